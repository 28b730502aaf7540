//! What other servers send: transactions of PDUs (`/send`), with the gaps and auth events they
//! leave fetched, backfill, and the EDUs (typing, receipts, to-device, device lists, presence).

use std::collections::{BTreeMap, HashSet};

use ruma::{
    OwnedEventId, OwnedRoomId, RoomId, RoomVersionId,
    room_version_rules::RoomVersionRules,
};
use serde_json::{Value as JsonValue, json, value::RawValue};

use super::{Federation, FederationHost, pdu::{room_id_of, verify_pdu}};
use crate::{
    error::{Error, Result},
    events::{Pdu, rules_for},
};

/// `PUT /send/{txnId}`: each PDU checked and appended on its own; the answer says which failed.
pub async fn receive_transaction(server: &dyn FederationHost, origin: &ruma::ServerName, pdus: &[Box<RawValue>]) -> BTreeMap<String, JsonValue> {
    let mut results = BTreeMap::new();
    for raw in pdus {
        let outcome = match room_id_of(raw) {
            Some(room_id) => receive_pdu(server, origin, &room_id, raw).await,
            None => Err((None, Error::bad_json("a PDU needs a room_id"))),
        };
        match outcome {
            Ok(event_id) => {
                results.insert(event_id.to_string(), json!({}));
            }
            Err((event_id, error)) => {
                tracing::warn!(%origin, event_id = event_id.as_deref().unwrap_or("?"), %error, "refused an event from another server");
                results.insert(event_id.unwrap_or_else(|| "unknown".into()), json!({ "error": error.to_string() }));
            }
        }
    }
    results
}

async fn receive_pdu(server: &dyn FederationHost, origin: &ruma::ServerName, room_id: &RoomId, raw: &RawValue) -> std::result::Result<OwnedEventId, (Option<String>, Error)> {
    let fail = |error: Error| (None, error);
    let federation = server.federation().ok_or_else(|| fail(Error::not_found("federation is disabled")))?;
    let Some(record) = server.rooms().room(room_id).map_err(fail)? else {
        return receive_outside_membership(server, federation, origin, room_id, raw).await;
    };
    let rules = rules_for(&record.version).map_err(fail)?;
    let signed = verify_pdu(federation, raw, &rules).await.map_err(fail)?;
    let event_id = signed.pdu.event_id.clone();
    let named = |error: Error| (Some(event_id.to_string()), error);
    for server_name in [origin, signed.pdu.sender.server_name()] {
        if !super::acl::allows(&server.rooms(), room_id, server_name).map_err(named)? {
            return Err(named(Error::forbidden(format!("{server_name} is denied by the room's server ACL"))));
        }
    }
    if signed.pdu.sender.server_name() != origin && signed.pdu.kind != ruma::events::TimelineEventType::RoomMember {
        return Err(named(Error::forbidden("events are sent by their sender's server")));
    }
    fill_gap(server, federation, origin, room_id, &signed.pdu, &rules).await;
    fetch_auth_events(server, federation, origin, room_id, &signed.pdu, &rules).await;
    // A client tries again after a 503; the sending server would not (a refused PDU stays
    // refused), so a write that met a concurrent one is tried again here.
    let mut waits = TRANSIENT_RETRIES.iter();
    loop {
        // The writer (and the room's lock with it) is gone before any wait.
        let appended = {
            let mut writer = server.rooms().writer(room_id).await.map_err(named)?;
            match writer.append_remote(signed.clone()) {
                Ok(_) => writer.commit().map(drop),
                Err(error) => Err(error),
            }
        };
        match appended {
            Err(error) if error.is_transient() && let Some(wait) = waits.next() => {
                tracing::debug!(%event_id, %error, "an event from another server met a concurrent write: trying again");
                tokio::time::sleep(*wait).await;
            }
            outcome => return outcome.map(|()| event_id.clone()).map_err(named),
        }
    }
}

/// How long a PDU whose write met a concurrent one waits before each further try.
const TRANSIENT_RETRIES: [std::time::Duration; 4] =
    [std::time::Duration::from_millis(20), std::time::Duration::from_millis(80), std::time::Duration::from_millis(250), std::time::Duration::from_millis(800)];

/// An event of a room this server is not in: only a membership change of one of our users who
/// is invited to or knocking on it counts (a declined knock, a withdrawn invite), recorded so
/// their sync shows it.
async fn receive_outside_membership(server: &dyn FederationHost, federation: &Federation, origin: &ruma::ServerName, room_id: &RoomId, raw: &RawValue) -> std::result::Result<OwnedEventId, (Option<String>, Error)> {
    let fail = |error: Error| (None, error);
    let not_in_room = || fail(Error::not_found("this server is not in that room"));
    let value: JsonValue = serde_json::from_str(raw.get()).map_err(|e| fail(Error::bad_json(e.to_string())))?;
    let user = value.get("state_key").and_then(JsonValue::as_str).and_then(|k| ruma::OwnedUserId::try_from(k).ok()).ok_or_else(not_in_room)?;
    let pending = server.rooms().user_room(&user, room_id).map_err(fail)?.filter(|e| matches!(e.membership, crate::rooms::Membership::Invite | crate::rooms::Membership::Knock));
    let Some(_pending) = pending.filter(|_| user.server_name() == server.server_name() && value.get("type").and_then(JsonValue::as_str) == Some("m.room.member")) else {
        return Err(not_in_room());
    };
    // Without the room, its version is unknown; versions 10 to 12 (the ones we accept invites
    // and knocks for) hash and redact membership events the same way.
    let rules = rules_for(&RoomVersionId::V11).map_err(fail)?;
    let signed = verify_pdu(federation, raw, &rules).await.map_err(fail)?;
    let event_id = signed.pdu.event_id.clone();
    let membership = crate::rooms::Membership::of(&signed.pdu.content_json());
    if signed.pdu.sender.server_name() != origin || !matches!(membership, Some(crate::rooms::Membership::Leave | crate::rooms::Membership::Ban)) {
        return Err((Some(event_id.to_string()), not_in_room().1));
    }
    server.rooms().record_remote_membership(&user, &signed, membership.unwrap_or(crate::rooms::Membership::Leave), None).map_err(|e| (Some(event_id.to_string()), e))?;
    Ok(event_id)
}

/// How many missing events one gap fetch asks for.
const MISSING_EVENTS_LIMIT: u32 = 20;

/// Fetches the events between what we have and `pdu` when some of its `prev_events` are
/// unknown (`get_missing_events` from the origin), and appends them oldest first. What cannot be
/// fetched or accepted is logged; the event itself is still appended after them.
async fn fill_gap(server: &dyn FederationHost, federation: &Federation, origin: &ruma::ServerName, room_id: &RoomId, pdu: &Pdu, rules: &RoomVersionRules) {
    let known = |id: &OwnedEventId| server.rooms().meta(id).is_ok_and(|meta| meta.is_some());
    if pdu.prev_events.iter().all(known) {
        return;
    }
    let Ok(Some(record)) = server.rooms().room(room_id) else { return };
    let mut request = ruma::api::federation::event::get_missing_events::v1::Request::new(room_id.to_owned(), record.extremities.clone(), vec![pdu.event_id.clone()]);
    request.limit = MISSING_EVENTS_LIMIT.into();
    let events = match federation.send(origin, request).await {
        Ok(answer) => answer.events,
        Err(error) => {
            tracing::warn!(%origin, %room_id, %error, "cannot fetch the events before an event");
            return;
        }
    };
    for raw in events {
        let outcome = async {
            let signed = verify_pdu(federation, &raw, rules).await?;
            let mut writer = server.rooms().writer(room_id).await?;
            writer.append_remote(signed)?;
            writer.commit()
        };
        if let Err(error) = outcome.await {
            tracing::warn!(%origin, %room_id, %error, "a fetched missing event was not accepted");
        }
    }
}

/// How many unknown auth events one received event may make us fetch.
const AUTH_EVENTS_FETCH_LIMIT: usize = 50;

/// Fetches the auth events of `pdu` this server does not have (and theirs) from the origin
/// with `/event`, and keeps each that its own auth events allow as an outlier, so that `pdu`
/// can be checked against them. What cannot be fetched or is refused is logged; `pdu` is then
/// rejected for an unknown auth event.
async fn fetch_auth_events(server: &dyn FederationHost, federation: &Federation, origin: &ruma::ServerName, room_id: &RoomId, pdu: &Pdu, rules: &RoomVersionRules) {
    let unknown = |id: &OwnedEventId| !matches!(server.rooms().pdu(id), Ok(Some(_)));
    let mut todo: Vec<OwnedEventId> = pdu.auth_events.iter().filter(|id| unknown(id)).cloned().collect();
    let (mut seen, mut fetched) = (HashSet::new(), Vec::new());
    while let Some(id) = todo.pop() {
        if fetched.len() >= AUTH_EVENTS_FETCH_LIMIT || !seen.insert(id.clone()) {
            continue;
        }
        let outcome = async {
            let answer = federation.send(origin, ruma::api::federation::event::get_event::v1::Request::new(id.clone())).await?;
            let signed = verify_pdu(federation, &answer.pdu, rules).await?;
            if signed.pdu.event_id != id || signed.pdu.room_id != room_id {
                return Err(Error::bad_json("the server answered with another event"));
            }
            Ok(signed)
        };
        match outcome.await {
            Ok(signed) => {
                todo.extend(signed.pdu.auth_events.iter().filter(|id| unknown(id)).cloned());
                fetched.push(signed);
            }
            Err(error) => tracing::warn!(%origin, %room_id, event_id = %id, %error, "cannot fetch an auth event"),
        }
    }
    if fetched.is_empty() {
        return;
    }
    // An auth event comes after its own auth events, which are less deep.
    fetched.sort_by_key(|signed| u64::from(signed.pdu.depth));
    let outcome = async {
        let mut writer = server.rooms().writer(room_id).await?;
        for signed in &fetched {
            if let Err(error) = writer.add_outlier(signed) {
                tracing::warn!(%origin, %room_id, event_id = %signed.pdu.event_id, %error, "refused a fetched auth event");
            }
        }
        writer.commit()
    };
    if let Err(error) = outcome.await {
        tracing::warn!(%origin, %room_id, %error, "cannot keep fetched auth events");
    }
}

/// While a client pages back through a room: fetches the history before `event` (at history
/// entry `at`) whose prev events this server lacks, with `/backfill` from the other servers in
/// the room, and keeps it just before the event. Asked once per event; returns how many events
/// were added.
pub async fn backfill_before(server: &dyn FederationHost, event: &Pdu, at: crate::rooms::HistoryKey, limit: usize) -> Result<usize> {
    let Some(federation) = server.federation() else { return Ok(0) };
    let room_id = &event.room_id;
    let missing: Vec<OwnedEventId> = event.prev_events.iter().filter(|id| !matches!(server.rooms().pdu(id), Ok(Some(_)))).cloned().collect();
    if missing.is_empty() || !federation.backfilled_before.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(event.event_id.clone()) {
        return Ok(0);
    }
    let rules = server.rooms().rules(room_id)?;
    let limit = u32::try_from(limit.clamp(1, 100)).unwrap_or(100);
    for remote in server.rooms().remote_servers(room_id)? {
        let request = ruma::api::federation::backfill::get_backfill::v1::Request::new(room_id.clone(), missing.clone(), limit.into());
        let answer = match federation.send(&remote, request).await {
            Ok(answer) => answer,
            Err(error) => {
                tracing::warn!(%remote, %room_id, %error, "cannot backfill");
                continue;
            }
        };
        let mut fetched = Vec::new();
        for raw in &answer.pdus {
            match verify_pdu(federation, raw, &rules).await {
                Ok(signed) if signed.pdu.room_id == *room_id => fetched.push(signed),
                Ok(signed) => tracing::warn!(%remote, event_id = %signed.pdu.event_id, "a backfilled event of another room"),
                Err(error) => tracing::warn!(%remote, %room_id, %error, "skipped a backfilled event"),
            }
        }
        let batch_ids: HashSet<OwnedEventId> = fetched.iter().map(|signed| signed.pdu.event_id.clone()).collect();
        for signed in &fetched {
            let unknown_elsewhere = signed.pdu.auth_events.iter().any(|id| !batch_ids.contains(id) && !matches!(server.rooms().pdu(id), Ok(Some(_))));
            if unknown_elsewhere {
                fetch_auth_events(server, federation, &remote, room_id, &signed.pdu, &rules).await;
            }
        }
        let mut writer = server.rooms().writer(room_id).await?;
        let added = writer.add_backfilled(fetched, at)?;
        writer.commit()?;
        return Ok(added);
    }
    Ok(0)
}

/// Typing notifications, read receipts, presence, to-device messages and device-list (and
/// signing-key) updates of the origin's users.
pub fn receive_edus(server: &dyn FederationHost, origin: &ruma::ServerName, edus: &[ruma::serde::Raw<ruma::api::federation::transactions::edu::Edu>]) {
    for edu in edus {
        let Ok(edu) = serde_json::from_str::<JsonValue>(edu.json().get()) else { continue };
        let content = edu.get("content").cloned().unwrap_or_default();
        let outcome = match edu.get("edu_type").and_then(JsonValue::as_str) {
            Some("m.typing") => receive_typing(server, origin, &content),
            Some("m.receipt") => receive_receipts(server, origin, &content),
            Some("m.direct_to_device") => receive_to_device(server, origin, &content),
            Some("m.presence") => receive_presence(server, origin, &content),
            Some("m.device_list_update") | Some("m.signing_key_update") => receive_key_change(server, origin, &content),
            _ => Ok(()),
        };
        if let Err(error) = outcome {
            tracing::debug!(%origin, %error, "ignored an EDU");
        }
    }
}

/// A remote user of `origin` who is joined to `room`.
fn remote_member(server: &dyn FederationHost, origin: &ruma::ServerName, room: &str, user: &str) -> Result<(OwnedRoomId, ruma::OwnedUserId)> {
    let room_id = OwnedRoomId::try_from(room).map_err(|_| Error::bad_json("bad room id"))?;
    let user_id = ruma::OwnedUserId::try_from(user).map_err(|_| Error::bad_json("bad user id"))?;
    if user_id.server_name() != origin || !server.rooms().is_joined(&room_id, &user_id)? || !super::acl::allows(&server.rooms(), &room_id, origin)? {
        return Err(Error::forbidden("not a joined user of the origin"));
    }
    Ok((room_id, user_id))
}

fn receive_typing(server: &dyn FederationHost, origin: &ruma::ServerName, content: &JsonValue) -> Result<()> {
    let field = |name: &str| content.get(name).and_then(JsonValue::as_str).unwrap_or_default();
    let (room_id, user_id) = remote_member(server, origin, field("room_id"), field("user_id"))?;
    let typing = content.get("typing").and_then(JsonValue::as_bool).unwrap_or(false);
    server.rooms().set_typing(&room_id, &user_id, typing.then_some(std::time::Duration::from_secs(30)))
}

fn receive_receipts(server: &dyn FederationHost, origin: &ruma::ServerName, content: &JsonValue) -> Result<()> {
    for (room, receipts) in content.as_object().into_iter().flatten() {
        for (user, receipt) in receipts.get("m.read").and_then(JsonValue::as_object).into_iter().flatten() {
            let Ok((room_id, user_id)) = remote_member(server, origin, room, user) else { continue };
            let Some(event_id) = receipt.get("event_ids").and_then(|ids| ids.get(0)).and_then(JsonValue::as_str).and_then(|id| OwnedEventId::try_from(id).ok()) else { continue };
            let thread = receipt.get("data").and_then(|d| d.get("thread_id")).and_then(JsonValue::as_str).map(str::to_owned);
            server.rooms().set_receipt(&room_id, "m.read", &user_id, event_id, thread)?;
        }
    }
    Ok(())
}

/// To-device messages from a user of `origin` to our users' devices (`*`: all of them).
fn receive_to_device(server: &dyn FederationHost, origin: &ruma::ServerName, content: &JsonValue) -> Result<()> {
    let sender = content.get("sender").and_then(JsonValue::as_str).and_then(|s| ruma::OwnedUserId::try_from(s).ok()).ok_or_else(|| Error::bad_json("no sender"))?;
    if sender.server_name() != origin {
        return Err(Error::forbidden("to-device messages come from the sender's server"));
    }
    let kind = content.get("type").and_then(JsonValue::as_str).ok_or_else(|| Error::bad_json("no type"))?;
    let mut messages: BTreeMap<ruma::OwnedUserId, BTreeMap<String, JsonValue>> = BTreeMap::new();
    for (user, devices) in content.get("messages").and_then(JsonValue::as_object).into_iter().flatten() {
        let Ok(user) = ruma::OwnedUserId::try_from(user.as_str()) else { continue };
        if user.server_name() != server.server_name() {
            continue;
        }
        let devices = devices.as_object().map(|d| d.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        messages.insert(user, devices);
    }
    server.e2ee().send_to_device(&sender, kind, &messages, |user| Ok(server.users().devices(user)?.into_iter().map(|(id, _)| id.to_string()).collect()))
}

/// A user of `origin` changed their devices or cross-signing keys: our users who share a room
/// with them see it in `device_lists.changed` and query the keys again.
fn receive_key_change(server: &dyn FederationHost, origin: &ruma::ServerName, content: &JsonValue) -> Result<()> {
    let user = content.get("user_id").and_then(JsonValue::as_str).and_then(|s| ruma::OwnedUserId::try_from(s).ok()).ok_or_else(|| Error::bad_json("no user_id"))?;
    if user.server_name() != origin {
        return Err(Error::forbidden("device lists come from the user's server"));
    }
    server.e2ee().record_remote_key_change(&user)
}

/// Presence of the origin's users, as our users' syncs show it for people they share a room with.
fn receive_presence(server: &dyn FederationHost, origin: &ruma::ServerName, content: &JsonValue) -> Result<()> {
    if !server.presence_enabled() {
        return Ok(());
    }
    for update in content.get("push").and_then(JsonValue::as_array).into_iter().flatten() {
        let Some(user) = update.get("user_id").and_then(JsonValue::as_str).and_then(|u| ruma::OwnedUserId::try_from(u).ok()) else { continue };
        let Some(presence) = update.get("presence").and_then(JsonValue::as_str).filter(|p| matches!(*p, "online" | "offline" | "unavailable")) else { continue };
        if user.server_name() != origin {
            continue;
        }
        let status = update.get("status_msg").and_then(JsonValue::as_str).map(str::to_owned);
        server.users().set_presence(&user, presence, status)?;
    }
    Ok(())
}
