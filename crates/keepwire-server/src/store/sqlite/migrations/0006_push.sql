-- Push wake-ups: one registration per device (a provider token or Web Push
-- endpoint belongs to one device), where its pushes stand, and per-user
-- mutes (a muted conversation sends no push; synced to every device).

CREATE TABLE push_registrations (
    user_id       INTEGER NOT NULL,
    device        TEXT NOT NULL,
    -- the opaque id pushes carry
    reg_id        TEXT NOT NULL UNIQUE,
    -- digest of what identifies it at its provider: registering it
    -- elsewhere moves it
    key           BLOB NOT NULL UNIQUE,
    provider      TEXT NOT NULL,
    -- the registration as JSON (a secret)
    registration  TEXT NOT NULL,
    previews      INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    refreshed_at  INTEGER NOT NULL,
    -- the position the last push was for, and the last one a provider took
    pushed_seq    INTEGER NOT NULL DEFAULT 0,
    delivered_seq INTEGER NOT NULL DEFAULT 0,
    pushed_at     INTEGER,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_success  INTEGER,
    last_error    TEXT,
    PRIMARY KEY (user_id, device)
) WITHOUT ROWID;

CREATE TABLE mutes (
    user_id INTEGER NOT NULL,
    conv_id INTEGER NOT NULL,
    PRIMARY KEY (user_id, conv_id)
) WITHOUT ROWID;
