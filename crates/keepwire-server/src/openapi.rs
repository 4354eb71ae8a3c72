//! The OpenAPI 3.0 document of the HTTP API (served at `GET /v1/openapi.json`).

use serde_json::{Value, json};

fn problem(desc: &str) -> Value {
    json!({"description": desc, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

fn ok(desc: &str, schema: Value) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": schema}}})
}

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The errors every authenticated operation may answer with.
fn errors(extra: &[(&str, &str)]) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("400".into(), problem("Invalid request"));
    m.insert("401".into(), problem("Missing or invalid API key"));
    m.insert(
        "404".into(),
        problem("No such user, device or conversation"),
    );
    m.insert(
        "429".into(),
        problem("Too many requests for this key (see Retry-After)"),
    );
    m.insert(
        "503".into(),
        problem("The relay could not handle the request; retry later"),
    );
    for (code, desc) in extra {
        m.insert((*code).into(), problem(desc));
    }
    m
}

fn with(mut base: serde_json::Map<String, Value>, code: &str, v: Value) -> Value {
    base.insert(code.into(), v);
    Value::Object(base)
}

fn with2(mut base: serde_json::Map<String, Value>, a: (&str, Value), b: (&str, Value)) -> Value {
    base.insert(a.0.into(), a.1);
    base.insert(b.0.into(), b.1);
    Value::Object(base)
}

fn body_errors() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "408",
            "The body did not arrive in time; the connection is closed",
        ),
        ("413", "Body too large"),
        ("415", "The body is not application/json"),
    ]
}

fn user_param() -> Value {
    json!({"name": "user", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.@][A-Za-z0-9_.@-]{0,63}$"}})
}

fn conv_param() -> Value {
    json!({"name": "conv", "in": "path", "required": true, "schema": {"type": "integer", "format": "int64", "minimum": 1}})
}

fn json_body(name: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema(name)}}})
}

/// The document.
pub(crate) fn document() -> Value {
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "keepwire relay API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Server-to-server API for a chat app's backend: publish messages, manage conversations, list and revoke devices, page history, read delivery positions. Authenticate with an API key from `keepwire admin api-key create`."
        },
        "security": [{"apiKey": []}],
        "paths": paths(),
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "kwk_... from `keepwire admin api-key create NAME`"}},
            "schemas": schemas()
        }
    });
    add_user_provisioning(&mut doc);
    doc
}

/// The operations on conversations, devices, tokens, push and positions.
fn paths() -> Value {
    let mut create_errors = errors(&body_errors());
    create_errors.insert("403".into(), problem("The acting user may not do this"));
    let conv_created = with2(
        create_errors.clone(),
        ("201", ok("Created", schema("Conversation"))),
        (
            "200",
            ok("Already created with this key", schema("Conversation")),
        ),
    );
    let mut publish_errors = errors(&body_errors());
    publish_errors.insert("403".into(), problem("The sender is not a member"));
    publish_errors.insert(
        "409".into(),
        problem("The idempotency key was used for another message"),
    );
    let published = with2(
        publish_errors,
        ("201", ok("Stored", schema("Confirmation"))),
        (
            "200",
            ok(
                "Stored before with this idempotency key (nothing new stored)",
                schema("Confirmation"),
            ),
        ),
    );
    let mut paths = json!({
        "/v1/conversations": {
            "post": {
                "operationId": "createConversation",
                "summary": "Create a conversation (idempotent per key)",
                "requestBody": json_body("CreateConversation"),
                "responses": conv_created
            }
        },
        "/v1/conversations/{conv}/messages": {
            "parameters": [conv_param()],
            "post": {
                "operationId": "publishMessage",
                "summary": "Publish a message as a member or as the system (idempotent per key)",
                "requestBody": json_body("Publish"),
                "responses": published
            },
            "get": {
                "operationId": "history",
                "summary": "Page a conversation's history backwards",
                "parameters": [
                    {"name": "before", "in": "query", "required": false, "schema": {"type": "integer", "format": "int64", "minimum": 0}},
                    {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 200}}
                ],
                "responses": with(errors(&[]), "200", ok("A page, ascending conv_seq", schema("HistoryPage")))
            }
        },
        "/v1/conversations/{conv}/members": {
            "parameters": [conv_param()],
            "post": {
                "operationId": "addMember",
                "summary": "Add a member (idempotent)",
                "requestBody": json_body("AddMember"),
                "responses": with(create_errors.clone(), "200", ok("The conversation after the change", schema("MemberChange")))
            }
        },
        "/v1/conversations/{conv}/members/{user}": {
            "parameters": [conv_param(), user_param()],
            "delete": {
                "operationId": "removeMember",
                "summary": "Remove a member (idempotent)",
                "responses": with(errors(&[("403", "Not allowed")]), "200", ok("The conversation after the change", schema("MemberChange")))
            }
        }
    });
    merge(&mut paths, user_paths());
    paths
}

/// The operations on a user's conversations, devices, tokens, push
/// registrations and delivery positions, and the VAPID key.
fn user_paths() -> Value {
    json!({
        "/v1/users/{user}/conversations": {
            "parameters": [user_param()],
            "get": {
                "operationId": "userConversations",
                "summary": "A user's conversations",
                "responses": with(errors(&[]), "200", ok("Conversations", json!({"type": "object", "required": ["conversations"], "properties": {"conversations": {"type": "array", "items": schema("Conversation")}}})))
            }
        },
        "/v1/users/{user}/devices": {
            "parameters": [user_param()],
            "get": {
                "operationId": "userDevices",
                "summary": "A user's devices with their delivery positions",
                "responses": with(errors(&[]), "200", ok("Devices", json!({"type": "object", "required": ["devices"], "properties": {"devices": {"type": "array", "items": schema("Device")}}})))
            }
        },
        "/v1/users/{user}/devices/{device}/revoke": {
            "parameters": [user_param(), {"name": "device", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}}],
            "post": {
                "operationId": "revokeDevice",
                "summary": "Revoke a device: its live connections close at once (4010) and it cannot reconnect",
                "responses": with(errors(&[]), "200", ok("Done", json!({"type": "object", "required": ["revoked"], "properties": {"revoked": {"type": "boolean", "description": "false if it was already revoked"}}})))
            }
        },
        "/v1/users/{user}/tokens/revoke": {
            "parameters": [user_param()],
            "post": {
                "operationId": "revokeTokens",
                "summary": "Revoke every token of a user (keepwire tokens, and app-issued tokens issued until now)",
                "responses": with(errors(&[]), "200", ok("Done", json!({"type": "object", "required": ["revoked_tokens", "closed_connections"], "properties": {"revoked_tokens": {"type": "integer", "minimum": 0, "description": "keepwire tokens revoked (0 for a user of app-issued JWTs)"}, "closed_connections": {"type": "integer", "minimum": 0, "description": "live connections of the user closed on this relay node"}}})))
            }
        },
        "/v1/users/{user}/devices/{device}/push": {
            "parameters": [user_param(), {"name": "device", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}}],
            "put": {
                "operationId": "setDevicePush",
                "summary": "Set or replace a device's push registration (FCM, APNs or Web Push); registering a token another device holds moves it",
                "requestBody": json_body("SetPush"),
                "responses": with(errors(&body_errors()), "200", ok("The registration id pushes carry", json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}})))
            },
            "delete": {
                "operationId": "deleteDevicePush",
                "summary": "Remove a device's push registration",
                "responses": with(errors(&[]), "200", ok("Done", json!({"type": "object", "required": ["removed"], "properties": {"removed": {"type": "boolean"}}})))
            }
        },
        "/v1/push/vapid": {
            "get": {
                "operationId": "vapidKey",
                "summary": "The relay's VAPID public key (Web Push); no API key needed",
                "security": [],
                "responses": {
                    "200": ok("The key", json!({"type": "object", "required": ["vapid"], "properties": {"vapid": {"type": "string"}}})),
                    "404": problem("No Web Push configuration")
                }
            }
        },
        "/v1/users/{user}/positions": {
            "parameters": [user_param()],
            "get": {
                "operationId": "positions",
                "summary": "Delivery positions per device (for delivered ticks)",
                "parameters": [{"name": "conv", "in": "query", "required": false, "schema": {"type": "integer", "format": "int64", "minimum": 1}}],
                "responses": with(errors(&[]), "200", ok("Positions", schema("Positions")))
            }
        }
    })
}

/// The request and response bodies.
fn schemas() -> Value {
    let mut schemas = json!({
        "SetPush": {
            "type": "object",
            "additionalProperties": false,
            "required": ["registration"],
            "properties": {
                "registration": {
                    "type": "object",
                    "description": "{\"provider\":\"fcm\",\"token\":...}, {\"provider\":\"apns\",\"token\":...,\"environment\":\"production\",\"topic\":...} or {\"provider\":\"webpush\",\"endpoint\":...,\"keys\":{\"p256dh\":...,\"auth\":...}}",
                    "required": ["provider"],
                    "properties": {"provider": {"type": "string", "enum": ["fcm", "apns", "webpush"]}}
                },
                "previews": {"type": "boolean", "description": "the user allows encrypted previews"}
            }
        },
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"}
            }
        },
        "Conversation": {
            "type": "object",
            "required": ["id", "kind", "members", "last_seq"],
            "properties": {
                "id": {"type": "integer", "format": "int64"},
                "kind": {"type": "string", "enum": ["direct", "group"]},
                "name": {"type": "string"},
                "members": {"type": "array", "items": {"type": "string"}},
                "last_seq": {"type": "integer", "minimum": 0}
            }
        },
        "CreateConversation": {
            "type": "object",
            "additionalProperties": false,
            "required": ["kind", "members", "key"],
            "properties": {
                "as": {"type": "string", "description": "Create as this user (a member, bound by user rules); absent: as the system"},
                "kind": {"type": "string", "enum": ["direct", "group"]},
                "members": {"type": "array", "items": {"type": "string"}, "description": "Members besides the creator (two for a direct conversation made by the system)"},
                "name": {"type": "string", "maxLength": 128},
                "key": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$", "description": "Idempotency key"}
            }
        },
        "Publish": {
            "type": "object",
            "additionalProperties": false,
            "required": ["body", "idempotency_key"],
            "properties": {
                "from": {"type": "string", "description": "Send as this user (must be a member); absent: a system message"},
                "body": {"type": "string"},
                "kind": {"type": "string", "enum": ["text"]},
                "idempotency_key": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
            }
        },
        "Confirmation": {
            "type": "object",
            "required": ["id", "conv", "conv_seq", "ts", "duplicate"],
            "properties": {
                "id": {"type": "integer", "format": "int64"},
                "conv": {"type": "integer", "format": "int64"},
                "conv_seq": {"type": "integer"},
                "ts": {"type": "integer", "format": "int64"},
                "duplicate": {"type": "boolean"}
            }
        }
    });
    merge(&mut schemas, message_schemas());
    schemas
}

/// The bodies of history, membership, devices and positions.
fn message_schemas() -> Value {
    json!({
        "Message": {
            "type": "object",
            "required": ["id", "conv", "conv_seq", "from", "cid", "kind", "body", "ts"],
            "properties": {
                "id": {"type": "integer", "format": "int64"},
                "conv": {"type": "integer", "format": "int64"},
                "conv_seq": {"type": "integer"},
                "from": {"type": "string"},
                "cid": {"type": "string"},
                "kind": {"type": "string"},
                "body": {"type": "string"},
                "ts": {"type": "integer", "format": "int64"}
            }
        },
        "HistoryPage": {
            "type": "object",
            "required": ["conv", "messages", "more"],
            "properties": {
                "conv": {"type": "integer", "format": "int64"},
                "messages": {"type": "array", "items": schema("Message")},
                "more": {"type": "boolean"}
            }
        },
        "AddMember": {
            "type": "object",
            "additionalProperties": false,
            "required": ["user"],
            "properties": {
                "user": {"type": "string"},
                "as": {"type": "string", "description": "Act as this member; absent: as the system"}
            }
        },
        "MemberChange": {
            "type": "object",
            "required": ["conversation", "changed"],
            "properties": {"conversation": schema("Conversation"), "changed": {"type": "boolean"}}
        },
        "Device": {
            "type": "object",
            "required": ["device", "first_seen_ms", "last_seen_ms", "acked_seq"],
            "properties": {
                "device": {"type": "string"},
                "first_seen_ms": {"type": "integer", "format": "int64"},
                "last_seen_ms": {"type": "integer", "format": "int64"},
                "acked_seq": {"type": "integer", "minimum": 0},
                "revoked_at_ms": {"type": "integer", "format": "int64", "nullable": true}
            }
        },
        "Positions": {
            "type": "object",
            "required": ["head", "devices"],
            "properties": {
                "head": {"type": "integer", "minimum": 0},
                "devices": {"type": "array", "items": {
                    "type": "object",
                    "required": ["device", "acked_seq"],
                    "properties": {
                        "device": {"type": "string"},
                        "acked_seq": {"type": "integer", "minimum": 0},
                        "conv_delivered_seq": {"type": "integer", "minimum": 0}
                    }
                }}
            }
        }
    })
}

/// Adds `more`'s entries to `into` (both JSON objects).
fn merge(into: &mut Value, more: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), more) {
        a.extend(b);
    }
}

/// The user and token provisioning operations (`/v1/users`,
/// `/v1/users/{user}`, `/v1/users/{user}/tokens`).
fn add_user_provisioning(doc: &mut Value) {
    let mut create_errors = errors(&body_errors());
    create_errors.insert("409".into(), problem("A user with this name exists"));
    let created = ok(
        "Created",
        json!({"type": "object", "required": ["user"], "properties": {"user": {"type": "string"}}}),
    );
    let users = json!({
        "post": {
            "operationId": "createUser",
            "summary": "Create a user (then issue it a token, or let it connect with your JWTs)",
            "requestBody": json_body("NewUser"),
            "responses": with(create_errors, "201", created)
        },
        "get": {
            "operationId": "listUsers",
            "summary": "Every user's name, sorted",
            "responses": with(errors(&[]), "200", ok("Users", json!({"type": "object", "required": ["users"], "properties": {"users": {"type": "array", "items": {"type": "string"}}}})))
        }
    });
    let token = ok(
        "Issued (the token is shown once)",
        json!({"type": "object", "required": ["token", "id", "expires_at_ms"], "properties": {
            "token": {"type": "string", "description": "kw_..., a bearer token for the user's devices"},
            "id": {"type": "integer", "format": "int64"},
            "expires_at_ms": {"type": "integer", "format": "int64"}
        }}),
    );
    let tokens = json!({
        "parameters": [user_param()],
        "post": {
            "operationId": "issueToken",
            "summary": "Issue a keepwire token for a user (`{}` for the default 90 days)",
            "requestBody": json_body("NewToken"),
            "responses": with(errors(&body_errors()), "201", token)
        }
    });
    let deleted = ok(
        "Deleted",
        json!({"type": "object", "required": ["user", "conversations", "devices", "closed_connections"], "properties": {
            "user": {"type": "string"},
            "conversations": {"type": "integer", "minimum": 0, "description": "conversations the user left (the other members get a `removed` event by `~system`)"},
            "devices": {"type": "integer", "minimum": 0, "description": "devices removed"},
            "closed_connections": {"type": "integer", "minimum": 0, "description": "live connections of the user closed on this relay node (others close theirs within a second, from the revocation log)"}
        }}),
    );
    let user = json!({
        "parameters": [user_param()],
        "delete": {
            "operationId": "deleteUser",
            "summary": "Delete a user",
            "description": "Removes the user's inbox, devices, tokens, push registrations, mutes and read markers, removes them from every conversation, and closes their live connections. Their messages already delivered stay in the other members' inboxes and in the history, attributed to `~deleted.ID`; the name is free for a new, unrelated user. A still-valid app-issued JWT for the name would create a new, empty user: stop issuing them first.",
            "responses": with(errors(&[]), "200", deleted)
        }
    });
    if let Some(paths) = doc["paths"].as_object_mut() {
        paths.insert("/v1/users".into(), users);
        paths.insert("/v1/users/{user}".into(), user);
        paths.insert("/v1/users/{user}/tokens".into(), tokens);
    }
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        schemas.insert(
            "NewUser".into(),
            json!({"type": "object", "additionalProperties": false, "required": ["name"], "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_.@][A-Za-z0-9_.@-]{0,63}$"}
            }}),
        );
        schemas.insert(
            "NewToken".into(),
            json!({"type": "object", "additionalProperties": false, "properties": {
                "ttl_secs": {"type": "integer", "minimum": 1, "maximum": 315_360_000_u64, "description": "lifetime in seconds (default 90 days, at most ten years)"}
            }}),
        );
    }
}
