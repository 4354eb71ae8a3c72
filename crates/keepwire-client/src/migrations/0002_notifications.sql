-- Notifications: a claim per message, written before it is shown, so a
-- message is notified at most once whichever process (app, extension, CLI)
-- receives it; unread counts per conversation for coalesced notifications.

CREATE TABLE notified (
    message_id INTEGER PRIMARY KEY,
    conv       INTEGER NOT NULL,
    -- 1 if shown, 0 if suppressed (muted, quiet hours, own message)
    shown      INTEGER NOT NULL,
    at         INTEGER NOT NULL
);

CREATE TABLE unread (
    conv        INTEGER PRIMARY KEY,
    count       INTEGER NOT NULL,
    last_sender TEXT NOT NULL,
    last_body   TEXT NOT NULL
);
