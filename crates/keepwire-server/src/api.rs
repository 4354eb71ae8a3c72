//! The HTTP API for the app's backend (server to server): publish messages,
//! manage conversations and membership, list devices, revoke devices and
//! tokens, page history, read delivery positions. Authenticated with API keys
//! (`Authorization: Bearer kwk_…`, stored hashed); errors are
//! `application/problem+json` (RFC 9457). The OpenAPI document is served at
//! `GET /v1/openapi.json`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use keepwire_proto::{
    ConvCreate, ConvKind, ErrorCode, MESSAGE_KIND_TEXT, Send as SendMsg, is_valid_request_id,
    is_valid_user_name,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Shared;
use crate::ratelimit::TokenBucket;
use crate::store::{Actor, RevokeTarget, StoreError};

/// The device id under which API sends are deduplicated.
const API_DEVICE: &str = "api";

/// An RFC 9457 problem.
pub(crate) struct Problem {
    status: StatusCode,
    code: &'static str,
    detail: String,
    retry_after: Option<u64>,
    /// Close the connection after the answer (the request was not read whole).
    close: bool,
}

impl Problem {
    fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
            close: false,
        }
    }

    fn not_found(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    /// A user name that does not exist: the type the store's refusals use.
    fn unknown_user(name: &str) -> Self {
        Problem::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownUser.as_str(),
            format!("no user named {name:?}"),
        )
    }

    /// A conversation id that does not exist: the type the store's refusals use.
    fn no_such_conv(id: &str) -> Self {
        Problem::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NoSuchConv.as_str(),
            format!("conversation {id:?} does not exist"),
        )
    }

    fn bad_request(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, "invalid", detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = json!({
            "type": format!("urn:keepwire:problem:{}", self.code),
            "title": self.status.canonical_reason().unwrap_or("error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        let mut resp = (self.status, body.to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.close {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Refused(code, msg) => {
                let status = match code {
                    ErrorCode::NoSuchConv | ErrorCode::UnknownUser => StatusCode::NOT_FOUND,
                    ErrorCode::NotMember | ErrorCode::Forbidden => StatusCode::FORBIDDEN,
                    ErrorCode::CidConflict => StatusCode::CONFLICT,
                    ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::Internal => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::BAD_REQUEST,
                };
                Problem::new(status, code.as_str(), msg)
            }
            // Admin lookups name a missing user this way: the same type as
            // the refusals (`unknown_user`), whichever path found it.
            StoreError::NotFound(m) if m.starts_with("no user named") => {
                Problem::new(StatusCode::NOT_FOUND, ErrorCode::UnknownUser.as_str(), m)
            }
            StoreError::NotFound(m) => Problem::not_found(m),
            StoreError::Conflict(m) => Problem::new(StatusCode::CONFLICT, "conflict", m),
            other => {
                tracing::error!(target: "keepwire::api", error = %other, "request failed");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "internal",
                    "the relay could not handle the request; retry later",
                )
            }
        }
    }
}

type ApiResult = Result<Response, Problem>;

/// A JSON body whose rejections are problems. The whole body must arrive
/// within `request_body_timeout` (a body trickled a byte at a time would
/// otherwise hold a task and a connection for ever).
pub(crate) struct ApiJson<T>(T);

impl<T> FromRequest<Arc<Shared>> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    axum::Json<T>: FromRequest<Arc<Shared>, Rejection = JsonRejection>,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &Arc<Shared>) -> Result<Self, Self::Rejection> {
        let deadline = state.config.request_body_timeout;
        let Ok(read) =
            tokio::time::timeout(deadline, axum::Json::<T>::from_request(req, state)).await
        else {
            let mut p = Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the request body did not arrive within {deadline:?}"),
            );
            p.close = true;
            return Err(p);
        };
        match read {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            )),
            Err(JsonRejection::BytesRejection(r))
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "the request body is too large",
                ))
            }
            Err(JsonRejection::JsonSyntaxError(e)) => Err(Problem::bad_request(format!(
                "the request body is not valid JSON: {}",
                serde_detail(&e.body_text())
            ))),
            Err(JsonRejection::JsonDataError(e)) => {
                Err(Problem::bad_request(body_mismatch(&e.body_text())))
            }
            Err(e) => Err(Problem::bad_request(e.body_text())),
        }
    }
}

/// What serde said, without axum's preamble and the line/column suffix (a
/// one-line JSON body makes "line 1 column 17" noise).
fn serde_detail(text: &str) -> &str {
    let text = text
        .split_once("target type: ")
        .or_else(|| text.split_once("as JSON: "))
        .map_or(text, |(_, rest)| rest);
    match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// A body that is JSON but not the expected shape, in the caller's terms:
/// which field is missing, or which one has the wrong type.
fn body_mismatch(text: &str) -> String {
    let detail = serde_detail(text);
    if let Some(rest) = detail.strip_prefix("missing field `")
        && let Some(field) = rest.strip_suffix('`')
    {
        return format!("the request body has no `{field}`, which is required");
    }
    // serde_path_to_error puts the field's path first: "body: invalid type ...".
    match detail.split_once(": ") {
        Some((path, why)) if !path.contains(' ') => {
            format!("the request body's `{path}` is wrong: {why}")
        }
        _ => format!("the request body does not fit this request: {detail}"),
    }
}

/// Path parameters whose rejections are problems (404: no such resource).
pub(crate) struct ApiPath<T>(T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(Problem::not_found(e.body_text())),
        }
    }
}

/// A request with a valid API key within its rate. As an extractor it runs
/// before the body is read, so a request without a key is a 401 whatever its body.
pub(crate) struct Authorized;

impl FromRequestParts<Arc<Shared>> for Authorized {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<Shared>,
    ) -> Result<Self, Self::Rejection> {
        authorize(state, &parts.headers).await.map(|_| Authorized)
    }
}

/// Per-key request budgets.
#[derive(Default)]
pub(crate) struct ApiLimits {
    buckets: Mutex<HashMap<i64, TokenBucket>>,
}

/// Checks the API key and its rate.
async fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<i64, Problem> {
    let unauthorized = || {
        let mut p = Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send a valid API key as `Authorization: Bearer kwk_...`",
        );
        p.retry_after = None;
        p
    };
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .ok_or_else(unauthorized)?;
    let id = shared
        .store
        .check_api_key(key)
        .await
        .map_err(Problem::from)?
        .ok_or_else(unauthorized)?;
    let rate = shared.config.api_requests_per_sec;
    let shared_now = shared.clock.now();
    let mut buckets = shared
        .api_limits
        .buckets
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let bucket = buckets
        .entry(id)
        .or_insert_with(|| TokenBucket::new(rate, rate.saturating_mul(2), shared_now));
    if let Err(wait) = bucket.take(shared_now) {
        let mut p = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests for this API key",
        );
        p.retry_after = Some(wait.as_secs().max(1));
        return Err(p);
    }
    Ok(id)
}

/// The credentials of an `Authorization: Bearer ...` value. The scheme is
/// case-insensitive (RFC 9110 §11.1): `bearer` and `BEARER` work too.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim().split_once(' ')?;
    let credentials = credentials.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credentials.is_empty()).then_some(credentials)
}

fn check_user(name: &str) -> Result<(), Problem> {
    if is_valid_user_name(name) {
        Ok(())
    } else {
        Err(Problem::unknown_user(name))
    }
}

fn parse_conv(s: &str) -> Result<u64, Problem> {
    s.parse::<u64>()
        .ok()
        .filter(|&c| c > 0 && c <= i64::MAX as u64)
        .ok_or_else(|| Problem::no_such_conv(s))
}

async fn actor_for(shared: &Shared, user: Option<&str>) -> Result<Actor, Problem> {
    match user {
        None => Ok(Actor::System),
        Some(name) => {
            check_user(name)?;
            match shared.store.user_id(name).await? {
                Some(id) => Ok(Actor::User(id)),
                None => Err(Problem::unknown_user(name)),
            }
        }
    }
}

fn ok(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

/// The API routes (mounted under `/v1`).
pub(crate) fn routes(max_body: usize) -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/conversations", post(create_conversation))
        .route(
            "/v1/conversations/{conv}/messages",
            post(publish).get(history),
        )
        .route("/v1/conversations/{conv}/members", post(add_member))
        .route(
            "/v1/conversations/{conv}/members/{user}",
            delete(remove_member),
        )
        .route("/v1/users", post(create_user).get(list_users))
        .route("/v1/users/{user}", delete(delete_user))
        .route("/v1/users/{user}/tokens", post(issue_token))
        .route("/v1/users/{user}/conversations", get(user_conversations))
        .route("/v1/users/{user}/devices", get(devices))
        .route(
            "/v1/users/{user}/devices/{device}/revoke",
            post(revoke_device),
        )
        .route("/v1/users/{user}/tokens/revoke", post(revoke_tokens))
        .route("/v1/users/{user}/positions", get(positions))
        .route(
            "/v1/users/{user}/devices/{device}/push",
            axum::routing::put(set_device_push).delete(delete_device_push),
        )
        .route("/v1/push/vapid", get(vapid_key))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
}

async fn openapi() -> Response {
    axum::Json(crate::openapi::document()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateConversation {
    #[serde(default, rename = "as")]
    creator: Option<String>,
    kind: ConvKind,
    members: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    key: String,
}

async fn create_conversation(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiJson(b): ApiJson<CreateConversation>,
) -> ApiResult {
    let actor = actor_for(&s, b.creator.as_deref()).await?;
    if !is_valid_request_id(&b.key) {
        return Err(Problem::bad_request(
            "key must be 1-64 characters of [A-Za-z0-9_-]",
        ));
    }
    for m in &b.members {
        if !is_valid_user_name(m) {
            return Err(Problem::bad_request(format!(
                "{m:?} is not a valid user name"
            )));
        }
    }
    if b.name
        .as_ref()
        .is_some_and(|n| n.len() > s.config.limits.max_name_bytes)
    {
        return Err(Problem::bad_request("name is too long"));
    }
    if b.name
        .as_deref()
        .is_some_and(|n| !keepwire_proto::is_safe_display_text(n))
    {
        return Err(Problem::bad_request(
            "name has control characters or bidirectional overrides",
        ));
    }
    let want = if actor == Actor::System { 2 } else { 1 };
    if b.kind == ConvKind::Direct && b.members.len() != want {
        return Err(Problem::bad_request(format!(
            "a direct conversation names exactly {want} member(s) besides its creator"
        )));
    }
    if b.members.len() > s.config.limits.max_group_size {
        return Err(Problem::bad_request("too many members"));
    }
    let req = ConvCreate {
        rid: String::new(),
        key: b.key,
        kind: b.kind,
        members: b.members,
        name: b.name,
    };
    let (conv, created) = s
        .store
        .conv_create(actor, req, s.config.limits.max_group_size)
        .await?;
    Ok(ok(
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        json!(conv),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Publish {
    #[serde(default)]
    from: Option<String>,
    body: String,
    #[serde(default)]
    kind: Option<String>,
    idempotency_key: String,
}

async fn publish(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath(conv): ApiPath<String>,
    ApiJson(b): ApiJson<Publish>,
) -> ApiResult {
    let conv = parse_conv(&conv)?;
    let actor = actor_for(&s, b.from.as_deref()).await?;
    if !is_valid_request_id(&b.idempotency_key) {
        return Err(Problem::bad_request(
            "idempotency_key must be 1-64 characters of [A-Za-z0-9_-]",
        ));
    }
    let kind = b.kind.unwrap_or_else(|| MESSAGE_KIND_TEXT.to_owned());
    if kind != MESSAGE_KIND_TEXT {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "unsupported_kind",
            format!("message kind {kind:?} is not supported"),
        ));
    }
    if b.body.len() > s.config.limits.max_body_bytes {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the message body is too large",
        ));
    }
    let send = SendMsg {
        cid: format!("api-{}", b.idempotency_key),
        conv,
        kind,
        body: b.body,
    };
    let c = match s.store.send(actor, API_DEVICE, send).await {
        Err(StoreError::Refused(ErrorCode::CidConflict, _)) => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                format!(
                    "idempotency_key {:?} was already used for a different message (another body, conversation or sender); use a new key for a new message",
                    b.idempotency_key
                ),
            ));
        }
        other => other?,
    };
    let status = if c.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(ok(
        status,
        json!({"id": c.id, "conv": c.conv, "conv_seq": c.conv_seq, "ts": c.ts, "duplicate": c.duplicate}),
    ))
}

#[derive(Deserialize)]
struct HistoryQuery {
    before: Option<u64>,
    limit: Option<u32>,
}

async fn history(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath(conv): ApiPath<String>,
    q: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let conv = parse_conv(&conv)?;
    let Query(q) = q.map_err(|e| Problem::bad_request(e.body_text()))?;
    let max = s.config.limits.max_history_page;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > max {
        return Err(Problem::bad_request(format!("limit must be 1-{max}")));
    }
    let page = s
        .store
        .history(Actor::System, conv, q.before, limit)
        .await?;
    Ok(ok(
        StatusCode::OK,
        json!({"conv": page.conv, "messages": page.messages, "more": page.more}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Member {
    user: String,
    #[serde(default, rename = "as")]
    actor: Option<String>,
}

async fn add_member(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath(conv): ApiPath<String>,
    ApiJson(b): ApiJson<Member>,
) -> ApiResult {
    let conv = parse_conv(&conv)?;
    let actor = actor_for(&s, b.actor.as_deref()).await?;
    if !is_valid_user_name(&b.user) {
        return Err(Problem::unknown_user(&b.user));
    }
    let (conv, changed) = s
        .store
        .conv_member(actor, conv, &b.user, true, s.config.limits.max_group_size)
        .await?;
    Ok(ok(
        StatusCode::OK,
        json!({"conversation": conv, "changed": changed}),
    ))
}

async fn remove_member(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath((conv, user)): ApiPath<(String, String)>,
) -> ApiResult {
    let conv = parse_conv(&conv)?;
    check_user(&user)?;
    let (conv, changed) = s
        .store
        .conv_member(
            Actor::System,
            conv,
            &user,
            false,
            s.config.limits.max_group_size,
        )
        .await?;
    Ok(ok(
        StatusCode::OK,
        json!({"conversation": conv, "changed": changed}),
    ))
}

async fn user_id(s: &Shared, user: &str) -> Result<crate::store::UserId, Problem> {
    check_user(user)?;
    s.store
        .user_id(user)
        .await?
        .ok_or_else(|| Problem::unknown_user(user))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
}

/// Longest token lifetime the API issues (ten years).
const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 86_400;
/// Token lifetime when the request names none (as `keepwire admin`).
const DEFAULT_TOKEN_TTL_SECS: u64 = 90 * 86_400;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    #[serde(default)]
    ttl_secs: Option<u64>,
}

async fn create_user(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiJson(b): ApiJson<NewUser>,
) -> ApiResult {
    if !is_valid_user_name(&b.name) {
        return Err(Problem::bad_request(format!(
            "{:?} is not a valid user name: use 1-64 characters of [A-Za-z0-9_.@-]",
            b.name
        )));
    }
    match s.store.create_user(&b.name).await {
        Ok(_) => Ok(ok(StatusCode::CREATED, json!({"user": b.name}))),
        Err(StoreError::Conflict(_)) => Err(Problem::new(
            StatusCode::CONFLICT,
            "user_exists",
            format!("a user named {:?} already exists", b.name),
        )),
        Err(e) => Err(e.into()),
    }
}

async fn list_users(State(s): State<Arc<Shared>>, _key: Authorized) -> ApiResult {
    let users = s.store.list_users().await?;
    Ok(ok(StatusCode::OK, json!({"users": users})))
}

/// Deletes a user: their inbox, devices, tokens, push registrations, mutes
/// and memberships go, and their live connections close (here at once, on
/// other relays through the revocation log). Their messages already
/// delivered stay in the other members' inboxes.
async fn delete_user(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath(user): ApiPath<String>,
) -> ApiResult {
    check_user(&user)?;
    let gone = s.store.delete_user(&user).await?;
    let closed = s.hub.revoke(gone.id, None, None);
    Ok(ok(
        StatusCode::OK,
        json!({
            "user": gone.user,
            "conversations": gone.conversations,
            "devices": gone.devices,
            "closed_connections": closed,
        }),
    ))
}

async fn issue_token(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath(user): ApiPath<String>,
    ApiJson(b): ApiJson<NewToken>,
) -> ApiResult {
    user_id(&s, &user).await?;
    let ttl = b.ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
    if ttl == 0 || ttl > MAX_TOKEN_TTL_SECS {
        return Err(Problem::bad_request(format!(
            "ttl_secs must be 1 to {MAX_TOKEN_TTL_SECS} (ten years)"
        )));
    }
    let t = s
        .store
        .issue_token(&user, std::time::Duration::from_secs(ttl))
        .await?;
    Ok(ok(
        StatusCode::CREATED,
        json!({"token": t.token, "id": t.id, "expires_at_ms": t.expires_at_ms}),
    ))
}

async fn user_conversations(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath(user): ApiPath<String>,
) -> ApiResult {
    let id = user_id(&s, &user).await?;
    let convs = s.store.conv_list(id).await?;
    Ok(ok(StatusCode::OK, json!({"conversations": convs})))
}

async fn devices(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath(user): ApiPath<String>,
) -> ApiResult {
    check_user(&user)?;
    let devices = s.store.list_devices(&user).await?;
    Ok(ok(StatusCode::OK, json!({"devices": devices})))
}

async fn revoke_device(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath((user, device)): ApiPath<(String, String)>,
) -> ApiResult {
    let id = user_id(&s, &user).await?;
    if !keepwire_proto::is_valid_device_id(&device) {
        return Err(Problem::not_found(format!("no device {device:?}")));
    }
    let revoked = s.store.revoke_device(&user, &device).await?;
    // Close at once in this relay; others learn it from the revocation log.
    s.hub.revoke(id, None, Some(&device));
    Ok(ok(StatusCode::OK, json!({"revoked": revoked})))
}

/// The body of `PUT /v1/users/{user}/devices/{device}/push`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPush {
    registration: serde_json::Value,
    #[serde(default)]
    previews: bool,
}

async fn set_device_push(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath((user, device)): ApiPath<(String, String)>,
    ApiJson(b): ApiJson<SetPush>,
) -> ApiResult {
    let id = user_id(&s, &user).await?;
    if !keepwire_proto::is_valid_device_id(&device) {
        return Err(Problem::not_found(format!("no device {device:?}")));
    }
    let Some(push) = &s.push else {
        return Err(Problem::bad_request(
            "this relay sends no push wake-ups (start it with --push-config)",
        ));
    };
    let reg = crate::session::PushPolicy::check(&**push, &b.registration, b.previews)
        .map_err(Problem::bad_request)?;
    let reg_id = s.store.set_push(id, &device, Some(reg)).await?;
    push.registered(id);
    Ok(ok(StatusCode::OK, json!({"id": reg_id})))
}

async fn delete_device_push(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath((user, device)): ApiPath<(String, String)>,
) -> ApiResult {
    let id = user_id(&s, &user).await?;
    if !keepwire_proto::is_valid_device_id(&device) {
        return Err(Problem::not_found(format!("no device {device:?}")));
    }
    s.store.set_push(id, &device, None).await?;
    Ok(ok(StatusCode::OK, json!({"removed": true})))
}

/// The relay's VAPID public key: a browser or UnifiedPush distributor needs
/// it to subscribe. Public (no API key).
async fn vapid_key(State(s): State<Arc<Shared>>) -> ApiResult {
    match s.push.as_ref().and_then(|p| p.vapid_public_key()) {
        Some(k) => Ok(ok(StatusCode::OK, json!({"vapid": k}))),
        None => Err(Problem::not_found(
            "this relay has no Web Push configuration",
        )),
    }
}

async fn revoke_tokens(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath(user): ApiPath<String>,
) -> ApiResult {
    let id = user_id(&s, &user).await?;
    let n = s.store.revoke(RevokeTarget::User(user)).await?;
    // A JWT user has no keepwire tokens (`revoked_tokens` 0) but live
    // connections, closed all the same: say how many.
    let closed = s.hub.revoke(id, None, None);
    Ok(ok(
        StatusCode::OK,
        json!({"revoked_tokens": n, "closed_connections": closed}),
    ))
}

#[derive(Deserialize)]
struct PositionsQuery {
    conv: Option<u64>,
}

async fn positions(
    State(s): State<Arc<Shared>>,
    _key: Authorized,
    ApiPath(user): ApiPath<String>,
    q: Result<Query<PositionsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    check_user(&user)?;
    let Query(q) = q.map_err(|e| Problem::bad_request(e.body_text()))?;
    let conv = q.conv.filter(|&c| c <= i64::MAX as u64);
    let p = s.store.positions(&user, conv).await?;
    Ok(ok(StatusCode::OK, json!(p)))
}

#[cfg(test)]
mod tests {
    use super::bearer;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in [
            "Bearer kwk_1",
            "bearer kwk_1",
            "BEARER kwk_1",
            "Bearer   kwk_1 ",
        ] {
            assert_eq!(bearer(v), Some("kwk_1"), "{v:?}");
        }
        for v in ["Basic kwk_1", "Bearer", "Bearer ", "Bearerkwk_1", "kwk_1"] {
            assert_eq!(bearer(v), None, "{v:?}");
        }
    }
}
