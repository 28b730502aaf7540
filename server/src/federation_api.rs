//! `/_matrix/key/*` and `/_matrix/federation/*`: what other servers ask us. Every federation
//! request except the key server and version endpoints carries an X-Matrix signature, checked
//! by the [`Signed`] extractor before a handler runs.

use limbic_core::now_ms;
use axum::{
    Json, Router,
    extract::{FromRequest, FromRequestParts, Path, Request, State},
    routing::{get, post},
};
use ruma::{
    OwnedServerName,
    api::{
        IncomingRequest, IncomingRequestExt,
        federation::{
            authentication::XMatrix,
            device::get_devices,
            directory::{get_public_rooms, get_public_rooms_filtered},
            keys::{claim_keys, get_keys},
            backfill::get_backfill,
            event::{get_event, get_missing_events, get_room_state, get_room_state_ids},
            membership::{create_invite, create_join_event, create_knock_event, create_leave_event, prepare_join_event, prepare_knock_event, prepare_leave_event},
            transactions::send_transaction_message,
            query::{get_profile_information, get_room_information},
        },
    },
};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use crate::{
    client::AppState,
    error::{Error, ErrorCode, Result},
};

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = router
        .route("/_matrix/federation/v1/version", get(version))
        .route("/_matrix/key/v2/server", get(server_keys))
        .route("/_matrix/key/v2/query", post(query_keys))
        .route("/_matrix/key/v2/query/{server_name}", get(query_server_keys))
        .route("/.well-known/matrix/server", get(well_known))
        .route("/_matrix/federation/v1/openid/userinfo", get(openid_userinfo));
    let router = crate::client::route::<get_profile_information::v1::Request, _, _>(router, profile);
    let router = crate::client::route::<get_room_information::v1::Request, _, _>(router, directory);
    let router = crate::client::route::<get_devices::v1::Request, _, _>(router, devices);
    let router = crate::client::route::<get_keys::v1::Request, _, _>(router, keys_query);
    let router = crate::client::route::<claim_keys::v1::Request, _, _>(router, keys_claim);
    let router = crate::client::route::<get_public_rooms::v1::Request, _, _>(router, public_rooms);
    let router = crate::client::route::<get_event::v1::Request, _, _>(router, event);
    let router = crate::client::route::<get_room_state::v1::Request, _, _>(router, room_state);
    let router = crate::client::route::<get_room_state_ids::v1::Request, _, _>(router, room_state_ids);
    let router = crate::client::route::<get_backfill::v1::Request, _, _>(router, backfill);
    let router = crate::client::route::<get_missing_events::v1::Request, _, _>(router, missing_events);
    let router = crate::client::route::<prepare_join_event::v1::Request, _, _>(router, make_join);
    let router = crate::client::route::<create_join_event::v2::Request, _, _>(router, send_join);
    let router = crate::client::route::<send_transaction_message::v1::Request, _, _>(router, send_transaction);
    let router = crate::client::route::<create_invite::v2::Request, _, _>(router, invite);
    let router = crate::client::route::<prepare_knock_event::v1::Request, _, _>(router, make_knock);
    let router = crate::client::route::<create_knock_event::v1::Request, _, _>(router, send_knock);
    let router = crate::client::route::<prepare_leave_event::v1::Request, _, _>(router, make_leave);
    let router = crate::client::route::<create_leave_event::v2::Request, _, _>(router, send_leave);
    crate::client::route::<get_public_rooms_filtered::v1::Request, _, _>(router, public_rooms_filtered)
}

async fn event(State(server): State<AppState>, req: Signed<get_event::v1::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(crate::federation::history::event(&*server, &req.origin, &req.body.event_id)?))
}

async fn room_state(State(server): State<AppState>, req: Signed<get_room_state::v1::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(crate::federation::history::state(&*server, &req.origin, &req.body.room_id, &req.body.event_id)?))
}

async fn room_state_ids(State(server): State<AppState>, req: Signed<get_room_state_ids::v1::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(crate::federation::history::state_ids(&*server, &req.origin, &req.body.room_id, &req.body.event_id)?))
}

async fn backfill(State(server): State<AppState>, req: Signed<get_backfill::v1::Request>) -> Result<Json<JsonValue>> {
    let limit = u64::from(req.body.limit) as usize;
    Ok(Json(crate::federation::history::backfill(&*server, &req.origin, &req.body.room_id, &req.body.v, limit)?))
}

async fn missing_events(State(server): State<AppState>, req: Signed<get_missing_events::v1::Request>) -> Result<Json<JsonValue>> {
    let body = &req.body;
    Ok(Json(crate::federation::history::missing_events(&*server, &req.origin, &body.room_id, &body.earliest_events, &body.latest_events, u64::from(body.limit) as usize, u64::from(body.min_depth))?))
}

async fn invite(State(server): State<AppState>, req: Signed<create_invite::v2::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(crate::federation::membership::receive_invite(&*server, &req.origin, &req.body).await?))
}

async fn make_join(State(server): State<AppState>, req: Signed<prepare_join_event::v1::Request>) -> Result<Json<JsonValue>> {
    let body = &req.body;
    Ok(Json(crate::federation::membership::make_membership(&*server, &req.origin, &body.room_id, &body.user_id, "join", Some(&body.ver)).await?))
}

async fn make_knock(State(server): State<AppState>, req: Signed<prepare_knock_event::v1::Request>) -> Result<Json<JsonValue>> {
    let body = &req.body;
    Ok(Json(crate::federation::membership::make_membership(&*server, &req.origin, &body.room_id, &body.user_id, "knock", Some(&body.ver)).await?))
}

async fn make_leave(State(server): State<AppState>, req: Signed<prepare_leave_event::v1::Request>) -> Result<Json<JsonValue>> {
    let body = &req.body;
    Ok(Json(crate::federation::membership::make_membership(&*server, &req.origin, &body.room_id, &body.user_id, "leave", None).await?))
}

async fn send_knock(State(server): State<AppState>, req: Signed<create_knock_event::v1::Request>) -> Result<Json<JsonValue>> {
    let body = &req.body;
    let pdu = crate::federation::membership::accept_membership(&*server, &req.origin, &body.room_id, &body.event_id, &body.pdu, "knock").await?;
    let state = crate::federation::membership::stripped_state_events(&*server, &pdu.room_id, None)?;
    Ok(Json(json!({ "knock_room_state": state })))
}

async fn send_leave(State(server): State<AppState>, req: Signed<create_leave_event::v2::Request>) -> Result<Json<JsonValue>> {
    let body = &req.body;
    crate::federation::membership::accept_membership(&*server, &req.origin, &body.room_id, &body.event_id, &body.pdu, "leave").await?;
    Ok(Json(json!({})))
}

async fn send_join(State(server): State<AppState>, req: Signed<create_join_event::v2::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(crate::federation::membership::send_join(&*server, &req.origin, &req.body).await?))
}

/// A transaction: PDUs appended one by one (each may fail on its own), then typing and receipts.
async fn send_transaction(State(server): State<AppState>, req: Signed<send_transaction_message::v1::Request>) -> Result<Json<JsonValue>> {
    check_transaction(&req.origin, &req.body)?;
    let results = crate::federation::inbound::receive_transaction(&*server, &req.origin, &req.body.pdus).await;
    crate::federation::inbound::receive_edus(&*server, &req.origin, &req.body.edus);
    Ok(Json(json!({ "pdus": results })))
}

/// A transaction comes from the server that signed the request, and has a bounded size.
pub fn check_transaction(origin: &ruma::ServerName, transaction: &send_transaction_message::v1::Request) -> Result<()> {
    if transaction.origin != origin {
        return Err(Error::forbidden("the transaction's origin is not the signing server"));
    }
    if transaction.pdus.len() > 50 || transaction.edus.len() > 100 {
        return Err(Error::bad_json("a transaction has at most 50 PDUs and 100 EDUs"));
    }
    Ok(())
}

fn unauthorized(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::Unauthorized, message)
}

/// A federation request whose X-Matrix signature checked out: the origin server and the parsed
/// request.
pub struct Signed<T> {
    pub origin: OwnedServerName,
    pub body: T,
}

impl<T: IncomingRequest + Send> FromRequest<AppState> for Signed<T> {
    type Rejection = Error;

    async fn from_request(request: Request, server: &AppState) -> Result<Self> {
        let federation = server.federation.as_ref().ok_or_else(|| Error::not_found("federation is disabled on this server"))?;
        let (mut parts, body) = request.into_parts();
        let params: Vec<String> = axum::extract::RawPathParams::from_request_parts(&mut parts, server)
            .await
            .map_err(|e| Error::invalid_param(format!("bad path parameter: {e}")))?
            .iter()
            .map(|(_, v)| v.to_owned())
            .collect();
        let limit = federation.config.max_transaction_bytes;
        let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| Error::new(ErrorCode::TooLarge, format!("request body is larger than {limit} bytes")))?;
        let http_request = http::Request::from_parts(parts, bytes.to_vec());

        let xmatrix = x_matrix(http_request.headers())?;
        let origin = xmatrix.origin.clone();
        if !federation.allows(&origin) || origin == federation.server_name() {
            tracing::warn!(%origin, path = %http_request.uri().path(), "refused a request from a server this one does not federate with");
            return Err(Error::forbidden(format!("this server does not federate with {origin}")));
        }
        let keys = federation.public_keys(&origin, &[xmatrix.key.to_string()], now_ms()).await.map_err(|e| {
            tracing::warn!(%origin, error = %e, "cannot get the keys of a requesting server");
            unauthorized(format!("cannot verify the request: {e}"))
        })?;
        verify_x_matrix(&xmatrix, &http_request, federation.server_name(), keys)?;
        let path_args: Vec<&str> = params.iter().map(String::as_str).collect();
        let body = parse_request(http_request, &path_args)?;
        Ok(Self { origin, body })
    }
}

/// The X-Matrix authorization of a request, parsed but not verified.
pub fn x_matrix(headers: &http::HeaderMap) -> Result<XMatrix> {
    XMatrix::extract_from_http_headers(headers).map_err(|e| unauthorized(format!("missing or malformed X-Matrix authorization: {e}")))
}

/// Checks the X-Matrix signature of a request to `destination` with the origin's keys.
pub fn verify_x_matrix(xmatrix: &XMatrix, request: &http::Request<Vec<u8>>, destination: &ruma::ServerName, keys: ruma::signatures::PublicKeySet) -> Result<()> {
    let origin = &xmatrix.origin;
    let map = std::collections::BTreeMap::from([(origin.to_string(), keys)]);
    xmatrix.verify_http_request(request, destination, &map).map_err(|e| {
        tracing::warn!(%origin, path = %request.uri().path(), error = %e, "refused a request with a bad X-Matrix signature");
        unauthorized(format!("the X-Matrix signature does not verify: {e}"))
    })
}

/// The federation request `T` (path parameters, query and body) of an authenticated request.
pub fn parse_request<T: IncomingRequest>(request: http::Request<Vec<u8>>, path_args: &[&str]) -> Result<T> {
    let (parts, bytes) = request.into_parts();
    T::try_from_http_request(http::Request::from_parts(parts, bytes.as_slice()), path_args).map_err(|e| Error::bad_json(e.to_string()))
}


fn federation(server: &AppState) -> Result<&std::sync::Arc<crate::federation::Federation>> {
    server.federation.as_ref().ok_or_else(|| Error::not_found("federation is disabled on this server"))
}

async fn version() -> Json<JsonValue> {
    Json(json!({ "server": { "name": "Limbic", "version": env!("CARGO_PKG_VERSION") } }))
}

async fn server_keys(State(server): State<AppState>) -> Result<Json<JsonValue>> {
    let federation = federation(&server)?;
    Ok(Json(serde_json::to_value(federation.own_keys()?).map_err(Error::internal)?))
}

async fn well_known(State(server): State<AppState>) -> Result<Json<JsonValue>> {
    let delegated = server.federation.as_ref().map(|f| f.config.well_known_server.as_str()).filter(|s| !s.is_empty());
    let delegated = delegated.ok_or_else(|| Error::not_found("no delegation is configured"))?;
    Ok(Json(json!({ "m.server": delegated })))
}

#[derive(Deserialize)]
struct KeyQuery {
    server_keys: std::collections::BTreeMap<OwnedServerName, std::collections::BTreeMap<String, KeyCriteria>>,
}

#[derive(Deserialize, Default)]
struct KeyCriteria {
    #[serde(default)]
    minimum_valid_until_ts: Option<u64>,
}

/// The notary: each requested server's keys, with our signature added.
async fn query_keys(State(server): State<AppState>, body: axum::body::Bytes) -> Result<Json<JsonValue>> {
    let federation = federation(&server)?;
    let query: KeyQuery = serde_json::from_slice(&body).map_err(|e| Error::bad_json(e.to_string()))?;
    let mut answers = Vec::new();
    for (name, criteria) in query.server_keys.iter().take(100) {
        let minimum = criteria.values().filter_map(|c| c.minimum_valid_until_ts).max().unwrap_or(0);
        if let Some(answer) = federation.notary_response(name, minimum).await? {
            answers.push(answer);
        }
    }
    Ok(Json(json!({ "server_keys": answers })))
}

#[derive(Deserialize)]
struct ServerKeyQuery {
    minimum_valid_until_ts: Option<u64>,
}

async fn query_server_keys(
    State(server): State<AppState>,
    Path(name): Path<String>,
    crate::client::QueryParams(query): crate::client::QueryParams<ServerKeyQuery>,
) -> Result<Json<JsonValue>> {
    let federation = federation(&server)?;
    let name = OwnedServerName::try_from(name).map_err(|_| Error::invalid_param("invalid server name"))?;
    let answer = federation.notary_response(&name, query.minimum_valid_until_ts.unwrap_or(0)).await?;
    Ok(Json(json!({ "server_keys": answer.into_iter().collect::<Vec<_>>() })))
}

async fn profile(State(server): State<AppState>, req: Signed<get_profile_information::v1::Request>) -> Result<Json<JsonValue>> {
    let user = &req.body.user_id;
    if user.server_name() != server.server_name() {
        return Err(Error::invalid_param("not a user of this server"));
    }
    let account = server.users.account(user)?.filter(|a| !a.deactivated).ok_or_else(|| Error::not_found("unknown user"))?;
    let mut profile = serde_json::Map::new();
    for (field, value) in [("displayname", account.displayname), ("avatar_url", account.avatar_url)] {
        let wanted = req.body.field.as_ref().is_none_or(|f| f.as_str() == field);
        if let Some(value) = value.filter(|_| wanted) {
            profile.insert(field.to_owned(), json!(value));
        }
    }
    Ok(Json(JsonValue::Object(profile)))
}

async fn directory(State(server): State<AppState>, req: Signed<get_room_information::v1::Request>) -> Result<Json<JsonValue>> {
    let alias = &req.body.room_alias;
    if alias.server_name() != server.server_name() {
        return Err(Error::invalid_param("not an alias of this server"));
    }
    let room_id = server.rooms.resolve_alias(alias)?.ok_or_else(|| Error::not_found("unknown alias"))?;
    Ok(Json(json!({ "room_id": room_id, "servers": [server.server_name()] })))
}

async fn devices(State(server): State<AppState>, req: Signed<get_devices::v1::Request>) -> Result<Json<JsonValue>> {
    let user = &req.body.user_id;
    if user.server_name() != server.server_name() || !server.users.exists(user)? {
        return Err(Error::not_found("unknown user"));
    }
    // No device names: they stay on this server (see `local_device_keys`).
    let mut devices = Vec::new();
    for (device_id, keys) in server.e2ee.device_keys(user, &[])? {
        devices.push(json!({ "device_id": device_id, "keys": keys }));
    }
    let (master, self_signing) = (
        server.e2ee.cross_signing_key(user, crate::e2ee::CrossSigningKind::Master)?,
        server.e2ee.cross_signing_key(user, crate::e2ee::CrossSigningKind::SelfSigning)?,
    );
    let mut answer = json!({ "user_id": user, "stream_id": server.store.streams().current(), "devices": devices });
    if let Some(master) = master {
        answer["master_key"] = master;
    }
    if let Some(self_signing) = self_signing {
        answer["self_signing_key"] = self_signing;
    }
    Ok(Json(answer))
}

async fn keys_query(State(server): State<AppState>, req: Signed<get_keys::v1::Request>) -> Result<Json<JsonValue>> {
    let users: Vec<_> = req.body.device_keys.iter().filter(|(user, _)| user.server_name() == server.server_name()).map(|(u, d)| (u.clone(), d.iter().map(ToString::to_string).collect())).collect();
    let keys = crate::client::local_device_keys(&server, &users, None)?;
    Ok(Json(json!({ "device_keys": keys.device_keys, "master_keys": keys.master_keys, "self_signing_keys": keys.self_signing_keys })))
}

async fn keys_claim(State(server): State<AppState>, req: Signed<claim_keys::v1::Request>) -> Result<Json<JsonValue>> {
    let mut claimed: std::collections::BTreeMap<String, std::collections::BTreeMap<String, serde_json::Map<String, JsonValue>>> = Default::default();
    for (user, devices) in req.body.one_time_keys.iter().filter(|(user, _)| user.server_name() == server.server_name()) {
        for (device, algorithm) in devices {
            if let Some((key_id, key)) = server.e2ee.claim_key(user, device.as_str(), algorithm.as_ref())? {
                claimed.entry(user.to_string()).or_default().entry(device.to_string()).or_default().insert(key_id, key);
            }
        }
    }
    Ok(Json(json!({ "one_time_keys": claimed })))
}

async fn public_rooms(State(server): State<AppState>, req: Signed<get_public_rooms::v1::Request>) -> Result<Json<JsonValue>> {
    let limit = req.body.limit.map(|l| u64::from(l) as usize);
    Ok(Json(crate::client::directory_page(&server, limit, req.body.since.as_deref(), None)?))
}

async fn public_rooms_filtered(State(server): State<AppState>, req: Signed<get_public_rooms_filtered::v1::Request>) -> Result<Json<JsonValue>> {
    let limit = req.body.limit.map(|l| u64::from(l) as usize);
    let term = req.body.filter.generic_search_term.as_deref();
    Ok(Json(crate::client::directory_page(&server, limit, req.body.since.as_deref(), term)?))
}

#[derive(Deserialize)]
struct UserInfoQuery {
    access_token: String,
}

/// Who an OpenID token (from `/user/{userId}/openid/request_token`) belongs to.
async fn openid_userinfo(State(server): State<AppState>, crate::client::QueryParams(query): crate::client::QueryParams<UserInfoQuery>) -> Result<Json<JsonValue>> {
    let user = server.users.openid_user(&query.access_token)?.ok_or_else(|| Error::new(ErrorCode::UnknownToken, "unknown or expired OpenID token"))?;
    Ok(Json(json!({ "sub": user })))
}
