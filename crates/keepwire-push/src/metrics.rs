//! Push metrics, per provider (`provider` = `fcm`, `apns`, `webpush`; no
//! other label ever carries a token, endpoint or registration).
//!
//! Registered under the sub-registry `push` of the registry given to
//! `DispatcherBuilder::start`, so with the relay's `keepwire` prefix:
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `keepwire_push_enqueued_total` | counter | pushes accepted by `enqueue` |
//! | `keepwire_push_queue_full_total` | counter | pushes refused because the provider's queue was full |
//! | `keepwire_push_sent_total` | counter | pushes the provider accepted |
//! | `keepwire_push_failed_total{reason}` | counter | pushes not delivered: `unregistered`, `config`, `rejected`, `gave_up`, `abandoned` |
//! | `keepwire_push_retried_total` | counter | provider calls retried after a transient failure |
//! | `keepwire_push_registrations_dropped_total` | counter | registrations the provider declared dead |
//! | `keepwire_push_throttled_total` | counter | pushes delayed by the per-device limit |
//! | `keepwire_push_latency_seconds` | histogram | round trip of successful provider calls |
//! | `keepwire_push_queue_depth` | gauge | pushes waiting or in flight now |
//! | `keepwire_push_oldest_pending_seconds` | gauge | age of the oldest push waiting or in flight |

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::dispatch::LaneState;
use crate::registration::Provider;

/// The `provider` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    /// `fcm`, `apns` or `webpush`.
    pub provider: &'static str,
}

/// The `provider` and `reason` labels of failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    /// `fcm`, `apns` or `webpush`.
    pub provider: &'static str,
    /// `unregistered`, `config`, `rejected`, `gave_up` or `abandoned`.
    pub reason: &'static str,
}

type LatencyFamily = Family<ProviderLabel, Histogram, fn() -> Histogram>;

/// The dispatcher's metrics (handles are cheap clones of shared counters).
#[derive(Debug, Clone)]
pub struct PushMetrics {
    /// Pushes accepted by `enqueue`.
    pub enqueued: Family<ProviderLabel, Counter>,
    /// Pushes refused because the queue was full.
    pub queue_full: Family<ProviderLabel, Counter>,
    /// Pushes the provider accepted.
    pub sent: Family<ProviderLabel, Counter>,
    /// Pushes not delivered, by reason.
    pub failed: Family<FailureLabel, Counter>,
    /// Provider calls retried.
    pub retried: Family<ProviderLabel, Counter>,
    /// Registrations the provider declared dead.
    pub dropped: Family<ProviderLabel, Counter>,
    /// Pushes delayed by the per-device limit.
    pub throttled: Family<ProviderLabel, Counter>,
    /// Round trip of successful provider calls, in seconds.
    pub latency: LatencyFamily,
}

fn latency_histogram() -> Histogram {
    // 5 ms .. ~20 s
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

impl Default for PushMetrics {
    fn default() -> Self {
        PushMetrics {
            enqueued: Family::default(),
            queue_full: Family::default(),
            sent: Family::default(),
            failed: Family::default(),
            retried: Family::default(),
            dropped: Family::default(),
            throttled: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        }
    }
}

/// The label of `p`.
pub(crate) fn label(p: Provider) -> ProviderLabel {
    ProviderLabel {
        provider: p.as_str(),
    }
}

impl PushMetrics {
    /// Registers the metrics and the queue gauges (read from `lanes` at each
    /// scrape) under `registry`'s sub-registry `push`.
    pub(crate) fn register(
        &self,
        registry: &mut Registry,
        lanes: Vec<(Provider, Arc<Mutex<LaneState>>)>,
    ) {
        let r = registry.sub_registry_with_prefix("push");
        r.register(
            "enqueued",
            "Pushes accepted by enqueue",
            self.enqueued.clone(),
        );
        r.register(
            "queue_full",
            "Pushes refused because the provider's queue was full",
            self.queue_full.clone(),
        );
        r.register("sent", "Pushes the provider accepted", self.sent.clone());
        r.register(
            "failed",
            "Pushes not delivered, by reason",
            self.failed.clone(),
        );
        r.register(
            "retried",
            "Provider calls retried after a transient failure",
            self.retried.clone(),
        );
        r.register(
            "registrations_dropped",
            "Registrations the provider declared dead",
            self.dropped.clone(),
        );
        r.register(
            "throttled",
            "Pushes delayed by the per-device limit",
            self.throttled.clone(),
        );
        r.register(
            "latency_seconds",
            "Round trip of successful provider calls",
            self.latency.clone(),
        );
        r.register_collector(Box::new(QueueCollector { lanes }));
    }
}

/// Reads queue depth and the oldest pending age at scrape time.
#[derive(Debug)]
struct QueueCollector {
    lanes: Vec<(Provider, Arc<Mutex<LaneState>>)>,
}

impl Collector for QueueCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snapshot: Vec<(Provider, usize, f64)> = self
            .lanes
            .iter()
            .map(|(p, s)| {
                let s = s.lock().expect("lane lock");
                (
                    *p,
                    s.depth(),
                    s.oldest_age().map(|d| d.as_secs_f64()).unwrap_or(0.0),
                )
            })
            .collect();
        let mut depth = encoder.encode_descriptor(
            "queue_depth",
            "Pushes waiting or in flight now",
            None,
            MetricType::Gauge,
        )?;
        for (p, d, _) in &snapshot {
            ConstGauge::new(*d as i64).encode(depth.encode_family(&label(*p))?)?;
        }
        let mut oldest = encoder.encode_descriptor(
            "oldest_pending_seconds",
            "Age of the oldest push waiting or in flight",
            None,
            MetricType::Gauge,
        )?;
        for (p, _, age) in &snapshot {
            ConstGauge::new(*age).encode(oldest.encode_family(&label(*p))?)?;
        }
        Ok(())
    }
}
