//! What other servers may read of a room's history: single events, the state at an event (whole
//! or as ids), backfill and missing events. A server sees a room's events only while one of its
//! users is in the room (or the room is world-readable), and never a room that does not
//! federate.

use std::collections::{BTreeSet, HashSet, VecDeque};

use ruma::{OwnedEventId, RoomId, ServerName};
use serde_json::{Value as JsonValue, json, value::RawValue};

use crate::{
    error::{Error, Result},
    events::Pdu,
    rooms::Membership,
    server::Server,
};

/// The most events one backfill or missing-events answer holds.
const MAX_EVENTS: usize = 100;

/// Whether `origin` may read `room_id`'s events.
pub fn server_may_see(server: &Server, origin: &ServerName, room_id: &RoomId) -> Result<bool> {
    let federates = server.rooms.state_content(room_id, "m.room.create", "")?.is_some_and(|c| c.get("m.federate") != Some(&JsonValue::Bool(false)));
    if !federates {
        return Ok(false);
    }
    if !super::acl::allows(&server.rooms, room_id, origin)? {
        return Ok(false);
    }
    let world_readable = server.rooms.state_content(room_id, "m.room.history_visibility", "")?.is_some_and(|c| c.get("history_visibility").and_then(JsonValue::as_str) == Some("world_readable"));
    let member = server.rooms.members(room_id)?.iter().any(|(user, membership)| user.server_name() == origin && matches!(membership, Membership::Join | Membership::Invite | Membership::Knock));
    Ok(world_readable || member)
}

fn check(server: &Server, origin: &ServerName, room_id: &RoomId) -> Result<()> {
    if server_may_see(server, origin, room_id)? { Ok(()) } else { Err(Error::forbidden(format!("{origin} is not in this room"))) }
}

fn raw(server: &Server, id: &OwnedEventId) -> Result<Option<Box<RawValue>>> {
    server.rooms.federation_pdu(id)
}

fn now() -> ruma::MilliSecondsSinceUnixEpoch {
    ruma::MilliSecondsSinceUnixEpoch::now()
}

pub fn event(server: &Server, origin: &ServerName, event_id: &OwnedEventId) -> Result<JsonValue> {
    let pdu = server.rooms.pdu(event_id)?.ok_or_else(|| Error::not_found("unknown event"))?;
    check(server, origin, &pdu.room_id)?;
    Ok(json!({ "origin": server.server_name(), "origin_server_ts": now(), "pdus": [raw(server, event_id)?] }))
}

/// The state before `event_id` and its auth chain, as ids.
fn state_at(server: &Server, room_id: &RoomId, event_id: &OwnedEventId) -> Result<(Vec<Pdu>, BTreeSet<OwnedEventId>)> {
    let pdu = server.rooms.pdu(event_id)?.filter(|p| p.room_id == room_id).ok_or_else(|| Error::not_found("unknown event in this room"))?;
    let meta = server.rooms.meta(&pdu.event_id)?.ok_or_else(|| Error::not_found("unknown event"))?;
    let state = server.rooms.state_events(meta.state_before, |_, _| true)?;
    let mut chain = BTreeSet::new();
    let mut todo: Vec<OwnedEventId> = state.iter().flat_map(|p| p.auth_events.iter().cloned()).collect();
    while let Some(id) = todo.pop() {
        if chain.insert(id.clone())
            && let Some(event) = server.rooms.pdu(&id)?
        {
            todo.extend(event.auth_events);
        }
    }
    Ok((state, chain))
}

pub fn state(server: &Server, origin: &ServerName, room_id: &RoomId, event_id: &OwnedEventId) -> Result<JsonValue> {
    check(server, origin, room_id)?;
    let (state, chain) = state_at(server, room_id, event_id)?;
    let pdus: Vec<_> = state.iter().map(|p| raw(server, &p.event_id)).collect::<Result<Vec<_>>>()?.into_iter().flatten().collect();
    let auth_chain: Vec<_> = chain.iter().map(|id| raw(server, id)).collect::<Result<Vec<_>>>()?.into_iter().flatten().collect();
    Ok(json!({ "pdus": pdus, "auth_chain": auth_chain }))
}

pub fn state_ids(server: &Server, origin: &ServerName, room_id: &RoomId, event_id: &OwnedEventId) -> Result<JsonValue> {
    check(server, origin, room_id)?;
    let (state, chain) = state_at(server, room_id, event_id)?;
    Ok(json!({ "pdu_ids": state.iter().map(|p| &p.event_id).collect::<Vec<_>>(), "auth_chain_ids": chain }))
}

/// Events before (and including) `from`, walking `prev_events` breadth first, newest first.
pub fn backfill(server: &Server, origin: &ServerName, room_id: &RoomId, from: &[OwnedEventId], limit: usize) -> Result<JsonValue> {
    check(server, origin, room_id)?;
    let limit = limit.clamp(1, MAX_EVENTS);
    let mut seen: HashSet<OwnedEventId> = HashSet::new();
    let mut queue: VecDeque<OwnedEventId> = from.iter().cloned().collect();
    let mut pdus = Vec::new();
    while let Some(id) = queue.pop_front() {
        if pdus.len() >= limit || !seen.insert(id.clone()) {
            continue;
        }
        let Some(pdu) = server.rooms.pdu(&id)?.filter(|p| p.room_id == room_id) else { continue };
        if let Some(raw) = raw(server, &id)? {
            pdus.push(raw);
        }
        queue.extend(pdu.prev_events);
    }
    Ok(json!({ "origin": server.server_name(), "origin_server_ts": now(), "pdus": pdus }))
}

/// Events between `earliest` (exclusive, what the asking server has) and `latest`.
pub fn missing_events(server: &Server, origin: &ServerName, room_id: &RoomId, earliest: &[OwnedEventId], latest: &[OwnedEventId], limit: usize, min_depth: u64) -> Result<JsonValue> {
    check(server, origin, room_id)?;
    let limit = limit.clamp(1, MAX_EVENTS);
    let mut seen: HashSet<OwnedEventId> = earliest.iter().cloned().collect();
    let mut queue: VecDeque<OwnedEventId> = VecDeque::new();
    for id in latest {
        if let Some(pdu) = server.rooms.pdu(id)? {
            queue.extend(pdu.prev_events);
        }
    }
    let mut events: Vec<Pdu> = Vec::new();
    while let Some(id) = queue.pop_front() {
        if events.len() >= limit || !seen.insert(id.clone()) {
            continue;
        }
        let Some(pdu) = server.rooms.pdu(&id)?.filter(|p| p.room_id == room_id && u64::from(p.depth) >= min_depth) else { continue };
        queue.extend(pdu.prev_events.iter().cloned());
        events.push(pdu);
    }
    // Oldest first, as the spec asks.
    events.sort_by_key(|p| u64::from(p.depth));
    let raws: Vec<_> = events.iter().map(|p| raw(server, &p.event_id)).collect::<Result<Vec<_>>>()?.into_iter().flatten().collect();
    Ok(json!({ "events": raws }))
}
