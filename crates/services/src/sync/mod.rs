//! /sync v3: what changed for a user between two stream positions, and the long-poll that waits
//! for the stream watermark to move.

pub mod sliding;

use std::collections::{BTreeMap, BTreeSet};

use ruma::{OwnedRoomId, OwnedUserId, RoomId};
use serde_json::{Value as JsonValue, json};

pub use crate::rooms::filter::{EventFilter, SyncFilter, history_token, parse_history_token, parse_token, token};

use crate::{
    error::Result,
    events::Pdu,
    rooms::{EventMeta, Membership, UserRoom},
    store::StreamPos,
    users::Caller,
};

/// What sync reads of the server: with the rooms, users and device keys, the notification counts and the
/// sliding-sync connections' cache.
pub trait SyncHost: crate::host::LocalServer {
    fn push(&self) -> &crate::push::Push;
    fn sliding_sync(&self) -> &sliding::Connections;
}

/// Renders one event for a client (with `unsigned` computed for the viewer).
pub type RenderEvent<'a> = dyn Fn(&Pdu, Option<&EventMeta>) -> JsonValue + 'a;

pub struct SyncRequest<'a> {
    pub caller: &'a Caller,
    pub since: Option<StreamPos>,
    pub full_state: bool,
    pub filter: &'a SyncFilter,
}

/// Builds the sync response body up to `upto`. Returns the body and whether it carries anything.
pub fn build(server: &dyn SyncHost, req: &SyncRequest<'_>, upto: StreamPos, render: &RenderEvent<'_>) -> Result<(JsonValue, bool)> {
    let user_id = &req.caller.user_id;
    let since = req.since.map(|s| s.min(upto));
    let mut join = serde_json::Map::new();
    let mut invite = serde_json::Map::new();
    let mut knock = serde_json::Map::new();
    let mut leave = serde_json::Map::new();
    let mut presence_users = BTreeSet::new();
    // Members of every joined room are only gathered when some presence changed since `since`.
    let want_presence = req.filter.presence_enabled && since.is_none_or(|s| server.users().presence_changed_after(s));

    let room_account_data = group_room_account_data(server, user_id, since.unwrap_or(0))?;
    for (room_id, entry) in server.rooms().user_rooms(user_id)? {
        if entry.pos > upto || !req.filter.room.allows_room(room_id.as_str()) {
            continue;
        }
        let changed_since = since.is_none_or(|s| entry.pos > s);
        match entry.membership {
            Membership::Join => {
                if let Some(room) = joined_room(server, req, &room_id, &entry, since, upto, render, room_account_data.get(room_id.as_str()))? {
                    join.insert(room_id.to_string(), room);
                }
                if want_presence {
                    presence_users.extend(server.rooms().joined_members(&room_id)?);
                }
            }
            Membership::Invite if changed_since => {
                invite.insert(room_id.to_string(), json!({ "invite_state": { "events": stripped_state(server, &room_id, &entry)? } }));
            }
            Membership::Knock if changed_since => {
                knock.insert(room_id.to_string(), json!({ "knock_state": { "events": stripped_state(server, &room_id, &entry)? } }));
            }
            Membership::Leave | Membership::Ban if !entry.forgotten && (since.is_some() && changed_since || since.is_none() && req.filter.room.include_leave) => {
                leave.insert(room_id.to_string(), left_room(server, req, &room_id, &entry, since, render)?);
            }
            _ => {}
        }
    }

    let global_data: Vec<JsonValue> = room_account_data
        .get("")
        .map(|entries| entries.iter().filter(|e| req.filter.account_data_allows(e["type"].as_str().unwrap_or_default())).cloned().collect())
        .unwrap_or_default();
    let presence = if want_presence { presence_events(server, &presence_users, since)? } else { Vec::new() };

    let device_id = req.caller.device_id.as_str();
    let to_device = server.e2ee().to_device_messages(user_id, device_id, since, upto)?;
    let (changed, left) = match since {
        Some(since) => device_list_changes(server, user_id, since, upto)?,
        None => (Vec::new(), Vec::new()),
    };
    let has_data = !(join.is_empty()
        && invite.is_empty()
        && knock.is_empty()
        && leave.is_empty()
        && global_data.is_empty()
        && presence.is_empty()
        && to_device.is_empty()
        && changed.is_empty()
        && left.is_empty());
    let body = json!({
        "next_batch": token(upto),
        "rooms": { "join": join, "invite": invite, "knock": knock, "leave": leave },
        "account_data": { "events": global_data },
        "presence": { "events": presence },
        "to_device": { "events": to_device },
        "device_lists": { "changed": changed, "left": left },
        "device_one_time_keys_count": server.e2ee().one_time_key_counts(user_id, device_id)?,
        "device_unused_fallback_key_types": server.e2ee().unused_fallback_key_types(user_id, device_id)?,
    });
    Ok((body, has_data))
}

/// Membership changes of `room_id` in (since, upto]: (user, membership).
fn membership_changes(server: &dyn SyncHost, room_id: &RoomId, since: StreamPos, upto: StreamPos) -> Result<Vec<(OwnedUserId, Membership)>> {
    let mut changes = Vec::new();
    for entry in server.rooms().timeline_after(room_id, since, upto) {
        let (_, event_id) = entry?;
        let Some(pdu) = server.rooms().pdu(&event_id)? else { continue };
        if pdu.kind != ruma::events::TimelineEventType::RoomMember {
            continue;
        }
        let membership = pdu.membership();
        if let (Some(user), Some(membership)) = (pdu.state_key.as_deref().and_then(|k| OwnedUserId::try_from(k).ok()), membership) {
            changes.push((user, membership));
        }
    }
    Ok(changes)
}

/// The `device_lists` of a sync: users whose devices changed or who newly share a room with
/// the user (`changed`), and users who no longer share any room (`left`).
pub fn device_list_changes(server: &dyn SyncHost, user_id: &ruma::UserId, since: StreamPos, upto: StreamPos) -> Result<(Vec<OwnedUserId>, Vec<OwnedUserId>)> {
    let key_changes = server.e2ee().key_changes(since, upto)?;
    let mut changed = BTreeSet::new();
    for user in &key_changes {
        if user != user_id && server.rooms().share_a_room(user_id, user)? {
            changed.insert(user.clone());
        }
    }
    let mut maybe_left = BTreeSet::new();
    for (room_id, entry) in server.rooms().user_rooms(user_id)? {
        let own_change = entry.pos > since && entry.pos <= upto;
        match entry.membership {
            Membership::Join if own_change => changed.extend(server.rooms().joined_members(&room_id)?),
            Membership::Join => {
                for (user, membership) in membership_changes(server, &room_id, since, upto)? {
                    match membership {
                        Membership::Join => {
                            changed.insert(user);
                        }
                        Membership::Leave | Membership::Ban => {
                            maybe_left.insert(user);
                        }
                        _ => {}
                    }
                }
            }
            Membership::Leave | Membership::Ban if own_change => maybe_left.extend(server.rooms().joined_members(&room_id)?),
            _ => {}
        }
    }
    changed.remove(user_id);
    let mut left = Vec::new();
    for user in maybe_left {
        if user != user_id && !server.rooms().share_a_room(user_id, &user)? {
            changed.remove(&user);
            left.push(user);
        }
    }
    // The user's own key changes are reported too.
    if key_changes.iter().any(|u| u == user_id) {
        changed.insert(user_id.to_owned());
    }
    Ok((changed.into_iter().collect(), left))
}

/// The user's account data set after `since`, by room ("" for global). From the start, the
/// global data includes `m.push_rules` even when the user never changed the defaults, as
/// clients take their notification settings from it.
pub(crate) fn group_room_account_data(server: &dyn SyncHost, user_id: &ruma::UserId, since: StreamPos) -> Result<BTreeMap<String, Vec<JsonValue>>> {
    let mut grouped: BTreeMap<String, Vec<JsonValue>> = BTreeMap::new();
    for (room, kind, content) in server.users().account_data_since(user_id, since)? {
        grouped.entry(room).or_default().push(json!({ "type": kind, "content": content }));
    }
    let global = grouped.entry(String::new()).or_default();
    if since == 0 && !global.iter().any(|e| e["type"] == crate::push::PUSH_RULES) {
        let rules = crate::push::Push::ruleset_content(&*server.push().ruleset(user_id)?);
        global.push(json!({ "type": crate::push::PUSH_RULES, "content": rules }));
    }
    grouped.retain(|_, events| !events.is_empty());
    Ok(grouped)
}

pub(crate) fn stripped_state(server: &dyn SyncHost, room_id: &RoomId, entry: &UserRoom) -> Result<Vec<JsonValue>> {
    let mut events = Vec::new();
    for kind in crate::rooms::STRIPPED_STATE_TYPES {
        if let Some(pdu) = server.rooms().state_event(room_id, kind, "")? {
            events.push(pdu.to_stripped_state());
        }
    }
    // An invite to (or knock on) a room this server is not in carries the state the other
    // server sent.
    events.extend(server.rooms().remote_room_state(room_id)?);
    if let Some(member) = server.rooms().pdu(&entry.event_id)? {
        // The inviter's own membership too: clients name an invite (a direct chat) after it.
        if member.state_key.as_deref() != Some(member.sender.as_str())
            && let Some(inviter) = server.rooms().state_event(room_id, "m.room.member", member.sender.as_str())?
        {
            events.push(inviter.to_stripped_state());
        }
        events.push(member.to_stripped_state());
    }
    Ok(events)
}

/// The room's state snapshot as of stream position `pos`.
pub(crate) fn snapshot_at(server: &dyn SyncHost, room_id: &RoomId, pos: StreamPos) -> Result<u64> {
    match server.rooms().timeline_before(room_id, pos).next() {
        Some(entry) => {
            let (_, event_id) = entry?;
            Ok(server.rooms().meta(&event_id)?.map_or(0, |m| m.state_after))
        }
        None => Ok(crate::rooms::state::EMPTY_SNAPSHOT),
    }
}

pub(crate) struct Timeline {
    pub events: Vec<(Pdu, EventMeta)>,
    pub limited: bool,
    pub prev_batch: StreamPos,
}

/// The newest `limit` visible events in (since, upto], oldest first.
fn timeline(server: &dyn SyncHost, req: &SyncRequest<'_>, room_id: &RoomId, since: StreamPos, upto: StreamPos) -> Result<Timeline> {
    let filter = &req.filter.room.timeline;
    let limit = filter.limit.unwrap_or(10).clamp(1, 1000);
    visible_timeline(server, &req.caller.user_id, room_id, since, upto, limit, Some(filter))
}

/// The newest `limit` events in (since, upto] that `user_id` may see and `filter` allows,
/// oldest first.
pub(crate) fn visible_timeline(
    server: &dyn SyncHost,
    user_id: &ruma::UserId,
    room_id: &RoomId,
    since: StreamPos,
    upto: StreamPos,
    limit: usize,
    filter: Option<&EventFilter>,
) -> Result<Timeline> {
    let mut events = Vec::new();
    let mut limited = false;
    let reader = crate::rooms::Reader::User(user_id);
    let in_room = server.rooms().reader_in_room(reader, room_id)?;
    // The timeline's entries are read a chunk at a time, each chunk's events in one read of
    // the store, until `limit` visible events and one more (to know it is limited) are found.
    let mut entries = server.rooms().timeline_before(room_id, upto);
    'chunks: loop {
        let mut ids = Vec::with_capacity(limit + 1);
        for entry in entries.by_ref() {
            let (pos, event_id) = entry?;
            if pos <= since {
                break;
            }
            ids.push(event_id);
            if ids.len() > limit - events.len() {
                break;
            }
        }
        if ids.is_empty() {
            break;
        }
        let exhausted = ids.len() <= limit - events.len();
        for (pdu, meta) in server.rooms().events(&ids)?.into_iter().flatten() {
            if filter.is_some_and(|f| !f.allows(&pdu)) || !server.rooms().can_see_in(reader, &in_room, &pdu, &meta)? {
                continue;
            }
            if events.len() == limit {
                limited = true;
                break 'chunks;
            }
            events.push((pdu, meta));
        }
        if exhausted {
            break;
        }
    }
    events.reverse();
    let prev_batch = events.first().map_or(upto, |(_, m)| m.pos - 1);
    Ok(Timeline { events, limited, prev_batch })
}

#[allow(clippy::too_many_arguments)]
fn joined_room(
    server: &dyn SyncHost,
    req: &SyncRequest<'_>,
    room_id: &OwnedRoomId,
    entry: &UserRoom,
    since: Option<StreamPos>,
    upto: StreamPos,
    render: &RenderEvent<'_>,
    account_data: Option<&Vec<JsonValue>>,
) -> Result<Option<JsonValue>> {
    let user_id = &req.caller.user_id;
    // A room joined since the last sync is sent as if for an initial sync.
    let initial = since.is_none() || req.full_state || since.is_some_and(|s| entry.pos > s);
    let from = since.unwrap_or(0);
    let timeline = timeline(server, req, room_id, from, upto)?;
    let state_filter = &req.filter.room.state;

    let needs_state = initial || timeline.limited;
    let start_snapshot = match timeline.events.first() {
        Some((_, meta)) => meta.state_before,
        None if needs_state => snapshot_at(server, room_id, upto)?,
        None => crate::rooms::state::EMPTY_SNAPSHOT,
    };
    let mut state: Vec<Pdu> = if initial {
        server.rooms().state_events(start_snapshot, |kind, _| kind != "m.room.member" || !state_filter.lazy_load_members)?
    } else if timeline.limited {
        let before = server.rooms().state_map(snapshot_at(server, room_id, from)?)?;
        let now = server.rooms().state_map(start_snapshot)?;
        now.iter()
            .filter(|(key, id)| before.get(*key) != Some(*id))
            .filter(|((kind, _), _)| kind != "m.room.member" || !state_filter.lazy_load_members)
            .filter_map(|(_, id)| server.rooms().pdu(id).ok().flatten())
            .collect()
    } else {
        Vec::new()
    };
    if state_filter.lazy_load_members && (needs_state || !timeline.events.is_empty()) {
        // Member events of the timeline's senders, as of the timeline's start (redundant ones
        // included: the server does not track what each device already has).
        let start_snapshot = match timeline.events.first() {
            Some((_, meta)) => meta.state_before,
            None => start_snapshot,
        };
        let mut senders: Vec<String> = timeline.events.iter().map(|(p, _)| p.sender.to_string()).collect();
        if needs_state {
            senders.push(user_id.to_string());
        }
        let map = server.rooms().state_map(start_snapshot)?;
        let mut seen = BTreeSet::new();
        for sender in senders {
            if seen.insert(sender.clone())
                && let Some(id) = map.get(&("m.room.member".to_owned(), sender))
                && let Some(pdu) = server.rooms().pdu(id)?
            {
                state.push(pdu);
            }
        }
    }
    state.retain(|p| state_filter.allows(p));

    let ephemeral = ephemeral_events(server, req, room_id, if initial { 0 } else { from })?;
    let account_data: Vec<JsonValue> = account_data
        .map(|events| events.iter().filter(|e| req.filter.room.account_data_allows(e["type"].as_str().unwrap_or_default())).cloned().collect())
        .unwrap_or_default();

    if !initial && timeline.events.is_empty() && state.is_empty() && ephemeral.is_empty() && account_data.is_empty() {
        return Ok(None);
    }
    let (notifications, highlights) = server.push().unread_counts(user_id, room_id, server.rooms().read_position(user_id, room_id)?)?;
    // The state after an incremental sync's last event is one the room's other members' syncs
    // read too, and each node keeps it; an initial sync's rooms each have their own, read from
    // its chain of snapshots (7 reads a room of a few state events, against the index's 1 or 2).
    let summary = summary(server, room_id, user_id, timeline.events.last().filter(|_| !initial).map(|(_, meta)| meta.state_after))?;
    Ok(Some(json!({
        "timeline": {
            "events": timeline.events.iter().map(|(p, m)| render(p, Some(m))).collect::<Vec<_>>(),
            "limited": timeline.limited,
            "prev_batch": token(timeline.prev_batch),
        },
        "state": { "events": state.iter().map(|p| render(p, None)).collect::<Vec<_>>() },
        "ephemeral": { "events": ephemeral },
        "account_data": { "events": account_data },
        "unread_notifications": { "notification_count": notifications, "highlight_count": highlights },
        "summary": summary,
    })))
}

fn left_room(server: &dyn SyncHost, req: &SyncRequest<'_>, room_id: &RoomId, entry: &UserRoom, since: Option<StreamPos>, render: &RenderEvent<'_>) -> Result<JsonValue> {
    let timeline = timeline(server, req, room_id, since.unwrap_or(0), entry.pos)?;
    // Someone who left without having been a member (a knock withdrawn or declined) gets no
    // state, as on every other read path.
    let readable = server.rooms().read_view(&req.caller.user_id, room_id)?.is_some();
    let state = if readable && (timeline.limited || since.is_none()) {
        let snapshot = timeline.events.first().map_or(0, |(_, m)| m.state_before);
        server.rooms().state_events(snapshot, |_, _| true)?
    } else {
        Vec::new()
    };
    Ok(json!({
        "timeline": {
            "events": timeline.events.iter().map(|(p, m)| render(p, Some(m))).collect::<Vec<_>>(),
            "limited": timeline.limited,
            "prev_batch": token(timeline.prev_batch),
        },
        "state": { "events": state.iter().map(|p| render(p, None)).collect::<Vec<_>>() },
        "account_data": { "events": [] },
    }))
}

fn ephemeral_events(server: &dyn SyncHost, req: &SyncRequest<'_>, room_id: &RoomId, since: StreamPos) -> Result<Vec<JsonValue>> {
    let filter = &req.filter.room;
    let typing = if filter.ephemeral_allows("m.typing") { typing_event(server, room_id, since)? } else { None };
    let receipts = if filter.ephemeral_allows("m.receipt") { receipt_event(server, &req.caller.user_id, room_id, since)? } else { None };
    Ok(typing.into_iter().chain(receipts).collect())
}

/// The room's `m.typing` event if typing changed after `since` (on an initial sync, only when
/// someone is typing).
pub(crate) fn typing_event(server: &dyn SyncHost, room_id: &RoomId, since: StreamPos) -> Result<Option<JsonValue>> {
    let (typing, typing_pos) = server.rooms().typing(room_id)?;
    Ok((typing_pos > since && (since > 0 || !typing.is_empty())).then(|| json!({ "type": "m.typing", "content": { "user_ids": typing } })))
}

/// The room's receipts set after `since` as one `m.receipt` event; private receipts only the
/// viewer's own.
pub(crate) fn receipt_event(server: &dyn SyncHost, viewer: &ruma::UserId, room_id: &RoomId, since: StreamPos) -> Result<Option<JsonValue>> {
    let mut content: BTreeMap<String, BTreeMap<String, BTreeMap<String, JsonValue>>> = BTreeMap::new();
    for (kind, user, receipt) in server.rooms().receipts_since(room_id, since)? {
        if kind == "m.read.private" && user != viewer {
            continue;
        }
        let mut data = json!({ "ts": receipt.ts });
        if let Some(thread) = &receipt.thread_id {
            data["thread_id"] = json!(thread);
        }
        content.entry(receipt.event_id.to_string()).or_default().entry(kind).or_default().insert(user.to_string(), data);
    }
    Ok((!content.is_empty()).then(|| json!({ "type": "m.receipt", "content": content })))
}

/// The room's summary; whether it is named as of `snapshot` (the state after an incremental
/// sync's last event, which each node keeps) when there is one, else as of now (the index).
fn summary(server: &dyn SyncHost, room_id: &RoomId, user_id: &ruma::UserId, snapshot: Option<StreamPos>) -> Result<JsonValue> {
    let members = server.rooms().members(room_id)?;
    let joined = members.iter().filter(|(_, m)| *m == Membership::Join).count();
    let invited = members.iter().filter(|(_, m)| *m == Membership::Invite).count();
    let mut summary = json!({ "m.joined_member_count": joined, "m.invited_member_count": invited });
    const NAMING: [&str; 2] = ["m.room.name", "m.room.canonical_alias"];
    let named = match snapshot {
        Some(snapshot) => {
            let state = server.rooms().state_map(snapshot)?;
            NAMING.iter().any(|kind| state.contains_key(&((*kind).to_owned(), String::new())))
        }
        None => server.rooms().state_event(room_id, NAMING[0], "")?.is_some() || server.rooms().state_event(room_id, NAMING[1], "")?.is_some(),
    };
    if !named {
        let heroes: Vec<&OwnedUserId> = members
            .iter()
            .filter(|(u, m)| u != user_id && matches!(m, Membership::Join | Membership::Invite))
            .map(|(u, _)| u)
            .take(5)
            .collect();
        summary["m.heroes"] = json!(heroes);
    }
    Ok(summary)
}

fn presence_events(server: &dyn SyncHost, users: &BTreeSet<OwnedUserId>, since: Option<StreamPos>) -> Result<Vec<JsonValue>> {
    let now: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
    let mut events = Vec::new();
    for user in users {
        if let Some(p) = server.users().presence(user)?
            && since.is_none_or(|s| p.pos > s)
        {
            let mut content = json!({
                "presence": p.presence,
                "last_active_ago": now.saturating_sub(p.last_active_ts),
                "currently_active": p.presence == "online",
            });
            if let Some(status) = &p.status_msg {
                content["status_msg"] = json!(status);
            }
            events.push(json!({ "type": "m.presence", "sender": user, "content": content }));
        }
    }
    Ok(events)
}
