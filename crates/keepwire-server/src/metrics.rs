//! Prometheus metrics, one registry per relay (so several relays can run in
//! one process, as the tests do).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels for send outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `confirmed`, `duplicate` or a rejection code.
    pub result: String,
}

/// Labels for connection closes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The close code number.
    pub code: u16,
}

/// The relay's metrics.
pub struct Metrics {
    registry: Registry,
    /// Group commits (transactions) of the writer.
    pub commits: Counter,
    /// Jobs committed (sends, acks, membership changes, ...).
    pub committed_jobs: Counter,
    /// Sends answered, by result.
    pub sends: Family<ResultLabel, Counter>,
    /// Inbox entries written to sockets.
    pub deliveries: Counter,
    /// Connections accepted (after the handshake).
    pub connections_opened: Counter,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Connections closed by the server, by close code.
    pub closes: Family<CodeLabel, Counter>,
    /// Error frames sent.
    pub errors: Family<ResultLabel, Counter>,
    /// WebSocket upgrades refused, by reason (`origin`, `token_in_url`, `subprotocol`).
    pub refused_upgrades: Family<ResultLabel, Counter>,
    /// Store transactions retried, by cause (`deadlock`, `serialization`,
    /// `unique`, `connection`; PostgreSQL store).
    pub store_retries: Family<ResultLabel, Counter>,
    attached: std::sync::OnceLock<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keepwire");
        let commits = Counter::default();
        registry.register(
            "commits",
            "Group commits of the storage writer",
            commits.clone(),
        );
        let committed_jobs = Counter::default();
        registry.register(
            "committed_jobs",
            "Write jobs committed (sends, acks, membership changes)",
            committed_jobs.clone(),
        );
        let sends = Family::<ResultLabel, Counter>::default();
        registry.register("sends", "Sends answered, by result", sends.clone());
        let deliveries = Counter::default();
        registry.register(
            "deliveries",
            "Inbox entries written to sockets",
            deliveries.clone(),
        );
        let connections_opened = Counter::default();
        registry.register(
            "connections_opened",
            "Connections that completed the handshake",
            connections_opened.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Connections open now",
            connections_open.clone(),
        );
        let closes = Family::<CodeLabel, Counter>::default();
        registry.register(
            "closes",
            "Connections closed by the server, by close code",
            closes.clone(),
        );
        let errors = Family::<ResultLabel, Counter>::default();
        registry.register("errors", "Error frames sent, by code", errors.clone());
        let refused_upgrades = Family::<ResultLabel, Counter>::default();
        registry.register(
            "refused_upgrades",
            "WebSocket upgrades refused, by reason",
            refused_upgrades.clone(),
        );
        let store_retries = Family::<ResultLabel, Counter>::default();
        registry.register(
            "store_retries",
            "Store transactions retried, by cause",
            store_retries.clone(),
        );
        Metrics {
            registry,
            refused_upgrades,
            store_retries,
            commits,
            committed_jobs,
            sends,
            deliveries,
            connections_opened,
            connections_open,
            closes,
            errors,
            attached: std::sync::OnceLock::new(),
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        if let Some(extra) = self.attached.get() {
            let mut more = String::new();
            if prometheus_client::encoding::text::encode(&mut more, extra).is_ok() {
                // One exposition: a single `# EOF` at the end.
                if let Some(body) = out.strip_suffix("# EOF\n") {
                    out = format!("{body}{more}");
                }
            }
        }
        out
    }

    /// Adds another component's metrics (push) to the exposition. Only the
    /// first registry attached is kept.
    pub fn attach(&self, registry: Registry) {
        let _ = self.attached.set(registry);
    }

    /// Counts one retried store transaction.
    pub fn store_retry(&self, cause: &str) {
        self.store_retries
            .get_or_create(&ResultLabel {
                result: cause.to_owned(),
            })
            .inc();
    }

    /// Counts one refused WebSocket upgrade.
    pub fn refused_upgrade(&self, reason: &str) {
        self.refused_upgrades
            .get_or_create(&ResultLabel {
                result: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one send outcome.
    pub fn send_result(&self, result: &str) {
        self.sends
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }
}
