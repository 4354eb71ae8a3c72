-- Read markers per conversation, synced from the user's other devices.
CREATE TABLE read_marks (
    conv  INTEGER PRIMARY KEY,
    up_to INTEGER NOT NULL
);
