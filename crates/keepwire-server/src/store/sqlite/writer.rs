//! The single writer: one thread owns the only write connection and commits
//! queued jobs in groups (one fsync per group), then answers each job and
//! tells the head listener.

use std::sync::{Arc, OnceLock};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::store::{CrashPoint, HeadAdvance, HeadListener};

/// Most jobs one group commit takes.
const MAX_BATCH: usize = 1024;

/// The entries a group commit appended, for the head listener.
pub(super) type Heads = Vec<HeadAdvance>;
/// What a job does once the group's commit is known.
pub(super) type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A job runs inside the group transaction (or gets `None` when the
/// transaction could not be started) and returns what to do after the commit.
/// It sets the flag when it failed after writing: the whole group then rolls
/// back.
pub(super) type Job =
    Box<dyn FnOnce(Option<&Connection>, &mut Heads, &mut bool) -> Completion + Send>;

/// A request to the writer thread.
pub(super) enum WriterMsg {
    /// A job for the next group commit.
    Job(Job),
    /// Commit what is queued, checkpoint, stop; then answer.
    Close(oneshot::Sender<()>),
}

pub(super) fn writer_loop(
    conn: Connection,
    mut rx: mpsc::Receiver<WriterMsg>,
    listener: Arc<OnceLock<Arc<dyn HeadListener>>>,
    metrics: Arc<Metrics>,
) {
    let mut closing: Option<oneshot::Sender<()>> = None;
    let mut batch: Vec<Job> = Vec::new();
    loop {
        if closing.is_none() {
            match rx.blocking_recv() {
                Some(WriterMsg::Job(j)) => batch.push(j),
                Some(WriterMsg::Close(t)) => closing = Some(t),
                None => break,
            }
        }
        // Everything queued meanwhile joins this commit (and, when closing,
        // everything queued before the close request).
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(WriterMsg::Job(j)) => batch.push(j),
                Ok(WriterMsg::Close(t)) => closing = Some(t),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            if closing.is_some() {
                break;
            }
            continue;
        }
        run_batch(&conn, std::mem::take(&mut batch), &listener, &metrics, None);
    }
    rx.close();
    // Jobs that raced the close still get an answer.
    while let Ok(msg) = rx.try_recv() {
        if let WriterMsg::Job(j) = msg {
            batch.push(j);
        }
    }
    if !batch.is_empty() {
        run_batch(&conn, batch, &listener, &metrics, None);
    }
    // Leave a clean database: fold the WAL back into the main file.
    let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
    drop(conn);
    if let Some(t) = closing {
        let _ = t.send(());
    }
}

/// Runs one group commit: every job in one transaction, one fsync, then the
/// head notices, then the answers. `crash` (tests) stops it at that point:
/// nothing stored, stored without notices, or stored and noticed without
/// answers.
pub(super) fn run_batch(
    conn: &Connection,
    batch: Vec<Job>,
    listener: &OnceLock<Arc<dyn HeadListener>>,
    metrics: &Metrics,
    crash: Option<CrashPoint>,
) {
    if crash == Some(CrashPoint::BeforeCommit) {
        return;
    }
    let mut heads = Heads::new();
    let jobs = batch.len() as u64;
    let mut wrote_then_failed = false;
    let begun = conn.execute_batch("BEGIN IMMEDIATE");
    let completions: Vec<Completion> = match &begun {
        Ok(()) => batch
            .into_iter()
            .map(|job| job(Some(conn), &mut heads, &mut wrote_then_failed))
            .collect(),
        Err(e) => {
            tracing::error!(target: "keepwire::store", error = %e, "cannot begin a transaction");
            batch
                .into_iter()
                .map(|job| job(None, &mut heads, &mut wrote_then_failed))
                .collect()
        }
    };
    let commit = if wrote_then_failed {
        tracing::error!(target: "keepwire::store", "a job failed after writing: the group commit is rolled back");
        let _ = conn.execute_batch("ROLLBACK");
        Err("a write in the same group commit failed; nothing was stored".to_owned())
    } else if begun.is_ok() {
        match conn.execute_batch("COMMIT") {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(target: "keepwire::store", error = %e, "commit failed");
                let _ = conn.execute_batch("ROLLBACK");
                Err(e.to_string())
            }
        }
    } else {
        Err("could not begin a transaction".to_owned())
    };
    if crash == Some(CrashPoint::AfterCommit) {
        return;
    }
    if commit.is_ok() {
        metrics.commits.inc();
        metrics.committed_jobs.inc_by(jobs);
        if !heads.is_empty()
            && let Some(l) = listener.get()
        {
            l.heads_advanced(&heads);
        }
    }
    if crash == Some(CrashPoint::AfterHeads) {
        return;
    }
    for c in completions {
        c(commit.clone());
    }
}
