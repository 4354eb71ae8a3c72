//! The notification policy in one place: which new messages notify (each
//! once, ever, across processes: the store's claims), how they coalesce per
//! conversation, and when they show — at once, or, while a sync runs, held
//! until it ends and then shown or handed back to the app (push wake-ups).

use super::*;

use crate::store::Claimed;

/// The notifications of one client.
pub(super) struct Notifications {
    notifier: Option<Arc<dyn Notifier>>,
    /// While a sync is open: what it holds back.
    held: Option<Held>,
}

/// What an open sync holds back.
struct Held {
    /// Hand them to the app at the end instead of showing them.
    collect: bool,
    /// Claimed, one entry per conversation.
    claimed: Vec<Claimed>,
    /// Conversations read elsewhere meanwhile (their shown notification is
    /// cleared at the end).
    clears: Vec<u64>,
}

impl Notifications {
    pub(super) fn new(notifier: Option<Arc<dyn Notifier>>) -> Notifications {
        Notifications {
            notifier,
            held: None,
        }
    }

    /// A sync starts: hold everything until [`Notifications::release`].
    pub(super) fn hold(&mut self, collect: bool) {
        self.held = Some(Held {
            collect,
            claimed: Vec::new(),
            clears: Vec::new(),
        });
    }

    /// New messages were stored (not in the foreground: the user sees them).
    /// Claims those that may notify and shows them, or holds them for the
    /// open sync. Returns how many notifications were shown.
    pub(super) fn on_messages(
        &mut self,
        store: &mut Store,
        messages: &[Message],
        app: AppState,
        me: Option<&str>,
    ) -> u64 {
        let collecting = self.held.as_ref().is_some_and(|h| h.collect);
        if (self.notifier.is_none() && !collecting)
            || app == AppState::Foreground
            || messages.is_empty()
        {
            return 0;
        }
        let prefs = store.prefs().unwrap_or_default();
        let quiet = prefs.quiet_hours.is_some_and(|q| q.now());
        // Read on another device: never shown here.
        let mut read: HashMap<u64, u64> = HashMap::new();
        for m in messages {
            if let std::collections::hash_map::Entry::Vacant(e) = read.entry(m.conv) {
                e.insert(store.read_mark(m.conv).unwrap_or(0));
            }
        }
        let claimed = match store.claim_notifications(messages, |m| {
            prefs.may_show(m, me, quiet, read.get(&m.conv).copied().unwrap_or(0))
        }) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(target: "keepwire::notify", error = %e, "claiming notifications failed");
                return 0;
            }
        };
        match &mut self.held {
            // One coalesced notification per conversation for the whole sync.
            Some(held) => {
                for c in claimed {
                    match held.claimed.iter_mut().find(|d| d.conv == c.conv) {
                        Some(d) => {
                            d.shown.extend(c.shown);
                            d.unread = c.unread;
                            d.last_sender = c.last_sender;
                        }
                        None => held.claimed.push(c),
                    }
                }
                0
            }
            None => self.show(store, claimed),
        }
    }

    /// The user read `conv` up to `up_to` (here or on another device): drop
    /// what a sync holds back and clear the shown notification.
    pub(super) fn read_elsewhere(&mut self, conv: u64, up_to: u64) {
        match &mut self.held {
            Some(held) => {
                for d in &mut held.claimed {
                    if d.conv == conv {
                        d.shown.retain(|m| m.conv_seq > up_to);
                        d.unread = d.shown.len() as u64;
                    }
                }
                held.claimed.retain(|d| !d.shown.is_empty());
                // Cleared (or handed back) when the sync ends.
                if !held.clears.contains(&conv) {
                    held.clears.push(conv);
                }
            }
            None => self.clear_shown(conv),
        }
    }

    /// The sync ended: shows what it held (or hands it back if it collects).
    /// Returns what is handed back and how many notifications were shown
    /// or handed back.
    pub(super) fn release(&mut self, store: &Store) -> (Collected, u64) {
        let Some(held) = self.held.take() else {
            return (Collected::default(), 0);
        };
        if held.collect {
            let show = coalesced(store, held.claimed);
            for n in &show {
                let _ = store.log_notification(n.conv, n.unread);
            }
            let n = show.len() as u64;
            let collected = Collected {
                show,
                clear: held.clears,
            };
            (collected, n)
        } else {
            let n = self.show(store, held.claimed);
            for conv in held.clears {
                self.clear_shown(conv);
            }
            (Collected::default(), n)
        }
    }

    fn clear_shown(&self, conv: u64) {
        if let Some(n) = &self.notifier
            && let Err(e) = n.clear(conv)
        {
            tracing::warn!(target: "keepwire::notify", error = %e, "clearing a notification failed");
        }
    }

    /// Shows what was claimed, coalesced; returns how many were shown.
    fn show(&self, store: &Store, claimed: Vec<Claimed>) -> u64 {
        let Some(notifier) = &self.notifier else {
            return 0;
        };
        let mut shown = 0;
        for n in coalesced(store, claimed) {
            match notifier.notify(&n) {
                Ok(()) => {
                    let _ = store.log_notification(n.conv, n.unread);
                    shown += 1;
                }
                Err(e) => {
                    tracing::warn!(target: "keepwire::notify", error = %e, "showing a notification failed")
                }
            }
        }
        shown
    }
}

/// The coalesced notifications for what was claimed.
fn coalesced(store: &Store, claimed: Vec<Claimed>) -> Vec<Notification> {
    let previews = store.prefs().map(|p| p.previews).unwrap_or(true);
    claimed
        .iter()
        .map(|c| {
            let name = store.conv_name(c.conv).ok().flatten();
            coalesce(c, name.as_deref(), previews)
        })
        .collect()
}
