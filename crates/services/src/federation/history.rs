//! What other servers may read of a room's history: single events, the state at an event (whole
//! or as ids), backfill and missing events. Only a server with a joined member in the room asks
//! at all (none for a room that does not federate, or whose ACL denies it); knocking or
//! invited users give their server nothing. Each event is then judged by the history
//! visibility at it, as the server's users would see it ([`crate::rooms::Rooms::can_see`]):
//! one it may not see goes out redacted (its content stripped), so that the DAG stays whole, as
//! Synapse's `filter_events_for_server` does. The state at an event goes only to a server that
//! had a joined member at that event.

use std::collections::{BTreeSet, HashSet, VecDeque};

use ruma::{CanonicalJsonObject, OwnedEventId, RoomId, ServerName};
use serde_json::{Value as JsonValue, json, value::RawValue};

use super::FederationHost;
use crate::{
    error::{Error, Result},
    events::Pdu,
    rooms::Reader,
};

/// The most events one backfill or missing-events answer holds.
const MAX_EVENTS: usize = 100;

/// Whether `origin` may read `room_id`'s history at all: the room federates, its ACL lets the
/// server in, and one of the server's users is joined to it.
pub fn server_may_see(server: &dyn FederationHost, origin: &ServerName, room_id: &RoomId) -> Result<bool> {
    let federates = server.rooms().state_content(room_id, "m.room.create", "")?.is_some_and(|c| c.get("m.federate") != Some(&JsonValue::Bool(false)));
    Ok(federates && super::acl::allows(&server.rooms(), room_id, origin)? && server.rooms().server_joined(room_id, origin)?)
}

fn check(server: &dyn FederationHost, origin: &ServerName, room_id: &RoomId) -> Result<()> {
    if server_may_see(server, origin, room_id)? { Ok(()) } else { Err(Error::forbidden(format!("{origin} is not in this room"))) }
}

/// An event as `origin` may have it: whole when its users may see it, else redacted.
fn visible_raw(server: &dyn FederationHost, origin: &ServerName, pdu: &Pdu) -> Result<Option<Box<RawValue>>> {
    let Some(raw) = raw(server, &pdu.event_id)? else { return Ok(None) };
    if let Some(meta) = server.rooms().meta(&pdu.event_id)?
        && server.rooms().can_see(Reader::Server(origin), pdu, &meta)?
    {
        return Ok(Some(raw));
    }
    let object: CanonicalJsonObject = serde_json::from_str(raw.get()).map_err(Error::internal)?;
    let redacted = ruma::canonical_json::redact(object, &server.rooms().rules(&pdu.room_id)?.redaction, None).map_err(Error::internal)?;
    Ok(Some(serde_json::value::to_raw_value(&redacted).map_err(Error::internal)?))
}

fn raw(server: &dyn FederationHost, id: &OwnedEventId) -> Result<Option<Box<RawValue>>> {
    server.rooms().federation_pdu(id)
}

fn now() -> ruma::MilliSecondsSinceUnixEpoch {
    ruma::MilliSecondsSinceUnixEpoch::now()
}

pub fn event(server: &dyn FederationHost, origin: &ServerName, event_id: &OwnedEventId) -> Result<JsonValue> {
    let pdu = server.rooms().pdu(event_id)?.ok_or_else(|| Error::not_found("unknown event"))?;
    check(server, origin, &pdu.room_id)?;
    Ok(json!({ "origin": server.server_name(), "origin_server_ts": now(), "pdus": [visible_raw(server, origin, &pdu)?] }))
}

/// The state before `event_id` and its auth chain, as ids, for a server that had a joined
/// member at that event (before or after it: its own join or leave counts).
fn state_at(server: &dyn FederationHost, origin: &ServerName, room_id: &RoomId, event_id: &OwnedEventId) -> Result<(Vec<Pdu>, BTreeSet<OwnedEventId>)> {
    check(server, origin, room_id)?;
    let pdu = server.rooms().pdu(event_id)?.filter(|p| p.room_id == room_id).ok_or_else(|| Error::not_found("unknown event in this room"))?;
    let meta = server.rooms().meta(&pdu.event_id)?.ok_or_else(|| Error::not_found("unknown event"))?;
    if !server.rooms().server_joined_in(meta.state_before, origin)? && !server.rooms().server_joined_in(meta.state_after, origin)? {
        return Err(Error::forbidden(format!("{origin} was not in the room at that event")));
    }
    let state = server.rooms().state_events(meta.state_before, |_, _| true)?;
    let mut chain = BTreeSet::new();
    let mut todo: Vec<OwnedEventId> = state.iter().flat_map(|p| p.auth_events.iter().cloned()).collect();
    while let Some(id) = todo.pop() {
        if chain.insert(id.clone())
            && let Some(event) = server.rooms().pdu(&id)?
        {
            todo.extend(event.auth_events);
        }
    }
    Ok((state, chain))
}

pub fn state(server: &dyn FederationHost, origin: &ServerName, room_id: &RoomId, event_id: &OwnedEventId) -> Result<JsonValue> {
    let (state, chain) = state_at(server, origin, room_id, event_id)?;
    let pdus: Vec<_> = state.iter().map(|p| raw(server, &p.event_id)).collect::<Result<Vec<_>>>()?.into_iter().flatten().collect();
    let auth_chain: Vec<_> = chain.iter().map(|id| raw(server, id)).collect::<Result<Vec<_>>>()?.into_iter().flatten().collect();
    Ok(json!({ "pdus": pdus, "auth_chain": auth_chain }))
}

pub fn state_ids(server: &dyn FederationHost, origin: &ServerName, room_id: &RoomId, event_id: &OwnedEventId) -> Result<JsonValue> {
    let (state, chain) = state_at(server, origin, room_id, event_id)?;
    Ok(json!({ "pdu_ids": state.iter().map(|p| &p.event_id).collect::<Vec<_>>(), "auth_chain_ids": chain }))
}

/// Events before (and including) `from`, walking `prev_events` breadth first, newest first.
pub fn backfill(server: &dyn FederationHost, origin: &ServerName, room_id: &RoomId, from: &[OwnedEventId], limit: usize) -> Result<JsonValue> {
    check(server, origin, room_id)?;
    let limit = limit.clamp(1, MAX_EVENTS);
    let mut seen: HashSet<OwnedEventId> = HashSet::new();
    let mut queue: VecDeque<OwnedEventId> = from.iter().cloned().collect();
    let mut pdus = Vec::new();
    while let Some(id) = queue.pop_front() {
        if pdus.len() >= limit || !seen.insert(id.clone()) {
            continue;
        }
        let Some(pdu) = server.rooms().pdu(&id)?.filter(|p| p.room_id == room_id) else { continue };
        if let Some(raw) = visible_raw(server, origin, &pdu)? {
            pdus.push(raw);
        }
        queue.extend(pdu.prev_events);
    }
    Ok(json!({ "origin": server.server_name(), "origin_server_ts": now(), "pdus": pdus }))
}

/// Events between `earliest` (exclusive, what the asking server has) and `latest`.
pub fn missing_events(server: &dyn FederationHost, origin: &ServerName, room_id: &RoomId, earliest: &[OwnedEventId], latest: &[OwnedEventId], limit: usize, min_depth: u64) -> Result<JsonValue> {
    check(server, origin, room_id)?;
    let limit = limit.clamp(1, MAX_EVENTS);
    let mut seen: HashSet<OwnedEventId> = earliest.iter().cloned().collect();
    let mut queue: VecDeque<OwnedEventId> = VecDeque::new();
    for id in latest {
        if let Some(pdu) = server.rooms().pdu(id)? {
            queue.extend(pdu.prev_events);
        }
    }
    let mut events: Vec<Pdu> = Vec::new();
    while let Some(id) = queue.pop_front() {
        if events.len() >= limit || !seen.insert(id.clone()) {
            continue;
        }
        let Some(pdu) = server.rooms().pdu(&id)?.filter(|p| p.room_id == room_id && u64::from(p.depth) >= min_depth) else { continue };
        queue.extend(pdu.prev_events.iter().cloned());
        events.push(pdu);
    }
    // Oldest first, as the spec asks.
    events.sort_by_key(|p| u64::from(p.depth));
    let raws: Vec<_> = events.iter().map(|p| visible_raw(server, origin, p)).collect::<Result<Vec<_>>>()?.into_iter().flatten().collect();
    Ok(json!({ "events": raws }))
}
