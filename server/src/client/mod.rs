//! `/_matrix/client/*` handlers, grouped by area. Handlers parse ruma request types through the
//! [`Ruma`] extractor, call a service, and answer ruma responses or Matrix errors.

mod account;
mod admin;
mod appointments;
mod calls;
mod delayed_events;
pub(crate) mod cors;
mod pages;
mod directory;
mod tags_and_users;
mod discovery;
mod events;
mod media;
mod keys;
mod push;
mod membership;
mod misc;
mod relations;
pub(crate) mod rejections;
mod rooms;
mod search;
mod breakouts;
mod plugins;
mod sessions;
mod summary;
mod sync;

use std::{marker::PhantomData, net::SocketAddr, sync::Arc, time::Instant};

use axum::{
    Router,
    extract::{ConnectInfo, FromRequest, FromRequestParts, MatchedPath, RawPathParams, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{MethodFilter, on},
};
use bytes::BytesMut;
use ruma::api::{
    IncomingRequest, IncomingRequestExt, Metadata, OutgoingResponse, OutgoingResponseExt,
    auth_scheme::{AccessToken, AccessTokenOptional, AppserviceToken, AppserviceTokenOptional, NoAccessToken, NoAuthentication},
    path_builder::PathBuilder,
};

use crate::{
    error::{Error, ErrorCode, Result},
    server::Server,
    users::Caller,
};

pub type AppState = Arc<Server>;

pub(crate) use admin::QueryParams;
pub(crate) use directory::directory_page;
pub(crate) use keys::local_device_keys;

/// Whether an endpoint's authentication scheme needs an access token.
pub trait TokenRequirement {
    const REQUIRED: Option<bool>;
}
impl TokenRequirement for AccessToken {
    const REQUIRED: Option<bool> = Some(true);
}
impl TokenRequirement for AccessTokenOptional {
    const REQUIRED: Option<bool> = Some(false);
}
impl TokenRequirement for AppserviceToken {
    const REQUIRED: Option<bool> = Some(true);
}
impl TokenRequirement for AppserviceTokenOptional {
    const REQUIRED: Option<bool> = Some(false);
}
impl TokenRequirement for NoAuthentication {
    const REQUIRED: Option<bool> = None;
}
impl TokenRequirement for NoAccessToken {
    const REQUIRED: Option<bool> = None;
}

/// How [`Ruma`] reads a request body.
pub trait BodyKind {
    /// Whether the body is JSON; other bodies (uploads) reach ruma untouched.
    const JSON: bool;
    /// Whether the handler reads the body itself as it arrives ([`Ruma::take_stream`], uploads):
    /// ruma then parses the rest of the request with an empty body, and the handler keeps
    /// to the limit.
    const STREAMED: bool = false;
    /// The largest body accepted.
    fn limit(server: &Server) -> usize;
}

/// The usual JSON body, up to `limits.max_request_body`.
pub struct JsonBody;

impl BodyKind for JsonBody {
    const JSON: bool = true;
    fn limit(server: &Server) -> usize {
        server.config.limits.max_request_body
    }
}

/// A parsed ruma request with its authenticated caller.
pub struct Ruma<T, B = JsonBody> {
    pub body: T,
    caller: Option<Caller>,
    pub ip: Option<std::net::IpAddr>,
    /// The JSON body as sent, for user-interactive auth that ruma keeps opaque.
    pub json: Option<serde_json::Value>,
    /// The unread body of [`BodyKind::STREAMED`] requests; in a mutex only so that the
    /// request stays `Sync` (a body is not) for handlers that hold it across an await.
    stream: std::sync::Mutex<Option<axum::body::Body>>,
    kind: PhantomData<fn() -> B>,
}

impl<T, B> Ruma<T, B> {
    /// The authenticated caller; only endpoints that require a token call this.
    pub fn caller(&self) -> &Caller {
        self.caller.as_ref().expect("endpoint requires an access token")
    }

    /// The unread body of a [`BodyKind::STREAMED`] request; empty for others, or once taken.
    pub fn take_stream(&mut self) -> axum::body::Body {
        self.stream.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).take().unwrap_or_default()
    }

    pub fn caller_opt(&self) -> Option<&Caller> {
        self.caller.as_ref()
    }

    /// What rate limits count the request against: its account (if any) and its client address.
    pub fn rate_keys(&self) -> crate::ratelimit::RateKeys {
        crate::ratelimit::RateKeys { subject: self.caller.as_ref().map(|c| c.user_id.to_string()), address: self.ip }
    }
}

fn access_token(parts: &http::request::Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(http::header::AUTHORIZATION) {
        return value.to_str().ok()?.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    let query = parts.uri.query()?;
    url_query_param(query, "access_token")
}

/// The caller named by the request's access token, or `None` when it has no token.
fn authenticate(server: &Server, parts: &http::request::Parts) -> Result<Option<Caller>> {
    let Some(token) = access_token(parts) else { return Ok(None) };
    let caller = server.users.authenticate(&token)?;
    caller.map(Some).ok_or_else(|| Error::new(ErrorCode::UnknownToken, "unknown or revoked access token"))
}

fn missing_token() -> Error {
    Error::new(ErrorCode::MissingToken, "missing access token")
}

fn url_query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| percent_decode(value))
    })
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The number of `{param}` segments an endpoint's path has.
fn path_param_count<T: Metadata>() -> usize {
    T::PATH_BUILDER.all_paths().next().map_or(0, |p| p.matches('{').count())
}

/// Reads and drops a refused body, up to `max` bytes, so that the refusal reaches the client:
/// a connection closed with unread data is reset, and the client may never see the answer.
async fn discard(body: axum::body::Body, max: usize) {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut read = 0usize;
    while read <= max {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, bytes::Bytes::len),
            _ => break,
        }
    }
}

/// A body field whose absence makes ruma's parser panic rather than fail: ruma 0.25's login
/// parser indexes the flattened `type` of `LoginInfo`. Checked first, so that no request of a
/// stranger reaches a panic (the catch below stays as the last line of defence).
fn missing_panicking_field<T: Metadata>(json: Option<&serde_json::Value>) -> Option<&'static str> {
    let login = T::METHOD == http::Method::POST && T::PATH_BUILDER.all_paths().any(|p| p.ends_with("/login"));
    let object = json?.as_object()?;
    (login && !object.contains_key("type")).then_some("type")
}

impl<T, B> FromRequest<AppState> for Ruma<T, B>
where
    T: IncomingRequest + Send,
    T::Authentication: TokenRequirement,
    B: BodyKind,
{
    type Rejection = Error;

    async fn from_request(request: Request, server: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = request.into_parts();
        let mut params: Vec<String> = RawPathParams::from_request_parts(&mut parts, server)
            .await
            .map_err(|e| Error::invalid_param(format!("bad path parameter: {e}")))?
            .iter()
            .map(|(_, v)| v.to_owned())
            .collect();
        // Routes registered without a trailing empty parameter (e.g. a state event with an
        // empty state key) get it filled in.
        params.resize(params.len().max(path_param_count::<T>()), String::new());
        // The one place a client's address is found: rate limits, devices and audit use it.
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        let ip = crate::ratelimit::client_address(peer, &parts.headers, &server.config.rate_limits.trusted_proxies);

        let caller = match T::Authentication::REQUIRED {
            None => None,
            Some(required) => match authenticate(server, &parts)? {
                None if required => return Err(missing_token()),
                caller => caller,
            },
        };

        // Strangers' JSON bodies get far less room than users'.
        let limit = match &caller {
            None if B::JSON => B::limit(server).min(server.config.limits.max_unauthenticated_body),
            _ => B::limit(server),
        };
        let too_large =
            || Error::new(ErrorCode::TooLarge, format!("request body is larger than {limit} bytes"));
        // A declared oversize body is refused before any of it is kept.
        let declared = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|length| length > limit) {
            discard(body, server.config.limits.max_request_body).await;
            return Err(too_large());
        }
        let (mut bytes, stream) = if B::STREAMED {
            (bytes::Bytes::new(), Some(body))
        } else {
            (axum::body::to_bytes(body, limit).await.map_err(|_| too_large())?, None)
        };
        // Many clients send no body at all where the spec has an all-optional JSON object.
        if B::JSON && bytes.is_empty() && matches!(parts.method, http::Method::POST | http::Method::PUT) {
            bytes = bytes::Bytes::from_static(b"{}");
        }
        let json = if !B::JSON || bytes.is_empty() {
            None
        } else {
            match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(value) => Some(value),
                Err(_) if parts.method == http::Method::GET => None,
                Err(e) => return Err(Error::new(ErrorCode::NotJson, format!("body is not JSON: {e}"))),
            }
        };
        if let Some(field) = missing_panicking_field::<T>(json.as_ref()) {
            return Err(Error::new(ErrorCode::MissingParam, format!("missing field `{field}`")));
        }
        let path_args: Vec<&str> = params.iter().map(String::as_str).collect();
        let http_request = http::Request::from_parts(parts, bytes.as_ref());
        // Some ruma parsers panic on malformed input (e.g. a login body without `type`).
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| T::try_from_http_request(http_request, &path_args)))
            .map_err(|_| Error::bad_json("the request body does not have the expected shape"))?;
        let body = parsed.map_err(parse_error)?;
        Ok(Self { body, caller, ip, json, stream: std::sync::Mutex::new(stream), kind: PhantomData })
    }
}

/// The Matrix error for a request ruma could not parse. ruma parses path and query parameters
/// alike (`Query`): a room id without its `!` is an invalid parameter. In the body, a missing
/// field is a missing parameter (serde_json has no variant for it: its data errors say
/// "missing field"), anything else bad JSON.
fn parse_error(error: ruma::api::error::FromHttpRequestError) -> Error {
    use ruma::api::error::{DeserializationError, FromHttpRequestError};
    let message = error.to_string();
    match error {
        FromHttpRequestError::Deserialization(DeserializationError::Query(_) | DeserializationError::Ident(_)) => Error::invalid_param(message),
        FromHttpRequestError::Deserialization(DeserializationError::Json(json))
            if json.classify() == serde_json::error::Category::Data && json.to_string().starts_with("missing field") =>
        {
            Error::new(ErrorCode::MissingParam, message)
        }
        _ => Error::bad_json(message),
    }
}

/// A ruma response as an axum response.
pub struct RumaResponse<T>(pub T);

impl<T: OutgoingResponse> IntoResponse for RumaResponse<T> {
    fn into_response(self) -> Response {
        match self.0.try_into_http_response::<BytesMut>() {
            Ok(response) => response.map(|body| axum::body::Body::from(body.freeze())).into_response(),
            Err(e) => Error::internal(format!("response serialization: {e}")).into_response(),
        }
    }
}

impl<T> From<T> for RumaResponse<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

/// Registers `handler` on every path (v3, r0 and unstable) of the ruma endpoint `T`.
pub(crate) fn route<T, H, X>(router: Router<AppState>, handler: H) -> Router<AppState>
where
    T: IncomingRequest,
    H: axum::handler::Handler<X, AppState>,
    X: 'static,
{
    let filter = MethodFilter::try_from(T::METHOD).expect("ruma endpoints use standard methods");
    let mut router = router;
    for path in T::PATH_BUILDER.all_paths() {
        router = router.route(path, on(filter, handler.clone()));
    }
    router
}

pub fn router() -> Router<AppState> {
    let router = Router::new();
    let router = discovery::routes(router);
    let router = account::routes(router);
    let router = rooms::routes(router);
    let router = membership::routes(router);
    let router = events::routes(router);
    let router = delayed_events::routes(router);
    let router = directory::routes(router);
    let router = summary::routes(router);
    let router = tags_and_users::routes(router);
    let router = sync::routes(router);
    let router = keys::routes(router);
    let router = push::routes(router);
    let router = media::routes(router);
    let router = relations::routes(router);
    let router = search::routes(router);
    let router = sessions::routes(router);
    let router = breakouts::routes(router);
    let router = appointments::routes(router);
    let router = admin::routes(router);
    let router = plugins::routes(router);
    let router = calls::routes(router);
    let router = pages::routes(router);
    misc::routes(router)
}

/// Records route, status and latency of every request.
pub async fn track_metrics(State(server): State<AppState>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    server.metrics.observe_request(&method, &route, response.status().as_u16(), start.elapsed());
    response
}

/// A handler that panicked answers 500 M_UNKNOWN; the panic itself is logged by the panic hook.
pub fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    Error::internal("the request failed unexpectedly").into_response()
}

/// Unknown endpoints answer M_UNRECOGNIZED, as the spec asks.
pub async fn unrecognized() -> Error {
    Error::new(ErrorCode::Unrecognized, "unrecognized request")
}

#[cfg(test)]
mod tests {
    use ruma::api::error::FromHttpRequestError;

    use super::parse_error;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        room_id: ruma::OwnedRoomId,
    }

    fn errcode(error: FromHttpRequestError) -> &'static str {
        parse_error(error).code().as_str()
    }

    #[test]
    fn parse_errors_are_classified_by_kind() {
        let missing = serde_json::from_str::<Body>("{}").unwrap_err();
        assert_eq!(errcode(missing.into()), "M_MISSING_PARAM");
        let wrong_type = serde_json::from_str::<Body>(r#"{"room_id": 7}"#).unwrap_err();
        assert_eq!(errcode(wrong_type.into()), "M_BAD_JSON");
        // A body field named like a parameter is still a body field.
        let bad_id = serde_json::from_str::<Body>(r#"{"room_id": "path-or-query"}"#).unwrap_err();
        assert_eq!(errcode(bad_id.into()), "M_BAD_JSON");
        let path = ruma::RoomId::parse("no-sigil").unwrap_err();
        assert_eq!(errcode(path.into()), "M_INVALID_PARAM");
    }
}
