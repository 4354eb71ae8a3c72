//! The exactly-once checker.
//!
//! Ground truth is the devices' journals. The checker reads the relay's
//! database and every device's store after a run and reports each broken
//! promise: a message whose send returned that is missing from a member
//! device (lost), a message stored twice (duplicated), a sender's messages
//! out of its send order, an inbox with a gap, a notification raised twice,
//! and a message on the relay that no device sent (phantom).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags};

use crate::journal::{self, Record};

/// One device as the checker sees it.
#[derive(Debug, Clone)]
pub struct DeviceFiles {
    /// Its name (the prefix of its message bodies: `NAME#N`).
    pub name: String,
    /// Its user.
    pub user: String,
    /// Its home (the client store).
    pub home: PathBuf,
    /// Its journal.
    pub journal: PathBuf,
}

/// What to check.
#[derive(Debug, Clone)]
pub struct Subject {
    /// The relay's database.
    pub relay_db: PathBuf,
    /// Every device of the run.
    pub devices: Vec<DeviceFiles>,
    /// Conversation id → member user names (fixed for the run).
    pub convs: BTreeMap<u64, Vec<String>>,
}

/// What the checker found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Sends journaled as intended.
    pub intents: u64,
    /// Sends journaled as accepted (their `send` returned).
    pub accepted: u64,
    /// Messages in the relay's log.
    pub relayed: u64,
    /// Message copies in device stores.
    pub stored: u64,
    /// Notifications' message ids journaled.
    pub notified: u64,
    /// Lost messages (accepted, or on the relay, and missing from a member device).
    pub lost: u64,
    /// Messages stored more than once (on the relay or a device).
    pub duplicated: u64,
    /// Messages out of their sender's order.
    pub misordered: u64,
    /// Inbox gaps, and devices whose cursor is not at their user's head.
    pub gaps: u64,
    /// Message ids notified more than once on a device.
    pub notified_twice: u64,
    /// Messages no device sent (or stored by a device but not on the relay).
    pub phantoms: u64,
    /// The first violations, described.
    pub violations: Vec<String>,
}

impl Report {
    /// No promise broken.
    pub fn ok(&self) -> bool {
        self.lost
            + self.duplicated
            + self.misordered
            + self.gaps
            + self.notified_twice
            + self.phantoms
            == 0
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 50 {
            self.violations.push(what);
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} intended, {} accepted, {} on the relay, {} copies stored, {} notified; \
             lost {}, duplicated {}, misordered {}, gaps {}, notified twice {}, phantoms {}",
            self.intents,
            self.accepted,
            self.relayed,
            self.stored,
            self.notified,
            self.lost,
            self.duplicated,
            self.misordered,
            self.gaps,
            self.notified_twice,
            self.phantoms
        )?;
        for v in &self.violations {
            write!(f, "\n  - {v}")?;
        }
        Ok(())
    }
}

/// A message as stored (relay or device).
#[derive(Debug, Clone)]
struct Stored {
    id: u64,
    conv: u64,
    conv_seq: u64,
    sender: String,
    body: String,
}

/// A journaled send.
#[derive(Debug, Clone)]
struct Sent {
    user: String,
    conv: u64,
    accepted: bool,
}

fn open_ro(path: &Path) -> anyhow::Result<Connection> {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// Messages from a query selecting (id, conv, conv_seq, sender, body).
fn read_stored(db: &Connection, sql: &str) -> anyhow::Result<Vec<Stored>> {
    Ok(db
        .prepare(sql)?
        .query_map([], |row| {
            Ok(Stored {
                id: row.get::<_, i64>(0)? as u64,
                conv: row.get::<_, i64>(1)? as u64,
                conv_seq: row.get::<_, i64>(2)? as u64,
                sender: row.get(3)?,
                body: row.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?)
}

/// `NAME#N` → (NAME, N).
fn parse_body(body: &str) -> Option<(&str, u64)> {
    let (name, n) = body.rsplit_once('#')?;
    Some((name, n.parse().ok()?))
}

/// Checks a finished run.
pub fn check(s: &Subject) -> anyhow::Result<Report> {
    let mut r = Report::default();

    // Ground truth: the journals.
    let mut sent: HashMap<String, Sent> = HashMap::new();
    let mut shown: HashMap<String, Vec<u64>> = HashMap::new();
    for d in &s.devices {
        let mut intents: HashMap<u64, (u64, String)> = HashMap::new();
        for rec in journal::read(&d.journal)? {
            match rec {
                Record::Intent { n, conv, body } => {
                    r.intents += 1;
                    intents.insert(n, (conv, body.clone()));
                    sent.insert(
                        body,
                        Sent {
                            user: d.user.clone(),
                            conv,
                            accepted: false,
                        },
                    );
                }
                Record::Accepted { n } => {
                    r.accepted += 1;
                    match intents.get(&n) {
                        Some((_, body)) => sent.get_mut(body).expect("inserted").accepted = true,
                        None => r.violation(format!("{}: accepted #{n} without an intent", d.name)),
                    }
                }
                Record::Shown { ids } => {
                    r.notified += ids.len() as u64;
                    shown.entry(d.name.clone()).or_default().extend(ids);
                }
            }
        }
    }

    // The relay's log.
    let relay = open_ro(&s.relay_db)?;
    let relayed = read_stored(
        &relay,
        "SELECT m.id, m.conv_id, m.conv_seq, u.name, m.body FROM messages m
         JOIN users u ON u.id = m.sender_id ORDER BY m.conv_id, m.conv_seq",
    )?;
    r.relayed = relayed.len() as u64;
    let mut on_relay: HashMap<&str, &Stored> = HashMap::new();
    for m in &relayed {
        if on_relay.insert(&m.body, m).is_some() {
            r.duplicated += 1;
            r.violation(format!("relay: {:?} stored twice", m.body));
        }
        match sent.get(&m.body) {
            Some(x) if x.user == m.sender && x.conv == m.conv => {}
            Some(x) => {
                r.phantoms += 1;
                r.violation(format!(
                    "relay: {:?} from {} in {} but sent by {} to {}",
                    m.body, m.sender, m.conv, x.user, x.conv
                ));
            }
            None => {
                r.phantoms += 1;
                r.violation(format!("relay: {:?} was never sent", m.body));
            }
        }
    }
    for (body, x) in &sent {
        if x.accepted && !on_relay.contains_key(body.as_str()) {
            r.lost += 1;
            r.violation(format!("relay: accepted {body:?} is missing"));
        }
    }
    check_order(&mut r, "relay", &relayed);

    // Inboxes on the relay: gap-free from floor to head.
    let mut heads: HashMap<String, u64> = HashMap::new();
    let users: Vec<(i64, String, u64, u64)> = relay
        .prepare("SELECT id, name, inbox_head, inbox_floor FROM users")?
        .query_map([], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get::<_, i64>(2)? as u64,
                row.get::<_, i64>(3)? as u64,
            ))
        })?
        .collect::<Result<_, _>>()?;
    for (id, name, head, floor) in users {
        let seqs: Vec<u64> = relay
            .prepare("SELECT seq FROM inbox WHERE user_id = ?1 ORDER BY seq")?
            .query_map([id], |row| Ok(row.get::<_, i64>(0)? as u64))?
            .collect::<Result<_, _>>()?;
        let expected: Vec<u64> = (floor..=head).collect();
        if seqs != expected {
            r.gaps += 1;
            r.violation(format!(
                "relay: {name}'s inbox is not gap-free ({} entries, floor {floor}, head {head})",
                seqs.len()
            ));
        }
        heads.insert(name, head);
    }

    // Every device: each relayed message of its conversations exactly once,
    // nothing else, in order, cursor at its user's head, notified at most once.
    for d in &s.devices {
        let db = open_ro(&keepwire_client::Home::new(&d.home).database())?;
        let stored = read_stored(
            &db,
            "SELECT id, conv, conv_seq, sender, body FROM messages ORDER BY conv, conv_seq",
        )?;
        r.stored += stored.len() as u64;
        let mut copies: HashMap<&str, u64> = HashMap::new();
        for m in &stored {
            *copies.entry(&m.body).or_default() += 1;
            match on_relay.get(m.body.as_str()) {
                Some(x) if x.id == m.id && x.conv_seq == m.conv_seq && x.conv == m.conv => {}
                Some(_) => {
                    r.phantoms += 1;
                    r.violation(format!("{}: {:?} differs from the relay's", d.name, m.body));
                }
                None => {
                    r.phantoms += 1;
                    r.violation(format!("{}: {:?} is not on the relay", d.name, m.body));
                }
            }
        }
        for m in &relayed {
            let member = s
                .convs
                .get(&m.conv)
                .is_some_and(|members| members.contains(&d.user));
            if !member {
                continue;
            }
            match copies.get(m.body.as_str()).copied().unwrap_or(0) {
                1 => {}
                0 => {
                    r.lost += 1;
                    r.violation(format!("{}: {:?} is missing", d.name, m.body));
                }
                n => {
                    r.duplicated += 1;
                    r.violation(format!("{}: {:?} stored {n} times", d.name, m.body));
                }
            }
        }
        check_order(&mut r, &d.name, &stored);
        let cursor: Option<u64> = db
            .query_row("SELECT value FROM meta WHERE key = 'cursor'", [], |row| {
                row.get::<_, String>(0)
            })
            .ok()
            .and_then(|v| v.parse().ok());
        let head = heads.get(&d.user).copied().unwrap_or(0);
        if cursor.unwrap_or(0) != head {
            r.gaps += 1;
            r.violation(format!(
                "{}: cursor {cursor:?} is not at {}'s inbox head {head}",
                d.name, d.user
            ));
        }
        let mut seen = HashSet::new();
        for id in shown.get(&d.name).into_iter().flatten() {
            if !seen.insert(*id) {
                r.notified_twice += 1;
                r.violation(format!("{}: message {id} notified twice", d.name));
            }
            match relayed.iter().find(|m| m.id == *id) {
                Some(m) if m.sender == d.user => {
                    r.violation(format!("{}: own message {id} notified", d.name));
                    r.phantoms += 1;
                }
                Some(_) => {}
                None => {
                    r.phantoms += 1;
                    r.violation(format!("{}: notified unknown message {id}", d.name));
                }
            }
        }
    }
    Ok(r)
}

/// Within each conversation, each sender device's messages must appear in
/// the order it sent them. `messages` are sorted by (conv, conv_seq).
fn check_order(r: &mut Report, whose: &str, messages: &[Stored]) {
    let mut last: HashMap<(u64, &str), u64> = HashMap::new();
    for m in messages {
        let Some((sender, n)) = parse_body(&m.body) else {
            continue;
        };
        if let Some(prev) = last.insert((m.conv, sender), n)
            && prev >= n
        {
            r.misordered += 1;
            r.violation(format!(
                "{whose}: {sender}#{n} after {sender}#{prev} in conversation {}",
                m.conv
            ));
        }
    }
}
