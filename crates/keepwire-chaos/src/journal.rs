//! The senders' journal: the ground truth of a chaos run.
//!
//! A device appends (and fsyncs) an `intent` before it hands a message to
//! the client, and an `accepted` once [`keepwire_client::Client::send`]
//! returned (the message is durably in the outbox). It also records every
//! notification it was asked to show. The checker trusts only this journal,
//! never the stores it checks. A line torn by SIGKILL at the end of the file
//! is ignored.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// One journal line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    /// About to send message number `n` (per device, from 1) to `conv`.
    Intent {
        /// The device's message number.
        n: u64,
        /// Conversation.
        conv: u64,
        /// The body (unique in the run).
        body: String,
    },
    /// `send` returned for message `n`: it must be delivered.
    Accepted {
        /// The device's message number.
        n: u64,
    },
    /// The notifier was asked to show these message ids.
    Shown {
        /// Message ids newly covered by the notification.
        ids: Vec<u64>,
    },
}

/// An append-only journal file, synced after every record.
pub struct Journal {
    file: File,
}

impl Journal {
    /// Opens (creating) the journal at `path` for appending.
    pub fn open(path: &Path) -> anyhow::Result<Journal> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the journal {}", path.display()))?;
        Ok(Journal { file })
    }

    /// Appends `r` and waits until it is on disk.
    pub fn append(&mut self, r: &Record) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(r)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()?;
        Ok(())
    }
}

/// Reads a journal; a torn last line (a SIGKILL mid-write) is dropped, any
/// other bad line is an error.
pub fn read(path: &Path) -> anyhow::Result<Vec<Record>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !complete => {}
            Err(e) => bail!("{}: line {}: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_dropped_and_other_bad_lines_are_errors() {
        let dir = std::env::temp_dir().join(format!("kw-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("j");
        let _ = std::fs::remove_file(&p);
        let mut j = Journal::open(&p).unwrap();
        j.append(&Record::Intent {
            n: 1,
            conv: 2,
            body: "a".into(),
        })
        .unwrap();
        j.append(&Record::Accepted { n: 1 }).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"t\":\"acc")
            .unwrap();
        assert_eq!(read(&p).unwrap().len(), 2);
        std::fs::write(&p, "{\"t\":\"accepted\",\"n\":1}\ngarbage\n").unwrap();
        assert!(read(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
