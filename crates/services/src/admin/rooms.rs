//! Rooms for server admins: summaries with Synapse's fields, the sorted and searchable list,
//! and deletion (every local member leaves, the room leaves the directory, its storage is purged).

use std::{cmp::Ordering, collections::VecDeque, sync::Mutex};

use ruma::{OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomId, UserId, events::TimelineEventType};
use serde::Serialize;
use serde_json::{Value as JsonValue, json};

use super::AdminHost;
use crate::{
    audit::AuditRecord,
    error::{Error, Result},
    events::PduBuilder,
    rooms::Membership,
    users::random_string,
};

/// A room as Synapse's admin API describes it (the list and the details share the fields).
pub fn room_summary(server: &dyn AdminHost, room_id: &RoomId) -> Result<JsonValue> {
    let record = server.rooms().room(room_id)?.ok_or_else(|| Error::not_found(format!("unknown room {room_id}")))?;
    let state = server.rooms().current_state(room_id)?;
    let event = |kind: &str| state.iter().find(|p| p.kind.to_string() == kind && p.state_key.as_deref() == Some(""));
    let content = |kind: &str, field: &str| event(kind).and_then(|p| p.content_json().get(field).cloned());
    let joined = server.rooms().joined_members(room_id)?;
    let local: Vec<&OwnedUserId> = joined.iter().filter(|u| u.server_name() == server.server_name()).collect();
    let mut local_devices = 0;
    for user_id in &local {
        local_devices += server.users().devices(user_id)?.len();
    }
    Ok(json!({
        "room_id": room_id,
        "name": content("m.room.name", "name"),
        "topic": content("m.room.topic", "topic"),
        "avatar": content("m.room.avatar", "url"),
        "canonical_alias": content("m.room.canonical_alias", "alias"),
        "joined_members": joined.len(),
        "joined_local_members": local.len(),
        "joined_local_devices": local_devices,
        "version": record.version,
        // The sender of m.room.create is the creator in every room version.
        "creator": event("m.room.create").map(|p| p.sender.clone()),
        "encryption": content("m.room.encryption", "algorithm"),
        "federatable": content("m.room.create", "m.federate").and_then(|v| v.as_bool()).unwrap_or(true),
        "public": server.rooms().is_public(room_id)?,
        "join_rules": content("m.room.join_rules", "join_rule"),
        "guest_access": content("m.room.guest_access", "guest_access"),
        "history_visibility": content("m.room.history_visibility", "history_visibility"),
        "state_events": state.len(),
        "room_type": content("m.room.create", "type"),
    }))
}

/// Audits an admin API read of a room as `note_read` when it is a session's notes room (room:
/// the session room; details: the notes room and what was read). Written before the answer,
/// so that no admin reads notes unrecorded; other rooms' reads are `admin_action`s only.
pub fn audit_notes_read(server: &dyn AdminHost, admin: &UserId, room_id: &RoomId, read: &str) -> Result<()> {
    let Some(session_room) = crate::clinic::subrooms::notes_session(&server.rooms(), room_id)? else { return Ok(()) };
    let record = AuditRecord::new("note_read", admin).room(&session_room).details(json!({ "notes_room": room_id, "via": "admin_api", "read": read }));
    server.audit().write_with(&server.store(), server.store().batch(), vec![record])
}

/// Synapse's `order_by` values: the summary field sorted on, and whether it sorts largest first.
fn order_field(order_by: &str) -> Option<(&'static str, bool)> {
    Some(match order_by {
        "name" | "alphabetical" => ("name", false),
        "size" | "joined_members" => ("joined_members", true),
        "joined_local_members" => ("joined_local_members", true),
        "state_events" => ("state_events", true),
        "version" => ("version", true),
        "canonical_alias" => ("canonical_alias", false),
        "creator" => ("creator", false),
        "encryption" => ("encryption", false),
        "federatable" => ("federatable", false),
        "public" => ("public", false),
        "join_rules" => ("join_rules", false),
        "guest_access" => ("guest_access", false),
        "history_visibility" => ("history_visibility", false),
        _ => return None,
    })
}

/// Summaries of every room whose id, name or canonical alias contains `search_term` (in any
/// case), sorted by `order_by` (text in any case); `backwards` reverses the order. Rooms
/// without a value for the sorted field come last either way; ties go by room id.
pub fn list_rooms(server: &dyn AdminHost, search_term: Option<&str>, order_by: &str, backwards: bool) -> Result<Vec<JsonValue>> {
    let (field, largest_first) =
        order_field(order_by).ok_or_else(|| Error::invalid_param(format!("unknown order_by value {order_by}")))?;
    let term = search_term.map(str::to_lowercase).filter(|t| !t.is_empty());
    let mut rooms = Vec::new();
    for room_id in server.rooms().room_ids()? {
        let summary = room_summary(server, &room_id)?;
        let matches = term.as_deref().is_none_or(|term| {
            ["room_id", "name", "canonical_alias"]
                .iter()
                .any(|key| summary[key].as_str().is_some_and(|value| value.to_lowercase().contains(term)))
        });
        if matches {
            rooms.push(summary);
        }
    }
    let descending = largest_first != backwards;
    rooms.sort_by(|a, b| {
        let order = match (&a[field], &b[field]) {
            (JsonValue::Null, JsonValue::Null) => Ordering::Equal,
            (JsonValue::Null, _) => Ordering::Greater,
            (_, JsonValue::Null) => Ordering::Less,
            (x, y) if descending => compare(x, y).reverse(),
            (x, y) => compare(x, y),
        };
        order.then_with(|| a["room_id"].as_str().cmp(&b["room_id"].as_str()))
    });
    Ok(rooms)
}

fn compare(a: &JsonValue, b: &JsonValue) -> Ordering {
    match (a, b) {
        (JsonValue::Number(x), JsonValue::Number(y)) => x.as_f64().partial_cmp(&y.as_f64()).unwrap_or(Ordering::Equal),
        (JsonValue::Bool(x), JsonValue::Bool(y)) => x.cmp(y),
        _ => a.as_str().map(str::to_lowercase).cmp(&b.as_str().map(str::to_lowercase)),
    }
}

/// How a room is deleted, beyond every local member leaving it.
#[derive(Debug, Clone)]
pub struct DeleteRoom {
    /// Keep anyone from joining, knocking on or being invited to the room again.
    pub block: bool,
    /// Delete the room's events and state from the store.
    pub purge: bool,
    /// The reason carried by the members' leave events.
    pub message: Option<String>,
}

/// What a deletion did, as Synapse's `shutdown_room` reports it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ShutdownReport {
    pub kicked_users: Vec<OwnedUserId>,
    pub failed_to_kick_users: Vec<OwnedUserId>,
    pub local_aliases: Vec<OwnedRoomAliasId>,
    /// Limbic makes no replacement room, so this is always null.
    pub new_room_id: Option<OwnedRoomId>,
}

#[derive(Clone, Debug)]
pub struct Deletion {
    pub delete_id: String,
    pub room_id: OwnedRoomId,
    pub report: ShutdownReport,
}

/// How many deletions `delete_status` remembers; like Synapse's, they are kept in memory only.
const KEPT_DELETIONS: usize = 100;

/// The latest room deletions of this process, oldest first.
#[derive(Default)]
pub struct Deletions(Mutex<VecDeque<Deletion>>);

impl Deletions {
    fn record(&self, deletion: Deletion) {
        let mut deletions = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if deletions.len() == KEPT_DELETIONS {
            deletions.pop_front();
        }
        deletions.push_back(deletion);
    }

    fn find(&self, keep: impl Fn(&Deletion) -> bool) -> Vec<Deletion> {
        let deletions = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        deletions.iter().filter(|d| keep(d)).cloned().collect()
    }

    pub fn by_id(&self, delete_id: &str) -> Option<Deletion> {
        self.find(|d| d.delete_id == delete_id).pop()
    }

    pub fn of_room(&self, room_id: &RoomId) -> Vec<Deletion> {
        self.find(|d| d.room_id == room_id)
    }
}

/// Deletes a room for `admin`: every local member leaves (each sends their own leave, which
/// the auth rules always allow), then the room leaves the directory and loses its aliases, or,
/// with `purge`, everything stored about it is deleted in one batch. Runs to completion before
/// returning; the deletion is remembered for `delete_status`.
pub async fn delete_room(server: &dyn AdminHost, admin: &UserId, room_id: &RoomId, options: &DeleteRoom) -> Result<Deletion> {
    if !server.rooms().exists(room_id)? {
        return Err(Error::not_found(format!("unknown room {room_id}")));
    }
    if options.block {
        server.rooms().set_blocked(room_id, Some(admin))?;
    }
    let mut report = ShutdownReport::default();
    let mut writer = server.rooms().writer(room_id).await?;
    for (user_id, membership) in server.rooms().members(room_id)? {
        let present = matches!(membership, Membership::Join | Membership::Invite | Membership::Knock);
        if !present || user_id.server_name() != server.server_name() {
            continue;
        }
        let mut content = json!({ "membership": "leave" });
        if let Some(message) = &options.message {
            content["reason"] = json!(message);
        }
        match writer.append(&user_id, PduBuilder::state(TimelineEventType::RoomMember, user_id.as_str(), content), None) {
            Ok(_) => report.kicked_users.push(user_id),
            Err(e) => {
                tracing::warn!(%room_id, %user_id, error = %e, "member could not leave a room being deleted");
                report.failed_to_kick_users.push(user_id);
            }
        }
    }
    writer.commit()?;
    report.local_aliases = if options.purge { server.rooms().purge(room_id).await? } else { server.rooms().unlist(room_id)? };
    let deletion = Deletion { delete_id: random_string(16), room_id: room_id.to_owned(), report };
    tracing::info!(%room_id, %admin, block = options.block, purge = options.purge, delete_id = %deletion.delete_id, "admin deleted room");
    server.admin().deletions.record(deletion.clone());
    Ok(deletion)
}
