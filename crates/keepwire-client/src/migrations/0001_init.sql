-- keepwire client store, version 1: one database per device ("home").

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Sends accepted from the app and not yet confirmed (or failed for good).
CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    cid        TEXT NOT NULL UNIQUE,
    conv       INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    -- 'pending' until confirmed (then deleted) or 'failed'
    status     TEXT NOT NULL DEFAULT 'pending',
    error      TEXT
);

-- Messages, from the inbox replay or history paging. A message is stored once.
CREATE TABLE messages (
    id        INTEGER NOT NULL,
    conv      INTEGER NOT NULL,
    conv_seq  INTEGER NOT NULL,
    sender    TEXT NOT NULL,
    cid       TEXT NOT NULL,
    kind      TEXT NOT NULL,
    body      TEXT NOT NULL,
    ts        INTEGER NOT NULL,
    -- inbox sequence it came with (NULL when it came from history)
    inbox_seq INTEGER,
    PRIMARY KEY (conv, conv_seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_by_id ON messages(id);
CREATE INDEX messages_by_inbox ON messages(inbox_seq);

CREATE TABLE convs (
    id       INTEGER PRIMARY KEY,
    kind     TEXT NOT NULL,
    name     TEXT,
    members  TEXT NOT NULL,
    -- false once this user left or was removed
    active   INTEGER NOT NULL DEFAULT 1
);
