//! Rooms: the event pipeline (build → authorize → persist → notify), the timeline, state
//! snapshots, membership indexes, aliases and the public directory.

mod admin;
mod after_commit;
mod ephemeral;
mod fanout;
pub mod filter;
mod group;
mod pipeline;
pub mod relations;
mod retention;
pub mod state;
mod summary;
mod visibility;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{
    OwnedEventId, OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomAliasId, RoomId, RoomVersionId,
    UserId,
    room_version_rules::{RoomIdFormatVersion, RoomVersionRules},
};
use serde::{Deserialize, Serialize};

pub use after_commit::{AfterCommit, Committed, FollowUp};
pub use ephemeral::Receipt;
pub use group::Sent;
pub use fanout::{Delivery, Fanout, Indexer, Policy, RoomView, StagedEvent, Staging};
pub use limbic_core::events::Membership;
pub use pipeline::{RoomWriter, TxnInfo, txn_key};
pub use summary::SummaryView;
pub use visibility::{ReadView, Reader, ReaderInRoom};
use state::{SnapshotCache, StateMap};

use crate::{
    error::{Error, Result},
    events::{Pdu, PduBuilder, PduPlacement, ServerSigningKey, build_unsigned_pdu, rules_for},
    store::{Key, KeyReader, Store, StreamPos, tables},
};

/// What the store keeps per room.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomRecord {
    pub version: RoomVersionId,
    /// Snapshot of the current state.
    pub snapshot: u64,
    pub extremities: Vec<OwnedEventId>,
    pub depth: u64,
    /// Whether the history visibility was ever `joined` or `invited`. While it was not, every
    /// event is visible to current members, which spares /sync and /messages a state lookup
    /// per event.
    #[serde(default)]
    pub history_ever_restricted: bool,
}

/// Per-event metadata kept beside the PDU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventMeta {
    pub pos: StreamPos,
    pub state_before: u64,
    pub state_after: u64,
    /// The state event this one replaced, for `unsigned.prev_content`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces_state: Option<OwnedEventId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<TxnInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redacted_by: Option<OwnedEventId>,
}

/// The state an invitee or a knocker sees of a room before joining (the spec's stripped state):
/// in their sync, in a room summary, and in invites and knocks sent between servers.
pub const STRIPPED_STATE_TYPES: &[&str] = &[
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.topic",
];

/// A user's membership in one room, indexed by user for /sync.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserRoom {
    pub membership: Membership,
    pub event_id: OwnedEventId,
    pub pos: StreamPos,
    #[serde(default)]
    pub forgotten: bool,
}

/// Locks by name: the rooms' write locks, and the claims writers take (see
/// [`RoomView::claim`]). Entries nobody holds or waits for are swept out as the map grows, so
/// that requests naming rooms that do not exist (or that nobody writes to any more) leave
/// nothing behind: the map stays within twice the locks in use, plus a little.
struct NamedLocks<K> {
    locks: HashMap<K, Arc<tokio::sync::Mutex<()>>>,
    sweep_at: usize,
}

impl<K> Default for NamedLocks<K> {
    fn default() -> Self {
        Self { locks: HashMap::new(), sweep_at: 0 }
    }
}

type RoomLocks = NamedLocks<OwnedRoomId>;

impl<K: std::hash::Hash + Eq> NamedLocks<K> {
    const MIN_SWEEP_AT: usize = 64;

    fn get<Q>(&mut self, name: &Q) -> Arc<tokio::sync::Mutex<()>>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(lock) = self.locks.get(name) {
            return lock.clone();
        }
        if self.locks.len() >= self.sweep_at {
            // Only the map holds an unused lock: no writer has it and none waits for it.
            self.locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            self.sweep_at = (self.locks.len() * 2).max(Self::MIN_SWEEP_AT);
        }
        self.locks.entry(name.to_owned()).or_default().clone()
    }
}

/// At most this many events are kept by id (about 1 KiB each); beyond it, all are read again.
const PDUS_KEPT: usize = 4_096;

/// What a writer claimed, kept until it commits: this process's lock on the name, and the hold
/// other nodes respect.
pub(crate) type Claim = (tokio::sync::OwnedMutexGuard<()>, crate::store::Hold);

pub struct Rooms {
    store: Arc<Store>,
    key: Arc<ServerSigningKey>,
    locks: Mutex<RoomLocks>,
    claims: Mutex<NamedLocks<String>>,
    snapshots: SnapshotCache,
    /// Per room, the position up to which retention has nothing left to remove.
    retention_cursors: Mutex<HashMap<OwnedRoomId, StreamPos>>,
    /// Per room, its newest timeline position (filled on first use, then kept by commits), so
    /// that "anything new in this room?" costs no store read.
    latest_positions: Mutex<HashMap<OwnedRoomId, StreamPos>>,
    /// The policies, indexers and after-commit hooks, registered once at start-up.
    fanout: std::sync::OnceLock<Fanout>,
    /// Chains the audit entries a write carries.
    audit: Arc<crate::audit::Audit>,
    /// Local sends waiting for their room's writer, committed in groups.
    sends: group::SendQueues,
    /// Events read by id, kept until announced changed (a redaction strips one, retention and
    /// purges delete them) or the node rests.
    pdus: Arc<crate::store::Kept<OwnedEventId, Pdu>>,
    /// Per room, the current state its writers read at one snapshot (the newest opened).
    state_reads: Mutex<HashMap<OwnedRoomId, (StreamPos, Arc<Mutex<pipeline::StateReads>>)>>,
    /// Whether this server federates (typing notifications go to other servers).
    pub federating: bool,
}

impl Rooms {
    pub fn new(store: Arc<Store>, key: Arc<ServerSigningKey>, audit: Arc<crate::audit::Audit>, federating: bool) -> Self {
        Self {
            federating,
            audit,
            key,
            locks: Mutex::default(),
            claims: Mutex::default(),
            snapshots: SnapshotCache::default(),
            retention_cursors: Mutex::default(),
            latest_positions: Mutex::default(),
            fanout: std::sync::OnceLock::new(),
            sends: group::SendQueues::default(),
            state_reads: Mutex::default(),
            pdus: crate::store::Kept::watching(&store, tables::PDUS, PDUS_KEPT, |key| {
                std::str::from_utf8(key).ok().and_then(|id| OwnedEventId::try_from(id).ok()).map_or(crate::store::Announced::Everything, crate::store::Announced::One)
            }),
            store,
        }
    }

    /// Registers, once at start-up, what the pipeline fans out to.
    pub fn register(&self, fanout: Fanout) {
        if self.fanout.set(fanout).is_err() {
            tracing::error!("the room pipeline's fan-out was registered twice; the first stays");
        }
    }

    /// Whether every policy lets outsiders knock on the room now.
    fn open_to_knocks(&self, room_id: &RoomId) -> Result<bool> {
        for policy in &self.fanout().policies {
            if !policy.open_to_knocks(room_id)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn fanout(&self) -> &Fanout {
        static NONE: std::sync::OnceLock<Fanout> = std::sync::OnceLock::new();
        self.fanout.get().unwrap_or_else(|| NONE.get_or_init(Fanout::default))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Takes the room's write lock: one writer per room keeps the DAG linear and ordered. On a
    /// store that other nodes share, the writer also holds the room against theirs.
    pub async fn writer(&self, room_id: &RoomId) -> Result<RoomWriter<'_>> {
        let lock = self.locks.lock().expect("room locks").get(room_id);
        let guard = lock.lock_owned().await;
        let hold = self.store.hold(&format!("room {room_id}")).await?;
        RoomWriter::open(self, room_id.to_owned(), (guard, hold))
    }

    /// Hands back, on a node gone idle, what is kept only for speed: state snapshots and the
    /// writers' state reads, and what the indexers keep (push contexts, rules and pushers).
    pub fn rest(&self) {
        self.snapshots.clear();
        self.pdus.forget(None);
        self.state_reads.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        for indexer in &self.fanout().indexers {
            indexer.rest();
        }
    }

    /// Rooms whose state reads are kept (at most 64 events each); past this, the map starts
    /// again.
    const STATE_READS_KEPT: usize = 1024;

    /// The state reads of the room's writers at `snapshot`, kept for the next writer that opens
    /// the room at the same snapshot (and replaced by those of a newer one).
    fn state_reads(&self, room_id: &RoomId, snapshot: StreamPos) -> Arc<Mutex<pipeline::StateReads>> {
        let mut kept = self.state_reads.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, reads)) = kept.get(room_id)
            && *at == snapshot
        {
            return reads.clone();
        }
        if kept.len() >= Self::STATE_READS_KEPT && !kept.contains_key(room_id) {
            kept.clear();
        }
        let reads = Arc::new(Mutex::default());
        kept.insert(room_id.to_owned(), (snapshot, reads.clone()));
        reads
    }

    /// Claims `name` unless another writer (of this process, or of another node sharing the
    /// store) has; waits for nothing.
    fn try_claim(&self, name: &str) -> Result<Option<Claim>> {
        let lock = self.claims.lock().expect("claims").get(name);
        let Ok(guard) = lock.try_lock_owned() else { return Ok(None) };
        Ok(self.store.try_hold(&format!("claim {name}"))?.map(|hold| (guard, hold)))
    }

    /// Starts a room and stages `events`, the first of which must be its `m.room.create` (whose
    /// `room_version` is set to `version`). The room id is random with our server name up to
    /// v11; since v12 it is the create event's reference hash, so the event is built once to
    /// learn it (signing is deterministic, so the staged event is the same).
    pub async fn new_room(&self, version: RoomVersionId, creator: &UserId, events: impl IntoIterator<Item = PduBuilder>) -> Result<RoomWriter<'_>> {
        let rules = rules_for(&version)?;
        let mut events = events.into_iter();
        let mut create = events.next().filter(|b| b.kind == ruma::events::TimelineEventType::RoomCreate).ok_or_else(|| Error::internal("a new room starts with m.room.create"))?;
        create.content["room_version"] = serde_json::Value::String(version.to_string());
        let random_id = RoomId::new_v1(self.key.server_name());
        let room_id = match rules.room_id_format {
            RoomIdFormatVersion::V1 => random_id,
            // V2 and any later format: derived from the create event.
            _ => {
                create.timestamp = Some(ruma::MilliSecondsSinceUnixEpoch::now());
                // The placement's room id is not part of a v12 create event.
                let placement = PduPlacement { room_id: &random_id, sender: creator, prev_events: Vec::new(), auth_events: Vec::new(), depth: 1, rules: &rules };
                build_unsigned_pdu(create.clone(), placement)?.pdu.room_id
            }
        };
        let mut writer = self.writer(&room_id).await?;
        writer.init_room(version)?;
        for builder in std::iter::once(create).chain(events) {
            writer.append(creator, builder, None)?;
        }
        Ok(writer)
    }

    pub fn room(&self, room_id: &RoomId) -> Result<Option<RoomRecord>> {
        Ok(self.store.get_json(tables::ROOMS, room_id.as_bytes())?)
    }

    pub fn exists(&self, room_id: &RoomId) -> Result<bool> {
        Ok(self.store.contains(tables::ROOMS, room_id.as_bytes())?)
    }

    pub fn rules(&self, room_id: &RoomId) -> Result<RoomVersionRules> {
        let room = self.room(room_id)?.ok_or_else(|| Error::not_found("unknown room"))?;
        rules_for(&room.version)
    }

    pub fn pdu(&self, event_id: &ruma::EventId) -> Result<Option<Pdu>> {
        self.pdus.get(&event_id.to_owned(), |event_id| self.store.get(tables::PDUS, event_id.as_bytes())?.map(|bytes| Pdu::from_stored(&bytes)).transpose())
    }

    /// Records a local user's membership in a room this server is not in (an invite received,
    /// a knock or a leave sent over federation): the event, the membership the user's sync
    /// shows, and the room's stripped state as the other server sent it (if any).
    pub fn record_remote_membership(&self, user: &UserId, signed: &crate::events::SignedPdu, membership: Membership, room_state: Option<&[serde_json::Value]>) -> Result<()> {
        let ticket = self.store.streams().allocate(&self.store)?;
        let pdu = &signed.pdu;
        let mut batch = self.store.batch();
        batch.put(tables::PDUS, pdu.event_id.as_bytes(), &signed.to_bytes());
        let entry = UserRoom { membership, event_id: pdu.event_id.clone(), pos: ticket.pos(), forgotten: false };
        batch.put_json(tables::USER_ROOMS, &Key::new().str(user.as_str()).str(pdu.room_id.as_str()).into_vec(), &entry)?;
        if let Some(state) = room_state {
            batch.put_json(tables::REMOTE_ROOM_STATE, pdu.room_id.as_bytes(), state)?;
        }
        tokio::task::block_in_place(|| self.store.write(batch))?;
        drop(ticket);
        Ok(())
    }

    /// The stripped state of a room a local user was invited to, or knocked on, over federation.
    pub fn remote_room_state(&self, room_id: &RoomId) -> Result<Vec<serde_json::Value>> {
        if self.exists(room_id)? {
            return Ok(Vec::new());
        }
        Ok(self.store.get_json(tables::REMOTE_ROOM_STATE, room_id.as_bytes())?.unwrap_or_default())
    }

    /// The other servers with a joined member in the room.
    pub fn remote_servers(&self, room_id: &RoomId) -> Result<std::collections::BTreeSet<ruma::OwnedServerName>> {
        let ours = self.key.server_name();
        Ok(self.joined_members(room_id)?.into_iter().map(|user| user.server_name().to_owned()).filter(|server| server != ours).collect())
    }

    /// Whether a membership change in the room must go through another server: this server has
    /// no joined member there (its view may be stale or missing) and the room is another's.
    pub fn reached_over_federation(&self, room_id: &RoomId) -> Result<bool> {
        let ours = self.key.server_name();
        let present = self.exists(room_id)? && self.joined_members(room_id)?.iter().any(|member| member.server_name() == ours);
        let ours_created = match self.state_event(room_id, "m.room.create", "")? {
            Some(create) => create.sender.server_name() == ours,
            // A v12 room id names no server; one we have never seen is another's.
            None => room_id.server_name().is_some_and(|owner| owner == ours),
        };
        Ok(self.federating && !present && !ours_created)
    }

    /// A stored event as other servers get it: its signed JSON without our `event_id`. An event
    /// of this server's built unsigned is signed here, each time it is asked for: the same
    /// signature every time (ed25519 is deterministic, and a redacted event's is its original's,
    /// as both sign the redacted form), so nothing is written back.
    pub fn federation_pdu(&self, event_id: &ruma::EventId) -> Result<Option<Box<serde_json::value::RawValue>>> {
        let Some(bytes) = self.store.get(tables::PDUS, event_id.as_bytes())? else { return Ok(None) };
        let mut object: ruma::CanonicalJsonObject = serde_json::from_slice(&bytes).map_err(|e| crate::Error::internal(format!("corrupt stored PDU: {e}")))?;
        object.remove("event_id");
        object.remove("unsigned");
        let ours = self.key.server_name();
        let from_here = matches!(object.get("sender"), Some(ruma::CanonicalJsonValue::String(sender)) if UserId::parse(sender.as_str()).is_ok_and(|sender| sender.server_name() == ours));
        let signed_here = matches!(object.get("signatures"), Some(ruma::CanonicalJsonValue::Object(signatures)) if signatures.contains_key(ours.as_str()));
        if from_here && !signed_here {
            let room_id = Pdu::from_stored(&bytes)?.room_id;
            crate::events::sign_local_pdu(&mut object, &self.key, &self.rules(&room_id)?)?;
        }
        Ok(Some(serde_json::value::to_raw_value(&object).map_err(crate::Error::internal)?))
    }

    /// Events with their metadata, in the order of `ids` (`None` for those unknown): two reads
    /// of the store for all of them.
    pub fn events(&self, ids: &[OwnedEventId]) -> Result<Vec<Option<(Pdu, EventMeta)>>> {
        let keys: Vec<&[u8]> = ids.iter().map(|id| id.as_bytes()).collect();
        let pdus = self.pdus.get_many(ids, |wanted| {
            let keys: Vec<&[u8]> = wanted.iter().map(|id| id.as_bytes()).collect();
            self.store.get_many(tables::PDUS, &keys)?.into_iter().map(|bytes| bytes.map(|bytes| Pdu::from_stored(&bytes)).transpose()).collect::<Result<Vec<_>>>()
        })?;
        let metas = self.store.get_many(tables::EVENT_META, &keys)?;
        pdus.into_iter()
            .zip(metas)
            .map(|pair| match pair {
                (Some(pdu), Some(meta)) => Ok(Some((pdu, crate::store::decode(tables::EVENT_META, &meta)?))),
                _ => Ok(None),
            })
            .collect()
    }

    pub fn meta(&self, event_id: &ruma::EventId) -> Result<Option<EventMeta>> {
        Ok(self.store.get_json(tables::EVENT_META, event_id.as_bytes())?)
    }

    /// The current state event for (type, state key).
    pub fn state_event(&self, room_id: &RoomId, kind: &str, state_key: &str) -> Result<Option<Pdu>> {
        match self.store.get(tables::ROOM_STATE, &state::state_key(room_id.as_str(), kind, state_key))? {
            Some(event_id) => {
                let event_id = String::from_utf8(event_id).map_err(Error::internal)?;
                self.pdu(<&ruma::EventId>::try_from(event_id.as_str()).map_err(Error::internal)?)
            }
            None => Ok(None),
        }
    }

    pub fn state_content(&self, room_id: &RoomId, kind: &str, state_key: &str) -> Result<Option<serde_json::Value>> {
        Ok(self.state_event(room_id, kind, state_key)?.map(|pdu| pdu.content_json()))
    }

    /// The full current state of a room.
    pub fn current_state(&self, room_id: &RoomId) -> Result<Vec<Pdu>> {
        let prefix = Key::new().str(room_id.as_str()).into_vec();
        self.store
            .scan_prefix(tables::ROOM_STATE, prefix, false)
            .map(|item| {
                let (_, event_id) = item?;
                let event_id = std::str::from_utf8(&event_id).map_err(Error::internal)?;
                self.pdu(event_id.try_into().map_err(Error::internal)?)?
                    .ok_or_else(|| Error::internal("state points at a missing event"))
            })
            .collect()
    }

    pub fn state_map(&self, snapshot: u64) -> Result<Arc<StateMap>> {
        self.snapshots.load(&self.store, snapshot)
    }

    /// Events of a snapshot's state, optionally filtered.
    pub fn state_events(&self, snapshot: u64, keep: impl Fn(&str, &str) -> bool) -> Result<Vec<Pdu>> {
        let map = self.state_map(snapshot)?;
        map.iter()
            .filter(|((kind, key), _)| keep(kind, key))
            .map(|(_, event_id)| {
                self.pdu(event_id)?.ok_or_else(|| Error::internal("snapshot points at a missing event"))
            })
            .collect()
    }

    pub fn membership(&self, room_id: &RoomId, user_id: &UserId) -> Result<Option<Membership>> {
        let key = Key::new().str(room_id.as_str()).str(user_id.as_str()).into_vec();
        Ok(self.store.get_json(tables::ROOM_MEMBERS, &key)?)
    }

    pub fn is_joined(&self, room_id: &RoomId, user_id: &UserId) -> Result<bool> {
        Ok(self.membership(room_id, user_id)? == Some(Membership::Join))
    }

    /// Members of a room with their current membership.
    pub fn members(&self, room_id: &RoomId) -> Result<Vec<(OwnedUserId, Membership)>> {
        parse_ids(self.store.children(tables::ROOM_MEMBERS, &[room_id.as_str()])?)
    }

    pub fn joined_members(&self, room_id: &RoomId) -> Result<Vec<OwnedUserId>> {
        Ok(self
            .members(room_id)?
            .into_iter()
            .filter(|(_, m)| *m == Membership::Join)
            .map(|(u, _)| u)
            .collect())
    }

    /// Every room the user has a membership in.
    pub fn user_rooms(&self, user_id: &UserId) -> Result<Vec<(OwnedRoomId, UserRoom)>> {
        parse_ids(self.store.children(tables::USER_ROOMS, &[user_id.as_str()])?)
    }

    /// Whether two users are both joined to some room (a user always shares with itself).
    pub fn share_a_room(&self, a: &UserId, b: &UserId) -> Result<bool> {
        if a == b {
            return Ok(true);
        }
        for (room_id, entry) in self.user_rooms(a)? {
            if entry.membership == Membership::Join && self.is_joined(&room_id, b)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub fn user_room(&self, user_id: &UserId, room_id: &RoomId) -> Result<Option<UserRoom>> {
        let key = Key::new().str(user_id.as_str()).str(room_id.as_str()).into_vec();
        Ok(self.store.get_json(tables::USER_ROOMS, &key)?)
    }

    pub fn forget(&self, user_id: &UserId, room_id: &RoomId) -> Result<()> {
        let key = Key::new().str(user_id.as_str()).str(room_id.as_str()).into_vec();
        let Some(mut entry) = self.store.get_json::<UserRoom>(tables::USER_ROOMS, &key)? else {
            return Err(Error::not_found("you have no membership in this room"));
        };
        if matches!(entry.membership, Membership::Join | Membership::Invite | Membership::Knock) {
            return Err(Error::with_status(
                crate::error::ErrorCode::Unknown,
                http::StatusCode::BAD_REQUEST,
                "leave the room before forgetting it",
            ));
        }
        entry.forgotten = true;
        let mut batch = self.store.batch();
        batch.put_json(tables::USER_ROOMS, &key, &entry)?;
        self.store.write(batch)?;
        Ok(())
    }

    /// Timeline events of a room after `from` (exclusive), ascending, up to `to` (inclusive).
    pub fn timeline_after(
        &self,
        room_id: &RoomId,
        from: StreamPos,
        to: StreamPos,
    ) -> impl Iterator<Item = Result<(StreamPos, OwnedEventId)>> + use<'_> {
        let prefix = Key::new().str(room_id.as_str()).into_vec();
        let start = Key::new().str(room_id.as_str()).u64(from.saturating_add(1)).into_vec();
        self.store
            .scan_from(tables::TIMELINE, prefix, &start, false)
            .map(timeline_entry)
            .take_while(move |item| !matches!(item, Ok((pos, _)) if *pos > to))
    }

    /// The position of the room's newest timeline event (`None` for a room without one here).
    pub fn latest_timeline_pos(&self, room_id: &RoomId) -> Result<Option<StreamPos>> {
        if let Some(pos) = self.latest_positions.lock().expect("latest positions lock").get(room_id) {
            return Ok(Some(*pos));
        }
        let Some((pos, _)) = self.timeline_before(room_id, StreamPos::MAX).next().transpose()? else { return Ok(None) };
        self.note_latest(&[(room_id.to_owned(), pos)]);
        Ok(Some(pos))
    }

    /// Records committed timeline positions; a room's entry only ever moves forward. On a store
    /// other nodes share, their commits would not move it: nothing is kept, and the timeline is
    /// read each time.
    fn note_latest(&self, positions: &[(OwnedRoomId, StreamPos)]) {
        if self.store.is_shared() {
            return;
        }
        let mut latest = self.latest_positions.lock().expect("latest positions lock");
        for (room_id, pos) in positions {
            let entry = latest.entry(room_id.clone()).or_insert(*pos);
            *entry = (*entry).max(*pos);
        }
    }

    /// Timeline events at or before `from`, descending.
    pub fn timeline_before(
        &self,
        room_id: &RoomId,
        from: StreamPos,
    ) -> impl Iterator<Item = Result<(StreamPos, OwnedEventId)>> + use<'_> {
        let prefix = Key::new().str(room_id.as_str()).into_vec();
        let start = Key::new().str(room_id.as_str()).u64(from).into_vec();
        self.store.scan_from(tables::TIMELINE, prefix, &start, true).map(timeline_entry)
    }

    /// The timeline event at stream position `pos` of the room.
    pub fn timeline_event(&self, room_id: &RoomId, pos: StreamPos) -> Result<Option<OwnedEventId>> {
        let Some(value) = self.store.get(tables::TIMELINE, &Key::new().str(room_id.as_str()).u64(pos).into_vec())? else { return Ok(None) };
        Ok(Some(OwnedEventId::try_from(String::from_utf8_lossy(&value).into_owned()).map_err(Error::internal)?))
    }

    /// History entries at or before `from`, newest first: the timeline with the backfilled
    /// history between its events.
    pub fn history_before(&self, room_id: &RoomId, from: HistoryKey) -> impl Iterator<Item = Result<(HistoryKey, OwnedEventId)>> + use<'_> {
        let timeline_from = if from.1 == TIMELINE_ORDER { from.0 } else { from.0.saturating_sub(1) };
        let timeline = self.timeline_before(room_id, timeline_from).map(|item| item.map(|(pos, id)| ((pos, TIMELINE_ORDER), id)));
        let prefix = Key::new().str(room_id.as_str()).into_vec();
        let start = Key::new().str(room_id.as_str()).u64(from.0).u64(from.1).into_vec();
        let backfill = self.store.scan_from(tables::BACKFILL, prefix, &start, true).map(backfill_entry);
        merge_history(timeline, backfill, true)
    }

    /// History entries after `from` up to stream position `upto`, oldest first.
    pub fn history_after(&self, room_id: &RoomId, from: HistoryKey, upto: StreamPos) -> impl Iterator<Item = Result<(HistoryKey, OwnedEventId)>> + use<'_> {
        let timeline_after = if from.1 == TIMELINE_ORDER { from.0 } else { from.0.saturating_sub(1) };
        let timeline = self.timeline_after(room_id, timeline_after, upto).map(|item| item.map(|(pos, id)| ((pos, TIMELINE_ORDER), id)));
        let prefix = Key::new().str(room_id.as_str()).into_vec();
        let start = match from.1.checked_add(1) {
            Some(order) => Key::new().str(room_id.as_str()).u64(from.0).u64(order),
            None => Key::new().str(room_id.as_str()).u64(from.0.saturating_add(1)),
        }
        .into_vec();
        let backfill = self.store.scan_from(tables::BACKFILL, prefix, &start, false).map(backfill_entry).take_while(move |item| !matches!(item, Ok(((pos, _), _)) if *pos > upto));
        merge_history(timeline, backfill, false)
    }

    /// The event the user may see that is closest to `ts` (ms since the epoch): the newest at
    /// or before it, or with `forward` the oldest at or after it. Timestamps follow the stream
    /// order closely enough that the timeline is scanned back from its end, stopping once past `ts`.
    pub fn event_near_timestamp(&self, user_id: &UserId, room_id: &RoomId, ts: u64, forward: bool) -> Result<Option<(OwnedEventId, u64)>> {
        let mut found = None;
        for entry in self.timeline_before(room_id, StreamPos::MAX) {
            let (_, event_id) = entry?;
            let (Some(pdu), Some(meta)) = (self.pdu(&event_id)?, self.meta(&event_id)?) else { continue };
            let event_ts: u64 = pdu.origin_server_ts.0.into();
            if forward && event_ts < ts {
                break;
            }
            let fits = forward || event_ts <= ts;
            if fits && self.user_can_see(user_id, &pdu, &meta)? {
                found = Some((event_id, event_ts));
                if !forward {
                    break;
                }
            }
        }
        Ok(found)
    }

    /// The stream position of the user's latest read receipt in the room (public or private),
    /// or of their membership when they have none.
    pub fn read_position(&self, user_id: &UserId, room_id: &RoomId) -> Result<StreamPos> {
        let joined_at = self.user_room(user_id, room_id)?.map_or(0, |e| e.pos);
        let mut read = joined_at;
        for kind in ["m.read", "m.read.private"] {
            if let Some(receipt) = self.receipt(room_id, kind, user_id)?
                && let Some(meta) = self.meta(&receipt.event_id)?
            {
                read = read.max(meta.pos);
            }
        }
        Ok(read)
    }


    // --- aliases and the public directory ---

    pub fn resolve_alias(&self, alias: &RoomAliasId) -> Result<Option<OwnedRoomId>> {
        match self.store.get(tables::ALIASES, alias.as_bytes())? {
            Some(room) => Ok(Some(
                String::from_utf8(room).ok().and_then(|r| r.try_into().ok()).ok_or_else(|| {
                    Error::internal("corrupt alias record")
                })?,
            )),
            None => Ok(None),
        }
    }

    pub fn set_alias(&self, alias: &RoomAliasId, room_id: &RoomId, creator: &UserId) -> Result<()> {
        if self.resolve_alias(alias)?.is_some() {
            return Err(Error::with_status(
                crate::error::ErrorCode::Unknown,
                http::StatusCode::CONFLICT,
                format!("alias {alias} already exists"),
            ));
        }
        let mut batch = self.store.batch();
        batch.put(tables::ALIASES, alias.as_bytes(), room_id.as_bytes());
        let owner = Key::new().str("owner").str(alias.as_str()).into_vec();
        batch.put(tables::ALIASES, &owner, creator.as_bytes());
        self.store.write(batch)?;
        Ok(())
    }

    pub fn alias_owner(&self, alias: &RoomAliasId) -> Result<Option<OwnedUserId>> {
        let owner = Key::new().str("owner").str(alias.as_str()).into_vec();
        Ok(self
            .store
            .get(tables::ALIASES, &owner)?
            .and_then(|u| String::from_utf8(u).ok())
            .and_then(|u| u.try_into().ok()))
    }

    pub fn remove_alias(&self, alias: &RoomAliasId) -> Result<()> {
        let mut batch = self.store.batch();
        batch.delete(tables::ALIASES, alias.as_bytes());
        batch.delete(tables::ALIASES, &Key::new().str("owner").str(alias.as_str()).into_vec());
        self.store.write(batch)?;
        Ok(())
    }

    pub fn local_aliases(&self, room_id: &RoomId) -> Result<Vec<OwnedRoomAliasId>> {
        let mut aliases = Vec::new();
        for item in self.store.scan_prefix(tables::ALIASES, b"#".to_vec(), false) {
            let (alias, room) = item?;
            if room.as_ref() == room_id.as_bytes()
                && let Ok(alias) = OwnedRoomAliasId::try_from(String::from_utf8_lossy(&alias).into_owned())
            {
                aliases.push(alias);
            }
        }
        Ok(aliases)
    }

    pub fn set_public(&self, room_id: &RoomId, public: bool) -> Result<()> {
        let mut batch = self.store.batch();
        if public {
            batch.put(tables::PUBLIC_ROOMS, room_id.as_bytes(), b"");
        } else {
            batch.delete(tables::PUBLIC_ROOMS, room_id.as_bytes());
        }
        self.store.write(batch)?;
        Ok(())
    }

    pub fn is_public(&self, room_id: &RoomId) -> Result<bool> {
        Ok(self.store.contains(tables::PUBLIC_ROOMS, room_id.as_bytes())?)
    }

    pub fn public_rooms(&self) -> Result<Vec<OwnedRoomId>> {
        self.store
            .scan_prefix(tables::PUBLIC_ROOMS, Vec::new(), false)
            .map(|item| {
                let (room, _) = item?;
                OwnedRoomId::try_from(String::from_utf8_lossy(&room).into_owned()).map_err(Error::internal)
            })
            .collect()
    }

    /// The power level a user has in the room's current state.
    pub fn user_power_level(&self, room_id: &RoomId, user_id: &UserId) -> Result<i64> {
        if let Some(create) = self.state_event(room_id, "m.room.create", "")?
            && crate::events::privileged_creators(&create, &self.rules(room_id)?).contains(&user_id.to_owned())
        {
            return Ok(i64::MAX);
        }
        let Some(power) = self.state_content(room_id, "m.room.power_levels", "")? else {
            // Without power levels the creator has 100.
            let create = self.state_event(room_id, "m.room.create", "")?;
            return Ok(if create.is_some_and(|c| c.sender == user_id) { 100 } else { 0 });
        };
        Ok(power
            .get("users")
            .and_then(|u| u.get(user_id.as_str()))
            .and_then(|v| v.as_i64())
            .or_else(|| power.get("users_default").and_then(|v| v.as_i64()))
            .unwrap_or(0))
    }
}

/// Parses the string keys of [`Store::children`] into Matrix ids.
fn parse_ids<Id: TryFrom<String>, T>(entries: Vec<(String, T)>) -> Result<Vec<(Id, T)>> {
    entries
        .into_iter()
        .map(|(id, value)| Ok((Id::try_from(id).map_err(|_| Error::internal("corrupt id in key"))?, value)))
        .collect()
}

/// A place in a room's history, in chronological order: (stream position, order). A timeline
/// event is at (its position, [`TIMELINE_ORDER`]); history fetched later from other servers sits
/// just before the event it was missing from, at (that event's position, a lower order).
pub type HistoryKey = (StreamPos, u64);

/// The order of the timeline event itself at a stream position.
pub const TIMELINE_ORDER: u64 = u64::MAX;

/// The history key just before `key`: where paging back continues after it.
pub fn history_key_before((pos, order): HistoryKey) -> HistoryKey {
    match order.checked_sub(1) {
        Some(order) => (pos, order),
        None => (pos.saturating_sub(1), TIMELINE_ORDER),
    }
}

/// The entries of two history streams sorted the same way, as one sorted stream.
fn merge_history<'a>(
    first: impl Iterator<Item = Result<(HistoryKey, OwnedEventId)>> + 'a,
    second: impl Iterator<Item = Result<(HistoryKey, OwnedEventId)>> + 'a,
    descending: bool,
) -> impl Iterator<Item = Result<(HistoryKey, OwnedEventId)>> + 'a {
    let (mut first, mut second) = (first.peekable(), second.peekable());
    std::iter::from_fn(move || {
        let take_first = match (first.peek(), second.peek()) {
            (None, None) => return None,
            (Some(_), None) | (Some(Err(_)), _) => true,
            (None, Some(_)) | (_, Some(Err(_))) => false,
            (Some(Ok((a, _))), Some(Ok((b, _)))) => (a > b) == descending,
        };
        if take_first { first.next() } else { second.next() }
    })
}

fn backfill_entry(item: crate::store::Result<(Box<[u8]>, Box<[u8]>)>) -> Result<(HistoryKey, OwnedEventId)> {
    let (key, value) = item?;
    let mut reader = KeyReader::new(&key).skip_str();
    let (Some(pos), Some(order)) = (reader.u64(), reader.u64()) else { return Err(Error::internal("corrupt backfill key")) };
    let event_id = OwnedEventId::try_from(String::from_utf8_lossy(&value).into_owned()).map_err(Error::internal)?;
    Ok(((pos, order), event_id))
}

fn timeline_entry(item: crate::store::Result<(Box<[u8]>, Box<[u8]>)>) -> Result<(StreamPos, OwnedEventId)> {
    let (key, value) = item?;
    let pos = KeyReader::new(&key).skip_str().u64().ok_or_else(|| Error::internal("corrupt timeline key"))?;
    let event_id = OwnedEventId::try_from(String::from_utf8_lossy(&value).into_owned()).map_err(Error::internal)?;
    Ok((pos, event_id))
}

#[cfg(test)]
mod lock_tests {
    use std::time::Duration;

    use ruma::{RoomId, server_name};

    use super::RoomLocks;

    #[tokio::test(flavor = "multi_thread")]
    async fn rooms_that_do_not_exist_leave_no_lock_behind() {
        let dir = tempfile::tempdir().unwrap();
        let rooms = crate::test_rooms(dir.path());
        let held_room = RoomId::new_v1(server_name!("test.local"));
        let held = rooms.writer(&held_room).await.unwrap();
        // What a request naming a random room does: open the room's writer, find no room.
        for _ in 0..10_000 {
            let writer = rooms.writer(&RoomId::new_v1(server_name!("test.local"))).await.unwrap();
            assert!(!writer.exists());
        }
        let entries = rooms.locks.lock().unwrap().locks.len();
        assert!(entries <= RoomLocks::MIN_SWEEP_AT, "{entries} lock entries");
        // A lock in use survives the sweeps: a second writer of its room waits.
        assert!(tokio::time::timeout(Duration::from_millis(100), rooms.writer(&held_room)).await.is_err());
        drop(held);
        assert!(tokio::time::timeout(Duration::from_secs(5), rooms.writer(&held_room)).await.is_ok());
    }
}
