//! Events across servers: checking a PDU another server signed, transactions (`/send`), and
//! joins (`make_join`/`send_join` as the resident server, and joining a room on another server).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, OwnedServerName, RoomId, RoomVersionId, UserId,
    api::federation::membership::{create_join_event, prepare_join_event},
    room_version_rules::RoomVersionRules,
    signatures::{PublicKeyMap, Verified},
};
use serde_json::{Value as JsonValue, json, value::RawValue};

use super::Federation;
use crate::{
    error::{Error, ErrorCode, Result},
    events::{Pdu, SUPPORTED_ROOM_VERSIONS, SignedPdu, rules_for},
    server::Server,
};

fn bad(message: impl Into<String>) -> Error {
    Error::bad_json(message)
}

/// The reference-hash event id of a PDU.
fn event_id_of(object: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<OwnedEventId> {
    let hash = ruma::signatures::reference_hash(object, rules).map_err(|e| bad(format!("cannot hash the event: {e}")))?;
    OwnedEventId::try_from(format!("${hash}")).map_err(|e| bad(e.to_string()))
}

/// Checks a PDU another server signed: every signature against the signer's keys as of the
/// event's time; a content hash that does not match means the event is kept redacted.
pub async fn verify_pdu(federation: &Federation, raw: &RawValue, rules: &RoomVersionRules) -> Result<SignedPdu> {
    let unchecked = UncheckedPdu::parse(raw, rules)?;
    let mut keys = PublicKeyMap::new();
    for (server, key_ids) in unchecked.signers() {
        keys.insert(server.to_string(), federation.public_keys(&server, &key_ids, unchecked.ts).await?);
    }
    unchecked.verify(&keys, rules)
}

/// A PDU read from another server, in canonical JSON and with its reference-hash event id,
/// whose signatures are not checked yet. Parsing and checking are apart from the key look-ups
/// between them (and fuzzed: `crate::fuzz`).
pub(crate) struct UncheckedPdu {
    object: CanonicalJsonObject,
    event_id: OwnedEventId,
    /// When it was sent: the signers' keys must have been valid then.
    ts: u64,
}

impl UncheckedPdu {
    pub(crate) fn parse(raw: &RawValue, rules: &RoomVersionRules) -> Result<Self> {
        let mut object: CanonicalJsonObject = serde_json::from_str(raw.get()).map_err(|e| bad(format!("not a PDU: {e}")))?;
        object.remove("event_id");
        ruma::state_res::check_pdu_format(&object, &rules.event_format).map_err(|e| bad(format!("malformed PDU: {e}")))?;
        let event_id = event_id_of(&object, rules)?;
        let ts = match object.get("origin_server_ts") {
            Some(CanonicalJsonValue::Integer(ts)) => u64::try_from(i64::from(*ts)).unwrap_or(0),
            _ => return Err(bad("a PDU needs origin_server_ts")),
        };
        Ok(Self { object, event_id, ts })
    }

    /// The servers that signed it, with the ids of the keys they signed with.
    pub(crate) fn signers(&self) -> Vec<(OwnedServerName, Vec<String>)> {
        let Some(CanonicalJsonValue::Object(signatures)) = self.object.get("signatures") else { return Vec::new() };
        signatures
            .iter()
            .filter_map(|(server, by_key)| match (OwnedServerName::try_from(server.as_str()), by_key) {
                (Ok(server), CanonicalJsonValue::Object(by_key)) => Some((server, by_key.keys().cloned().collect())),
                _ => None,
            })
            .collect()
    }

    /// Checks the signatures against `keys` (the signers' keys as of the event's time).
    pub(crate) fn verify(self, keys: &PublicKeyMap, rules: &RoomVersionRules) -> Result<SignedPdu> {
        let Self { mut object, event_id, .. } = self;
        match ruma::signatures::verify_event(keys, &object, rules) {
            Ok(Verified::All) => {}
            Ok(Verified::Signatures) => {
                tracing::warn!(%event_id, "content hash mismatch: keeping the event redacted");
                object = ruma::canonical_json::redact(object, &rules.redaction, None).map_err(|e| bad(e.to_string()))?;
            }
            Err(error) => return Err(Error::forbidden(format!("{event_id}: bad signatures: {error}"))),
        }
        object.insert("event_id".into(), CanonicalJsonValue::String(event_id.to_string()));
        let bytes = serde_json::to_vec(&object).map_err(Error::internal)?;
        let pdu = Pdu::from_stored(&bytes).map_err(|_| bad(format!("{event_id} is not a valid PDU")))?;
        Ok(SignedPdu { pdu, canonical: object })
    }
}

/// The room a PDU of a transaction names, if it names a valid one.
pub(crate) fn room_id_of(raw: &RawValue) -> Option<OwnedRoomId> {
    serde_json::from_str::<JsonValue>(raw.get()).ok()?.get("room_id")?.as_str().and_then(|r| OwnedRoomId::try_from(r).ok())
}

/// `PUT /send/{txnId}`: each PDU checked and appended on its own; the answer says which failed.
pub async fn receive_transaction(server: &Server, origin: &ruma::ServerName, pdus: &[Box<RawValue>]) -> BTreeMap<String, JsonValue> {
    let mut results = BTreeMap::new();
    for raw in pdus {
        let outcome = match room_id_of(raw) {
            Some(room_id) => receive_pdu(server, origin, &room_id, raw).await,
            None => Err((None, bad("a PDU needs a room_id"))),
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

async fn receive_pdu(server: &Server, origin: &ruma::ServerName, room_id: &RoomId, raw: &RawValue) -> std::result::Result<OwnedEventId, (Option<String>, Error)> {
    let fail = |error: Error| (None, error);
    let federation = server.federation.as_ref().ok_or_else(|| fail(Error::not_found("federation is disabled")))?;
    let Some(record) = server.rooms.room(room_id).map_err(fail)? else {
        return receive_outside_membership(server, federation, origin, room_id, raw).await;
    };
    let rules = rules_for(&record.version).map_err(fail)?;
    let signed = verify_pdu(federation, raw, &rules).await.map_err(fail)?;
    let event_id = signed.pdu.event_id.clone();
    let named = |error: Error| (Some(event_id.to_string()), error);
    for server_name in [origin, signed.pdu.sender.server_name()] {
        if !super::acl::allows(&server.rooms, room_id, server_name).map_err(named)? {
            return Err(named(Error::forbidden(format!("{server_name} is denied by the room's server ACL"))));
        }
    }
    if signed.pdu.sender.server_name() != origin && signed.pdu.kind != ruma::events::TimelineEventType::RoomMember {
        return Err(named(Error::forbidden("events are sent by their sender's server")));
    }
    fill_gap(server, federation, origin, room_id, &signed.pdu, &rules).await;
    fetch_auth_events(server, federation, origin, room_id, &signed.pdu, &rules).await;
    let mut writer = server.rooms.writer(room_id).await.map_err(named)?;
    writer.append_remote(signed).map_err(named)?;
    writer.commit().map_err(named)?;
    Ok(event_id)
}

/// An event of a room this server is not in: only a membership change of one of our users who
/// is invited to or knocking on it counts (a declined knock, a withdrawn invite), recorded so
/// their sync shows it.
async fn receive_outside_membership(server: &Server, federation: &Federation, origin: &ruma::ServerName, room_id: &RoomId, raw: &RawValue) -> std::result::Result<OwnedEventId, (Option<String>, Error)> {
    let fail = |error: Error| (None, error);
    let not_in_room = || fail(Error::not_found("this server is not in that room"));
    let value: JsonValue = serde_json::from_str(raw.get()).map_err(|e| fail(bad(e.to_string())))?;
    let user = value.get("state_key").and_then(JsonValue::as_str).and_then(|k| ruma::OwnedUserId::try_from(k).ok()).ok_or_else(not_in_room)?;
    let pending = server.rooms.user_room(&user, room_id).map_err(fail)?.filter(|e| matches!(e.membership, crate::rooms::Membership::Invite | crate::rooms::Membership::Knock));
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
    server.rooms.record_remote_membership(&user, &signed, membership.unwrap_or(crate::rooms::Membership::Leave), None).map_err(|e| (Some(event_id.to_string()), e))?;
    Ok(event_id)
}

/// How many events before a join the joining server fetches.
const JOIN_BACKFILL: u32 = 50;

/// How many missing events one gap fetch asks for.
const MISSING_EVENTS_LIMIT: u32 = 20;

/// Fetches the events between what we have and `pdu` when some of its `prev_events` are
/// unknown (`get_missing_events` from the origin), and appends them oldest first. What cannot be
/// fetched or accepted is logged; the event itself is still appended after them.
async fn fill_gap(server: &Server, federation: &Federation, origin: &ruma::ServerName, room_id: &RoomId, pdu: &Pdu, rules: &RoomVersionRules) {
    let known = |id: &OwnedEventId| server.rooms.meta(id).is_ok_and(|meta| meta.is_some());
    if pdu.prev_events.iter().all(known) {
        return;
    }
    let Ok(Some(record)) = server.rooms.room(room_id) else { return };
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
            let mut writer = server.rooms.writer(room_id).await?;
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
async fn fetch_auth_events(server: &Server, federation: &Federation, origin: &ruma::ServerName, room_id: &RoomId, pdu: &Pdu, rules: &RoomVersionRules) {
    let unknown = |id: &OwnedEventId| !matches!(server.rooms.pdu(id), Ok(Some(_)));
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
                return Err(bad("the server answered with another event"));
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
        let mut writer = server.rooms.writer(room_id).await?;
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
pub async fn backfill_before(server: &Server, event: &Pdu, at: crate::rooms::HistoryKey, limit: usize) -> Result<usize> {
    let Some(federation) = server.federation.as_ref() else { return Ok(0) };
    let room_id = &event.room_id;
    let missing: Vec<OwnedEventId> = event.prev_events.iter().filter(|id| !matches!(server.rooms.pdu(id), Ok(Some(_)))).cloned().collect();
    if missing.is_empty() || !federation.backfilled_before.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(event.event_id.clone()) {
        return Ok(0);
    }
    let rules = server.rooms.rules(room_id)?;
    let limit = u32::try_from(limit.clamp(1, 100)).unwrap_or(100);
    for remote in server.rooms.remote_servers(room_id)? {
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
            let unknown_elsewhere = signed.pdu.auth_events.iter().any(|id| !batch_ids.contains(id) && !matches!(server.rooms.pdu(id), Ok(Some(_))));
            if unknown_elsewhere {
                fetch_auth_events(server, federation, &remote, room_id, &signed.pdu, &rules).await;
            }
        }
        let mut writer = server.rooms.writer(room_id).await?;
        let added = writer.add_backfilled(fetched, at)?;
        writer.commit()?;
        return Ok(added);
    }
    Ok(0)
}

/// The events an event's auth chain consists of, recursively.
fn auth_chain(server: &Server, start: &[OwnedEventId]) -> Result<Vec<Pdu>> {
    let mut seen: HashSet<OwnedEventId> = HashSet::new();
    let mut todo: Vec<OwnedEventId> = start.to_vec();
    let mut chain = Vec::new();
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        if let Some(pdu) = server.rooms.pdu(&id)? {
            todo.extend(pdu.auth_events.iter().cloned());
            chain.push(pdu);
        }
    }
    Ok(chain)
}

fn raw_events(server: &Server, events: impl IntoIterator<Item = OwnedEventId>) -> Result<Vec<Box<RawValue>>> {
    let mut raw = Vec::new();
    for id in events {
        if let Some(pdu) = server.rooms.federation_pdu(&id)? {
            raw.push(pdu);
        }
    }
    Ok(raw)
}

/// `make_join`, `make_knock` and `make_leave` as the resident server: a membership event for the
/// remote user to sign, placed after our current extremities with the auth events of the
/// current state. `versions` are the room versions the asking server supports (none for leave).
pub async fn make_membership(server: &Server, origin: &ruma::ServerName, room_id: &RoomId, user_id: &UserId, membership: &str, versions: Option<&[RoomVersionId]>) -> Result<JsonValue> {
    if user_id.server_name() != origin {
        return Err(Error::forbidden("a server asks for its own users only"));
    }
    let record = server.rooms.room(room_id)?.ok_or_else(|| Error::not_found("unknown room"))?;
    if versions.is_some_and(|versions| !versions.contains(&record.version)) {
        return Err(Error::with_status(ErrorCode::IncompatibleRoomVersion, http::StatusCode::BAD_REQUEST, format!("the room is version {}", record.version)));
    }
    let federates = server.rooms.state_content(room_id, "m.room.create", "")?.is_none_or(|c| c.get("m.federate") != Some(&JsonValue::Bool(false)));
    if !federates {
        return Err(Error::forbidden("this room is not federated"));
    }
    if !super::acl::allows(&server.rooms, room_id, origin)? {
        return Err(Error::forbidden(format!("{origin} is denied by the room's server ACL")));
    }
    let rules = rules_for(&record.version)?;
    let content = json!({ "membership": membership });
    let raw_content = serde_json::value::to_raw_value(&content).map_err(Error::internal)?;
    let types = ruma::state_res::auth_types_for_event(&ruma::events::TimelineEventType::RoomMember, user_id, Some(user_id.as_str()), &raw_content, &rules.authorization)
        .map_err(Error::bad_json)?;
    let mut auth_events = Vec::new();
    for (kind, key) in &types {
        if let Some(pdu) = server.rooms.state_event(room_id, &kind.to_string(), key)? {
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
pub async fn accept_membership(server: &Server, origin: &ruma::ServerName, room_id: &RoomId, event_id: &OwnedEventId, raw: &RawValue, membership: &str) -> Result<Pdu> {
    let federation = server.federation.as_ref().ok_or_else(|| Error::not_found("federation is disabled"))?;
    let record = server.rooms.room(room_id)?.ok_or_else(|| Error::not_found("unknown room"))?;
    let rules = rules_for(&record.version)?;
    let signed = verify_pdu(federation, raw, &rules).await?;
    let pdu = signed.pdu.clone();
    let subject = pdu.state_key.as_deref().and_then(|k| <&UserId>::try_from(k).ok());
    if pdu.event_id != *event_id || pdu.room_id != room_id
        || pdu.membership().map(crate::rooms::Membership::as_str) != Some(membership)
        || subject != Some(&pdu.sender) || pdu.sender.server_name() != origin
    {
        return Err(bad(format!("not a {membership} of the origin's own user matching the request")));
    }
    let mut writer = server.rooms.writer(room_id).await?;
    writer.append_remote(signed)?;
    writer.commit()?;
    Ok(pdu)
}

/// The room's stripped state as full events, for invites and knocks, with the inviter's own
/// membership (by which clients name an invite) when `inviter` is given.
pub fn stripped_state_events(server: &Server, room_id: &RoomId, inviter: Option<&UserId>) -> Result<Vec<ruma::api::federation::membership::RawStrippedState>> {
    let mut state = Vec::new();
    let keys = crate::rooms::STRIPPED_STATE_TYPES.iter().map(|kind| (*kind, "")).chain(inviter.map(|user| ("m.room.member", user.as_str())));
    for (kind, state_key) in keys {
        if let Some(pdu) = server.rooms.state_event(room_id, kind, state_key)?
            && let Some(raw) = server.rooms.federation_pdu(&pdu.event_id)?
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
pub async fn membership_remote(server: &Server, user: &UserId, room_id: &RoomId, via: &[OwnedServerName], membership: &str, reason: Option<&str>) -> Result<()> {
    let federation = server.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled on this server"))?;
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
            let mut object: CanonicalJsonObject = serde_json::from_str(template.get()).map_err(|e| bad(format!("bad template: {e}")))?;
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
            server.rooms.record_remote_membership(user, &signed, recorded, state.as_deref())
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
pub async fn send_join(server: &Server, origin: &ruma::ServerName, request: &create_join_event::v2::Request) -> Result<JsonValue> {
    let federation = server.federation.as_ref().ok_or_else(|| Error::not_found("federation is disabled"))?;
    let record = server.rooms.room(&request.room_id)?.ok_or_else(|| Error::not_found("unknown room"))?;
    let rules = rules_for(&record.version)?;
    let signed = verify_pdu(federation, &request.pdu, &rules).await?;
    let pdu = signed.pdu.clone();
    if pdu.event_id != request.event_id || pdu.room_id != request.room_id {
        return Err(bad("the event does not match the request"));
    }
    let joining = pdu.state_key.as_deref().and_then(|k| <&UserId>::try_from(k).ok());
    if pdu.membership() != Some(crate::rooms::Membership::Join) || joining != Some(&pdu.sender) || pdu.sender.server_name() != origin {
        return Err(bad("not a join of the origin's own user"));
    }
    let mut writer = server.rooms.writer(&request.room_id).await?;
    let state_before: Vec<OwnedEventId> = writer.current_state_ids()?;
    writer.append_remote(signed)?;
    writer.commit()?;
    let chain: BTreeSet<OwnedEventId> = auth_chain(server, &state_before)?.into_iter().map(|p| p.event_id).collect();
    Ok(json!({
        "origin": server.server_name(),
        "state": raw_events(server, state_before)?,
        "auth_chain": raw_events(server, chain)?,
        "event": server.rooms.federation_pdu(&pdu.event_id)?,
        "members_omitted": false,
    }))
}

/// The servers to reach a room through, each once: the `via` servers, the server of whoever
/// invited the user (or answered their knock), then the one the room id names (up to v11).
fn residents(server: &Server, user: &UserId, room_id: &RoomId, via: &[OwnedServerName]) -> Vec<OwnedServerName> {
    let ours = server.server_name();
    let inviter = server.rooms.user_room(user, room_id).ok().flatten()
        .and_then(|entry| server.rooms.pdu(&entry.event_id).ok().flatten())
        .map(|pdu| pdu.sender.server_name().to_owned());
    let owner = room_id.server_name().map(ToOwned::to_owned);
    let mut seen = HashSet::new();
    via.iter().cloned().chain(inviter).chain(owner).filter(|s| s != ours && seen.insert(s.clone())).collect()
}

/// Joins a local user to a room on another server: `make_join`, sign, `send_join`, then the
/// room's state is checked and stored, and the join appended.
pub async fn join_remote(server: &Server, user: &UserId, room_id: &RoomId, via: &[OwnedServerName]) -> Result<()> {
    let federation = server.federation.as_ref().ok_or_else(|| Error::forbidden("federation is disabled on this server"))?;
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

async fn join_via(server: &Server, federation: &Federation, user: &UserId, room_id: &RoomId, resident: &ruma::ServerName) -> Result<()> {
    let mut make = prepare_join_event::v1::Request::new(room_id.to_owned(), user.to_owned());
    make.ver = SUPPORTED_ROOM_VERSIONS.to_vec();
    let template = federation.send(resident, make).await?;
    let version = template.room_version.unwrap_or(RoomVersionId::V1);
    let rules = rules_for(&version)?;
    let mut object: CanonicalJsonObject = serde_json::from_str(template.event.get()).map_err(|e| bad(format!("bad make_join template: {e}")))?;
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
    let mut writer = server.rooms.writer(room_id).await?;
    if !writer.exists() {
        writer.init_room(version)?;
    }
    for signed in imported {
        writer.import(signed)?;
    }
    // The state is written first: the clinic policy reads earlier events (an admission's knock)
    // from the store when it checks the join.
    writer.commit()?;
    let mut writer = server.rooms.writer(room_id).await?;
    writer.append_remote(join)?;
    writer.commit().map(drop)
}

/// Typing notifications, read receipts, presence, to-device messages and device-list (and
/// signing-key) updates of the origin's users.
pub fn receive_edus(server: &Server, origin: &ruma::ServerName, edus: &[ruma::serde::Raw<ruma::api::federation::transactions::edu::Edu>]) {
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
fn remote_member(server: &Server, origin: &ruma::ServerName, room: &str, user: &str) -> Result<(OwnedRoomId, ruma::OwnedUserId)> {
    let room_id = OwnedRoomId::try_from(room).map_err(|_| bad("bad room id"))?;
    let user_id = ruma::OwnedUserId::try_from(user).map_err(|_| bad("bad user id"))?;
    if user_id.server_name() != origin || !server.rooms.is_joined(&room_id, &user_id)? || !super::acl::allows(&server.rooms, &room_id, origin)? {
        return Err(Error::forbidden("not a joined user of the origin"));
    }
    Ok((room_id, user_id))
}

fn receive_typing(server: &Server, origin: &ruma::ServerName, content: &JsonValue) -> Result<()> {
    let field = |name: &str| content.get(name).and_then(JsonValue::as_str).unwrap_or_default();
    let (room_id, user_id) = remote_member(server, origin, field("room_id"), field("user_id"))?;
    let typing = content.get("typing").and_then(JsonValue::as_bool).unwrap_or(false);
    server.rooms.set_typing(&room_id, &user_id, typing.then_some(std::time::Duration::from_secs(30)))
}

fn receive_receipts(server: &Server, origin: &ruma::ServerName, content: &JsonValue) -> Result<()> {
    for (room, receipts) in content.as_object().into_iter().flatten() {
        for (user, receipt) in receipts.get("m.read").and_then(JsonValue::as_object).into_iter().flatten() {
            let Ok((room_id, user_id)) = remote_member(server, origin, room, user) else { continue };
            let Some(event_id) = receipt.get("event_ids").and_then(|ids| ids.get(0)).and_then(JsonValue::as_str).and_then(|id| OwnedEventId::try_from(id).ok()) else { continue };
            let thread = receipt.get("data").and_then(|d| d.get("thread_id")).and_then(JsonValue::as_str).map(str::to_owned);
            server.rooms.set_receipt(&room_id, "m.read", &user_id, event_id, thread)?;
        }
    }
    Ok(())
}

/// Sends an invite of a user of `destination` through `/invite` (v2), with the room's stripped
/// state as full events. A refusal is final (logged); a failure to reach the server is retried.
pub async fn send_invite(server: &Server, federation: &Federation, destination: &ruma::ServerName, invite: &Pdu) -> Result<()> {
    let record = server.rooms.room(&invite.room_id)?.ok_or_else(|| Error::not_found("unknown room"))?;
    let state = stripped_state_events(server, &invite.room_id, Some(&invite.sender))?;
    let event = server.rooms.federation_pdu(&invite.event_id)?.ok_or_else(|| Error::not_found("unknown event"))?;
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
pub async fn receive_invite(server: &Server, origin: &ruma::ServerName, request: &ruma::api::federation::membership::create_invite::v2::Request) -> Result<JsonValue> {
    let federation = server.federation.as_ref().ok_or_else(|| Error::not_found("federation is disabled"))?;
    if !SUPPORTED_ROOM_VERSIONS.contains(&request.room_version) {
        return Err(Error::with_status(ErrorCode::IncompatibleRoomVersion, http::StatusCode::BAD_REQUEST, format!("room version {} is not supported", request.room_version)));
    }
    let rules = rules_for(&request.room_version)?;
    let signed = verify_pdu(federation, &request.event, &rules).await?;
    let pdu = &signed.pdu;
    let invitee = pdu.state_key.as_deref().and_then(|k| <&UserId>::try_from(k).ok()).map(ToOwned::to_owned);
    let Some(invitee) = invitee.filter(|u| u.server_name() == server.server_name()) else { return Err(bad("the invitee is not a user of this server")) };
    if pdu.membership() != Some(crate::rooms::Membership::Invite) || pdu.sender.server_name() != origin || pdu.event_id != request.event_id || pdu.room_id != request.room_id {
        return Err(bad("not an invite from the origin's user matching the request"));
    }
    if !server.users.account(&invitee)?.is_some_and(|a| !a.deactivated) {
        return Err(Error::not_found("unknown user"));
    }
    // Countersigned by us, as the spec asks.
    let mut object = signed.canonical.clone();
    object.remove("event_id");
    ruma::signatures::sign_json(server.server_name().as_str(), federation.key().key_pair(), &mut object).map_err(|e| Error::internal(e.to_string()))?;
    let invite_state = stripped_for_clients(&request.invite_room_state);
    let room_id = pdu.room_id.clone();
    if server.rooms.exists(&room_id)? {
        let mut writer = server.rooms.writer(&room_id).await?;
        writer.append_remote(signed)?;
        writer.commit()?;
    } else {
        server.rooms.record_remote_membership(&invitee, &signed, crate::rooms::Membership::Invite, Some(&invite_state))?;
    }
    Ok(json!({ "event": object }))
}

/// To-device messages from a user of `origin` to our users' devices (`*`: all of them).
fn receive_to_device(server: &Server, origin: &ruma::ServerName, content: &JsonValue) -> Result<()> {
    let sender = content.get("sender").and_then(JsonValue::as_str).and_then(|s| ruma::OwnedUserId::try_from(s).ok()).ok_or_else(|| bad("no sender"))?;
    if sender.server_name() != origin {
        return Err(Error::forbidden("to-device messages come from the sender's server"));
    }
    let kind = content.get("type").and_then(JsonValue::as_str).ok_or_else(|| bad("no type"))?;
    let mut messages: BTreeMap<ruma::OwnedUserId, BTreeMap<String, JsonValue>> = BTreeMap::new();
    for (user, devices) in content.get("messages").and_then(JsonValue::as_object).into_iter().flatten() {
        let Ok(user) = ruma::OwnedUserId::try_from(user.as_str()) else { continue };
        if user.server_name() != server.server_name() {
            continue;
        }
        let devices = devices.as_object().map(|d| d.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        messages.insert(user, devices);
    }
    server.e2ee.send_to_device(&sender, kind, &messages, |user| Ok(server.users.devices(user)?.into_iter().map(|(id, _)| id.to_string()).collect()))
}

/// A user of `origin` changed their devices or cross-signing keys: our users who share a room
/// with them see it in `device_lists.changed` and query the keys again.
fn receive_key_change(server: &Server, origin: &ruma::ServerName, content: &JsonValue) -> Result<()> {
    let user = content.get("user_id").and_then(JsonValue::as_str).and_then(|s| ruma::OwnedUserId::try_from(s).ok()).ok_or_else(|| bad("no user_id"))?;
    if user.server_name() != origin {
        return Err(Error::forbidden("device lists come from the user's server"));
    }
    server.e2ee.record_remote_key_change(&user)
}

/// Presence of the origin's users, as our users' syncs show it for people they share a room with.
fn receive_presence(server: &Server, origin: &ruma::ServerName, content: &JsonValue) -> Result<()> {
    if !server.config.presence.enabled {
        return Ok(());
    }
    for update in content.get("push").and_then(JsonValue::as_array).into_iter().flatten() {
        let Some(user) = update.get("user_id").and_then(JsonValue::as_str).and_then(|u| ruma::OwnedUserId::try_from(u).ok()) else { continue };
        let Some(presence) = update.get("presence").and_then(JsonValue::as_str).filter(|p| matches!(*p, "online" | "offline" | "unavailable")) else { continue };
        if user.server_name() != origin {
            continue;
        }
        let status = update.get("status_msg").and_then(JsonValue::as_str).map(str::to_owned);
        server.users.set_presence(&user, presence, status)?;
    }
    Ok(())
}
