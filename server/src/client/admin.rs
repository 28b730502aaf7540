//! The Synapse-compatible admin API under `/_synapse/admin/`, for server admins only: plain JSON
//! routes (ruma has no types for them) over the `admin` service.

use std::sync::{Arc, Mutex};

use axum::{
    Json, Router,
    extract::{FromRequest, FromRequestParts, MatchedPath, Path, Query, RawPathParams, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use http::{StatusCode, request::Parts};
use ruma::{OwnedRoomId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Value as JsonValue, json};

use super::{AppState, authenticate, missing_token};
use crate::{
    admin::{self, AccountChanges, DeleteRoom, Deletion, UserFilter},
    audit::AuditRecord,
    error::{Error, ErrorCode, Result},
    users::{Account, Device},
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    const V1: &str = "/_synapse/admin/v1";
    const V2: &str = "/_synapse/admin/v2";
    let audited = Router::new()
        .route(&format!("{V2}/users"), get(list_users))
        .route(&format!("{V2}/users/{{user_id}}"), get(query_user).put(put_user))
        .route(&format!("{V1}/deactivate/{{user_id}}"), post(deactivate))
        .route(&format!("{V1}/users/{{user_id}}/admin"), get(get_admin).put(set_admin))
        .route(&format!("{V1}/reset_password/{{user_id}}"), post(reset_password))
        .route(&format!("{V2}/users/{{user_id}}/devices"), get(devices))
        .route(&format!("{V2}/users/{{user_id}}/devices/{{device_id}}"), get(device).delete(delete_device))
        .route(&format!("{V1}/whois/{{user_id}}"), get(whois))
        .route(&format!("{V1}/rooms"), get(list_rooms))
        .route(&format!("{V1}/rooms/{{room_id}}"), get(room_details).delete(delete_room_v1))
        .route(&format!("{V1}/rooms/{{room_id}}/members"), get(room_members))
        .route(&format!("{V1}/rooms/{{room_id}}/state"), get(room_state))
        .route(&format!("{V1}/rooms/{{room_id}}/block"), get(get_block).put(set_block))
        .route(&format!("{V2}/rooms/{{room_id}}"), delete(delete_room_v2))
        .route(&format!("{V2}/rooms/{{room_id}}/delete_status"), get(room_delete_status))
        .route(&format!("{V2}/rooms/delete_status/{{delete_id}}"), get(delete_status))
        .route(&format!("{V1}/media/{{server_name}}/{{media_id}}"), delete(delete_media))
        .route_layer(axum::middleware::from_fn(audit_admin_request));
    router
        .merge(audited)
        .route(&format!("{V1}/server_version"), get(server_version))
        .route("/_limbic/admin/v1/audit", get(audit_log))
        .route("/_limbic/admin/v1/audit/verify", get(audit_verify))
        .route("/_limbic/admin/v1/audit/head", get(audit_head))
}

// --- extractors: the admin caller, and Matrix errors for bad paths, queries and bodies ---

/// A request from a server admin, authenticated by access token.
pub(super) struct Admin(pub(super) OwnedUserId);

impl FromRequestParts<AppState> for Admin {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, server: &AppState) -> Result<Self> {
        let caller = authenticate(server, parts)?.ok_or_else(missing_token)?;
        if !server.users.account(&caller.user_id)?.is_some_and(|a| a.admin && !a.deactivated) {
            return Err(Error::forbidden("you are not a server admin"));
        }
        if let Some(slot) = parts.extensions.get::<AuditedAdmin>() {
            *slot.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((server.clone(), caller.user_id.clone()));
        }
        Ok(Self(caller.user_id))
    }
}

/// Filled by the [`Admin`] extractor, so that [`audit_admin_request`] knows who acted.
#[derive(Clone, Default)]
struct AuditedAdmin(Arc<Mutex<Option<(AppState, OwnedUserId)>>>);

/// Every admin API request that succeeds is audited as `admin_action`: who, which route, and
/// the user or room it was about. Recorded once the handler has answered, as the longer actions
/// (room deletion, deactivation) span several writes.
async fn audit_admin_request(matched: MatchedPath, params: RawPathParams, mut request: Request, next: Next) -> Response {
    let slot = AuditedAdmin::default();
    request.extensions_mut().insert(slot.clone());
    let method = request.method().to_string();
    let response = next.run(request).await;
    let acted = slot.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some((server, admin)) = acted.filter(|_| response.status().is_success()) {
        let mut record = AuditRecord::new("admin_action", &admin).details(json!({ "method": method, "route": matched.as_str() }));
        for (name, value) in &params {
            match name {
                "user_id" => record = record.target(value),
                "room_id" => record = record.room(value),
                _ => {}
            }
        }
        if let Err(error) = server.audit.write_with(&server.store, server.store.batch(), vec![record]) {
            tracing::error!(%error, %admin, route = matched.as_str(), "could not audit an admin action");
        }
    }
    response
}

struct Params<T>(T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for Params<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, server: &AppState) -> Result<Self> {
        let Path(params) = Path::<T>::from_request_parts(parts, server)
            .await
            .map_err(|e| Error::invalid_param(format!("bad path parameter: {e}")))?;
        Ok(Self(params))
    }
}

pub(crate) struct QueryParams<T>(pub(crate) T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for QueryParams<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, server: &AppState) -> Result<Self> {
        let Query(query) = Query::<T>::from_request_parts(parts, server)
            .await
            .map_err(|e| Error::invalid_param(format!("bad query parameter: {}", e.body_text())))?;
        Ok(Self(query))
    }
}

/// A JSON body; an empty one reads as `{}`.
struct Body<T>(T);

impl<T: DeserializeOwned> FromRequest<AppState> for Body<T> {
    type Rejection = Error;

    async fn from_request(request: Request, server: &AppState) -> Result<Self> {
        let limit = server.config.limits.max_request_body;
        let bytes = axum::body::to_bytes(request.into_body(), limit)
            .await
            .map_err(|_| Error::new(ErrorCode::TooLarge, format!("request body is larger than {limit} bytes")))?;
        let value: JsonValue = if bytes.is_empty() {
            json!({})
        } else {
            serde_json::from_slice(&bytes).map_err(|e| Error::new(ErrorCode::NotJson, format!("body is not JSON: {e}")))?
        };
        serde_json::from_value(value).map(Self).map_err(|e| {
            let code = if e.to_string().starts_with("missing field") { ErrorCode::MissingParam } else { ErrorCode::BadJson };
            Error::new(code, e.to_string())
        })
    }
}

fn room_id(room: &str) -> Result<OwnedRoomId> {
    OwnedRoomId::try_from(room).map_err(|e| Error::invalid_param(format!("invalid room id {room}: {e}")))
}

fn yes() -> bool {
    true
}

// --- server and users ---

async fn server_version(_admin: Admin) -> Json<JsonValue> {
    Json(json!({ "server_version": format!("limbic {}", env!("CARGO_PKG_VERSION")) }))
}

fn last_seen_ts(devices: &[(ruma::OwnedDeviceId, Device)]) -> Option<u64> {
    devices.iter().filter_map(|(_, d)| d.last_seen_ts).max()
}

fn user_json(server: &AppState, user_id: &UserId, account: &Account) -> Result<JsonValue> {
    let devices = server.users.devices(user_id)?;
    Ok(json!({
        "name": user_id,
        "displayname": account.displayname,
        "avatar_url": account.avatar_url,
        "admin": account.admin,
        "deactivated": account.deactivated,
        "is_guest": false,
        "user_type": null,
        "creation_ts": account.created_ts,
        "last_seen_ts": last_seen_ts(&devices),
        "shadow_banned": false,
        "erased": false,
        "locked": false,
        "approved": true,
        "threepids": [],
        "external_ids": [],
    }))
}

#[derive(Deserialize)]
struct UserListQuery {
    #[serde(default)]
    from: usize,
    limit: Option<usize>,
    name: Option<String>,
    user_id: Option<String>,
    #[serde(default)]
    deactivated: bool,
    admins: Option<bool>,
}

const DEFAULT_LIMIT: usize = 100;

async fn list_users(
    State(server): State<AppState>,
    _admin: Admin,
    QueryParams(query): QueryParams<UserListQuery>,
) -> Result<Json<JsonValue>> {
    let filter = UserFilter { name: query.name, user_id: query.user_id, include_deactivated: query.deactivated, admins: query.admins };
    let page = admin::page(admin::list_users(&*server, &filter)?, query.from, query.limit.unwrap_or(DEFAULT_LIMIT));
    let users = page.items.iter().map(|(user_id, account)| user_json(&server, user_id, account)).collect::<Result<Vec<_>>>()?;
    let mut response = json!({ "users": users, "total": page.total });
    if let Some(next) = page.next {
        response["next_token"] = json!(next.to_string());
    }
    Ok(Json(response))
}

async fn query_user(State(server): State<AppState>, _admin: Admin, Params(user): Params<String>) -> Result<Json<JsonValue>> {
    let user_id = admin::local_user(&*server, &user)?;
    Ok(Json(user_json(&server, &user_id, &admin::account(&*server, &user_id)?)?))
}

#[derive(Deserialize)]
struct PutUserBody {
    password: Option<String>,
    #[serde(default = "yes")]
    logout_devices: bool,
    displayname: Option<String>,
    avatar_url: Option<String>,
    admin: Option<bool>,
    deactivated: Option<bool>,
}

/// Server admins may not take their own admin rights away (another admin has to).
fn refuse_self_demotion(caller: &UserId, target: &UserId, admin: Option<bool>) -> Result<()> {
    if caller == target && admin == Some(false) {
        return Err(Error::with_status(ErrorCode::Unknown, StatusCode::BAD_REQUEST, "you may not demote yourself"));
    }
    Ok(())
}

async fn put_user(
    State(server): State<AppState>,
    Admin(caller): Admin,
    Params(user): Params<String>,
    Body(body): Body<PutUserBody>,
) -> Result<Response> {
    let user_id = admin::local_user(&*server, &user)?;
    refuse_self_demotion(&caller, &user_id, body.admin)?;
    // An empty string clears a profile field.
    let field = |value: Option<String>| value.map(|v| Some(v).filter(|v| !v.is_empty()));
    let changes = AccountChanges {
        password: body.password,
        logout_devices: body.logout_devices,
        displayname: field(body.displayname),
        avatar_url: field(body.avatar_url),
        admin: body.admin,
        deactivated: body.deactivated,
    };
    let created = admin::put_user(&*server, &user_id, changes).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    let user = user_json(&server, &user_id, &admin::account(&*server, &user_id)?)?;
    Ok((status, Json(user)).into_response())
}

async fn deactivate(State(server): State<AppState>, _admin: Admin, Params(user): Params<String>) -> Result<Json<JsonValue>> {
    crate::accounts::deactivate_account(&*server, &admin::local_user(&*server, &user)?).await?;
    Ok(Json(json!({ "id_server_unbind_result": "success" })))
}

async fn get_admin(State(server): State<AppState>, _admin: Admin, Params(user): Params<String>) -> Result<Json<JsonValue>> {
    let user_id = admin::local_user(&*server, &user)?;
    Ok(Json(json!({ "admin": admin::account(&*server, &user_id)?.admin })))
}

#[derive(Deserialize)]
struct SetAdminBody {
    admin: bool,
}

async fn set_admin(
    State(server): State<AppState>,
    Admin(caller): Admin,
    Params(user): Params<String>,
    Body(body): Body<SetAdminBody>,
) -> Result<Json<JsonValue>> {
    let user_id = admin::local_user(&*server, &user)?;
    refuse_self_demotion(&caller, &user_id, Some(body.admin))?;
    admin::set_admin(&*server, &user_id, body.admin)?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct ResetPasswordBody {
    new_password: String,
    #[serde(default = "yes")]
    logout_devices: bool,
}

async fn reset_password(
    State(server): State<AppState>,
    _admin: Admin,
    Params(user): Params<String>,
    Body(body): Body<ResetPasswordBody>,
) -> Result<Json<JsonValue>> {
    let user_id = admin::local_user(&*server, &user)?;
    admin::reset_password(&*server, &user_id, &body.new_password, body.logout_devices)?;
    Ok(Json(json!({})))
}

// --- devices and sessions ---

fn device_json(user_id: &UserId, device_id: &str, device: &Device) -> JsonValue {
    json!({
        "device_id": device_id,
        "display_name": device.display_name,
        "last_seen_ip": device.last_seen_ip,
        "last_seen_ts": device.last_seen_ts,
        "last_seen_user_agent": null,
        "user_id": user_id,
    })
}

fn existing_user(server: &AppState, user: &str) -> Result<OwnedUserId> {
    let user_id = admin::local_user(&**server, user)?;
    admin::account(&**server, &user_id)?;
    Ok(user_id)
}

/// The devices of an existing local user.
fn user_devices(server: &AppState, user: &str) -> Result<(OwnedUserId, Vec<(ruma::OwnedDeviceId, Device)>)> {
    let user_id = existing_user(server, user)?;
    let devices = server.users.devices(&user_id)?;
    Ok((user_id, devices))
}

async fn devices(State(server): State<AppState>, _admin: Admin, Params(user): Params<String>) -> Result<Json<JsonValue>> {
    let (user_id, devices) = user_devices(&server, &user)?;
    let list: Vec<JsonValue> = devices.iter().map(|(id, d)| device_json(&user_id, id.as_str(), d)).collect();
    Ok(Json(json!({ "devices": list, "total": devices.len() })))
}

async fn device(
    State(server): State<AppState>,
    _admin: Admin,
    Params((user, device_id)): Params<(String, String)>,
) -> Result<Json<JsonValue>> {
    let user_id = existing_user(&server, &user)?;
    let device = server.users.device(&user_id, &device_id)?.ok_or_else(|| Error::not_found("unknown device"))?;
    Ok(Json(device_json(&user_id, &device_id, &device)))
}

async fn delete_device(
    State(server): State<AppState>,
    _admin: Admin,
    Params((user, device_id)): Params<(String, String)>,
) -> Result<Json<JsonValue>> {
    let user_id = existing_user(&server, &user)?;
    // As in Synapse, deleting a device that is already gone succeeds.
    crate::accounts::delete_devices(&*server, &user_id, [device_id.as_str()])?;
    Ok(Json(json!({})))
}

async fn whois(State(server): State<AppState>, _admin: Admin, Params(user): Params<String>) -> Result<Json<JsonValue>> {
    let (user_id, devices) = user_devices(&server, &user)?;
    // Limbic keeps one connection per device: where and when it was last seen.
    let sessions: serde_json::Map<String, JsonValue> = devices
        .iter()
        .map(|(id, device)| {
            let connection = json!({ "ip": device.last_seen_ip, "last_seen": device.last_seen_ts, "user_agent": null });
            (id.to_string(), json!({ "sessions": [{ "connections": [connection] }] }))
        })
        .collect();
    Ok(Json(json!({ "user_id": user_id, "devices": sessions })))
}

// --- rooms ---

#[derive(Deserialize)]
struct RoomListQuery {
    #[serde(default)]
    from: usize,
    limit: Option<usize>,
    order_by: Option<String>,
    dir: Option<String>,
    search_term: Option<String>,
}

async fn list_rooms(
    State(server): State<AppState>,
    _admin: Admin,
    QueryParams(query): QueryParams<RoomListQuery>,
) -> Result<Json<JsonValue>> {
    let backwards = match query.dir.as_deref() {
        None | Some("f") => false,
        Some("b") => true,
        Some(other) => return Err(Error::invalid_param(format!("dir must be f or b, not {other}"))),
    };
    let order_by = query.order_by.as_deref().unwrap_or("name");
    let rooms = admin::list_rooms(&*server, query.search_term.as_deref(), order_by, backwards)?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    let page = admin::page(rooms, query.from, limit);
    let mut response = json!({ "rooms": page.items, "offset": query.from, "total_rooms": page.total });
    if let Some(next) = page.next {
        response["next_batch"] = json!(next);
    }
    if query.from > 0 {
        response["prev_batch"] = json!(query.from.saturating_sub(limit));
    }
    Ok(Json(response))
}

async fn room_details(State(server): State<AppState>, Admin(caller): Admin, Params(room): Params<String>) -> Result<Json<JsonValue>> {
    let room_id = room_id(&room)?;
    let summary = admin::room_summary(&*server, &room_id)?;
    admin::audit_notes_read(&*server, &caller, &room_id, "details")?;
    Ok(Json(summary))
}

fn existing_room(server: &AppState, room: &str) -> Result<OwnedRoomId> {
    let room_id = room_id(room)?;
    if !server.rooms.exists(&room_id)? {
        return Err(Error::not_found(format!("unknown room {room_id}")));
    }
    Ok(room_id)
}

async fn room_members(State(server): State<AppState>, Admin(caller): Admin, Params(room): Params<String>) -> Result<Json<JsonValue>> {
    let room_id = existing_room(&server, &room)?;
    admin::audit_notes_read(&*server, &caller, &room_id, "members")?;
    let members = server.rooms.joined_members(&room_id)?;
    Ok(Json(json!({ "members": members, "total": members.len() })))
}

async fn room_state(State(server): State<AppState>, Admin(caller): Admin, Params(room): Params<String>) -> Result<Json<JsonValue>> {
    let room_id = existing_room(&server, &room)?;
    admin::audit_notes_read(&*server, &caller, &room_id, "state")?;
    let state = server.rooms.current_state(&room_id)?;
    let events: Vec<JsonValue> = state.iter().map(|pdu| pdu.to_client_event(None, true)).collect();
    Ok(Json(json!({ "state": events })))
}

async fn get_block(State(server): State<AppState>, _admin: Admin, Params(room): Params<String>) -> Result<Json<JsonValue>> {
    Ok(Json(match server.rooms.blocked_by(&room_id(&room)?)? {
        Some(user_id) => json!({ "block": true, "user_id": user_id }),
        None => json!({ "block": false }),
    }))
}

#[derive(Deserialize)]
struct BlockBody {
    block: bool,
}

async fn set_block(
    State(server): State<AppState>,
    Admin(caller): Admin,
    Params(room): Params<String>,
    Body(body): Body<BlockBody>,
) -> Result<Json<JsonValue>> {
    server.rooms.set_blocked(&room_id(&room)?, body.block.then_some(caller.as_ref()))?;
    Ok(Json(json!({ "block": body.block })))
}

#[derive(Deserialize)]
struct DeleteRoomBody {
    #[serde(default)]
    block: bool,
    #[serde(default = "yes")]
    purge: bool,
    message: Option<String>,
    new_room_user_id: Option<String>,
}

async fn run_deletion(server: &AppState, caller: &UserId, room: &str, body: DeleteRoomBody) -> Result<Deletion> {
    let room_id = room_id(room)?;
    if body.new_room_user_id.is_some() {
        return Err(Error::invalid_param("Limbic makes no replacement room: leave out new_room_user_id"));
    }
    let options = DeleteRoom { block: body.block, purge: body.purge, message: body.message };
    admin::delete_room(&**server, caller, &room_id, &options).await
}

async fn delete_room_v1(
    State(server): State<AppState>,
    Admin(caller): Admin,
    Params(room): Params<String>,
    Body(body): Body<DeleteRoomBody>,
) -> Result<Json<JsonValue>> {
    let deletion = run_deletion(&server, &caller, &room, body).await?;
    Ok(Json(json!(deletion.report)))
}

/// Synapse runs v2 deletions in the background; Limbic finishes before answering, so the
/// status is `complete` as soon as the client can ask.
async fn delete_room_v2(
    State(server): State<AppState>,
    Admin(caller): Admin,
    Params(room): Params<String>,
    Body(body): Body<DeleteRoomBody>,
) -> Result<Json<JsonValue>> {
    let deletion = run_deletion(&server, &caller, &room, body).await?;
    Ok(Json(json!({ "delete_id": deletion.delete_id })))
}

fn status_json(deletion: &Deletion) -> JsonValue {
    json!({ "delete_id": deletion.delete_id, "status": "complete", "shutdown_room": deletion.report })
}

async fn room_delete_status(State(server): State<AppState>, _admin: Admin, Params(room): Params<String>) -> Result<Json<JsonValue>> {
    let deletions = server.admin.deletions.of_room(&room_id(&room)?);
    if deletions.is_empty() {
        return Err(Error::not_found("no deletion of this room is known"));
    }
    Ok(Json(json!({ "results": deletions.iter().map(status_json).collect::<Vec<_>>() })))
}

async fn delete_status(State(server): State<AppState>, _admin: Admin, Params(delete_id): Params<String>) -> Result<Json<JsonValue>> {
    let deletion = server.admin.deletions.by_id(&delete_id).ok_or_else(|| Error::not_found("unknown delete id"))?;
    Ok(Json(status_json(&deletion)))
}

// --- media ---

async fn delete_media(
    State(server): State<AppState>,
    _admin: Admin,
    Params((server_name, media_id)): Params<(String, String)>,
) -> Result<Json<JsonValue>> {
    if server_name != server.server_name().as_str() {
        return Err(Error::invalid_param("only local media can be deleted"));
    }
    server.media.delete(&media_id).await?;
    Ok(Json(json!({ "deleted_media": [media_id], "total": 1 })))
}

// --- the audit log ---

#[derive(Deserialize)]
struct AuditLogQuery {
    user: Option<String>,
    action: Option<String>,
    room_id: Option<String>,
    from_ts: Option<u64>,
    to_ts: Option<u64>,
    from: Option<u64>,
    limit: Option<usize>,
}

/// Entries oldest first, filtered by user (actor or target), action, room and time; `next_token`
/// pages on.
async fn audit_log(State(server): State<AppState>, _admin: Admin, QueryParams(query): QueryParams<AuditLogQuery>) -> Result<Json<AuditPage>> {
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let entries = server.audit.query(&server.store, &crate::audit::AuditQuery {
        user: query.user,
        action: query.action,
        room_id: query.room_id,
        from_ts: query.from_ts,
        to_ts: query.to_ts,
        after: query.from,
        limit,
    })?;
    let next_token = if entries.len() == limit { entries.last().map(|last| last.seq) } else { None };
    Ok(Json(AuditPage { entries, next_token }))
}

/// `GET /_limbic/admin/v1/audit`: a page of entries, and where the next one starts.
#[derive(Serialize)]
struct AuditPage {
    entries: Vec<crate::audit::AuditEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_token: Option<u64>,
}

/// The newest entry, for operators to keep off the machine and hand back to `verify` later.
/// Not audited itself: reading the head must not move it.
async fn audit_head(State(server): State<AppState>, _admin: Admin) -> Result<Json<crate::audit::AuditHead>> {
    let head = crate::audit::Audit::head(&server.store)?.ok_or_else(|| Error::not_found("the audit log is empty"))?;
    Ok(Json(head))
}

#[derive(Deserialize)]
struct AuditVerifyQuery {
    head_seq: Option<u64>,
    head_hash: Option<String>,
}

/// The whole chain, and with an exported head, that the head is still there unchanged.
async fn audit_verify(State(server): State<AppState>, _admin: Admin, QueryParams(query): QueryParams<AuditVerifyQuery>) -> Result<Json<crate::audit::Verification>> {
    let exported = match (query.head_seq, query.head_hash.as_deref()) {
        (Some(seq), Some(hash)) => Some((seq, hash)),
        (None, None) => None,
        _ => return Err(Error::invalid_param("head_seq and head_hash go together")),
    };
    let verification = tokio::task::block_in_place(|| server.audit.verify(&server.store, exported))?;
    Ok(Json(verification))
}
