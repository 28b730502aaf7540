//! End-to-end encryption endpoints: keys upload/query/claim/changes, cross-signing, to-device
//! messages and key backup. Key objects are stored exactly as clients signed them.

use std::collections::BTreeMap;

use axum::{Json, Router, extract::State};
use ruma::{
    OwnedUserId,
    api::client::{
        backup::{
            add_backup_keys, add_backup_keys_for_room, add_backup_keys_for_session, create_backup_version,
            delete_backup_keys, delete_backup_keys_for_room, delete_backup_keys_for_session, delete_backup_version,
            get_backup_info, get_backup_keys, get_backup_keys_for_room, get_backup_keys_for_session,
            get_latest_backup_info, update_backup_version,
        },
        keys::{claim_keys, get_key_changes, get_keys, upload_keys, upload_signatures, upload_signing_keys},
        to_device::send_event_to_device,
    },
};
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, account::require_password_auth, route};
use crate::{
    e2ee::CrossSigningKind,
    error::{Error, Result},
    store::{Key, tables},
    sync::parse_token,
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<upload_keys::v3::Request, _, _>(router, upload);
    let router = route::<get_keys::v3::Request, _, _>(router, query);
    let router = route::<claim_keys::v3::Request, _, _>(router, claim);
    let router = route::<get_key_changes::v3::Request, _, _>(router, changes);
    let router = route::<upload_signing_keys::v3::Request, _, _>(router, upload_cross_signing);
    let router = route::<upload_signatures::v3::Request, _, _>(router, signatures);
    let router = route::<send_event_to_device::v3::Request, _, _>(router, send_to_device);
    let router = route::<create_backup_version::v3::Request, _, _>(router, create_backup);
    let router = route::<get_latest_backup_info::v3::Request, _, _>(router, latest_backup);
    let router = route::<get_backup_info::v3::Request, _, _>(router, backup_info);
    let router = route::<update_backup_version::v3::Request, _, _>(router, update_backup);
    let router = route::<delete_backup_version::v3::Request, _, _>(router, delete_backup);
    let router = route::<add_backup_keys::v3::Request, _, _>(router, put_all_keys);
    let router = route::<add_backup_keys_for_room::v3::Request, _, _>(router, put_room_keys);
    let router = route::<add_backup_keys_for_session::v3::Request, _, _>(router, put_session_key);
    let router = route::<get_backup_keys::v3::Request, _, _>(router, get_all_keys);
    let router = route::<get_backup_keys_for_room::v3::Request, _, _>(router, get_room_keys);
    let router = route::<get_backup_keys_for_session::v3::Request, _, _>(router, get_session_key);
    let router = route::<delete_backup_keys::v3::Request, _, _>(router, delete_all_keys);
    let router = route::<delete_backup_keys_for_room::v3::Request, _, _>(router, delete_room_keys);
    route::<delete_backup_keys_for_session::v3::Request, _, _>(router, delete_session_key)
}

/// The named JSON object field of the request body, as a map.
fn body_map(body: Option<&JsonValue>, field: &str) -> BTreeMap<String, JsonValue> {
    body.and_then(|b| b.get(field))
        .and_then(JsonValue::as_object)
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

async fn upload(State(server): State<AppState>, req: Ruma<upload_keys::v3::Request>) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let body = req.json.as_ref();
    let device_keys = body.and_then(|b| b.get("device_keys")).filter(|k| !k.is_null()).cloned();
    let new_device_keys = device_keys.is_some();
    let counts = server.e2ee.upload_keys(
        &caller.user_id,
        caller.device_id.as_str(),
        device_keys,
        body_map(body, "one_time_keys"),
        body_map(body, "fallback_keys"),
    )?;
    if new_device_keys {
        crate::federation::sender::device_list_changed(&*server, &caller.user_id, caller.device_id.as_str(), false)?;
    }
    Ok(Json(json!({ "one_time_key_counts": counts })))
}

/// Device and cross-signing keys of local users, for `/keys/query` and its federation twin.
pub(crate) struct LocalKeys {
    pub device_keys: serde_json::Map<String, JsonValue>,
    pub master_keys: serde_json::Map<String, JsonValue>,
    pub self_signing_keys: serde_json::Map<String, JsonValue>,
    pub user_signing_keys: serde_json::Map<String, JsonValue>,
}

/// The keys of `users` (each with the devices asked for; none means all), for `owner`, a local
/// user, or `None`: another server. A user-signing key is private to its owner: only `owner`'s
/// is included. Device names stay on this server, as with Synapse's default
/// (`allow_device_name_lookup_over_federation: false`): they tell who uses it.
pub(crate) fn local_device_keys(server: &AppState, users: &[(ruma::OwnedUserId, Vec<String>)], owner: Option<&ruma::UserId>) -> Result<LocalKeys> {
    let mut keys = LocalKeys { device_keys: Default::default(), master_keys: Default::default(), self_signing_keys: Default::default(), user_signing_keys: Default::default() };
    for (user, only) in users {
        let mut devices = serde_json::Map::new();
        for (device_id, mut device) in server.e2ee.device_keys(user, only)? {
            if owner.is_some()
                && let Some(info) = server.users.device(user, &device_id)?
            {
                device["unsigned"] = json!({ "device_display_name": info.display_name });
            }
            devices.insert(device_id, device);
        }
        keys.device_keys.insert(user.to_string(), JsonValue::Object(devices));
        for (kind, target) in [(CrossSigningKind::Master, &mut keys.master_keys), (CrossSigningKind::SelfSigning, &mut keys.self_signing_keys)] {
            if let Some(key) = server.e2ee.cross_signing_key(user, kind)? {
                target.insert(user.to_string(), key);
            }
        }
        if owner == Some(user.as_ref())
            && let Some(key) = server.e2ee.cross_signing_key(user, CrossSigningKind::UserSigning)?
        {
            keys.user_signing_keys.insert(user.to_string(), key);
        }
    }
    Ok(keys)
}

async fn query(State(server): State<AppState>, req: Ruma<get_keys::v3::Request>) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let (local, remote): (Vec<_>, Vec<_>) = req.body.device_keys.iter().partition(|(user, _)| user.server_name() == server.server_name());
    let local: Vec<_> = local.into_iter().map(|(user, devices)| (user.clone(), devices.iter().map(ToString::to_string).collect())).collect();
    let mut keys = local_device_keys(&server, &local, Some(&caller.user_id))?;
    let mut failures = serde_json::Map::new();
    let mut by_server: BTreeMap<ruma::OwnedServerName, BTreeMap<ruma::OwnedUserId, Vec<ruma::OwnedDeviceId>>> = BTreeMap::new();
    for (user, devices) in remote {
        by_server.entry(user.server_name().to_owned()).or_default().insert(user.clone(), devices.clone());
    }
    for (remote_server, users) in by_server {
        let Some(federation) = server.federation.as_ref() else {
            failures.insert(remote_server.to_string(), json!({ "errcode": "M_UNAVAILABLE", "error": "federation is disabled on this server" }));
            continue;
        };
        match federation.send(&remote_server, ruma::api::federation::keys::get_keys::v1::Request::new(users)).await {
            Ok(answer) => {
                let merge = |target: &mut serde_json::Map<String, JsonValue>, from: JsonValue| {
                    for (user, value) in from.as_object().into_iter().flatten() {
                        target.insert(user.clone(), value.clone());
                    }
                };
                merge(&mut keys.device_keys, serde_json::to_value(&answer.device_keys).unwrap_or_default());
                merge(&mut keys.master_keys, serde_json::to_value(&answer.master_keys).unwrap_or_default());
                merge(&mut keys.self_signing_keys, serde_json::to_value(&answer.self_signing_keys).unwrap_or_default());
            }
            Err(error) => {
                failures.insert(remote_server.to_string(), json!({ "errcode": "M_UNAVAILABLE", "error": error.to_string() }));
            }
        }
    }
    Ok(Json(json!({
        "device_keys": keys.device_keys,
        "master_keys": keys.master_keys,
        "self_signing_keys": keys.self_signing_keys,
        "user_signing_keys": keys.user_signing_keys,
        "failures": failures,
    })))
}

async fn claim(State(server): State<AppState>, req: Ruma<claim_keys::v3::Request>) -> Result<Json<JsonValue>> {
    let mut claimed: BTreeMap<String, BTreeMap<String, BTreeMap<String, JsonValue>>> = BTreeMap::new();
    let mut failures = serde_json::Map::new();
    let mut remote: BTreeMap<ruma::OwnedServerName, BTreeMap<_, _>> = BTreeMap::new();
    for (user, devices) in &req.body.one_time_keys {
        if user.server_name() != server.server_name() {
            remote.entry(user.server_name().to_owned()).or_default().insert(user.clone(), devices.clone());
            continue;
        }
        for (device, algorithm) in devices {
            if let Some((key_id, key)) = server.e2ee.claim_key(user, device.as_str(), algorithm.as_ref())? {
                claimed.entry(user.to_string()).or_default().entry(device.to_string()).or_default().insert(key_id, key);
            }
        }
    }
    // Other servers' users' keys are claimed from their servers.
    for (remote_server, users) in remote {
        let Some(federation) = server.federation.as_ref() else {
            failures.insert(remote_server.to_string(), json!({ "errcode": "M_UNAVAILABLE", "error": "federation is disabled on this server" }));
            continue;
        };
        match federation.send(&remote_server, ruma::api::federation::keys::claim_keys::v1::Request::new(users)).await {
            Ok(answer) => {
                let keys = serde_json::to_value(&answer.one_time_keys).unwrap_or_default();
                for (user, devices) in keys.as_object().into_iter().flatten() {
                    for (device, keys) in devices.as_object().into_iter().flatten() {
                        for (key_id, key) in keys.as_object().into_iter().flatten() {
                            claimed.entry(user.clone()).or_default().entry(device.clone()).or_default().insert(key_id.clone(), key.clone());
                        }
                    }
                }
            }
            Err(error) => {
                failures.insert(remote_server.to_string(), json!({ "errcode": "M_UNAVAILABLE", "error": error.to_string() }));
            }
        }
    }
    Ok(Json(json!({ "one_time_keys": claimed, "failures": failures })))
}

async fn changes(State(server): State<AppState>, req: Ruma<get_key_changes::v3::Request>) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let from = parse_token(&req.body.from)?;
    let to = parse_token(&req.body.to)?;
    let (changed, left) = crate::sync::device_list_changes(&*server, &caller.user_id, from, to)?;
    Ok(Json(json!({ "changed": changed, "left": left })))
}

async fn upload_cross_signing(State(server): State<AppState>, req: Ruma<upload_signing_keys::v3::Request>) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    // The first master key may be uploaded without re-authentication (spec v1.11); replacing
    // one needs the password.
    if server.e2ee.cross_signing_key(&caller.user_id, CrossSigningKind::Master)?.is_some() {
        require_password_auth(&server, caller, &req)?;
    }
    let body = req.json.as_ref();
    let mut keys = Vec::new();
    for (field, kind) in [("master_key", CrossSigningKind::Master), ("self_signing_key", CrossSigningKind::SelfSigning), ("user_signing_key", CrossSigningKind::UserSigning)] {
        if let Some(key) = body.and_then(|b| b.get(field)).filter(|k| !k.is_null()) {
            keys.push((kind, key.clone()));
        }
    }
    let has_master = keys.iter().any(|(k, _)| *k == CrossSigningKind::Master)
        || server.e2ee.cross_signing_key(&caller.user_id, CrossSigningKind::Master)?.is_some();
    if !has_master {
        return Err(Error::invalid_param("a master key is needed before other cross-signing keys"));
    }
    server.e2ee.upload_cross_signing_keys(&caller.user_id, &keys)?;
    crate::federation::sender::signing_keys_changed(&*server, &caller.user_id)?;
    Ok(Json(json!({})))
}

async fn signatures(State(server): State<AppState>, req: Ruma<upload_signatures::v3::Request>) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let mut signed: BTreeMap<String, BTreeMap<String, JsonValue>> = BTreeMap::new();
    for (user, keys) in req.json.as_ref().and_then(JsonValue::as_object).into_iter().flatten() {
        let Some(keys) = keys.as_object() else { continue };
        for (key_id, object) in keys {
            // Signatures on behalf of someone else are refused; signing others' keys is fine.
            let signer_ok = object
                .get("signatures")
                .and_then(JsonValue::as_object)
                .is_some_and(|s| s.keys().all(|signer| signer == caller.user_id.as_str()));
            if !signer_ok {
                return Err(Error::forbidden("signatures must be the caller's own"));
            }
            signed.entry(user.clone()).or_default().insert(key_id.clone(), object.clone());
        }
    }
    let failures = server.e2ee.upload_signatures(&signed)?;
    Ok(Json(json!({ "failures": failures })))
}

async fn send_to_device(State(server): State<AppState>, req: Ruma<send_event_to_device::v3::Request>) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let txn_key = Key::new()
        .str(caller.user_id.as_str())
        .str(caller.device_id.as_str())
        .str(&format!("to_device:{}", req.body.txn_id))
        .into_vec();
    if server.store.contains(tables::TXN_IDS, &txn_key)? {
        return Ok(Json(json!({})));
    }
    let mut messages: BTreeMap<OwnedUserId, BTreeMap<String, JsonValue>> = BTreeMap::new();
    let mut remote: BTreeMap<ruma::OwnedServerName, serde_json::Map<String, JsonValue>> = BTreeMap::new();
    for (user, devices) in body_map(req.json.as_ref(), "messages") {
        let user = OwnedUserId::try_from(user).map_err(|e| Error::invalid_param(e.to_string()))?;
        if user.server_name() != server.server_name() {
            if server.federation.is_none() {
                return Err(Error::forbidden("federation is disabled on this server"));
            }
            remote.entry(user.server_name().to_owned()).or_default().insert(user.to_string(), devices);
            continue;
        }
        let devices = devices.as_object().map(|d| d.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        messages.insert(user, devices);
    }
    // Messages for other servers' users travel as m.direct_to_device EDUs, one per server.
    for (destination, messages) in remote {
        let edu = json!({
            "edu_type": "m.direct_to_device",
            "content": { "sender": caller.user_id, "type": req.body.event_type.to_string(), "message_id": format!("{}-{}", caller.device_id, req.body.txn_id), "messages": messages },
        });
        crate::federation::sender::queue_edu(&*server, &std::collections::HashSet::from([destination]), &edu)?;
    }
    server.e2ee.send_to_device(&caller.user_id, &req.body.event_type.to_string(), &messages, |user| {
        Ok(server.users.devices(user)?.into_iter().map(|(id, _)| id.to_string()).collect())
    })?;
    let mut batch = server.store.batch();
    batch.put(tables::TXN_IDS, &txn_key, b"");
    server.store.write(batch)?;
    Ok(Json(json!({})))
}

// --- key backup ---

fn algorithm_parts(body: Option<&JsonValue>) -> Result<(String, JsonValue)> {
    let algorithm = body.and_then(|b| b.get("algorithm")).and_then(JsonValue::as_str).ok_or_else(|| Error::bad_json("missing algorithm"))?;
    let auth_data = body.and_then(|b| b.get("auth_data")).cloned().ok_or_else(|| Error::bad_json("missing auth_data"))?;
    Ok((algorithm.to_owned(), auth_data))
}

async fn create_backup(State(server): State<AppState>, req: Ruma<create_backup_version::v3::Request>) -> Result<Json<JsonValue>> {
    let (algorithm, auth_data) = algorithm_parts(req.json.as_ref())?;
    let version = server.e2ee.backups().create(&req.caller().user_id, algorithm, auth_data)?;
    Ok(Json(json!({ "version": version })))
}

async fn latest_backup(State(server): State<AppState>, req: Ruma<get_latest_backup_info::v3::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(server.e2ee.backups().version_info(&req.caller().user_id, None)?))
}

async fn backup_info(State(server): State<AppState>, req: Ruma<get_backup_info::v3::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(server.e2ee.backups().version_info(&req.caller().user_id, Some(&req.body.version))?))
}

async fn update_backup(State(server): State<AppState>, req: Ruma<update_backup_version::v3::Request>) -> Result<Json<JsonValue>> {
    let (algorithm, auth_data) = algorithm_parts(req.json.as_ref())?;
    server.e2ee.backups().update(&req.caller().user_id, &req.body.version, algorithm, auth_data)?;
    Ok(Json(json!({})))
}

async fn delete_backup(State(server): State<AppState>, req: Ruma<delete_backup_version::v3::Request>) -> Result<Json<JsonValue>> {
    server.e2ee.backups().delete_version(&req.caller().user_id, &req.body.version)?;
    Ok(Json(json!({})))
}

type Sessions = BTreeMap<String, BTreeMap<String, JsonValue>>;

fn sessions_of(rooms: Option<&JsonValue>) -> Sessions {
    let mut out = Sessions::new();
    for (room, value) in rooms.and_then(JsonValue::as_object).into_iter().flatten() {
        for (session, data) in value.get("sessions").and_then(JsonValue::as_object).into_iter().flatten() {
            out.entry(room.clone()).or_default().insert(session.clone(), data.clone());
        }
    }
    out
}

fn rooms_json(rooms: Sessions) -> JsonValue {
    JsonValue::Object(rooms.into_iter().map(|(room, sessions)| (room, json!({ "sessions": sessions }))).collect())
}

async fn put_all_keys(State(server): State<AppState>, req: Ruma<add_backup_keys::v3::Request>) -> Result<Json<JsonValue>> {
    let rooms = sessions_of(req.json.as_ref().and_then(|b| b.get("rooms")));
    Ok(Json(server.e2ee.backups().put_keys(&req.caller().user_id, &req.body.version, rooms)?))
}

async fn put_room_keys(State(server): State<AppState>, req: Ruma<add_backup_keys_for_room::v3::Request>) -> Result<Json<JsonValue>> {
    let sessions = body_map(req.json.as_ref(), "sessions");
    let rooms = Sessions::from([(req.body.room_id.to_string(), sessions)]);
    Ok(Json(server.e2ee.backups().put_keys(&req.caller().user_id, &req.body.version, rooms)?))
}

async fn put_session_key(State(server): State<AppState>, req: Ruma<add_backup_keys_for_session::v3::Request>) -> Result<Json<JsonValue>> {
    let data = req.json.clone().unwrap_or_default();
    let rooms = Sessions::from([(req.body.room_id.to_string(), BTreeMap::from([(req.body.session_id.clone(), data)]))]);
    Ok(Json(server.e2ee.backups().put_keys(&req.caller().user_id, &req.body.version, rooms)?))
}

async fn get_all_keys(State(server): State<AppState>, req: Ruma<get_backup_keys::v3::Request>) -> Result<Json<JsonValue>> {
    let rooms = server.e2ee.backups().get_keys(&req.caller().user_id, &req.body.version, None, None)?;
    Ok(Json(json!({ "rooms": rooms_json(rooms) })))
}

async fn get_room_keys(State(server): State<AppState>, req: Ruma<get_backup_keys_for_room::v3::Request>) -> Result<Json<JsonValue>> {
    let mut rooms = server.e2ee.backups().get_keys(&req.caller().user_id, &req.body.version, Some(req.body.room_id.as_str()), None)?;
    let sessions = rooms.remove(req.body.room_id.as_str()).unwrap_or_default();
    Ok(Json(json!({ "sessions": sessions })))
}

async fn get_session_key(State(server): State<AppState>, req: Ruma<get_backup_keys_for_session::v3::Request>) -> Result<Json<JsonValue>> {
    let rooms = server.e2ee.backups().get_keys(&req.caller().user_id, &req.body.version, Some(req.body.room_id.as_str()), Some(&req.body.session_id))?;
    rooms
        .get(req.body.room_id.as_str())
        .and_then(|s| s.get(&req.body.session_id))
        .cloned()
        .map(Json)
        .ok_or_else(|| Error::not_found("no key for this session"))
}

async fn delete_all_keys(State(server): State<AppState>, req: Ruma<delete_backup_keys::v3::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(server.e2ee.backups().delete_keys(&req.caller().user_id, &req.body.version, None, None)?))
}

async fn delete_room_keys(State(server): State<AppState>, req: Ruma<delete_backup_keys_for_room::v3::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(server.e2ee.backups().delete_keys(&req.caller().user_id, &req.body.version, Some(req.body.room_id.as_str()), None)?))
}

async fn delete_session_key(State(server): State<AppState>, req: Ruma<delete_backup_keys_for_session::v3::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(server.e2ee.backups().delete_keys(&req.caller().user_id, &req.body.version, Some(req.body.room_id.as_str()), Some(&req.body.session_id))?))
}
