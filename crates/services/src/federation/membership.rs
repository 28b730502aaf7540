//! Memberships across servers: `make_*`/`send_*` as the resident server, invites both ways, and
//! joining, knocking on or leaving a room on another server.

use std::collections::{BTreeSet, HashSet};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedServerName, RoomId, RoomVersionId, UserId,
    api::federation::membership::{create_join_event, prepare_join_event},
};
use serde_json::{Value as JsonValue, json, value::RawValue};

use super::{Federation, FederationHost, pdu::{auth_chain, event_id_of, raw_events, verify_pdu}};
use crate::{
    error::{Error, ErrorCode, Result},
    events::{Pdu, SUPPORTED_ROOM_VERSIONS, rules_for},
};

/// How many events before a join the joining server fetches.
const JOIN_BACKFILL: u32 = 50;

/// `make_join`, `make_knock` and `make_leave` as the resident server: a membership event for the
/// remote user to sign, placed after our current extremities with the auth events of the
/// current state. `versions` are the room versions the asking server supports (none for leave).
pub async fn make_membership(server: &dyn FederationHost, origin: &ruma::ServerName, room_id: &RoomId, user_id: &UserId, membership: &str, versions: Option<&[RoomVersionId]>) -> Result<JsonValue> {
    if user_id.server_name() != origin {
        return Err(Error::forbidden("a server asks for its own users only"));
    }
    let record = server.rooms().room(room_id)?.ok_or_else(|| Error::not_found("unknown room"))?;
    if versions.is_some_and(|versions| !versions.contains(&record.version)) {
        return Err(Error::with_status(ErrorCode::IncompatibleRoomVersion, http::StatusCode::BAD_REQUEST, format!("the room is version {}", record.version)));
    }
    let federates = server.rooms().state_content(room_id, "m.room.create", "")?.is_none_or(|c| c.get("m.federate") != Some(&JsonValue::Bool(false)));
    if !federates {
        return Err(Error::forbidden("this room is not federated"));
    }
    if !super::acl::allows(&server.rooms(), room_id, origin)? {
        return Err(Error::forbidden(format!("{origin} is denied by the room's server ACL")));
    }
    let rules = rules_for(&record.version)?;
    let content = json!({ "membership": membership });
    let raw_content = serde_json::value::to_raw_value(&content).map_err(Error::internal)?;
    let types = ruma::state_res::auth_types_for_event(&ruma::events::TimelineEventType::RoomMember, user_id, Some(user_id.as_str()), &raw_content, &rules.authorization)
        .map_err(Error::bad_json)?;
    let mut auth_events = Vec::new();
    for (kind, key) in &types {
        if let Some(pdu) = server.rooms().state_event(room_id, &kind.to_string(), key)? {
            auth_events.push(pdu.event_id);
        }
    }
    let event = json!({
        "type": "m.room.member",
        "room_id": room_id,
        "sender": user_id,
        "state_key": user_id,
        "content": content,
        "origin_server_ts": ruma::MilliSecondsSinceUnixEpoch::now(),
        "depth": record.depth + 1,
        "prev_events": record.extremities,
        "auth_events": auth_events,
    });
    Ok(json!({ "room_version": record.version, "event": event }))
}

/// `send_leave` and `send_knock` as the resident server: the signed membership of the origin's
/// own user is checked and appended.
pub async fn accept_membership(server: &dyn FederationHost, origin: &ruma::ServerName, room_id: &RoomId, event_id: &OwnedEventId, raw: &RawValue, membership: &str) -> Result<Pdu> {
    let federation = server.federation().ok_or_else(|| Error::not_found("federation is disabled"))?;
    let record = server.rooms().room(room_id)?.ok_or_else(|| Error::not_found("unknown room"))?;
    let rules = rules_for(&record.version)?;
    let signed = verify_pdu(federation, raw, &rules).await?;
    let pdu = signed.pdu.clone();
    let subject = pdu.state_key.as_deref().and_then(|k| <&UserId>::try_from(k).ok());
    if pdu.event_id != *event_id || pdu.room_id != room_id
        || pdu.membership().map(crate::rooms::Membership::as_str) != Some(membership)
        || subject != Some(&pdu.sender) || pdu.sender.server_name() != origin
    {
        return Err(Error::bad_json(format!("not a {membership} of the origin's own user matching the request")));
    }
    let mut writer = server.rooms().writer(room_id).await?;
    writer.append_remote(signed)?;
    writer.commit()?;
    Ok(pdu)
}

/// The room's stripped state as full events, for invites and knocks, with the inviter's own
/// membership (by which clients name an invite) when `inviter` is given.
pub fn stripped_state_events(server: &dyn FederationHost, room_id: &RoomId, inviter: Option<&UserId>) -> Result<Vec<ruma::api::federation::membership::RawStrippedState>> {
    let mut state = Vec::new();
    let keys = crate::rooms::STRIPPED_STATE_TYPES.iter().map(|kind| (*kind, "")).chain(inviter.map(|user| ("m.room.member", user.as_str())));
    for (kind, state_key) in keys {
        if let Some(pdu) = server.rooms().state_event(room_id, kind, state_key)?
            && let Some(raw) = server.rooms().federation_pdu(&pdu.event_id)?
        {
            #[allow(deprecated)]
            state.push(ruma::api::federation::membership::RawStrippedState::Pdu(raw));
        }
    }
    Ok(state)
}

/// Stripped state (full events or stripped ones) as clients get it.
fn stripped_for_clients(state: &[ruma::api::federation::membership::RawStrippedState]) -> Vec<JsonValue> {
    state
        .iter()
        .filter_map(|state| serde_json::to_value(state).ok())
        .map(|event| json!({ "type": event.get("type"), "state_key": event.get("state_key"), "sender": event.get("sender"), "content": event.get("content") }))
        .collect()
}

/// Knocks on, or leaves (or rejects an invite to), a room on another server for a local user:
/// `make_knock`/`make_leave`, our signature, `send_knock`/`send_leave`. The user's sync then
/// shows the knock (with the room's state) or the leave.
pub async fn membership_remote(server: &dyn FederationHost, user: &UserId, room_id: &RoomId, via: &[OwnedServerName], membership: &str, reason: Option<&str>) -> Result<()> {
    let federation = server.federation().ok_or_else(|| Error::forbidden("federation is disabled on this server"))?;
    let candidates = residents(server, user, room_id, via);
    let mut last_error = Error::not_found("no server to reach the room through");
    for resident in candidates {
        let attempt = async {
            let (version, template) = if membership == "knock" {
                let mut make = ruma::api::federation::membership::prepare_knock_event::v1::Request::new(room_id.to_owned(), user.to_owned());
                make.ver = SUPPORTED_ROOM_VERSIONS.to_vec();
                let answer = federation.send(&resident, make).await?;
                (answer.room_version, answer.event)
            } else {
                let answer = federation.send(&resident, ruma::api::federation::membership::prepare_leave_event::v1::Request::new(room_id.to_owned(), user.to_owned())).await?;
                (answer.room_version.unwrap_or(RoomVersionId::V1), answer.event)
            };
            let rules = rules_for(&version)?;
            let mut object: CanonicalJsonObject = serde_json::from_str(template.get()).map_err(|e| Error::bad_json(format!("bad template: {e}")))?;
            object.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(ruma::MilliSecondsSinceUnixEpoch::now().0.into()));
            if let (Some(reason), Some(CanonicalJsonValue::Object(content))) = (reason, object.get_mut("content")) {
                content.insert("reason".into(), CanonicalJsonValue::String(reason.to_owned()));
            }
            ruma::signatures::hash_and_sign_event(server.server_name().as_str(), federation.key().key_pair(), &mut object, &rules.redaction).map_err(|e| Error::internal(format!("signing: {e}")))?;
            let event_id = event_id_of(&object, &rules)?;
            let raw = serde_json::value::to_raw_value(&object).map_err(Error::internal)?;
            let state = if membership == "knock" {
                let answer = federation.send(&resident, ruma::api::federation::membership::create_knock_event::v1::Request::new(room_id.to_owned(), event_id.clone(), raw.clone())).await?;
                Some(stripped_for_clients(&answer.knock_room_state))
            } else {
                federation.send(&resident, ruma::api::federation::membership::create_leave_event::v2::Request::new(room_id.to_owned(), event_id.clone(), raw.clone())).await?;
                None
            };
            let signed = verify_pdu(federation, &raw, &rules).await?;
            let recorded = if membership == "knock" { crate::rooms::Membership::Knock } else { crate::rooms::Membership::Leave };
            server.rooms().record_remote_membership(user, &signed, recorded, state.as_deref())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(%room_id, %resident, %error, membership, "membership over federation failed");
                last_error = error;
            }
        }
    }
    Err(last_error)
}

/// `send_join` as the resident server: the signed join is checked and appended, and the joining
/// server gets the room's state before it and the auth chain.
pub async fn send_join(server: &dyn FederationHost, origin: &ruma::ServerName, request: &create_join_event::v2::Request) -> Result<JsonValue> {
    let federation = server.federation().ok_or_else(|| Error::not_found("federation is disabled"))?;
    let record = server.rooms().room(&request.room_id)?.ok_or_else(|| Error::not_found("unknown room"))?;
    let rules = rules_for(&record.version)?;
    let signed = verify_pdu(federation, &request.pdu, &rules).await?;
    let pdu = signed.pdu.clone();
    if pdu.event_id != request.event_id || pdu.room_id != request.room_id {
        return Err(Error::bad_json("the event does not match the request"));
    }
    let joining = pdu.state_key.as_deref().and_then(|k| <&UserId>::try_from(k).ok());
    if pdu.membership() != Some(crate::rooms::Membership::Join) || joining != Some(&pdu.sender) || pdu.sender.server_name() != origin {
        return Err(Error::bad_json("not a join of the origin's own user"));
    }
    let mut writer = server.rooms().writer(&request.room_id).await?;
    let state_before: Vec<OwnedEventId> = writer.current_state_ids()?;
    writer.append_remote(signed)?;
    writer.commit()?;
    let chain: BTreeSet<OwnedEventId> = auth_chain(server, &state_before)?.into_iter().map(|p| p.event_id).collect();
    Ok(json!({
        "origin": server.server_name(),
        "state": raw_events(server, state_before)?,
        "auth_chain": raw_events(server, chain)?,
        "event": server.rooms().federation_pdu(&pdu.event_id)?,
        "members_omitted": false,
    }))
}

/// The servers to reach a room through, each once: the `via` servers, the server of whoever
/// invited the user (or answered their knock), then the one the room id names (up to v11).
fn residents(server: &dyn FederationHost, user: &UserId, room_id: &RoomId, via: &[OwnedServerName]) -> Vec<OwnedServerName> {
    let ours = server.server_name();
    let inviter = server.rooms().user_room(user, room_id).ok().flatten()
        .and_then(|entry| server.rooms().pdu(&entry.event_id).ok().flatten())
        .map(|pdu| pdu.sender.server_name().to_owned());
    let owner = room_id.server_name().map(ToOwned::to_owned);
    let mut seen = HashSet::new();
    via.iter().cloned().chain(inviter).chain(owner).filter(|s| s != ours && seen.insert(s.clone())).collect()
}

/// Joins a local user to a room on another server: `make_join`, sign, `send_join`, then the
/// room's state is checked and stored, and the join appended.
pub async fn join_remote(server: &dyn FederationHost, user: &UserId, room_id: &RoomId, via: &[OwnedServerName]) -> Result<()> {
    let federation = server.federation().ok_or_else(|| Error::forbidden("federation is disabled on this server"))?;
    let candidates = residents(server, user, room_id, via);
    let mut last_error = Error::not_found("no server to join the room through");
    for resident in candidates {
        match join_via(server, federation, user, room_id, &resident).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(%room_id, %resident, %error, "joining over federation failed");
                last_error = error;
            }
        }
    }
    Err(last_error)
}

async fn join_via(server: &dyn FederationHost, federation: &Federation, user: &UserId, room_id: &RoomId, resident: &ruma::ServerName) -> Result<()> {
    let mut make = prepare_join_event::v1::Request::new(room_id.to_owned(), user.to_owned());
    make.ver = SUPPORTED_ROOM_VERSIONS.to_vec();
    let template = federation.send(resident, make).await?;
    let version = template.room_version.unwrap_or(RoomVersionId::V1);
    let rules = rules_for(&version)?;
    let mut object: CanonicalJsonObject = serde_json::from_str(template.event.get()).map_err(|e| Error::bad_json(format!("bad make_join template: {e}")))?;
    object.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(ruma::MilliSecondsSinceUnixEpoch::now().0.into()));
    ruma::signatures::hash_and_sign_event(server.server_name().as_str(), federation.key().key_pair(), &mut object, &rules.redaction).map_err(|e| Error::internal(format!("signing the join: {e}")))?;
    let event_id = event_id_of(&object, &rules)?;
    let raw = serde_json::value::to_raw_value(&object).map_err(Error::internal)?;
    let answer = federation.send(resident, create_join_event::v2::Request::new(room_id.to_owned(), event_id.clone(), raw.clone())).await?;
    let state = answer.room_state;

    let mut imported = Vec::new();
    for raw in state.auth_chain.iter().chain(state.state.iter()) {
        imported.push(verify_pdu(federation, raw, &rules).await?);
    }
    // Recent history too, so that the joining user sees what came before (as the room's
    // history visibility allows); a server that cannot give it costs the join nothing.
    let before: Vec<OwnedEventId> = match object.get("prev_events") {
        Some(CanonicalJsonValue::Array(ids)) => ids.iter().filter_map(|id| match id {
            CanonicalJsonValue::String(id) => OwnedEventId::try_from(id.as_str()).ok(),
            _ => None,
        }).collect(),
        _ => Vec::new(),
    };
    match federation.send(resident, ruma::api::federation::backfill::get_backfill::v1::Request::new(room_id.to_owned(), before, JOIN_BACKFILL.into())).await {
        Ok(history) => {
            for raw in &history.pdus {
                match verify_pdu(federation, raw, &rules).await {
                    Ok(signed) => imported.push(signed),
                    Err(error) => tracing::warn!(%resident, %room_id, %error, "skipped a backfilled event"),
                }
            }
        }
        Err(error) => tracing::info!(%resident, %room_id, %error, "no history before the join"),
    }
    // Oldest first, so that each state key ends with the version the state names.
    imported.sort_by_key(|signed| u64::from(signed.pdu.depth));
    let join = verify_pdu(federation, state.event.as_deref().unwrap_or(&raw), &rules).await?;
    let mut writer = server.rooms().writer(room_id).await?;
    if !writer.exists() {
        writer.init_room(version)?;
    }
    for signed in imported {
        writer.import(signed)?;
    }
    // The state is written first: the clinic policy reads earlier events (an admission's knock)
    // from the store when it checks the join.
    writer.commit()?;
    let mut writer = server.rooms().writer(room_id).await?;
    writer.append_remote(join)?;
    writer.commit().map(drop)
}

/// Sends an invite of a user of `destination` through `/invite` (v2), with the room's stripped
/// state as full events. A refusal is final (logged); a failure to reach the server is retried.
pub async fn send_invite(server: &dyn FederationHost, federation: &Federation, destination: &ruma::ServerName, invite: &Pdu) -> Result<()> {
    let record = server.rooms().room(&invite.room_id)?.ok_or_else(|| Error::not_found("unknown room"))?;
    let state = stripped_state_events(server, &invite.room_id, Some(&invite.sender))?;
    let event = server.rooms().federation_pdu(&invite.event_id)?.ok_or_else(|| Error::not_found("unknown event"))?;
    let request = ruma::api::federation::membership::create_invite::v2::Request::new(invite.room_id.clone(), invite.event_id.clone(), record.version, event, state);
    match federation.send(destination, request).await {
        Ok(_) => Ok(()),
        Err(super::FederationError::Remote { status, body, .. }) if (400..500).contains(&status) => {
            tracing::warn!(%destination, event_id = %invite.event_id, status, %body, "the invitee's server refused the invite");
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// `PUT /v2/invite`: one of our users invited to a room on another server. We countersign the
/// event, and the user's sync shows the invite with the state the inviting server sent.
pub async fn receive_invite(server: &dyn FederationHost, origin: &ruma::ServerName, request: &ruma::api::federation::membership::create_invite::v2::Request) -> Result<JsonValue> {
    let federation = server.federation().ok_or_else(|| Error::not_found("federation is disabled"))?;
    if !SUPPORTED_ROOM_VERSIONS.contains(&request.room_version) {
        return Err(Error::with_status(ErrorCode::IncompatibleRoomVersion, http::StatusCode::BAD_REQUEST, format!("room version {} is not supported", request.room_version)));
    }
    let rules = rules_for(&request.room_version)?;
    let signed = verify_pdu(federation, &request.event, &rules).await?;
    let pdu = &signed.pdu;
    let invitee = pdu.state_key.as_deref().and_then(|k| <&UserId>::try_from(k).ok()).map(ToOwned::to_owned);
    let Some(invitee) = invitee.filter(|u| u.server_name() == server.server_name()) else { return Err(Error::bad_json("the invitee is not a user of this server")) };
    if pdu.membership() != Some(crate::rooms::Membership::Invite) || pdu.sender.server_name() != origin || pdu.event_id != request.event_id || pdu.room_id != request.room_id {
        return Err(Error::bad_json("not an invite from the origin's user matching the request"));
    }
    if !server.users().account(&invitee)?.is_some_and(|a| !a.deactivated) {
        return Err(Error::not_found("unknown user"));
    }
    // Countersigned by us, as the spec asks.
    let mut object = signed.canonical.clone();
    object.remove("event_id");
    ruma::signatures::sign_json(server.server_name().as_str(), federation.key().key_pair(), &mut object).map_err(|e| Error::internal(e.to_string()))?;
    let invite_state = stripped_for_clients(&request.invite_room_state);
    let room_id = pdu.room_id.clone();
    if server.rooms().exists(&room_id)? {
        let mut writer = server.rooms().writer(&room_id).await?;
        writer.append_remote(signed)?;
        writer.commit()?;
    } else {
        server.rooms().record_remote_membership(&invitee, &signed, crate::rooms::Membership::Invite, Some(&invite_state))?;
    }
    Ok(json!({ "event": object }))
}
