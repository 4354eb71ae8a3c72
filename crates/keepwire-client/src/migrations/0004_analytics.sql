-- Connection analytics: every state change, background heartbeat, received
-- batch and notification, with wall-clock times (ms since the Unix epoch).

CREATE TABLE conn_log (
    id      INTEGER PRIMARY KEY,
    at      INTEGER NOT NULL,
    state   TEXT NOT NULL,
    app     TEXT NOT NULL,
    network TEXT,
    reason  TEXT
);

CREATE TABLE hb_log (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    network     TEXT NOT NULL,
    interval_ms INTEGER NOT NULL,
    ok          INTEGER NOT NULL
);

CREATE TABLE recv_log (
    id    INTEGER PRIMARY KEY,
    at    INTEGER NOT NULL,
    app   TEXT NOT NULL,
    -- 'socket' or 'sync'
    via   TEXT NOT NULL,
    count INTEGER NOT NULL
);

CREATE TABLE notif_log (
    id    INTEGER PRIMARY KEY,
    at    INTEGER NOT NULL,
    conv  INTEGER NOT NULL,
    count INTEGER NOT NULL
);
