-- The keepwire tokens each device connected with: revoking a device revokes
-- them too, so a stolen device's token cannot connect under another device id.
CREATE TABLE device_tokens (
    user_id  INTEGER NOT NULL,
    device   TEXT NOT NULL,
    token_id INTEGER NOT NULL,
    PRIMARY KEY (user_id, device, token_id)
) WITHOUT ROWID;
