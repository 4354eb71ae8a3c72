//! The dispatcher: bounded, non-blocking push delivery with retries, a
//! per-device rate limit, and one report per push.
//!
//! ```text
//!  relay ── enqueue(job) ──► lane (one per configured provider)
//!   (never blocks;           pending: min-heap by due time, bounded by `limits.queue`
//!    QueueFull is counted)   scheduler task: starts due jobs, at most `limits.concurrency`
//!                              at once, each under `limits.attempt_timeout`
//!                                 │ Attempt
//!                                 ▼
//!                            Delivered / Unregistered / ConfigError / Rejected → Report
//!                            Retry → back into pending after a backoff, until
//!                                    `limits.max_attempts`, then GaveUp → Report
//!  relay ◄── reports (mpsc) ──┘
//! ```
//!
//! - **Never blocks the caller**: [`Dispatcher::enqueue`] takes a short lock
//!   and returns; a full queue is an error the caller sees and a metric.
//!   Providers are independent lanes: one that hangs fills its own queue and
//!   holds its own concurrency slots, nothing else.
//! - **Every push is reported** exactly once on the channel returned by
//!   [`DispatcherBuilder::start`] (also on shutdown: [`Outcome::Abandoned`]).
//!   The channel is bounded; a relay that stops reading it stalls the
//!   lanes (which then refuse new pushes), never memory.
//! - **Backoff**: attempt *n* waits `backoff_base · 2^(n-1)` capped at
//!   `backoff_max`, with ±50 % jitter, but never less than the provider's
//!   `Retry-After` (capped at an hour) or its minimum (a minute after FCM
//!   `QUOTA_EXCEEDED`).
//! - **Per-device limit**: a token bucket per registration (burst
//!   `device_burst`, then one per `device_interval`); a push over the limit
//!   waits in the queue (counted as throttled), it is not dropped. Retries
//!   are not charged again.
//! - **Previews** are removed at enqueue unless the configuration allows them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use rand::Rng as _;
use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::apns::ApnsClient;
use crate::clock::{Clock, SystemClock};
use crate::config::{Limits, PushConfig};
use crate::fcm::FcmClient;
use crate::message::{Attempt, Message};
use crate::metrics::{FailureLabel, PushMetrics, label};
use crate::registration::{Endpoint, Provider, Registration, RegistrationError, RegistrationKey};
use crate::vapid::VapidKey;
use crate::webpush::{EndpointProbe, ProbeError, WebPushClient};

const TARGET: &str = "keepwire::push";

/// One push to send.
#[derive(Debug, Clone)]
pub struct PushJob {
    /// The caller's id for this push, echoed in its [`Report`].
    pub id: u64,
    /// Where to send it.
    pub registration: Registration,
    /// What to send.
    pub message: Message,
}

/// What became of one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The [`PushJob::id`].
    pub id: u64,
    /// The provider.
    pub provider: Provider,
    /// The registration's key (safe to log).
    pub registration: RegistrationKey,
    /// The outcome.
    pub outcome: Outcome,
}

/// The final outcome of one push.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The provider accepted it.
    Delivered {
        /// Round trip of the successful provider call.
        latency: Duration,
        /// From enqueue to the provider's acceptance.
        queued_for: Duration,
        /// Provider calls made (1 without retries).
        attempts: u32,
        /// Whether an encrypted preview went along.
        preview_sent: bool,
        /// The registration to store from now on, when the provider showed
        /// the stored one was wrong (an APNs token of the other environment).
        corrected: Option<Box<Registration>>,
    },
    /// The registration is dead: delete it.
    Unregistered {
        /// Provider and error code.
        reason: String,
    },
    /// The relay's provider configuration is wrong: alert the operator;
    /// keep the registration.
    ConfigError {
        /// Provider and error code.
        reason: String,
    },
    /// Refused for a reason retrying will not fix; keep the registration.
    Rejected {
        /// Provider and error code.
        reason: String,
    },
    /// Still failing after `limits.max_attempts` provider calls.
    GaveUp {
        /// Provider calls made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },
    /// The dispatcher shut down before the push was delivered.
    Abandoned,
}

/// Why [`Dispatcher::enqueue`] refused a push. The push was not queued and
/// will not be reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The provider's queue holds `limits.queue` pushes already.
    #[error("the {0} push queue is full")]
    QueueFull(Provider),
    /// The configuration has no section for this provider.
    #[error("no {0} configuration")]
    NotConfigured(Provider),
    /// The dispatcher is shutting down.
    #[error("the push dispatcher is shutting down")]
    ShuttingDown,
}

/// Why the dispatcher could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Web Push is configured but no VAPID key was given.
    #[error("[webpush] is configured but no VAPID key was given")]
    MissingVapidKey,
    /// An HTTP client could not be built (TLS roots, CA file).
    #[error("{0}: cannot build the HTTP client: {1}")]
    Http(Provider, reqwest::Error),
}

/// A provider client.
#[derive(Debug, Clone)]
enum Sender {
    Fcm(Arc<FcmClient>),
    Apns(Arc<ApnsClient>),
    WebPush(Arc<WebPushClient>),
}

impl Sender {
    async fn send(&self, registration: &Registration, msg: &Message) -> Attempt {
        match self {
            Sender::Fcm(c) => c.send(registration, msg).await,
            Sender::Apns(c) => c.send(registration, msg).await,
            Sender::WebPush(c) => c.send(registration, msg).await,
        }
    }
}

/// A queued push.
#[derive(Debug)]
struct Queued {
    job: PushJob,
    key: RegistrationKey,
    enqueued: Instant,
    attempts: u32,
    seq: u64,
}

#[derive(Debug)]
struct Pending {
    due: Instant,
    seq: u64,
    item: Box<Queued>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// A lane's queue, shared by `enqueue`, the scheduler and the metrics.
#[derive(Debug, Default)]
pub(crate) struct LaneState {
    pending: BinaryHeap<Reverse<Pending>>,
    /// Enqueue times of the pushes in flight, by sequence number.
    in_flight: HashMap<u64, Instant>,
    closed: bool,
    next_seq: u64,
}

impl LaneState {
    /// Pushes waiting or in flight.
    pub(crate) fn depth(&self) -> usize {
        self.pending.len() + self.in_flight.len()
    }

    /// Age of the oldest push waiting or in flight.
    pub(crate) fn oldest_age(&self) -> Option<Duration> {
        let oldest = self
            .pending
            .iter()
            .map(|p| p.0.item.enqueued)
            .chain(self.in_flight.values().copied())
            .min()?;
        Some(oldest.elapsed())
    }

    fn push(&mut self, due: Instant, item: Box<Queued>) {
        self.pending.push(Reverse(Pending {
            due,
            seq: item.seq,
            item,
        }));
    }
}

#[derive(Debug)]
struct Lane {
    state: Arc<Mutex<LaneState>>,
    wake: Arc<Notify>,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Inner {
    lanes: HashMap<Provider, Lane>,
    limits: Limits,
    previews: bool,
    cancel: CancellationToken,
    /// Milliseconds calls in flight may take to finish after a shutdown.
    grace_ms: Arc<AtomicU64>,
    metrics: PushMetrics,
    config: PushConfig,
    webpush: Option<Arc<WebPushClient>>,
    vapid: Option<Arc<VapidKey>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: stop the lanes (they report what is left
        // as abandoned).
        self.cancel.cancel();
    }
}

/// Sends pushes through the configured providers. Cheap to clone; every
/// clone feeds the same lanes. See the module docs.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

/// Builds a [`Dispatcher`].
#[derive(Debug)]
pub struct DispatcherBuilder {
    config: PushConfig,
    vapid: Option<VapidKey>,
    clock: Arc<dyn Clock>,
    reports: usize,
}

impl DispatcherBuilder {
    /// The relay's VAPID key (required when `[webpush]` is configured).
    pub fn vapid(mut self, key: VapidKey) -> Self {
        self.vapid = Some(key);
        self
    }

    /// The wall clock for JWTs and token caches (tests use a `ManualClock`).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Capacity of the report channel (default 1024).
    pub fn report_capacity(mut self, n: usize) -> Self {
        self.reports = n.max(1);
        self
    }

    /// Builds the provider clients, registers the metrics under `registry`
    /// (sub-registry `push`) and starts one scheduler task per configured
    /// provider. Must run inside a tokio runtime. Returns the dispatcher and
    /// the channel every [`Report`] arrives on.
    pub fn start(
        self,
        registry: Option<&mut Registry>,
    ) -> Result<(Dispatcher, mpsc::Receiver<Report>), StartError> {
        let DispatcherBuilder {
            config,
            vapid,
            clock,
            reports,
        } = self;
        let timeout = config.limits.attempt_timeout;
        let mut senders = Vec::new();
        if let Some(c) = &config.fcm {
            let client = FcmClient::new(c, clock.clone(), timeout)
                .map_err(|e| StartError::Http(Provider::Fcm, e))?;
            senders.push((Provider::Fcm, Sender::Fcm(Arc::new(client))));
        }
        if let Some(c) = &config.apns {
            let client = ApnsClient::new(c, clock.clone(), timeout)
                .map_err(|e| StartError::Http(Provider::Apns, e))?;
            senders.push((Provider::Apns, Sender::Apns(Arc::new(client))));
        }
        let vapid = vapid.map(Arc::new);
        let mut webpush = None;
        if let Some(c) = &config.webpush {
            let key = vapid.clone().ok_or(StartError::MissingVapidKey)?;
            let client = Arc::new(
                WebPushClient::new(c, key, clock.clone(), timeout)
                    .map_err(|e| StartError::Http(Provider::WebPush, e))?,
            );
            webpush = Some(client.clone());
            senders.push((Provider::WebPush, Sender::WebPush(client)));
        }

        let (tx, rx) = mpsc::channel(reports);
        let cancel = CancellationToken::new();
        let grace_ms = Arc::new(AtomicU64::new(0));
        let metrics = PushMetrics::default();
        let mut lanes = HashMap::new();
        let mut lane_states = Vec::new();
        for (provider, sender) in senders {
            let state = Arc::new(Mutex::new(LaneState::default()));
            let wake = Arc::new(Notify::new());
            lane_states.push((provider, state.clone()));
            let scheduler = Scheduler {
                provider,
                sender,
                state: state.clone(),
                wake: wake.clone(),
                limits: config.limits.clone(),
                reports: tx.clone(),
                metrics: metrics.clone(),
                cancel: cancel.clone(),
                grace_ms: grace_ms.clone(),
                buckets: HashMap::new(),
                running: HashMap::new(),
            };
            let task = tokio::spawn(scheduler.run());
            lanes.insert(
                provider,
                Lane {
                    state,
                    wake,
                    task: Mutex::new(Some(task)),
                },
            );
        }
        if let Some(r) = registry {
            metrics.register(r, lane_states);
        }
        let inner = Inner {
            lanes,
            limits: config.limits.clone(),
            previews: config.previews,
            cancel,
            grace_ms,
            metrics,
            config,
            webpush,
            vapid,
        };
        Ok((
            Dispatcher {
                inner: Arc::new(inner),
            },
            rx,
        ))
    }
}

impl Dispatcher {
    /// A builder for a dispatcher with `config`.
    pub fn builder(config: PushConfig) -> DispatcherBuilder {
        DispatcherBuilder {
            config,
            vapid: None,
            clock: Arc::new(SystemClock),
            reports: 1024,
        }
    }

    /// Queues a push. Never blocks and never waits for a provider. On `Ok`,
    /// exactly one [`Report`] with `job.id` will follow; on `Err` none.
    pub fn enqueue(&self, mut job: PushJob) -> Result<(), EnqueueError> {
        let provider = job.registration.provider();
        let lane = self
            .inner
            .lanes
            .get(&provider)
            .ok_or(EnqueueError::NotConfigured(provider))?;
        if !self.inner.previews {
            job.message.preview = None;
        }
        {
            let mut st = lane.state.lock().expect("lane lock");
            if st.closed {
                return Err(EnqueueError::ShuttingDown);
            }
            if st.depth() >= self.inner.limits.queue {
                drop(st);
                let refused = self
                    .inner
                    .metrics
                    .queue_full
                    .get_or_create(&label(provider))
                    .inc()
                    + 1;
                // Log the 1st, 2nd, 4th, 8th... refusal: an overload must
                // not also flood the log (the counter has every one).
                if refused.is_power_of_two() {
                    tracing::warn!(target: TARGET, provider = provider.as_str(), refused, "push queue full; pushes refused");
                }
                return Err(EnqueueError::QueueFull(provider));
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            let now = Instant::now();
            let item = Box::new(Queued {
                key: job.registration.key(),
                job,
                enqueued: now,
                attempts: 0,
                seq,
            });
            st.push(now, item);
        }
        self.inner
            .metrics
            .enqueued
            .get_or_create(&label(provider))
            .inc();
        lane.wake.notify_one();
        Ok(())
    }

    /// Pushes waiting or in flight for `provider` (0 if not configured).
    pub fn queue_depth(&self, provider: Provider) -> usize {
        self.inner
            .lanes
            .get(&provider)
            .map(|l| l.state.lock().expect("lane lock").depth())
            .unwrap_or(0)
    }

    /// Whether `provider` is configured.
    pub fn has_provider(&self, provider: Provider) -> bool {
        self.inner.lanes.contains_key(&provider)
    }

    /// The metrics handles (also registered, when a registry was given).
    pub fn metrics(&self) -> &PushMetrics {
        &self.inner.metrics
    }

    /// Whether this relay accepts `registration` (see
    /// [`PushConfig::check_registration`]).
    pub fn check_registration(&self, registration: &Registration) -> Result<(), RegistrationError> {
        self.inner.config.check_registration(registration)
    }

    /// The VAPID public key as base64url, for `GET /v1/push/vapid` and the
    /// `welcome` (None without a key).
    pub fn vapid_public_key(&self) -> Option<String> {
        self.inner.vapid.as_ref().map(|k| k.public_key_base64())
    }

    /// Checks a Web Push endpoint with a `GET` (see
    /// [`WebPushClient::probe_unifiedpush`]); call it at registration.
    pub async fn probe_unifiedpush(
        &self,
        endpoint: &Endpoint,
    ) -> Result<EndpointProbe, ProbeError> {
        match &self.inner.webpush {
            Some(c) => c.probe_unifiedpush(endpoint).await,
            None => Err(ProbeError::Refused("no [webpush] configuration".into())),
        }
    }

    /// Stops accepting pushes, lets calls in flight finish for up to
    /// `grace`, and reports everything left as [`Outcome::Abandoned`].
    /// Returns when every lane has stopped.
    pub async fn shutdown(&self, grace: Duration) {
        for lane in self.inner.lanes.values() {
            lane.state.lock().expect("lane lock").closed = true;
        }
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.inner.grace_ms.store(grace_ms, Ordering::Relaxed);
        self.inner.cancel.cancel();
        // The schedulers honour the grace themselves; this bounds one stuck
        // on a report channel nobody reads.
        let deadline = Instant::now() + grace + Duration::from_secs(1);
        for lane in self.inner.lanes.values() {
            let task = lane.task.lock().expect("task lock").take();
            if let Some(mut task) = task
                && tokio::time::timeout_at(deadline, &mut task).await.is_err()
            {
                task.abort();
            }
        }
    }
}

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn level(&self, now: Instant, burst: f64, interval: Duration) -> f64 {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() / interval.as_secs_f64();
        (self.tokens + refill).min(burst)
    }
}

/// One lane's scheduler task.
struct Scheduler {
    provider: Provider,
    sender: Sender,
    state: Arc<Mutex<LaneState>>,
    wake: Arc<Notify>,
    limits: Limits,
    reports: mpsc::Sender<Report>,
    metrics: PushMetrics,
    cancel: CancellationToken,
    grace_ms: Arc<AtomicU64>,
    buckets: HashMap<RegistrationKey, Bucket>,
    /// What is needed to report a call whose task panicked or was aborted.
    running: HashMap<tokio::task::Id, Running>,
}

#[derive(Debug, Clone, Copy)]
struct Running {
    key: RegistrationKey,
    id: u64,
    seq: u64,
    attempts: u32,
}

type Done = (Box<Queued>, Attempt);

impl Scheduler {
    async fn run(mut self) {
        let mut tasks: JoinSet<Done> = JoinSet::new();
        loop {
            let next_due = self.start_due(&mut tasks);
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    self.finished(done, false).await;
                }
                _ = self.wake.notified() => {}
                _ = sleep_until_opt(next_due) => {}
            }
        }
        self.stop(tasks).await;
    }

    /// Starts every due push there is a slot for; returns when the next
    /// waiting push is due (None when nothing waits or no slot is free).
    fn start_due(&mut self, tasks: &mut JoinSet<Done>) -> Option<Instant> {
        let now = Instant::now();
        let state = self.state.clone();
        let mut st = state.lock().expect("lane lock");
        loop {
            if tasks.len() >= self.limits.concurrency {
                return None;
            }
            let due = st.pending.peek()?.0.due;
            if due > now {
                return Some(due);
            }
            let Reverse(p) = st.pending.pop().expect("peeked");
            let item = p.item;
            // Retries are not charged again.
            if item.attempts == 0
                && let Err(ready) = self.take_token(item.key, now)
            {
                self.metrics
                    .throttled
                    .get_or_create(&label(self.provider))
                    .inc();
                st.push(ready, item);
                continue;
            }
            st.in_flight.insert(item.seq, item.enqueued);
            let sender = self.sender.clone();
            let timeout = self.limits.attempt_timeout;
            let meta = Running {
                key: item.key,
                id: item.job.id,
                seq: item.seq,
                attempts: item.attempts,
            };
            let handle = tasks.spawn(async move {
                let attempt = match tokio::time::timeout(
                    timeout,
                    sender.send(&item.job.registration, &item.job.message),
                )
                .await
                {
                    Ok(a) => a,
                    Err(_) => Attempt::retry("the provider did not answer in time".into()),
                };
                (item, attempt)
            });
            self.running.insert(handle.id(), meta);
        }
    }

    /// The per-device limit: Ok if `key` may send now, else when it may.
    fn take_token(&mut self, key: RegistrationKey, now: Instant) -> Result<(), Instant> {
        let burst = f64::from(self.limits.device_burst.max(1));
        let interval = self.limits.device_interval;
        if self.buckets.len() > self.limits.queue.saturating_mul(2).max(1024) {
            // Forget devices whose bucket is full again: they behave as new.
            self.buckets
                .retain(|_, b| b.level(now, burst, interval) < burst);
        }
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let level = b.level(now, burst, interval);
        if level >= 1.0 {
            b.tokens = level - 1.0;
            b.at = now;
            Ok(())
        } else {
            Err(now + interval.mul_f64(1.0 - level))
        }
    }

    /// Handles a finished provider call. When `stopping`, retries are not
    /// rescheduled but abandoned.
    async fn finished(
        &mut self,
        done: Result<(tokio::task::Id, Done), tokio::task::JoinError>,
        stopping: bool,
    ) {
        let (mut item, attempt) = match done {
            Ok((id, d)) => {
                self.running.remove(&id);
                d
            }
            Err(e) => {
                // The task panicked or was aborted: report from what we kept.
                let Some(Running {
                    key,
                    id,
                    seq,
                    attempts,
                }) = self.running.remove(&e.id())
                else {
                    return;
                };
                self.state.lock().expect("lane lock").in_flight.remove(&seq);
                let outcome = if e.is_cancelled() {
                    self.fail("abandoned");
                    Outcome::Abandoned
                } else {
                    tracing::error!(target: TARGET, provider = self.provider.as_str(), "push task panicked");
                    self.fail("gave_up");
                    Outcome::GaveUp {
                        attempts: attempts + 1,
                        reason: format!("{}: the provider client panicked", self.provider),
                    }
                };
                self.report(id, key, outcome).await;
                return;
            }
        };
        item.attempts += 1;
        let p = self.provider.as_str();
        let reg = item.key;
        let outcome = match attempt {
            Attempt::Delivered {
                latency,
                preview_sent,
                corrected,
            } => {
                self.metrics.sent.get_or_create(&label(self.provider)).inc();
                self.metrics
                    .latency
                    .get_or_create(&label(self.provider))
                    .observe(latency.as_secs_f64());
                tracing::debug!(target: TARGET, provider = p, %reg, attempts = item.attempts, ?latency, "push delivered");
                Outcome::Delivered {
                    latency,
                    queued_for: item.enqueued.elapsed(),
                    attempts: item.attempts,
                    preview_sent,
                    corrected,
                }
            }
            Attempt::Unregistered { reason } => {
                self.metrics
                    .dropped
                    .get_or_create(&label(self.provider))
                    .inc();
                self.fail("unregistered");
                tracing::info!(target: TARGET, provider = p, %reg, %reason, "push registration is dead");
                Outcome::Unregistered { reason }
            }
            Attempt::ConfigError { reason } => {
                self.fail("config");
                tracing::error!(target: TARGET, provider = p, %reg, %reason, "push configuration error: check the [{p}] settings");
                Outcome::ConfigError { reason }
            }
            Attempt::Rejected { reason } => {
                self.fail("rejected");
                tracing::warn!(target: TARGET, provider = p, %reg, %reason, "push rejected");
                Outcome::Rejected { reason }
            }
            Attempt::Retry {
                after,
                at_least,
                reason,
            } => {
                if stopping {
                    self.fail("abandoned");
                    Outcome::Abandoned
                } else if item.attempts >= self.limits.max_attempts {
                    self.fail("gave_up");
                    tracing::warn!(target: TARGET, provider = p, %reg, attempts = item.attempts, %reason, "push given up");
                    Outcome::GaveUp {
                        attempts: item.attempts,
                        reason,
                    }
                } else {
                    self.metrics
                        .retried
                        .get_or_create(&label(self.provider))
                        .inc();
                    let delay = self.backoff(item.attempts, after, at_least);
                    tracing::debug!(target: TARGET, provider = p, %reg, attempts = item.attempts, ?delay, %reason, "push will be retried");
                    let mut st = self.state.lock().expect("lane lock");
                    st.in_flight.remove(&item.seq);
                    st.push(Instant::now() + delay, item);
                    return;
                }
            }
        };
        self.state
            .lock()
            .expect("lane lock")
            .in_flight
            .remove(&item.seq);
        self.report(item.job.id, reg, outcome).await;
    }

    /// The delay before attempt `attempts + 1`.
    fn backoff(&self, attempts: u32, after: Option<Duration>, at_least: Duration) -> Duration {
        let base = self.limits.backoff_base.max(at_least);
        let cap = self.limits.backoff_max.max(at_least);
        let exp = base.saturating_mul(1u32 << (attempts - 1).min(20)).min(cap);
        let jittered = exp
            .mul_f64(rand::rng().random_range(0.5..1.5))
            .min(cap)
            .max(at_least);
        jittered.max(after.unwrap_or(Duration::ZERO))
    }

    fn fail(&self, reason: &'static str) {
        self.metrics
            .failed
            .get_or_create(&FailureLabel {
                provider: self.provider.as_str(),
                reason,
            })
            .inc();
    }

    async fn report(&self, id: u64, registration: RegistrationKey, outcome: Outcome) {
        let report = Report {
            id,
            provider: self.provider,
            registration,
            outcome,
        };
        // Err only when the relay dropped the receiver: nobody is listening.
        let _ = self.reports.send(report).await;
    }

    /// Shutdown: wait for calls in flight up to the grace the caller gave
    /// (none when the dispatcher was dropped), abort the rest, and report
    /// everything left as abandoned.
    async fn stop(mut self, mut tasks: JoinSet<Done>) {
        self.state.lock().expect("lane lock").closed = true;
        let grace = Instant::now()
            + Duration::from_millis(self.grace_ms.load(Ordering::Relaxed))
                .min(self.limits.attempt_timeout);
        while !tasks.is_empty() {
            tokio::select! {
                Some(done) = tasks.join_next_with_id() => self.finished(done, true).await,
                _ = tokio::time::sleep_until(grace) => break,
            }
        }
        tasks.abort_all();
        while let Some(done) = tasks.join_next_with_id().await {
            self.finished(done, true).await;
        }
        let left: Vec<Box<Queued>> = {
            let mut st = self.state.lock().expect("lane lock");
            st.in_flight.clear();
            std::mem::take(&mut st.pending)
                .into_iter()
                .map(|p| p.0.item)
                .collect()
        };
        for item in left {
            self.fail("abandoned");
            self.report(item.job.id, item.key, Outcome::Abandoned).await;
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(limits: Limits) -> Scheduler {
        let (tx, _rx) = mpsc::channel(1);
        let cfg = crate::config::WebPushConfig {
            subject: "mailto:a@b".into(),
            allow_private: vec![],
        };
        let client = WebPushClient::new(
            &cfg,
            Arc::new(VapidKey::generate()),
            Arc::new(SystemClock),
            Duration::from_secs(1),
        )
        .unwrap();
        Scheduler {
            provider: Provider::WebPush,
            sender: Sender::WebPush(Arc::new(client)),
            state: Arc::default(),
            wake: Arc::default(),
            limits,
            reports: tx,
            metrics: PushMetrics::default(),
            cancel: CancellationToken::new(),
            grace_ms: Arc::default(),
            buckets: HashMap::new(),
            running: HashMap::new(),
        }
    }

    #[tokio::test]
    async fn backoff_grows_is_capped_and_honours_retry_after() {
        let s = scheduler(Limits {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            ..Limits::default()
        });
        for _ in 0..50 {
            let d1 = s.backoff(1, None, Duration::ZERO);
            assert!(
                d1 >= Duration::from_millis(500) && d1 <= Duration::from_millis(1500),
                "{d1:?}"
            );
            let d4 = s.backoff(4, None, Duration::ZERO);
            assert!(
                d4 >= Duration::from_secs(4) && d4 <= Duration::from_secs(12),
                "{d4:?}"
            );
            assert!(s.backoff(30, None, Duration::ZERO) <= Duration::from_secs(60));
            assert!(
                s.backoff(1, Some(Duration::from_secs(30)), Duration::ZERO)
                    >= Duration::from_secs(30)
            );
            // QUOTA_EXCEEDED: at least a minute, growing from there.
            assert!(s.backoff(1, None, Duration::from_secs(60)) >= Duration::from_secs(60));
            assert!(s.backoff(3, None, Duration::from_secs(60)) <= Duration::from_secs(60));
        }
    }

    #[tokio::test]
    async fn device_bucket_allows_a_burst_then_one_per_interval() {
        let mut s = scheduler(Limits {
            device_burst: 3,
            device_interval: Duration::from_secs(60),
            ..Limits::default()
        });
        let key = RegistrationKey([1; 32]);
        let other = RegistrationKey([2; 32]);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(s.take_token(key, t0).is_ok());
        }
        let ready = s.take_token(key, t0).unwrap_err();
        assert_eq!(ready, t0 + Duration::from_secs(60));
        assert!(s.take_token(other, t0).is_ok(), "devices are independent");
        assert!(s.take_token(key, t0 + Duration::from_secs(30)).is_err());
        assert!(s.take_token(key, t0 + Duration::from_secs(60)).is_ok());
        assert!(s.take_token(key, t0 + Duration::from_secs(61)).is_err());
    }
}
