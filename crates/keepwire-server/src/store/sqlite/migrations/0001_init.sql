-- keepwire relay schema, version 1.
-- Inbox sequences are per user and gap-free; messages are stored once and
-- referenced by every member's inbox entry.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE users (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    -- highest inbox sequence handed out (0 = none)
    inbox_head  INTEGER NOT NULL DEFAULT 0,
    -- lowest inbox sequence still stored (inbox_head + 1 when empty)
    inbox_floor INTEGER NOT NULL DEFAULT 1
);

CREATE TABLE tokens (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users(id),
    -- SHA-256 of the token; the token itself is never stored
    hash       BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX tokens_by_user ON tokens(user_id);

-- Append-only log of revocations, polled by running relays so that a
-- revocation made by another process closes live connections at once.
CREATE TABLE revocations (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id  INTEGER NOT NULL,
    token_id INTEGER,
    at       INTEGER NOT NULL
);

CREATE TABLE devices (
    user_id    INTEGER NOT NULL,
    device     TEXT NOT NULL,
    acked_seq  INTEGER NOT NULL DEFAULT 0,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    PRIMARY KEY (user_id, device)
) WITHOUT ROWID;

CREATE TABLE convs (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('direct', 'group')),
    name       TEXT,
    created_by INTEGER NOT NULL,
    -- the creator's idempotency key
    create_key TEXT NOT NULL,
    -- 'lo:hi' user ids for direct conversations: one per pair
    direct_key TEXT UNIQUE,
    last_seq   INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    UNIQUE (created_by, create_key)
);

CREATE TABLE members (
    conv_id   INTEGER NOT NULL,
    user_id   INTEGER NOT NULL,
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (conv_id, user_id)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON members(user_id, conv_id);

CREATE TABLE messages (
    id        INTEGER PRIMARY KEY,
    conv_id   INTEGER NOT NULL,
    conv_seq  INTEGER NOT NULL,
    sender_id INTEGER NOT NULL,
    cid       TEXT NOT NULL,
    kind      TEXT NOT NULL,
    body      TEXT NOT NULL,
    ts        INTEGER NOT NULL,
    UNIQUE (conv_id, conv_seq)
);
CREATE INDEX messages_by_ts ON messages(ts);

CREATE TABLE inbox (
    user_id    INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    -- a message entry references the message...
    message_id INTEGER,
    -- ...a membership entry carries its event as JSON
    event      TEXT,
    ts         INTEGER NOT NULL,
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;
CREATE INDEX inbox_by_ts ON inbox(ts);

-- Dedupe keys: one row per (user, device, client id), kept at least as long
-- as the dedupe retention even when the message itself has been trimmed.
CREATE TABLE sends (
    user_id    INTEGER NOT NULL,
    device     TEXT NOT NULL,
    cid        TEXT NOT NULL,
    digest     BLOB NOT NULL,
    message_id INTEGER NOT NULL,
    conv_id    INTEGER NOT NULL,
    conv_seq   INTEGER NOT NULL,
    ts         INTEGER NOT NULL,
    PRIMARY KEY (user_id, device, cid)
) WITHOUT ROWID;
CREATE INDEX sends_by_ts ON sends(ts);
