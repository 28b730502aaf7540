//! Simplified sliding sync (MSC4186): windows onto the user's rooms ordered by recency, room
//! subscriptions, and extensions (to-device, e2ee, account data, receipts, typing).
//!
//! Each connection (user, device, `conn_id`) keeps what it has sent per room, so a response
//! carries only what changed since the position the client sends back. Positions live in memory:
//! after a restart, or once superseded, a position is unknown and the client starts over
//! (`M_UNKNOWN_POS`), as MSC4186 allows. The same visibility rules as `/sync` v3 apply: rooms are
//! the user's memberships (a notes room is never one of a client's), and timeline events pass
//! `user_can_see`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ruma::{
    OwnedRoomId, OwnedUserId, RoomId, UserId,
    api::client::sync::sync_events::v5::request::{self as v5, ExtensionRoomConfig},
};
use serde_json::{Value as JsonValue, json};

use super::{RenderEvent, SyncHost, group_room_account_data, receipt_event, snapshot_at, stripped_state, token, typing_event, visible_timeline};
use crate::{
    error::{Error, ErrorCode, Result},
    rooms::{Membership, UserRoom},
    store::StreamPos,
    users::Caller,
};

/// Event types that move a room up the lists (Synapse's defaults): what a person would call
/// activity, not state churn.
const BUMP_TYPES: &[&str] =
    &["m.room.create", "m.room.message", "m.room.encrypted", "m.sticker", "m.call.invite", "m.poll.start", "m.beacon_info"];
/// How far back a room's timeline is scanned for its last bump event.
const BUMP_SCAN: usize = 100;
/// The largest timeline a client may ask for per room.
const MAX_TIMELINE_LIMIT: u64 = 1000;
/// A connection keeps its newest position and the one before, so that a client whose response
/// was lost can repeat its request.
const KEPT_POSITIONS: usize = 2;
/// Connections unused for this long are forgotten.
const IDLE_CONNECTION: Duration = Duration::from_secs(30 * 60);

/// The state of every sliding sync connection of this process.
pub struct Connections {
    /// Distinguishes this process's positions from an earlier one's.
    epoch: u64,
    /// This node's name, in its positions, when nodes share the store: a request continuing a
    /// connection through another node is passed to this one, which holds it.
    node: Option<String>,
    inner: Mutex<HashMap<ConnectionKey, Connection>>,
    /// Per joined room: the newest timeline position looked at, and the bump stamp up to it.
    bumps: Mutex<HashMap<OwnedRoomId, (StreamPos, StreamPos)>>,
}

type ConnectionKey = (OwnedUserId, String, String);

struct Connection {
    next: u64,
    positions: VecDeque<(u64, Arc<ConnectionState>)>,
    used: Instant,
}

/// What a connection has delivered as of one position.
#[derive(Clone, Default)]
pub struct ConnectionState {
    /// Everything up to this stream position has been considered (`None`: a new connection).
    since: Option<StreamPos>,
    rooms: HashMap<OwnedRoomId, SentRoom>,
    list_counts: BTreeMap<String, usize>,
}

/// What the client was last told about one room.
#[derive(Clone)]
struct SentRoom {
    /// The room's updates are delivered up to this stream position.
    stream: StreamPos,
    membership: Membership,
    membership_pos: StreamPos,
    config: RoomConfig,
    name: Option<String>,
    avatar: Option<String>,
    /// The heroes sent, while the room has no name.
    heroes: Option<JsonValue>,
    unread: (u64, u64),
    counts: (usize, usize),
}

impl Default for Connections {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Connections {
    /// The connections of this process, named `node` among the nodes sharing the store.
    pub fn new(node: Option<String>) -> Self {
        let epoch = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
        Self { epoch, node, inner: Mutex::default(), bumps: Mutex::default() }
    }

    /// The other node whose connection `pos` continues (`<node>:<epoch>_<n>`), if it is not
    /// this one's.
    pub fn holder<'a>(&self, pos: &'a str) -> Option<&'a str> {
        let (node, _) = pos.rsplit_once(':')?;
        (Some(node) != self.node.as_deref()).then_some(node)
    }

    /// The connection state a request continues from: a fresh one without `pos` (which also
    /// resets the connection), else the state stored under `pos`.
    pub fn resume(&self, caller: &Caller, conn_id: &str, pos: Option<&str>) -> Result<Arc<ConnectionState>> {
        let key = (caller.user_id.clone(), caller.device_id.to_string(), conn_id.to_owned());
        let mut connections = self.inner.lock().expect("sliding sync connections lock");
        let Some(pos) = pos else {
            connections.remove(&key);
            return Ok(Arc::default());
        };
        let unknown = || Error::new(ErrorCode::UnknownPos, format!("unknown or expired position {pos:?}; start a new connection"));
        let own = match (&self.node, pos.rsplit_once(':')) {
            (Some(node), Some((named, own))) if named == node => own,
            (None, None) => pos,
            _ => return Err(unknown()),
        };
        let (epoch, number) = own.split_once('_').ok_or_else(unknown)?;
        if epoch.parse::<u64>().ok() != Some(self.epoch) {
            return Err(unknown());
        }
        let number: u64 = number.parse().map_err(|_| unknown())?;
        let connection = connections.get_mut(&key).ok_or_else(unknown)?;
        connection.used = Instant::now();
        connection.positions.iter().find(|(n, _)| *n == number).map(|(_, state)| state.clone()).ok_or_else(unknown)
    }

    /// Stores the state a response leaves the connection in and returns its position.
    pub fn save(&self, caller: &Caller, conn_id: &str, state: ConnectionState) -> String {
        let key = (caller.user_id.clone(), caller.device_id.to_string(), conn_id.to_owned());
        let mut connections = self.inner.lock().expect("sliding sync connections lock");
        if !connections.contains_key(&key) {
            connections.retain(|_, c| c.used.elapsed() < IDLE_CONNECTION);
        }
        let connection = connections.entry(key).or_insert_with(|| Connection { next: 1, positions: VecDeque::new(), used: Instant::now() });
        let number = connection.next;
        connection.next += 1;
        connection.used = Instant::now();
        connection.positions.push_back((number, Arc::new(state)));
        while connection.positions.len() > KEPT_POSITIONS {
            connection.positions.pop_front();
        }
        match &self.node {
            Some(node) => format!("{node}:{}_{number}", self.epoch),
            None => format!("{}_{number}", self.epoch),
        }
    }
}

/// The state events a client wants of a room, and how many timeline events.
#[derive(Clone, Default, PartialEq)]
struct RoomConfig {
    required_state: BTreeSet<(String, String)>,
    timeline_limit: usize,
}

impl RoomConfig {
    fn merge(&mut self, required_state: &[(ruma::events::StateEventType, String)], timeline_limit: ruma::UInt) {
        self.required_state.extend(required_state.iter().map(|(kind, key)| (kind.to_string(), key.clone())));
        self.timeline_limit = self.timeline_limit.max(u64::from(timeline_limit).min(MAX_TIMELINE_LIMIT) as usize);
    }

    /// Whether the state event (`kind`, `key`) is wanted; `$LAZY` members are chosen separately.
    fn wants(&self, kind: &str, key: &str, user_id: &UserId) -> bool {
        self.required_state.iter().any(|(k, s)| {
            (k == "*" || k == kind) && (s == "*" || s == key || (s == "$ME" && key == user_id.as_str()))
        })
    }

    fn lazy_members(&self) -> bool {
        self.required_state.iter().any(|(k, s)| (k == "m.room.member" || k == "*") && s == "$LAZY")
    }
}

/// A room the user has a membership in that may be listed.
struct Candidate {
    room_id: OwnedRoomId,
    entry: UserRoom,
    bump_stamp: StreamPos,
}

/// One sliding sync request, as the handler parsed it.
pub struct SlidingRequest<'a> {
    pub caller: &'a Caller,
    pub lists: &'a BTreeMap<String, v5::List>,
    /// Per list, the `spaces` filter (not in ruma's types).
    pub list_spaces: &'a BTreeMap<String, Vec<OwnedRoomId>>,
    pub room_subscriptions: &'a BTreeMap<OwnedRoomId, v5::RoomSubscription>,
    pub extensions: &'a v5::Extensions,
}

/// A built response: the body without `pos`, the state it leaves the connection in, and
/// whether it carries anything the client has not seen.
pub struct SlidingResponse {
    pub body: JsonValue,
    pub state: ConnectionState,
    pub has_data: bool,
}

/// Builds the response to `req` continuing from `previous`, with everything up to `upto`.
pub fn build(server: &dyn SyncHost, req: &SlidingRequest<'_>, previous: &ConnectionState, upto: StreamPos, render: &RenderEvent<'_>) -> Result<SlidingResponse> {
    let user_id = &req.caller.user_id;
    let since = previous.since.map(|s| s.min(upto));
    let mut state = previous.clone();
    state.since = Some(upto);
    // Every request carries its whole configuration (MSC4186 has no sticky parameters).
    let extensions = req.extensions;

    let candidates = candidates(server, user_id, since, upto)?;
    let mut selected: BTreeMap<OwnedRoomId, (RoomConfig, BTreeSet<String>)> = BTreeMap::new();
    let mut lists = serde_json::Map::new();
    let mut lists_changed = false;
    let mut filters = FilterContext::new(server, user_id)?;
    for (name, list) in req.lists {
        let spaces = req.list_spaces.get(name).map(Vec::as_slice).unwrap_or_default();
        let mut members = Vec::new();
        for candidate in &candidates {
            if filters.allows(candidate, list.filters.as_ref(), spaces)? {
                members.push(candidate);
            }
        }
        for &(start, end) in &list.ranges {
            let start = u64::from(start) as usize;
            let end = (u64::from(end) as usize).min(members.len().saturating_sub(1));
            for candidate in members.iter().take(end + 1).skip(start) {
                let (config, in_lists) = selected.entry(candidate.room_id.clone()).or_default();
                config.merge(&list.room_details.required_state, list.room_details.timeline_limit);
                in_lists.insert(name.clone());
            }
        }
        lists.insert(name.clone(), json!({ "count": members.len() }));
        lists_changed |= previous.list_counts.get(name) != Some(&members.len());
        state.list_counts.insert(name.clone(), members.len());
    }
    let by_id: HashMap<&RoomId, &Candidate> = candidates.iter().map(|c| (c.room_id.as_ref(), c)).collect();
    let mut subscribed = BTreeSet::new();
    for (room_id, subscription) in req.room_subscriptions {
        // Only rooms the user has a membership in; others are ignored, not revealed.
        if by_id.contains_key(&**room_id) {
            selected.entry(room_id.clone()).or_default().0.merge(&subscription.required_state, subscription.timeline_limit);
            subscribed.insert(room_id.clone());
        }
    }

    let mut rooms = serde_json::Map::new();
    let mut initial_rooms = BTreeSet::new();
    let direct = filters.direct_rooms().clone();
    for (room_id, (config, _)) in &selected {
        let candidate = by_id[&**room_id];
        let sent = previous.rooms.get(room_id);
        let update = match candidate.entry.membership {
            Membership::Invite | Membership::Knock => invited_room(server, candidate, sent)?,
            Membership::Join | Membership::Leave | Membership::Ban => {
                joined_room(server, user_id, candidate, config, sent, since, upto, render)?
            }
        };
        let Some((mut body, sent_now, initial)) = update else {
            if let Some(sent) = state.rooms.get_mut(room_id) {
                sent.stream = upto;
            }
            continue;
        };
        body["bump_stamp"] = json!(candidate.bump_stamp);
        if initial {
            initial_rooms.insert(room_id.clone());
            if direct.contains(room_id.as_str()) {
                body["is_dm"] = json!(true);
            }
        }
        rooms.insert(room_id.to_string(), body);
        state.rooms.insert(room_id.clone(), sent_now);
    }

    // Extensions cover the rooms of the lists they name and the subscriptions they name (all
    // of either when left out, as in Synapse).
    let in_scope = |lists: &Option<Vec<String>>, scoped_rooms: &Option<Vec<ExtensionRoomConfig>>, room_id: &OwnedRoomId| {
        let (_, in_lists) = &selected[room_id];
        let by_list = match lists {
            None => !in_lists.is_empty(),
            Some(names) => names.iter().any(|n| (n == "*" && !in_lists.is_empty()) || in_lists.contains(n)),
        };
        let by_subscription = subscribed.contains(room_id)
            && scoped_rooms.as_ref().is_none_or(|rooms| {
                rooms.iter().any(|r| match r {
                    ExtensionRoomConfig::Room(id) => id == room_id,
                    _ => true,
                })
            });
        by_list || by_subscription
    };
    let room_since = |room_id: &OwnedRoomId| if initial_rooms.contains(room_id) { 0 } else { previous.rooms.get(room_id).map_or(0, |s| s.stream) };

    let mut ext = serde_json::Map::new();
    let mut ext_data = false;
    if extensions.to_device.enabled == Some(true) {
        // A token this server did not issue acknowledges nothing (clients keep it across
        // servers' restarts and resets).
        let acknowledged = extensions.to_device.since.as_deref().and_then(|since| super::parse_token(since).ok());
        let events = server.e2ee().to_device_messages(user_id, req.caller.device_id.as_str(), acknowledged, upto)?;
        ext_data |= !events.is_empty();
        ext.insert("to_device".into(), json!({ "next_batch": token(upto), "events": events }));
    }
    if extensions.e2ee.enabled == Some(true) {
        let device_id = req.caller.device_id.as_str();
        let (changed, left) = match since {
            Some(since) => super::device_list_changes(server, user_id, since, upto)?,
            None => (Vec::new(), Vec::new()),
        };
        ext_data |= !changed.is_empty() || !left.is_empty();
        ext.insert(
            "e2ee".into(),
            json!({
                "device_lists": { "changed": changed, "left": left },
                "device_one_time_keys_count": server.e2ee().one_time_key_counts(user_id, device_id)?,
                "device_unused_fallback_key_types": server.e2ee().unused_fallback_key_types(user_id, device_id)?,
            }),
        );
    }
    if extensions.account_data.enabled == Some(true) {
        let changed = group_room_account_data(server, user_id, since.unwrap_or(0))?;
        let everything = if initial_rooms.is_empty() { None } else { Some(group_room_account_data(server, user_id, 0)?) };
        let global = changed.get("").cloned().unwrap_or_default();
        let mut per_room = serde_json::Map::new();
        for room_id in selected.keys() {
            if !in_scope(&extensions.account_data.lists, &extensions.account_data.rooms, room_id) {
                continue;
            }
            let source = if initial_rooms.contains(room_id) { everything.as_ref() } else { Some(&changed) };
            if let Some(events) = source.and_then(|s| s.get(room_id.as_str())).filter(|e| !e.is_empty()) {
                per_room.insert(room_id.to_string(), json!(events));
            }
        }
        ext_data |= !global.is_empty() || !per_room.is_empty();
        ext.insert("account_data".into(), json!({ "global": global, "rooms": per_room }));
    }
    if extensions.receipts.enabled == Some(true) {
        let mut per_room = serde_json::Map::new();
        for room_id in selected.keys() {
            // Receipts only of rooms the user is in: a removed member learns nothing after it.
            let joined = by_id[&**room_id].entry.membership == Membership::Join;
            if joined
                && in_scope(&extensions.receipts.lists, &extensions.receipts.rooms, room_id)
                && let Some(event) = receipt_event(server, user_id, room_id, room_since(room_id))?
            {
                per_room.insert(room_id.to_string(), event);
            }
        }
        ext_data |= !per_room.is_empty();
        ext.insert("receipts".into(), json!({ "rooms": per_room }));
    }
    if extensions.typing.enabled == Some(true) {
        let mut per_room = serde_json::Map::new();
        for room_id in selected.keys() {
            let joined = by_id[&**room_id].entry.membership == Membership::Join;
            if joined
                && in_scope(&extensions.typing.lists, &extensions.typing.rooms, room_id)
                && let Some(event) = typing_event(server, room_id, room_since(room_id))?
            {
                per_room.insert(room_id.to_string(), event);
            }
        }
        ext_data |= !per_room.is_empty();
        ext.insert("typing".into(), json!({ "rooms": per_room }));
    }

    let has_data = since.is_none() || !rooms.is_empty() || lists_changed || ext_data;
    let body = json!({ "lists": lists, "rooms": rooms, "extensions": ext });
    Ok(SlidingResponse { body, state, has_data })
}

/// The user's rooms that may appear, most recently active first: joined, invited and knocked
/// rooms, rooms the user was removed from (kicked, declined, banned) and not forgot, and rooms
/// they left themselves since the connection's last position (as Synapse lists them).
fn candidates(server: &dyn SyncHost, user_id: &UserId, since: Option<StreamPos>, upto: StreamPos) -> Result<Vec<Candidate>> {
    let mut candidates = Vec::new();
    for (room_id, entry) in server.rooms().user_rooms(user_id)? {
        if entry.pos > upto {
            continue;
        }
        let listed = match entry.membership {
            Membership::Join | Membership::Invite | Membership::Knock => true,
            Membership::Leave | Membership::Ban => {
                !entry.forgotten && (since.is_some_and(|s| entry.pos > s) || removed_by_someone_else(server, user_id, &entry)?)
            }
        };
        if listed {
            let bump_stamp = bump_stamp(server, &room_id, &entry, upto)?;
            candidates.push(Candidate { room_id, entry, bump_stamp });
        }
    }
    candidates.sort_by(|a, b| b.bump_stamp.cmp(&a.bump_stamp).then_with(|| a.room_id.cmp(&b.room_id)));
    Ok(candidates)
}

/// Whether the user's leave or ban was someone else's doing.
fn removed_by_someone_else(server: &dyn SyncHost, user_id: &UserId, entry: &UserRoom) -> Result<bool> {
    Ok(entry.membership == Membership::Ban || server.rooms().pdu(&entry.event_id)?.is_some_and(|p| p.sender != user_id))
}

/// The stream position of the room's last activity the user may know of: its latest bump event
/// (up to the user's leave), or the invite or knock itself.
fn bump_stamp(server: &dyn SyncHost, room_id: &RoomId, entry: &UserRoom, upto: StreamPos) -> Result<StreamPos> {
    if matches!(entry.membership, Membership::Invite | Membership::Knock) {
        return Ok(entry.pos);
    }
    if entry.membership != Membership::Join {
        return scan_bump(server, room_id, entry.pos.min(upto), None).map(|(bump, _)| bump.unwrap_or(entry.pos));
    }
    // A joined room's stamp is the same for every member: remembered per room, so that a
    // request scans only the events that arrived since the last one.
    let cached = server.sliding_sync().bumps.lock().expect("bump cache lock").get(room_id).copied().filter(|&(_, bump)| bump <= upto);
    if let Some((seen, bump)) = cached
        && server.rooms().latest_timeline_pos(room_id)?.is_some_and(|latest| latest <= seen)
    {
        return Ok(bump);
    }
    let (found, newest) = scan_bump(server, room_id, upto, cached.map(|(seen, _)| seen))?;
    let bump = found.or(cached.map(|(_, bump)| bump)).or(newest).unwrap_or(entry.pos);
    if let Some(newest) = newest {
        let mut bumps = server.sliding_sync().bumps.lock().expect("bump cache lock");
        let entry = bumps.entry(room_id.to_owned()).or_insert((newest, bump));
        if newest >= entry.0 {
            *entry = (newest, bump);
        }
    }
    Ok(bump)
}

/// Scans the room's timeline back from `until` (not past `seen`, at most [`BUMP_SCAN`] events)
/// for a bump event: its position, and the newest position looked at.
fn scan_bump(server: &dyn SyncHost, room_id: &RoomId, until: StreamPos, seen: Option<StreamPos>) -> Result<(Option<StreamPos>, Option<StreamPos>)> {
    let mut newest = None;
    for item in server.rooms().timeline_before(room_id, until).take(BUMP_SCAN) {
        let (pos, event_id) = item?;
        if seen.is_some_and(|seen| pos <= seen) {
            break;
        }
        newest.get_or_insert(pos);
        if let Some(pdu) = server.rooms().pdu(&event_id)?
            && BUMP_TYPES.contains(&pdu.kind.to_string().as_str())
        {
            return Ok((Some(pos), newest));
        }
    }
    Ok((None, newest))
}

/// Evaluates list filters, loading what they need once per request.
struct FilterContext<'a> {
    server: &'a dyn SyncHost,
    direct: BTreeSet<String>,
    space_children: HashMap<OwnedRoomId, BTreeSet<String>>,
}

impl<'a> FilterContext<'a> {
    fn new(server: &'a dyn SyncHost, user_id: &UserId) -> Result<Self> {
        // m.direct maps users to their direct rooms.
        let direct = server
            .users()
            .account_data(user_id, None, "m.direct")?
            .and_then(|content| content.as_object().cloned())
            .map(|users| users.values().filter_map(JsonValue::as_array).flatten().filter_map(|r| r.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        Ok(Self { server, direct, space_children: HashMap::new() })
    }

    fn direct_rooms(&self) -> &BTreeSet<String> {
        &self.direct
    }

    fn allows(&mut self, candidate: &Candidate, filters: Option<&v5::ListFilters>, spaces: &[OwnedRoomId]) -> Result<bool> {
        let room_id = &candidate.room_id;
        if let Some(filters) = filters {
            if filters.is_dm.is_some_and(|dm| dm != self.direct.contains(room_id.as_str())) {
                return Ok(false);
            }
            if filters.is_invite.is_some_and(|invite| invite != (candidate.entry.membership == Membership::Invite)) {
                return Ok(false);
            }
            if let Some(encrypted) = filters.is_encrypted
                && encrypted != self.server.rooms().state_event(room_id, "m.room.encryption", "")?.is_some()
            {
                return Ok(false);
            }
            if !filters.room_types.is_empty() || !filters.not_room_types.is_empty() {
                let room_type = self.room_type(room_id)?;
                let matches = |f: &ruma::directory::RoomTypeFilter| f.as_str() == room_type.as_deref();
                if !filters.room_types.is_empty() && !filters.room_types.iter().any(matches) {
                    return Ok(false);
                }
                if filters.not_room_types.iter().any(matches) {
                    return Ok(false);
                }
            }
        }
        for space in spaces {
            if !self.space_children.contains_key(space) {
                let children = self.children_of(space)?;
                self.space_children.insert(space.clone(), children);
            }
        }
        Ok(spaces.is_empty() || spaces.iter().any(|space| self.space_children[space].contains(room_id.as_str())))
    }

    /// The room's type from its create event (`None` for an ordinary room).
    fn room_type(&self, room_id: &RoomId) -> Result<Option<String>> {
        let create = self.server.rooms().state_content(room_id, "m.room.create", "")?;
        Ok(create.and_then(|c| c.get("type").and_then(JsonValue::as_str).map(str::to_owned)))
    }

    /// The rooms a space lists as its children (`m.space.child` with a `via`).
    fn children_of(&self, space: &RoomId) -> Result<BTreeSet<String>> {
        Ok(self
            .server
            .rooms()
            .current_state(space)?
            .into_iter()
            .filter(|p| p.kind.to_string() == "m.space.child" && p.content_json().get("via").and_then(JsonValue::as_array).is_some_and(|v| !v.is_empty()))
            .filter_map(|p| p.state_key.clone())
            .collect())
    }
}

/// An invited or knocked room: its stripped state, sent once per invite or knock.
fn invited_room(server: &dyn SyncHost, candidate: &Candidate, sent: Option<&SentRoom>) -> Result<Option<(JsonValue, SentRoom, bool)>> {
    let entry = &candidate.entry;
    if sent.is_some_and(|s| s.membership_pos == entry.pos) {
        return Ok(None);
    }
    let invite_state = stripped_state(server, &candidate.room_id, entry)?;
    let name = invite_state
        .iter()
        .find(|e| e["type"] == "m.room.name")
        .and_then(|e| e["content"]["name"].as_str())
        .map(str::to_owned);
    let mut body = json!({ "initial": true, "invite_state": invite_state });
    if let Some(name) = &name {
        body["name"] = json!(name);
    }
    let sent = SentRoom {
        stream: entry.pos,
        membership: entry.membership,
        membership_pos: entry.pos,
        config: RoomConfig::default(),
        name,
        avatar: None,
        heroes: None,
        unread: (0, 0),
        counts: (0, 0),
    };
    Ok(Some((body, sent, true)))
}

/// A joined room, or one the user left since the last position: what changed since it was last
/// sent (everything when it was not), or `None` when nothing did.
#[allow(clippy::too_many_arguments)]
fn joined_room(
    server: &dyn SyncHost,
    user_id: &UserId,
    candidate: &Candidate,
    config: &RoomConfig,
    sent: Option<&SentRoom>,
    since: Option<StreamPos>,
    upto: StreamPos,
    render: &RenderEvent<'_>,
) -> Result<Option<(JsonValue, SentRoom, bool)>> {
    let room_id = &candidate.room_id;
    let entry = &candidate.entry;
    let joined = entry.membership == Membership::Join;
    let room_upto = if joined { upto } else { entry.pos.min(upto) };
    // A room is new to the client, or was only an invite or knock until now.
    let initial = sent.is_none_or(|s| matches!(s.membership, Membership::Invite | Membership::Knock));
    let sent = sent.filter(|_| !initial);
    let expanded = sent.is_some_and(|s| config.timeline_limit > s.config.timeline_limit);
    let room_since = match sent {
        Some(s) if !expanded => s.stream.min(room_upto),
        _ => 0,
    };
    // The common case on a wake-up: a room the client has, with nothing new in it. Only its
    // unread counts (moved by receipts) can have changed.
    if let Some(s) = sent
        && !expanded
        && s.membership == entry.membership
        && config.required_state.is_subset(&s.config.required_state)
        && server.rooms().latest_timeline_pos(room_id)?.is_none_or(|latest| latest <= room_since)
    {
        let unread = if joined { server.push().unread_counts(user_id, room_id, server.rooms().read_position(user_id, room_id)?)? } else { (0, 0) };
        if unread == s.unread {
            return Ok(None);
        }
    }
    let timeline = visible_timeline(server, user_id, room_id, room_since, room_upto, config.timeline_limit, None)?;

    // State: all that is wanted when the room is new (or more is wanted than before), else what
    // changed among the wanted since the room was last sent.
    let now = server.rooms().state_map(snapshot_at(server, room_id, room_upto)?)?;
    let full_state = sent.is_none_or(|s| !config.required_state.is_subset(&s.config.required_state));
    // The state the client has of a room it has, to send only what changed.
    let before = match sent {
        Some(s) => Some(server.rooms().state_map(snapshot_at(server, room_id, s.stream.min(room_upto))?)?),
        None => None,
    };
    let was_member = joined || server.rooms().departure(user_id, entry)?.is_some();
    let content_of = |kind: &str| -> Option<JsonValue> {
        now.get(&(kind.to_owned(), String::new())).and_then(|id| server.rooms().pdu(id).ok().flatten()).map(|p| p.content_json())
    };
    let name = content_of("m.room.name").and_then(|c| c["name"].as_str().filter(|n| !n.is_empty()).map(str::to_owned));
    let avatar = content_of("m.room.avatar").and_then(|c| c["url"].as_str().filter(|u| !u.is_empty()).map(str::to_owned));
    // The members as the user may know them: now while joined, as of the leave for a former
    // member, none for someone who never joined.
    let members = if joined {
        server.rooms().members(room_id)?
    } else if was_member {
        members_in(server, &now)?
    } else {
        Vec::new()
    };
    let mut wanted: BTreeSet<ruma::OwnedEventId> = BTreeSet::new();
    if was_member {
        for ((kind, key), event_id) in now.iter() {
            let known = !full_state && before.as_ref().is_some_and(|b| b.get(&(kind.clone(), key.clone())) == Some(event_id));
            if config.wants(kind, key, user_id) && !known {
                wanted.insert(event_id.clone());
            }
        }
        if config.lazy_members() {
            // Members of the timeline's senders and of the memberships it changes, the user's
            // own, and the heroes of a room without a name: clients (matrix-sdk) take room state
            // from here only, never from the timeline.
            let mut users: BTreeSet<String> = timeline.events.iter().map(|(p, _)| p.sender.to_string()).collect();
            users.extend(timeline.events.iter().filter(|(p, _)| p.kind == ruma::events::TimelineEventType::RoomMember).filter_map(|(p, _)| p.state_key.clone()));
            if full_state {
                users.insert(user_id.to_string());
            }
            if name.is_none() {
                users.extend(hero_ids(&members, user_id).map(|u| u.to_string()));
            }
            for user in users {
                if let Some(event_id) = now.get(&("m.room.member".to_owned(), user)) {
                    wanted.insert(event_id.clone());
                }
            }
            // Every membership that changed since the room was last sent, also beyond the
            // timeline's window: a client must never take a removed member for a present one
            // (it would share room keys with them).
            if let Some(before) = &before {
                for ((kind, key), event_id) in now.iter() {
                    if kind == "m.room.member" && before.get(&(kind.clone(), key.clone())) != Some(event_id) {
                        wanted.insert(event_id.clone());
                    }
                }
            }
        }
    }
    if !joined && sent.is_none_or(|s| s.membership_pos != entry.pos) {
        // A left room always carries the user's own leave (clients take a room without it for a
        // joined one); someone who left without ever joining (a withdrawn or declined knock)
        // learns of nothing else.
        wanted.insert(entry.event_id.clone());
    }
    let required_state: Vec<JsonValue> =
        wanted.iter().filter_map(|id| server.rooms().pdu(id).ok().flatten()).map(|p| render(&p, None)).collect();

    let counts = (
        members.iter().filter(|(_, m)| *m == Membership::Join).count(),
        members.iter().filter(|(_, m)| *m == Membership::Invite).count(),
    );
    let unread = if joined { server.push().unread_counts(user_id, room_id, server.rooms().read_position(user_id, room_id)?)? } else { (0, 0) };
    // Heroes name a room without a name, so they go again whenever one of them changes (a new
    // display name, someone leaving).
    let heroes = if was_member && name.is_none() { Some(heroes(server, user_id, &members, &now)?) } else { None };

    let changed = sent.is_none_or(|s| {
        expanded
            || !timeline.events.is_empty()
            || !required_state.is_empty()
            || s.membership != entry.membership
            || s.unread != unread
            || s.counts != counts
            || s.name != name
            || s.avatar != avatar
            || s.heroes != heroes
    });
    if !changed {
        return Ok(None);
    }

    let num_live = since.map_or(0, |s| timeline.events.iter().filter(|(_, m)| m.pos > s).count());
    let mut body = json!({
        "required_state": required_state,
        "timeline": timeline.events.iter().map(|(p, m)| render(p, Some(m))).collect::<Vec<_>>(),
        "prev_batch": token(timeline.prev_batch),
        "limited": timeline.limited,
        "num_live": num_live,
        "notification_count": unread.0,
        "highlight_count": unread.1,
    });
    if was_member {
        body["joined_count"] = json!(counts.0);
        body["invited_count"] = json!(counts.1);
    }
    if initial {
        body["initial"] = json!(true);
    }
    if expanded {
        body["unstable_expanded_timeline"] = json!(true);
    }
    if let Some(name) = &name {
        body["name"] = json!(name);
    }
    if sent.is_none_or(|s| s.avatar != avatar) {
        body["avatar"] = json!(avatar);
    }
    if let Some(heroes) = &heroes
        && sent.is_none_or(|s| s.heroes.as_ref() != Some(heroes))
    {
        body["heroes"] = heroes.clone();
    }
    let sent_now = SentRoom {
        stream: room_upto,
        membership: entry.membership,
        membership_pos: entry.pos,
        config: config.clone(),
        name,
        avatar,
        heroes,
        unread,
        counts,
    };
    Ok(Some((body, sent_now, initial)))
}

/// Up to five other joined or invited members: the room's heroes.
fn hero_ids<'m>(members: &'m [(OwnedUserId, Membership)], user_id: &'m UserId) -> impl Iterator<Item = &'m OwnedUserId> {
    members.iter().filter(move |(u, m)| u != user_id && matches!(m, Membership::Join | Membership::Invite)).map(|(u, _)| u).take(5)
}

/// The members of a room in the state `state`, with their membership.
fn members_in(server: &dyn SyncHost, state: &crate::rooms::state::StateMap) -> Result<Vec<(OwnedUserId, Membership)>> {
    let mut members = Vec::new();
    for ((kind, key), event_id) in state.iter() {
        if kind != "m.room.member" {
            continue;
        }
        let membership = server.rooms().pdu(event_id)?.and_then(|p| p.content_json()["membership"].as_str().and_then(Membership::parse));
        if let (Ok(user), Some(membership)) = (OwnedUserId::try_from(key.as_str()), membership) {
            members.push((user, membership));
        }
    }
    Ok(members)
}

/// Up to five other joined or invited members, with their names and avatars, from which a client
/// names a room that has no name.
fn heroes(
    server: &dyn SyncHost,
    user_id: &UserId,
    members: &[(OwnedUserId, Membership)],
    state: &crate::rooms::state::StateMap,
) -> Result<JsonValue> {
    let mut heroes = Vec::new();
    for member in hero_ids(members, user_id) {
        let mut hero = json!({ "user_id": member });
        if let Some(id) = state.get(&("m.room.member".to_owned(), member.to_string()))
            && let Some(pdu) = server.rooms().pdu(id)?
        {
            let content = pdu.content_json();
            if let Some(name) = content["displayname"].as_str() {
                hero["displayname"] = json!(name);
            }
            if let Some(avatar) = content["avatar_url"].as_str() {
                hero["avatar_url"] = json!(avatar);
            }
        }
        heroes.push(hero);
    }
    Ok(JsonValue::Array(heroes))
}
