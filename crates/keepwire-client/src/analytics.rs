//! Connection analytics: what the connection did, from the store's logs
//! (`keepwire stats`). Uptime while a connection was wanted, reconnects and
//! how long they took, background heartbeats per hour, messages received in
//! the background and by sync, notifications; and a timeline picture (SVG).

use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::params;
use serde::Serialize;

use keepwire_core::{AppState, State};

use crate::store::{Store, StoreError};

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Logs a connection state change.
    pub fn log_state(
        &self,
        state: &str,
        app: &str,
        network: Option<&str>,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO conn_log (at, state, app, network, reason) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![now_ms(), state, app, network, reason])?;
        Ok(())
    }

    /// Logs a background heartbeat and whether the path kept the connection.
    pub fn log_heartbeat(
        &self,
        network: &str,
        interval_ms: u64,
        ok: bool,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO hb_log (at, network, interval_ms, ok) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![now_ms(), network, interval_ms as i64, ok])?;
        Ok(())
    }

    /// Logs a batch of received messages.
    pub fn log_received(&self, app: &str, via: &str, count: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO recv_log (at, app, via, count) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![now_ms(), app, via, count as i64])?;
        Ok(())
    }

    /// Logs a notification shown.
    pub fn log_notification(&self, conv: u64, count: u64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT INTO notif_log (at, conv, count) VALUES (?1, ?2, ?3)")?
            .execute(params![now_ms(), conv as i64, count as i64])?;
        Ok(())
    }
}

/// A stretch of time in one state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// Start, ms since the Unix epoch.
    pub from: i64,
    /// End, ms since the Unix epoch.
    pub to: i64,
    /// Connection state.
    pub state: String,
    /// App state.
    pub app: String,
}

/// Statistics over a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// Window start and end, ms since the Unix epoch.
    pub from: i64,
    /// Window end.
    pub to: i64,
    /// Time a connection was wanted (not idle, dormant or stopped), ms.
    pub wanted_ms: i64,
    /// Time connected while wanted, ms.
    pub connected_ms: i64,
    /// connected ÷ wanted.
    pub uptime: f64,
    /// Times the connection came back after being lost.
    pub reconnects: u64,
    /// Time to reconnect, median, ms.
    pub reconnect_p50_ms: Option<i64>,
    /// Time to reconnect, 95th percentile, ms.
    pub reconnect_p95_ms: Option<i64>,
    /// Time connected in the background, hours.
    pub background_connected_hours: f64,
    /// Background heartbeats (tested intervals).
    pub background_heartbeats: u64,
    /// Background heartbeats per connected hour.
    pub background_heartbeats_per_hour: Option<f64>,
    /// Messages received while in the background (over the socket).
    pub received_background: u64,
    /// Messages received by sync.
    pub received_by_sync: u64,
    /// Notifications raised.
    pub notifications: u64,
    /// The timeline.
    pub segments: Vec<Segment>,
}

/// Whether the client wanted a connection in this recorded state (an
/// unknown name, e.g. an older version's "stopped", counts as not wanted).
fn wanted(state: &str) -> bool {
    State::from_name(state)
        .is_some_and(|s| !matches!(s, State::Idle | State::Dormant | State::Stopped(_)))
}

/// Computes statistics for `[from, to]` from the logs.
pub fn stats(store: &Store, from: i64, to: i64) -> Result<Stats, StoreError> {
    let c = &store.conn;
    // The state in force at `from`, then every change in the window.
    let mut rows: Vec<(i64, String, String)> = Vec::new();
    if let Ok((state, app)) = c.query_row(
        "SELECT state, app FROM conn_log WHERE at < ?1 ORDER BY id DESC LIMIT 1",
        [from],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
    ) {
        rows.push((from, state, app));
    }
    let mut stmt =
        c.prepare("SELECT at, state, app FROM conn_log WHERE at >= ?1 AND at <= ?2 ORDER BY id")?;
    for r in stmt.query_map(params![from, to], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))? {
        rows.push(r?);
    }
    let mut segments = Vec::new();
    for (i, (at, state, app)) in rows.iter().enumerate() {
        let end = rows.get(i + 1).map(|r| r.0).unwrap_or(to);
        if end > *at {
            segments.push(Segment {
                from: *at,
                to: end,
                state: state.clone(),
                app: app.clone(),
            });
        }
    }
    let mut wanted_ms = 0;
    let mut connected_ms = 0;
    let mut bg_connected_ms = 0;
    let mut reconnect_times = Vec::new();
    let mut lost_at: Option<i64> = None;
    let mut was_connected = false;
    for s in &segments {
        let len = s.to - s.from;
        if wanted(&s.state) {
            wanted_ms += len;
        }
        if s.state == State::Connected.name() {
            connected_ms += len;
            if s.app == AppState::Background.name() {
                bg_connected_ms += len;
            }
            if let Some(l) = lost_at.take() {
                reconnect_times.push(s.from - l);
            }
            was_connected = true;
        } else if was_connected && wanted(&s.state) && lost_at.is_none() {
            lost_at = Some(s.from);
        } else if !wanted(&s.state) {
            // Leaving on purpose (dormant, idle, stopped) is not a loss.
            lost_at = None;
            was_connected = false;
        }
    }
    reconnect_times.sort_unstable();
    let pct = |p: f64| -> Option<i64> {
        if reconnect_times.is_empty() {
            return None;
        }
        let i = ((reconnect_times.len() - 1) as f64 * p).round() as usize;
        Some(reconnect_times[i])
    };
    let count = |sql: &str| -> Result<u64, StoreError> {
        Ok(c.query_row(sql, params![from, to], |r| r.get::<_, i64>(0))? as u64)
    };
    let background_heartbeats = count("SELECT COUNT(*) FROM hb_log WHERE at BETWEEN ?1 AND ?2")?;
    let hours = bg_connected_ms as f64 / 3_600_000.0;
    Ok(Stats {
        from,
        to,
        wanted_ms,
        connected_ms,
        uptime: if wanted_ms > 0 {
            connected_ms as f64 / wanted_ms as f64
        } else {
            0.0
        },
        reconnects: reconnect_times.len() as u64,
        reconnect_p50_ms: pct(0.5),
        reconnect_p95_ms: pct(0.95),
        background_connected_hours: hours,
        background_heartbeats,
        background_heartbeats_per_hour: (hours > 0.0).then(|| background_heartbeats as f64 / hours),
        received_background: count(
            "SELECT COALESCE(SUM(count), 0) FROM recv_log WHERE at BETWEEN ?1 AND ?2 AND app = 'Background' AND via = 'socket'",
        )?,
        received_by_sync: count(
            "SELECT COALESCE(SUM(count), 0) FROM recv_log WHERE at BETWEEN ?1 AND ?2 AND via = 'sync'",
        )?,
        notifications: count("SELECT COUNT(*) FROM notif_log WHERE at BETWEEN ?1 AND ?2")?,
        segments,
    })
}

fn color(state: &str) -> &'static str {
    match state {
        "Connected" => "#2e9d4f",
        "Connecting" | "Handshaking" => "#f2c14e",
        "BackingOff" => "#e07a3f",
        "WaitingForNetwork" => "#8c8c8c",
        "Dormant" => "#6c8ebf",
        "RefreshingToken" => "#9467bd",
        // Idle, stopped, and before the first record.
        _ => "#ececec",
    }
}

/// The app row's colours: blues, so that neither reads as "no network".
fn app_color(app: &str) -> &'static str {
    if app == "Foreground" {
        "#1f4e9c"
    } else {
        "#9cc3ec"
    }
}

/// Tick spacing for a window of `span_ms`: the smallest of a few round
/// steps that gives at most 8 ticks.
fn tick_step(span_ms: i64) -> i64 {
    const STEPS: [i64; 15] = [
        1_000,
        5_000,
        10_000,
        30_000,
        60_000,
        300_000,
        600_000,
        1_800_000,
        3_600_000,
        3 * 3_600_000,
        6 * 3_600_000,
        12 * 3_600_000,
        86_400_000,
        7 * 86_400_000,
        30 * 86_400_000,
    ];
    STEPS
        .into_iter()
        .find(|s| span_ms / s <= 8)
        .unwrap_or(365 * 86_400_000)
}

/// A tick label (UTC): `HH:MM`, with seconds for steps under a minute, and
/// `MM-DD` for steps of a day or more.
fn tick_label(t: i64, step: i64) -> String {
    let secs = t.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (h, m, sec) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if step >= 86_400_000 {
        // Days since 1970-01-01 to month and day (Howard Hinnant's civil_from_days).
        let z = days + 719_468;
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let mo = if mp < 10 { mp + 3 } else { mp - 9 };
        format!("{mo:02}-{d:02}")
    } else if step < 60_000 {
        format!("{h:02}:{m:02}:{sec:02}")
    } else {
        format!("{h:02}:{m:02}")
    }
}

/// A timeline picture of the window: one bar of connection states, one of
/// app states, a time axis (UTC) and a legend for both bars.
pub fn svg(s: &Stats) -> String {
    let width = 960.0;
    let (left, right) = (90.0, 20.0);
    let span = (s.to - s.from).max(1);
    let x = |t: i64| left + (t - s.from) as f64 / span as f64 * (width - left - right);
    let mut out = String::new();
    out.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"230\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
    ));
    out.push_str(&format!(
        "<text x=\"{left}\" y=\"20\" font-size=\"14\">keepwire connection timeline</text>\n"
    ));
    out.push_str("<text x=\"6\" y=\"57\">connection</text><text x=\"6\" y=\"92\">app</text>\n");
    // The plot area's frame, so an empty stretch reads as "no record".
    out.push_str(&format!(
        "<rect x=\"{left}\" y=\"40\" width=\"{:.1}\" height=\"60\" fill=\"none\" stroke=\"#d0d0d0\"/>\n",
        width - left - right
    ));
    for seg in &s.segments {
        let (a, b) = (x(seg.from), x(seg.to));
        out.push_str(&format!(
            "<rect x=\"{a:.1}\" y=\"40\" width=\"{:.1}\" height=\"25\" fill=\"{}\"><title>{}</title></rect>\n",
            (b - a).max(0.5),
            color(&seg.state),
            seg.state
        ));
        out.push_str(&format!(
            "<rect x=\"{a:.1}\" y=\"75\" width=\"{:.1}\" height=\"25\" fill=\"{}\"><title>{}</title></rect>\n",
            (b - a).max(0.5),
            app_color(&seg.app),
            seg.app
        ));
    }
    // The time axis: round ticks inside the window.
    let step = tick_step(span);
    out.push_str(&format!(
        "<line x1=\"{left}\" y1=\"106\" x2=\"{:.1}\" y2=\"106\" stroke=\"#606060\"/>\n",
        width - right
    ));
    let mut t = (s.from + step - 1).div_euclid(step) * step;
    while t <= s.to {
        let tx = x(t);
        out.push_str(&format!(
            "<line x1=\"{tx:.1}\" y1=\"102\" x2=\"{tx:.1}\" y2=\"110\" stroke=\"#606060\"/>\
             <text x=\"{tx:.1}\" y=\"124\" text-anchor=\"middle\">{}</text>\n",
            tick_label(t, step)
        ));
        t += step;
    }
    out.push_str("<text x=\"6\" y=\"124\" fill=\"#606060\">time (UTC)</text>\n");
    let mut lx = left;
    for (name, fill) in [
        ("connected", color("Connected")),
        ("connecting", color("Connecting")),
        ("backing off", color("BackingOff")),
        ("no network", color("WaitingForNetwork")),
        ("dormant", color("Dormant")),
        ("idle / stopped", color("Idle")),
    ] {
        out.push_str(&format!(
            "<rect x=\"{lx}\" y=\"140\" width=\"12\" height=\"12\" fill=\"{fill}\" stroke=\"#a0a0a0\" stroke-width=\"0.5\"/><text x=\"{}\" y=\"151\">{name}</text>\n",
            lx + 16.0
        ));
        lx += 130.0;
    }
    out.push_str("<text x=\"6\" y=\"151\">connection:</text><text x=\"6\" y=\"176\">app:</text>\n");
    let mut lx = left;
    for (name, app) in [("foreground", "Foreground"), ("background", "Background")] {
        out.push_str(&format!(
            "<rect x=\"{lx}\" y=\"165\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"176\">{name}</text>\n",
            app_color(app),
            lx + 16.0
        ));
        lx += 130.0;
    }
    out.push_str(&format!(
        "<text x=\"{left}\" y=\"210\">uptime {:.1}% while wanted, {} reconnect{}</text>\n</svg>\n",
        s.uptime * 100.0,
        s.reconnects,
        if s.reconnects == 1 { "" } else { "s" }
    ));
    out
}

/// When the first connection state was logged, ms since the Unix epoch.
pub fn first_record(store: &Store) -> Result<Option<i64>, StoreError> {
    Ok(store
        .conn
        .query_row("SELECT MIN(at) FROM conn_log", [], |r| {
            r.get::<_, Option<i64>>(0)
        })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_of(segments: Vec<Segment>, from: i64, to: i64) -> Stats {
        Stats {
            from,
            to,
            wanted_ms: 0,
            connected_ms: 0,
            uptime: 0.0,
            reconnects: 0,
            reconnect_p50_ms: None,
            reconnect_p95_ms: None,
            background_connected_hours: 0.0,
            background_heartbeats: 0,
            background_heartbeats_per_hour: None,
            received_background: 0,
            received_by_sync: 0,
            notifications: 0,
            segments,
        }
    }

    #[test]
    fn ticks_are_round_and_labelled_in_utc() {
        assert_eq!(tick_step(90_000), 30_000);
        assert_eq!(tick_step(3_600_000), 600_000);
        assert_eq!(tick_step(86_400_000), 3 * 3_600_000);
        // 2026-11-29T14:05:09Z
        let t = 1_795_961_109_000;
        assert_eq!(tick_label(t, 10_000), "14:05:09");
        assert_eq!(tick_label(t, 600_000), "14:05");
        assert_eq!(tick_label(t, 86_400_000), "11-29");
    }

    #[test]
    fn the_picture_has_an_axis_a_legend_for_both_rows_and_distinct_greys() {
        let from = 1_795_961_100_000;
        let seg = |a: i64, b: i64, state: &str, app: &str| Segment {
            from: from + a,
            to: from + b,
            state: state.into(),
            app: app.into(),
        };
        let s = stats_of(
            vec![
                seg(0, 60_000, "Connected", "Foreground"),
                seg(60_000, 90_000, "WaitingForNetwork", "Background"),
                seg(90_000, 120_000, "Connected", "Background"),
            ],
            from,
            from + 120_000,
        );
        let pic = svg(&s);
        assert!(
            pic.contains(">time (UTC)<") && pic.contains(">14:05:30<"),
            "{pic}"
        );
        assert!(pic.contains(">foreground<") && pic.contains(">background<"));
        assert_ne!(app_color("Background"), color("WaitingForNetwork"));
        assert_ne!(app_color("Foreground"), color("WaitingForNetwork"));
        assert!(pic.contains("fill=\"#ffffff\""), "a white page");
    }
}
