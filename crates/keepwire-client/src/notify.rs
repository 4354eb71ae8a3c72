//! Local notifications: preferences, coalescing, and the ways to show them.
//!
//! A message is notified at most once, whichever process receives it: the
//! claim is written in the store's transaction before it is shown
//! ([`crate::store::Store::claim_notifications`]). Notifications are raised
//! only while the app is not in the foreground, never for the user's own
//! messages, and are coalesced per conversation ("3 new messages from bob"),
//! replacing the previous one for that conversation (same `tag`).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;

use chrono::Timelike as _;
use keepwire_proto::Message;
use serde::{Deserialize, Serialize};

use crate::store::Claimed;

/// A notification to show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notification {
    /// The conversation to open when it is tapped.
    pub conv: u64,
    /// Replaces the previous notification with the same tag (one per conversation).
    pub tag: String,
    /// Title, e.g. "bob" or "3 new messages from bob".
    pub title: String,
    /// The last message's text, or "New message" when previews are off.
    pub body: String,
    /// Unread messages in the conversation.
    pub unread: u64,
    /// Messages newly covered by this notification.
    pub message_ids: Vec<u64>,
    /// The last sender.
    pub sender: String,
}

/// Shows notifications: desktop (D-Bus), a command hook, or an app callback.
pub trait Notifier: Send + Sync + 'static {
    /// Shows (or replaces) a notification. Errors are logged, not retried:
    /// the message stays in the store either way.
    fn notify(&self, n: &Notification) -> Result<(), String>;

    /// Removes the conversation's notification (it was read on another device).
    fn clear(&self, _conv: u64) -> Result<(), String> {
        Ok(())
    }
}

/// Runs a shell command for each notification, with the notification as JSON
/// on its standard input (`keepwire ... --notify-command CMD`).
pub struct CommandNotifier {
    command: String,
}

impl CommandNotifier {
    /// A notifier running `command` with `sh -c`.
    pub fn new(command: impl Into<String>) -> Self {
        CommandNotifier {
            command: command.into(),
        }
    }
}

impl CommandNotifier {
    fn run(&self, json: &str) -> Result<(), String> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {:?}: {e}", self.command))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(json.as_bytes());
            let _ = stdin.write_all(b"\n");
        }
        // Wait so the hook sees notifications in order, and reap it.
        child.wait().map_err(|e| e.to_string())?;
        Ok(())
    }
}

impl Notifier for CommandNotifier {
    fn notify(&self, n: &Notification) -> Result<(), String> {
        let mut v = serde_json::to_value(n).map_err(|e| e.to_string())?;
        v["action"] = "show".into();
        self.run(&v.to_string())
    }

    fn clear(&self, conv: u64) -> Result<(), String> {
        let v = serde_json::json!({"action": "clear", "conv": conv, "tag": format!("keepwire-conv-{conv}")});
        self.run(&v.to_string())
    }
}

/// What a [`CallbackNotifier`] is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifierCall {
    /// Show or replace this notification.
    Show(Notification),
    /// Remove the conversation's notification.
    Clear(u64),
}

/// Calls a function for each notification (for bindings and tests).
pub struct CallbackNotifier(Box<dyn Fn(NotifierCall) + Send + Sync>);

impl CallbackNotifier {
    /// A notifier calling `f`.
    pub fn new(f: impl Fn(NotifierCall) + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(CallbackNotifier(Box::new(f)))
    }
}

impl Notifier for CallbackNotifier {
    fn notify(&self, n: &Notification) -> Result<(), String> {
        (self.0)(NotifierCall::Show(n.clone()));
        Ok(())
    }

    fn clear(&self, conv: u64) -> Result<(), String> {
        (self.0)(NotifierCall::Clear(conv));
        Ok(())
    }
}

/// Desktop notifications over D-Bus (`org.freedesktop.Notifications`, as
/// shown by GNOME, KDE, dunst, mako...). One notification per conversation,
/// replaced in place as messages come in.
///
/// Message text is written by other users. Where the notification server
/// renders markup in the body (it advertises `body-markup`: GNOME, KDE,
/// dunst...), `&`, `<` and `>` are escaped, so a message cannot inject links,
/// images or formatting; the summary is plain text by the specification.
#[cfg(feature = "desktop")]
pub struct DesktopNotifier {
    shown: std::sync::Mutex<std::collections::HashMap<u64, notify_rust::NotificationHandle>>,
    body_markup: std::sync::OnceLock<bool>,
}

/// `text` for a notification body that the server renders as markup
/// (Desktop Notifications Specification, "Markup"): `&`, `<` and `>` as
/// entities. A NUL (which D-Bus strings cannot carry) becomes U+FFFD.
pub fn escape_markup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\0' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(feature = "desktop")]
impl DesktopNotifier {
    /// A notifier on the session bus (`DBUS_SESSION_BUS_ADDRESS`).
    pub fn new() -> Self {
        DesktopNotifier {
            shown: std::sync::Mutex::new(std::collections::HashMap::new()),
            body_markup: std::sync::OnceLock::new(),
        }
    }

    /// Whether the server renders markup in bodies (asked once; when it
    /// cannot be asked, assumed, so text is escaped rather than rendered).
    fn body_markup(&self) -> bool {
        *self.body_markup.get_or_init(|| {
            notify_rust::get_capabilities()
                .map(|caps| caps.iter().any(|c| c == "body-markup"))
                .unwrap_or(true)
        })
    }
}

#[cfg(feature = "desktop")]
impl Default for DesktopNotifier {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "desktop")]
impl Notifier for DesktopNotifier {
    fn notify(&self, n: &Notification) -> Result<(), String> {
        let mut shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        let body = if self.body_markup() {
            escape_markup(&n.body)
        } else {
            n.body.replace('\0', "\u{FFFD}")
        };
        let mut note = notify_rust::Notification::new();
        note.appname("keepwire")
            .summary(&n.title.replace('\0', "\u{FFFD}"))
            .body(&body)
            .hint(notify_rust::Hint::Category("im.received".into()))
            .hint(notify_rust::Hint::Custom(
                "x-keepwire-conv".into(),
                n.conv.to_string(),
            ));
        if let Some(h) = shown.get(&n.conv) {
            note.id(h.id());
        }
        let handle = note
            .show()
            .map_err(|e| format!("desktop notification failed: {e}"))?;
        shown.insert(n.conv, handle);
        Ok(())
    }

    fn clear(&self, conv: u64) -> Result<(), String> {
        if let Some(h) = self
            .shown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&conv)
        {
            h.close();
        }
        Ok(())
    }
}

/// Quiet hours in local time, `start..end` minutes of the day (may wrap midnight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietHours {
    /// Start, minutes after midnight.
    pub start: u16,
    /// End, minutes after midnight.
    pub end: u16,
}

impl QuietHours {
    /// Parses `HH:MM-HH:MM`.
    pub fn parse(s: &str) -> Option<QuietHours> {
        let (a, b) = s.split_once('-')?;
        let min = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        Some(QuietHours {
            start: min(a)?,
            end: min(b)?,
        })
    }

    /// Whether minute-of-day `m` is quiet. `start == end` means all day.
    pub fn contains(&self, m: u16) -> bool {
        if self.start == self.end {
            true
        } else if self.start < self.end {
            (self.start..self.end).contains(&m)
        } else {
            m >= self.start || m < self.end
        }
    }

    /// Whether it is quiet now, in local time.
    pub fn now(&self) -> bool {
        let t = chrono::Local::now();
        self.contains((t.hour() * 60 + t.minute()) as u16)
    }
}

impl std::fmt::Display for QuietHours {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

/// The user's preferences, kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefs {
    /// Conversations that never notify.
    #[serde(default)]
    pub muted: BTreeSet<u64>,
    /// No notifications during these hours.
    #[serde(default)]
    pub quiet_hours: Option<QuietHours>,
    /// Show message text in notifications.
    #[serde(default = "yes")]
    pub previews: bool,
    /// Background policy: `keep`, `linger:SECONDS` or `wake-only`.
    #[serde(default)]
    pub background: Option<String>,
    /// Command run for each notification (JSON on stdin).
    #[serde(default)]
    pub notify_command: Option<String>,
    /// Desktop notifications over D-Bus.
    #[serde(default)]
    pub desktop: bool,
}

fn yes() -> bool {
    true
}

impl Default for Prefs {
    fn default() -> Self {
        Prefs {
            muted: BTreeSet::new(),
            quiet_hours: None,
            previews: true,
            background: None,
            notify_command: None,
            desktop: false,
        }
    }
}

impl Prefs {
    /// The background policy these preferences ask for, if valid.
    pub fn background_policy(&self) -> Option<keepwire_core::BackgroundPolicy> {
        parse_policy(self.background.as_deref()?)
    }

    /// Whether a message may be shown now (not muted, not quiet, not `me`,
    /// not already read on another device: `read_up_to`).
    pub fn may_show(
        &self,
        m: &Message,
        me: Option<&str>,
        quiet_now: bool,
        read_up_to: u64,
    ) -> bool {
        me != Some(m.from.as_str())
            && !self.muted.contains(&m.conv)
            && !quiet_now
            && m.conv_seq > read_up_to
    }
}

/// Parses `keep`, `linger:SECONDS` (or `linger:5m`) and `wake-only`.
pub fn parse_policy(s: &str) -> Option<keepwire_core::BackgroundPolicy> {
    use keepwire_core::BackgroundPolicy as P;
    match s {
        "keep" | "keep-alive" => Some(P::KeepAlive),
        "wake-only" => Some(P::WakeOnly),
        other => {
            let d = other.strip_prefix("linger:")?;
            let secs = d.strip_suffix('s').unwrap_or(d);
            if let Some(m) = d.strip_suffix('m') {
                return m
                    .parse::<u64>()
                    .ok()
                    .map(|m| P::Linger(std::time::Duration::from_secs(m * 60)));
            }
            secs.parse::<u64>()
                .ok()
                .map(|s| P::Linger(std::time::Duration::from_secs(s)))
        }
    }
}

/// Builds the coalesced notification for one conversation's claimed messages.
pub fn coalesce(c: &Claimed, conv_name: Option<&str>, previews: bool) -> Notification {
    let title = match (c.unread, conv_name) {
        (1, _) => c.last_sender.clone(),
        (n, Some(name)) => format!("{n} new messages in {name}"),
        (n, None) => format!("{n} new messages from {}", c.last_sender),
    };
    let body = match (previews, c.shown.last()) {
        (true, Some(m)) => m.body.chars().take(200).collect(),
        _ => "New message".to_owned(),
    };
    Notification {
        conv: c.conv,
        tag: format!("keepwire-conv-{}", c.conv),
        title,
        body,
        unread: c.unread,
        message_ids: c.shown.iter().map(|m| m.id).collect(),
        sender: c.last_sender.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_escaped_for_the_notification_body() {
        assert_eq!(
            escape_markup("<b>1 & 2</b> <a href=\"https://evil\">x</a> <img src=\"file:///\"/>"),
            "&lt;b&gt;1 &amp; 2&lt;/b&gt; &lt;a href=\"https://evil\"&gt;x&lt;/a&gt; &lt;img src=\"file:///\"/&gt;"
        );
        assert_eq!(escape_markup("&amp;"), "&amp;amp;");
        assert_eq!(escape_markup("nul\0"), "nul\u{FFFD}");
        assert_eq!(escape_markup("plain ✓"), "plain ✓");
    }

    #[test]
    fn quiet_hours_wrap_midnight() {
        let q = QuietHours::parse("22:00-07:30").unwrap();
        assert!(q.contains(23 * 60));
        assert!(q.contains(3 * 60));
        assert!(!q.contains(12 * 60));
        assert!(!q.contains(7 * 60 + 30));
        assert_eq!(q.to_string(), "22:00-07:30");
        let day = QuietHours::parse("09:00-17:00").unwrap();
        assert!(day.contains(12 * 60) && !day.contains(18 * 60));
        assert!(QuietHours::parse("25:00-01:00").is_none());
        assert!(QuietHours::parse("nonsense").is_none());
        assert!(
            QuietHours::parse("00:00-00:00")
                .unwrap()
                .contains(23 * 60 + 59),
            "all day"
        );
    }

    #[test]
    fn policies_parse() {
        use keepwire_core::BackgroundPolicy as P;
        assert_eq!(parse_policy("keep"), Some(P::KeepAlive));
        assert_eq!(parse_policy("wake-only"), Some(P::WakeOnly));
        assert_eq!(
            parse_policy("linger:90"),
            Some(P::Linger(std::time::Duration::from_secs(90)))
        );
        assert_eq!(
            parse_policy("linger:5m"),
            Some(P::Linger(std::time::Duration::from_secs(300)))
        );
        assert_eq!(parse_policy("sometimes"), None);
    }
}
