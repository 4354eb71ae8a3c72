-- App-backend integration: revocable devices, revocation of app-issued
-- tokens by issue time, API keys for the backend's HTTP API.

ALTER TABLE devices ADD COLUMN revoked_at INTEGER;

-- App-issued tokens (JWTs) issued at or before this time are revoked.
ALTER TABLE users ADD COLUMN tokens_revoked_at INTEGER;

-- A revocation may name one device.
ALTER TABLE revocations ADD COLUMN device TEXT;

CREATE TABLE api_keys (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    -- SHA-256 of the key; the key itself is never stored
    hash       BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
