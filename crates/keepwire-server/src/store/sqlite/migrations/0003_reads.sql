-- Read markers per (user, conversation), synced to the user's devices.
CREATE TABLE reads (
    user_id INTEGER NOT NULL,
    conv_id INTEGER NOT NULL,
    up_to   INTEGER NOT NULL,
    PRIMARY KEY (user_id, conv_id)
) WITHOUT ROWID;
