//! The write side of a room: build, authorize and stage events under the room's lock, then
//! persist everything staged in one atomic batch. Readers see nothing until the commit.

use std::{collections::HashMap, sync::Arc};

use ruma::{
    OwnedEventId, OwnedRoomId, OwnedUserId, RoomVersionId, UserId,
    events::{StateEventType, TimelineEventType},
    room_version_rules::RoomVersionRules,
};
use serde::{Deserialize, Serialize};

use super::{Claim, Delivery, EventMeta, Membership, RoomRecord, RoomView, Rooms, StagedEvent, Staging, UserRoom, relations, state};
use crate::{
    audit::AuditRecord,
    error::{Error, ErrorCode, Result},
    events::{Pdu, PduBuilder, PduPlacement, SignedPdu, build_unsigned_pdu, redact_stored, rules_for},
    store::{Batch, Hold, Key, StreamPos, StreamTicket, tables},
};

/// What keeps other writers out of a room: this process's lock on it, and the hold other nodes
/// sharing the store respect.
pub(super) type RoomLock = (tokio::sync::OwnedMutexGuard<()>, Hold);

/// The writer's view of its room, borrowed apart from its batch so that indexers read the room
/// while they stage into the batch.
struct View<'w> {
    rooms: &'w Rooms,
    room_id: &'w OwnedRoomId,
    record: &'w Option<RoomRecord>,
    rules: &'w Option<RoomVersionRules>,
    staged_state: &'w HashMap<(String, String), Pdu>,
    staged_members: &'w HashMap<OwnedUserId, Membership>,
    claims: &'w std::sync::Mutex<HashMap<String, Claim>>,
    reads: &'w std::sync::Mutex<StoredReads>,
}

/// What a writer read of its room as stored: current state by (type, state key), shared with
/// the room's other writers that open it at the same state snapshot (a snapshot names one
/// state, the content of its events included: a redaction of a state event makes a new one),
/// and events by id. Staged events are looked at first.
struct StoredReads {
    state: Arc<std::sync::Mutex<StateReads>>,
    events: HashMap<OwnedEventId, Option<Pdu>>,
}

/// The current state events read at one snapshot.
pub(super) type StateReads = HashMap<(String, String), Option<Pdu>>;

impl StoredReads {
    /// Reads shared by the writers that open the room at `snapshot`.
    fn at(rooms: &Rooms, room_id: &ruma::RoomId, snapshot: StreamPos) -> Self {
        Self { state: rooms.state_reads(room_id, snapshot), events: HashMap::new() }
    }

    /// Reads of this writer alone (after a redaction, which changes a stored event).
    fn private() -> Self {
        Self { state: Arc::default(), events: HashMap::new() }
    }

    /// State events kept per room: the few every event's checks read (create, power levels,
    /// join rules, the senders' memberships), not every member's event of a large room.
    const STATE_KEPT: usize = 64;

    fn state(reads: &std::sync::Mutex<Self>, rooms: &Rooms, room_id: &ruma::RoomId, kind: &str, state_key: &str) -> Result<Option<Pdu>> {
        let key = (kind.to_owned(), state_key.to_owned());
        let shared = lock(reads).state.clone();
        if let Some(pdu) = lock(&shared).get(&key) {
            return Ok(pdu.clone());
        }
        let pdu = rooms.state_event(room_id, kind, state_key)?;
        let mut kept = lock(&shared);
        if kept.len() < Self::STATE_KEPT {
            kept.insert(key, pdu.clone());
        }
        Ok(pdu)
    }

    /// An event by id: the auth events of the room's own events are mostly its current state,
    /// found among the state read at the snapshot (as stored at it: a redaction of a state event
    /// makes a new snapshot) without reading the store again.
    fn event(reads: &std::sync::Mutex<Self>, rooms: &Rooms, event_id: &ruma::EventId) -> Result<Option<Pdu>> {
        if let Some(pdu) = lock(reads).events.get(event_id) {
            return Ok(pdu.clone());
        }
        let shared = lock(reads).state.clone();
        if let Some(pdu) = lock(&shared).values().flatten().find(|pdu| pdu.event_id == event_id) {
            return Ok(Some(pdu.clone()));
        }
        let pdu = rooms.pdu(event_id)?;
        lock(reads).events.insert(event_id.to_owned(), pdu.clone());
        Ok(pdu)
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RoomView for View<'_> {
    fn room_id(&self) -> &ruma::RoomId {
        self.room_id
    }

    fn rooms(&self) -> &Rooms {
        self.rooms
    }

    fn state(&self, kind: &str, state_key: &str) -> Result<Option<Pdu>> {
        if let Some(pdu) = self.staged_state.get(&(kind.to_owned(), state_key.to_owned())) {
            return Ok(Some(pdu.clone()));
        }
        if self.record.as_ref().is_none_or(|r| r.snapshot == state::EMPTY_SNAPSHOT) {
            return Ok(None);
        }
        StoredReads::state(self.reads, self.rooms, self.room_id, kind, state_key)
    }

    fn state_of_type(&self, kind: &str) -> Result<Vec<(String, Pdu)>> {
        let mut found = std::collections::BTreeMap::new();
        if self.record.as_ref().is_some_and(|r| r.snapshot != state::EMPTY_SNAPSHOT) {
            let prefix = Key::new().str(self.room_id.as_str()).str(kind).into_vec();
            for item in self.rooms.store.scan_prefix(tables::ROOM_STATE, prefix, false) {
                let (key, event_id) = item?;
                let mut reader = crate::store::KeyReader::new(&key);
                reader.str();
                reader.str();
                let (Some(state_key), Ok(event_id)) = (reader.str(), std::str::from_utf8(&event_id)) else { continue };
                if let Some(pdu) = self.rooms.pdu(<&ruma::EventId>::try_from(event_id).map_err(Error::internal)?)? {
                    found.insert(state_key.to_owned(), pdu);
                }
            }
        }
        for ((staged_kind, state_key), pdu) in self.staged_state {
            if staged_kind == kind {
                found.insert(state_key.clone(), pdu.clone());
            }
        }
        Ok(found.into_iter().collect())
    }

    fn members(&self) -> Result<HashMap<OwnedUserId, Membership>> {
        let mut members: HashMap<OwnedUserId, Membership> = self.rooms.members(self.room_id)?.into_iter().collect();
        members.extend(self.staged_members.iter().map(|(u, m)| (u.clone(), *m)));
        Ok(members)
    }

    fn rules(&self) -> Result<&RoomVersionRules> {
        self.rules.as_ref().ok_or_else(|| Error::not_found("unknown room"))
    }

    fn claim(&self, name: &str) -> Result<bool> {
        let mut claims = self.claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if claims.contains_key(name) {
            return Ok(true);
        }
        let Some(claim) = self.rooms.try_claim(name)? else { return Ok(false) };
        claims.insert(name.to_owned(), claim);
        Ok(true)
    }
}

/// The audit entry of a membership change: joins, leaves, kicks, bans, knocks, invites and
/// admissions (an invite answering a knock).
fn membership_audit(pdu: &Pdu, target: &OwnedUserId, previous: Option<Membership>, membership: Membership) -> AuditRecord {
    let by_self = pdu.sender == *target;
    let action = match membership {
        Membership::Join => "join",
        Membership::Knock => "knock",
        Membership::Ban => "ban",
        Membership::Invite if previous == Some(Membership::Knock) => "admit",
        Membership::Invite => "invite",
        Membership::Leave if previous == Some(Membership::Ban) => "unban",
        Membership::Leave if by_self => "leave",
        Membership::Leave if previous == Some(Membership::Knock) => "decline",
        Membership::Leave => "kick",
    };
    let reason = pdu.content_json().get("reason").cloned().unwrap_or(serde_json::Value::Null);
    AuditRecord::new(action, &pdu.sender)
        .room(&pdu.room_id)
        .target(target)
        .details(serde_json::json!({ "event_id": pdu.event_id, "reason": reason }))
}

/// The key a transaction id is kept under, naming the event it was sent as.
pub fn txn_key(sender: &UserId, txn: &TxnInfo) -> Vec<u8> {
    Key::new().str(sender.as_str()).str(&txn.device_id).str(&txn.txn_id).into_vec()
}

/// The device and transaction id a client sent an event with.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TxnInfo {
    pub device_id: String,
    pub txn_id: String,
}

pub struct RoomWriter<'a> {
    rooms: &'a Rooms,
    room_id: OwnedRoomId,
    record: Option<RoomRecord>,
    /// The room's record as stored when the writer opened it: the write lands only if it is
    /// still so (see [`Self::condition`]).
    record_read: Option<Vec<u8>>,
    rules: Option<RoomVersionRules>,
    batch: Batch,
    tickets: Vec<StreamTicket>,
    /// State set by events staged in this writer, over the stored current state.
    staged_state: HashMap<(String, String), Pdu>,
    staged_events: HashMap<OwnedEventId, Pdu>,
    /// The staged events in order, for the after-commit hooks.
    staged_order: Vec<Pdu>,
    snapshot_generations: HashMap<u64, u32>,
    /// Memberships changed by staged events, over the stored ones.
    staged_members: HashMap<OwnedUserId, Membership>,
    /// What indexers left for after the commit (push delivery).
    staged_deliveries: Vec<Delivery>,
    /// Audit entries for membership changes, chained and written with the batch.
    staged_audit: Vec<AuditRecord>,
    /// The newest timeline position staged per room (this writer's, and those it commits with).
    staged_latest: Vec<(OwnedRoomId, StreamPos)>,
    /// What the writer claimed (by name), kept until it commits.
    claims: std::sync::Mutex<HashMap<String, Claim>>,
    /// Set while an event is being staged, and left set if staging failed halfway: the batch
    /// then holds part of an event and must never be written.
    broken: bool,
    reads: std::sync::Mutex<StoredReads>,
    _guard: RoomLock,
}

impl<'a> RoomWriter<'a> {
    pub(super) fn open(
        rooms: &'a Rooms,
        room_id: OwnedRoomId,
        guard: RoomLock,
    ) -> Result<Self> {
        let record_read = rooms.store.get(tables::ROOMS, room_id.as_bytes())?;
        let record: Option<RoomRecord> = record_read.as_deref().map(|bytes| crate::store::decode(tables::ROOMS, bytes)).transpose()?;
        let rules = record.as_ref().map(|r| rules_for(&r.version)).transpose()?;
        let reads = match &record {
            Some(record) => StoredReads::at(rooms, &room_id, record.snapshot),
            None => StoredReads::private(),
        };
        Ok(Self {
            batch: rooms.store.batch(),
            rooms,
            room_id,
            record,
            record_read,
            rules,
            tickets: Vec::new(),
            staged_state: HashMap::new(),
            staged_events: HashMap::new(),
            staged_order: Vec::new(),
            snapshot_generations: HashMap::new(),
            staged_members: HashMap::new(),
            staged_deliveries: Vec::new(),
            staged_audit: Vec::new(),
            staged_latest: Vec::new(),
            claims: std::sync::Mutex::default(),
            broken: false,
            reads: std::sync::Mutex::new(reads),
            _guard: guard,
        })
    }

    pub fn room_id(&self) -> &OwnedRoomId {
        &self.room_id
    }

    pub fn exists(&self) -> bool {
        self.record.is_some()
    }

    /// Starts a new room; the first event appended must be its `m.room.create`.
    pub fn init_room(&mut self, version: RoomVersionId) -> Result<()> {
        if self.record.is_some() {
            return Err(Error::new(ErrorCode::RoomInUse, "room already exists"));
        }
        self.rules = Some(rules_for(&version)?);
        self.record = Some(RoomRecord {
            version,
            snapshot: state::EMPTY_SNAPSHOT,
            extremities: Vec::new(),
            depth: 0,
            history_ever_restricted: false,
        });
        Ok(())
    }

    fn view(&self) -> View<'_> {
        View { rooms: self.rooms, room_id: &self.room_id, record: &self.record, rules: &self.rules, staged_state: &self.staged_state, staged_members: &self.staged_members, claims: &self.claims, reads: &self.reads }
    }

    /// The current state event for (type, state key), staged events included.
    pub fn state_event(&self, kind: &str, state_key: &str) -> Result<Option<Pdu>> {
        self.view().state(kind, state_key)
    }

    fn event(&self, event_id: &ruma::EventId) -> Option<Pdu> {
        self.staged_events.get(event_id).cloned().or_else(|| StoredReads::event(&self.reads, self.rooms, event_id).ok().flatten())
    }

    /// The registered policies' verdict on an event the room version's rules allowed.
    fn authorize(&self, pdu: &Pdu) -> Result<()> {
        let view = self.view();
        self.rooms.fanout().policies.iter().try_for_each(|policy| policy.authorize(&view, pdu))
    }

    /// Builds, authorizes and stages one event. Nothing is visible before [`Self::commit`].
    pub fn append(&mut self, sender: &UserId, mut builder: PduBuilder, txn: Option<TxnInfo>) -> Result<Pdu> {
        for policy in &self.rooms.fanout().policies {
            policy.prepare(&self.view(), sender, &mut builder)?;
        }
        let record = self.record.clone().ok_or_else(|| Error::not_found("unknown room"))?;
        let rules = self.rules.clone().ok_or_else(|| Error::not_found("unknown room"))?;
        let is_create = builder.kind == TimelineEventType::RoomCreate;
        if builder.kind == TimelineEventType::RoomMember
            && matches!(Membership::of(&builder.content), Some(Membership::Join | Membership::Invite | Membership::Knock))
            && self.rooms.blocked_by(&self.room_id)?.is_some()
        {
            return Err(Error::forbidden("this room has been blocked by the server administrator"));
        }
        if is_create != record.extremities.is_empty() {
            return Err(Error::new(
                ErrorCode::InvalidRoomState,
                "m.room.create must be the first and only create event of a room",
            ));
        }

        let content_raw = serde_json::value::to_raw_value(&builder.content)
            .map_err(|e| Error::bad_json(e.to_string()))?;
        let auth_types = ruma::state_res::auth_types_for_event(
            &builder.kind,
            sender,
            builder.state_key.as_deref(),
            &content_raw,
            &rules.authorization,
        )
        .map_err(Error::bad_json)?;
        let mut auth_events = Vec::new();
        for (kind, state_key) in &auth_types {
            if let Some(pdu) = self.state_event(&kind.to_string(), state_key)? {
                auth_events.push(pdu.event_id);
            }
        }

        let signed: SignedPdu = build_unsigned_pdu(
            builder,
            PduPlacement {
                room_id: &self.room_id,
                sender,
                prev_events: record.extremities.clone(),
                auth_events,
                depth: record.depth + 1,
                rules: &rules,
            },
        )?;
        let pdu = signed.pdu.clone();

        // authorize: the room version's rules against the state before the event.
        ruma::state_res::check_state_independent_auth_rules(&rules.authorization, &pdu, |id| {
            self.event(id)
        })
        .map_err(|reason| Error::forbidden(format!("event not authorized: {reason}")))?;
        ruma::state_res::check_state_dependent_auth_rules(
            &rules.authorization,
            &pdu,
            |kind: &StateEventType, key: &str| self.state_event(&kind.to_string(), key).ok().flatten(),
        )
        .map_err(|reason| Error::forbidden(format!("event not authorized: {reason}")))?;
        // Then the registered policies (the clinic's rules, the plugins' check-event).
        self.authorize(&pdu)?;

        self.stage(signed, record, &rules, txn)?;
        Ok(pdu)
    }

    fn stage(
        &mut self,
        signed: SignedPdu,
        mut record: RoomRecord,
        rules: &RoomVersionRules,
        txn: Option<TxnInfo>,
    ) -> Result<()> {
        // Broken until this event is wholly staged, and for good if an earlier one was not.
        let broken_before = self.broken;
        self.broken = true;
        let store = &self.rooms.store;
        let ticket = store.streams().allocate(store)?;
        let pos = ticket.pos();
        let pdu = signed.pdu.clone();
        let room_id = self.room_id.clone();
        let room = room_id.as_str();

        let state_before = record.snapshot;
        let mut meta = EventMeta {
            pos,
            state_before,
            state_after: state_before,
            replaces_state: None,
            txn: txn.clone(),
            redacted_by: None,
        };

        let mut replaced = None;
        if let Some(state_key) = &pdu.state_key {
            let kind = pdu.kind.to_string();
            replaced = self.state_event(&kind, state_key)?;
            meta.replaces_state = replaced.as_ref().map(|p| p.event_id.clone());
            let generation = self.rooms.snapshots.write_child(
                store,
                &mut self.batch,
                state_before,
                pos,
                ((kind.clone(), state_key.clone()), pdu.event_id.clone()),
                &self.snapshot_generations,
            )?;
            self.snapshot_generations.insert(pos, generation);
            meta.state_after = pos;
            record.snapshot = pos;
            self.batch.put(tables::ROOM_STATE,
                &state::state_key(room, &kind, state_key),
                pdu.event_id.as_bytes(),
            );
            if pdu.kind == TimelineEventType::RoomMember {
                self.index_membership(&pdu, pos)?;
            }
            self.staged_state.insert((kind, state_key.clone()), pdu.clone());
        }

        if pdu.kind == TimelineEventType::RoomRedaction
            && let Some(target) = &pdu.redacts
            && self.apply_redaction(target, &pdu, rules)?
        {
            // The redacted event is part of the room's state: a new snapshot (of the same
            // events) names the state with its content stripped, so that nothing kept per
            // snapshot outlives the change, on any node.
            let generation = self.rooms.snapshots.write_entries(store, &mut self.batch, record.snapshot, pos, Vec::new(), &self.snapshot_generations)?;
            self.snapshot_generations.insert(pos, generation);
            meta.state_after = pos;
            record.snapshot = pos;
        }

        if pdu.kind == TimelineEventType::RoomHistoryVisibility
            && matches!(
                pdu.content_json().get("history_visibility").and_then(|v| v.as_str()),
                Some("joined" | "invited")
            )
        {
            record.history_ever_restricted = true;
        }
        // The event supersedes the extremities it points at (all of them, for a local event).
        record.extremities.retain(|e| !pdu.prev_events.contains(e));
        record.extremities.push(pdu.event_id.clone());
        record.depth = record.depth.max(u64::from(pdu.depth));
        self.batch.put(tables::PDUS, pdu.event_id.as_bytes(), &signed.to_bytes());
        self.batch.put_json(tables::EVENT_META, pdu.event_id.as_bytes(), &meta)?;
        self.batch.put(tables::TIMELINE, &Key::new().str(room).u64(pos).into_vec(), pdu.event_id.as_bytes());
        self.staged_latest.push((self.room_id.clone(), pos));
        relations::stage(&mut self.batch, &pdu, pos);
        self.batch.put_json(tables::ROOMS, room.as_bytes(), &record)?;
        if let Some(txn) = &txn {
            self.batch.put(tables::TXN_IDS, &txn_key(&pdu.sender, txn), pdu.event_id.as_bytes());
        }
        self.record = Some(record);
        // What the registered indexers keep about the event goes into the same batch.
        let view = View { rooms: self.rooms, room_id: &self.room_id, record: &self.record, rules: &self.rules, staged_state: &self.staged_state, staged_members: &self.staged_members, claims: &self.claims, reads: &self.reads };
        let mut staging = Staging { store, batch: &mut self.batch, audit: &mut self.staged_audit, deliveries: &mut self.staged_deliveries };
        let state = self.record.as_ref().map_or(state::EMPTY_SNAPSHOT, |r| r.snapshot);
        let event = StagedEvent { pdu: &pdu, pos, replaced: replaced.as_ref(), local: pdu.sender.server_name() == self.rooms.key.server_name(), state };
        for indexer in &self.rooms.fanout().indexers {
            indexer.stage(&view, &event, &mut staging)?;
        }
        self.staged_order.push(pdu.clone());
        self.staged_events.insert(pdu.event_id.clone(), pdu);
        self.tickets.push(ticket);
        self.broken = broken_before;
        Ok(())
    }

    /// Whether an event's staging failed halfway, so that this writer must not commit (it
    /// refuses to). A refused event leaves the writer as it was.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// An event staged in this writer.
    pub fn staged_event(&self, event_id: &ruma::EventId) -> Option<Pdu> {
        self.staged_events.get(event_id).cloned()
    }

    /// Authorizes and stages an event another server built and signed (its signatures and
    /// hashes checked by the caller), against the room's current state. Forks are applied in
    /// arrival order: state resolution of concurrent branches is not implemented yet.
    pub fn append_remote(&mut self, signed: SignedPdu) -> Result<Pdu> {
        let record = self.record.clone().ok_or_else(|| Error::not_found("unknown room"))?;
        let rules = self.rules.clone().ok_or_else(|| Error::not_found("unknown room"))?;
        let pdu = signed.pdu.clone();
        if self.has_event(&pdu.event_id)? {
            return Ok(pdu);
        }
        for policy in &self.rooms.fanout().policies {
            policy.prepare_remote(&self.view(), &pdu)?;
        }
        self.check_auth_events(&pdu, &rules)?;
        // An event that does not extend our current forward extremities comes from another
        // branch: it is authorized against the state of its own branch, and the branches are
        // merged by state resolution (v2) once it is staged.
        let tips: std::collections::HashSet<&OwnedEventId> = record.extremities.iter().collect();
        let forked = pdu.prev_events.iter().collect::<std::collections::HashSet<_>>() != tips
            && pdu.prev_events.iter().all(|prev| self.rooms.meta(prev).ok().flatten().is_some());
        let branch_state = if forked { Some(self.state_before(&pdu, &rules)?) } else { None };
        match &branch_state {
            Some(branch) => ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, &pdu, |kind: &StateEventType, key: &str| {
                branch.get(&(kind.to_string(), key.to_owned())).and_then(|id| self.event(id))
            }),
            None => ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, &pdu, |kind: &StateEventType, key: &str| {
                self.state_event(&kind.to_string(), key).ok().flatten()
            }),
        }
        .map_err(|reason| Error::forbidden(format!("event not authorized: {reason}")))?;
        // Soft failure: an event allowed in its own branch but not by the room's current state
        // (say, from a user banned meanwhile) is kept, so other events may point at it, but it
        // reaches no client, changes no state and is no forward extremity.
        if branch_state.is_some()
            && ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, &pdu, |kind: &StateEventType, key: &str| {
                self.state_event(&kind.to_string(), key).ok().flatten()
            })
            .is_err()
        {
            tracing::info!(event_id = %pdu.event_id, room_id = %self.room_id, "soft-failed an event from another branch");
            self.stage_outlier(&signed, record.snapshot)?;
            return Ok(pdu);
        }
        self.authorize(&pdu)?;
        let mut record = record;
        // The event's own branch after it, for the resolution below (its snapshot is only staged).
        let branch_after = branch_state.clone().map(|mut branch| {
            if let Some(key) = &pdu.state_key {
                branch.insert((pdu.kind.to_string(), key.clone()), pdu.event_id.clone());
            }
            branch
        });
        if let Some(branch) = branch_state {
            // The event's state (before and after it) is its branch's, kept as a snapshot.
            let store = &self.rooms.store;
            let ticket = store.streams().allocate(store)?;
            let generation = self.rooms.snapshots.write_entries(store, &mut self.batch, state::EMPTY_SNAPSHOT, ticket.pos(), branch.into_iter().collect(), &self.snapshot_generations)?;
            self.snapshot_generations.insert(ticket.pos(), generation);
            state::index_snapshot(&mut self.batch, &self.room_id, ticket.pos());
            record.snapshot = ticket.pos();
            self.tickets.push(ticket);
        }
        self.stage(signed, record, &rules, None)?;
        if let Some(branch_after) = branch_after {
            // The room's state is the resolution of the states after each forward extremity, so
            // every server with the same events reaches the same state, whatever their order.
            let record = self.record.clone().ok_or_else(|| Error::not_found("unknown room"))?;
            let mut maps = Vec::new();
            for tip in &record.extremities {
                if *tip == pdu.event_id {
                    maps.push(branch_after.clone());
                } else if let Some(meta) = self.rooms.meta(tip)? {
                    maps.push((*self.rooms.snapshots.load(&self.rooms.store, meta.state_after)?).clone());
                }
            }
            let resolved = if maps.len() == 1 { maps.pop().unwrap_or_default() } else { self.resolve(maps, &rules)? };
            self.apply_state(resolved, &branch_after)?;
        }
        Ok(pdu)
    }

    /// Stores an event without placing it in the room: no timeline entry, no state, not a
    /// forward extremity (soft-failed events).
    /// The checks on an event's own auth events: the format rules, then whether the state they
    /// name allows it. An event that fails them is rejected.
    fn check_auth_events(&self, pdu: &Pdu, rules: &RoomVersionRules) -> Result<()> {
        ruma::state_res::check_state_independent_auth_rules(&rules.authorization, pdu, |id| self.event(id))
            .map_err(|reason| Error::forbidden(format!("event not authorized: {reason}")))?;
        let cited = self.auth_events_state(pdu)?;
        ruma::state_res::check_state_dependent_auth_rules(&rules.authorization, pdu, |kind: &StateEventType, key: &str| {
            cited.get(&(kind.to_string(), key.to_owned())).cloned()
        })
        .map_err(|reason| Error::forbidden(format!("event not authorized by its auth events: {reason}")))
    }

    /// The state an event's `auth_events` name (and, since v12, the room's create event, which
    /// they leave out).
    fn auth_events_state(&self, pdu: &Pdu) -> Result<HashMap<(String, String), Pdu>> {
        let mut cited = HashMap::new();
        let create = self.state_event("m.room.create", "")?;
        for id in &pdu.auth_events {
            let event = self.event(id).ok_or_else(|| Error::forbidden(format!("event not authorized: unknown auth event {id}")))?;
            cited.insert((event.kind.to_string(), event.state_key.clone().unwrap_or_default()), event);
        }
        if let Some(create) = create {
            cited.entry(("m.room.create".to_owned(), String::new())).or_insert(create);
        }
        Ok(cited)
    }

    /// Stages history fetched from another server that is older than the history entry `at`:
    /// the events go just before it, oldest first, each if its own auth events allow it (it
    /// changes no current state). Returns how many were kept.
    pub fn add_backfilled(&mut self, mut events: Vec<SignedPdu>, at: super::HistoryKey) -> Result<usize> {
        let rules = self.rules.clone().ok_or_else(|| Error::not_found("unknown room"))?;
        // Checked oldest first, as later events' auth events may be among them.
        events.sort_by_key(|signed| u64::from(signed.pdu.depth));
        let mut kept = Vec::new();
        for signed in events {
            if self.has_event(&signed.pdu.event_id)? {
                continue;
            }
            if let Err(error) = self.check_auth_events(&signed.pdu, &rules) {
                tracing::warn!(room_id = %self.room_id, event_id = %signed.pdu.event_id, %error, "refused a backfilled event");
                continue;
            }
            self.staged_events.insert(signed.pdu.event_id.clone(), signed.pdu.clone());
            kept.push(signed);
        }
        let anchor = match self.rooms.timeline_event(&self.room_id, at.0)? {
            Some(id) => self.rooms.meta(&id)?.ok_or_else(|| Error::internal("no metadata for a timeline event"))?,
            None => return Err(Error::internal("backfill before an unknown timeline position")),
        };
        let store = &self.rooms.store;
        let count = kept.len() as u64;
        for (index, signed) in kept.iter().enumerate() {
            let order = at.1.checked_sub(count - index as u64).ok_or_else(|| Error::internal("backfill orders exhausted"))?;
            // Its state is not known; the anchor's state before stands in for visibility checks.
            let meta = EventMeta { pos: at.0, state_before: anchor.state_before, state_after: anchor.state_before, replaces_state: None, txn: None, redacted_by: None };
            self.batch.put(tables::PDUS, signed.pdu.event_id.as_bytes(), &signed.to_bytes());
            self.batch.put_json(tables::EVENT_META, signed.pdu.event_id.as_bytes(), &meta)?;
            self.batch.put(tables::BACKFILL, &Key::new().str(self.room_id.as_str()).u64(at.0).u64(order).into_vec(), signed.pdu.event_id.as_bytes());
            for indexer in &self.rooms.fanout().indexers {
                indexer.stage_backfilled(store, &mut self.batch, &signed.pdu)?;
            }
        }
        Ok(kept.len())
    }

    /// Keeps an event other events refer to (an auth event fetched from another server) without
    /// making it part of the timeline or the state.
    /// It must pass the checks on its own auth events (which must be known).
    pub fn add_outlier(&mut self, signed: &SignedPdu) -> Result<()> {
        if self.has_event(&signed.pdu.event_id)? {
            return Ok(());
        }
        let rules = self.rules.clone().ok_or_else(|| Error::not_found("unknown room"))?;
        self.check_auth_events(&signed.pdu, &rules)?;
        let snapshot = self.record.as_ref().ok_or_else(|| Error::not_found("unknown room"))?.snapshot;
        self.stage_outlier(signed, snapshot)
    }

    fn stage_outlier(&mut self, signed: &SignedPdu, snapshot: u64) -> Result<()> {
        let store = &self.rooms.store;
        let ticket = store.streams().allocate(store)?;
        let meta = EventMeta { pos: ticket.pos(), state_before: snapshot, state_after: snapshot, replaces_state: None, txn: None, redacted_by: None };
        self.batch.put(tables::PDUS, signed.pdu.event_id.as_bytes(), &signed.to_bytes());
        self.batch.put_json(tables::EVENT_META, signed.pdu.event_id.as_bytes(), &meta)?;
        self.staged_events.insert(signed.pdu.event_id.clone(), signed.pdu.clone());
        self.tickets.push(ticket);
        Ok(())
    }

    /// The state before `pdu` in its own branch: the state after its prev event, or the
    /// resolution of the states after its prev events.
    fn state_before(&self, pdu: &Pdu, rules: &RoomVersionRules) -> Result<state::StateMap> {
        let mut maps = Vec::new();
        for prev in &pdu.prev_events {
            let meta = self.rooms.meta(prev)?.ok_or_else(|| Error::internal(format!("no metadata for {prev}")))?;
            maps.push((*self.rooms.snapshots.load(&self.rooms.store, meta.state_after)?).clone());
        }
        if maps.len() == 1 {
            return Ok(maps.pop().unwrap_or_default());
        }
        self.resolve(maps, rules)
    }

    /// State resolution (v2, ruma's) of several states of the room.
    fn resolve(&self, maps: Vec<state::StateMap>, rules: &RoomVersionRules) -> Result<state::StateMap> {
        let v2 = rules.state_res.v2_rules().ok_or_else(|| Error::internal("the room version has no state resolution v2"))?;
        let converted: Vec<ruma::state_res::StateMap<OwnedEventId>> = maps
            .iter()
            .map(|map| map.iter().map(|((kind, key), id)| ((StateEventType::from(kind.as_str()), key.clone()), id.clone())).collect())
            .collect();
        let chains = maps.iter().map(|map| self.auth_chain(map.values())).collect();
        let resolved = ruma::state_res::resolve(&rules.authorization, v2, converted.iter(), chains, |id| self.event(id), |conflicted| Some(self.conflicted_state_subgraph(conflicted)))
            .map_err(|e| Error::internal(format!("state resolution failed: {e}")))?;
        Ok(resolved.into_iter().map(|((kind, key), id)| ((kind.to_string(), key), id)).collect())
    }

    /// State resolution v2.1's conflicted state subgraph: the conflicted events and every event
    /// on an auth-event path between two of them (an ancestor of one and a descendant of another).
    fn conflicted_state_subgraph(&self, conflicted: &ruma::state_res::StateMap<Vec<OwnedEventId>>) -> ruma::state_res::utils::event_id_set::EventIdSet<OwnedEventId> {
        let conflicted: std::collections::HashSet<OwnedEventId> = conflicted.values().flatten().cloned().collect();
        // The ancestors of the conflicted events, and for each the events it authorizes.
        let mut authorizes: HashMap<OwnedEventId, Vec<OwnedEventId>> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut todo: Vec<OwnedEventId> = conflicted.iter().cloned().collect();
        while let Some(id) = todo.pop() {
            let Some(event) = self.event(&id) else { continue };
            for auth in event.auth_events {
                authorizes.entry(auth.clone()).or_default().push(id.clone());
                if seen.insert(auth.clone()) {
                    todo.push(auth);
                }
            }
        }
        // Walk down from the conflicted events, staying among those ancestors.
        let mut subgraph = conflicted.clone();
        let mut todo: Vec<OwnedEventId> = conflicted.into_iter().collect();
        while let Some(id) = todo.pop() {
            for child in authorizes.get(&id).into_iter().flatten() {
                if subgraph.insert(child.clone()) {
                    todo.push(child.clone());
                }
            }
        }
        subgraph.into_iter().collect()
    }

    /// Every event in the auth chains of `events`.
    fn auth_chain<'e>(&self, events: impl Iterator<Item = &'e OwnedEventId>) -> ruma::state_res::utils::event_id_set::EventIdSet<OwnedEventId> {
        let mut chain = std::collections::HashSet::new();
        let mut todo: Vec<OwnedEventId> = events.cloned().collect();
        while let Some(id) = todo.pop() {
            if let Some(event) = self.event(&id) {
                for auth in event.auth_events {
                    if chain.insert(auth.clone()) {
                        todo.push(auth);
                    }
                }
            }
        }
        chain.into_iter().collect()
    }

    /// Makes `resolved` the room's current state: a snapshot holding it, and the current-state
    /// and membership indexes changed where they differ.
    /// `snapshot` is the state of the room's snapshot now (staged, so not readable from the store).
    fn apply_state(&mut self, resolved: state::StateMap, snapshot: &state::StateMap) -> Result<()> {
        let mut record = self.record.clone().ok_or_else(|| Error::not_found("unknown room"))?;
        let store = &self.rooms.store;
        let snapshot_changes: Vec<(state::StateKey, OwnedEventId)> = resolved.iter().filter(|(key, id)| snapshot.get(*key) != Some(*id)).map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut index_changes = Vec::new();
        for ((kind, key), id) in &resolved {
            if self.state_event(kind, key)?.map(|pdu| pdu.event_id).as_ref() != Some(id) {
                index_changes.push(((kind.clone(), key.clone()), id.clone()));
            }
        }
        if snapshot_changes.is_empty() && index_changes.is_empty() {
            return Ok(());
        }
        let ticket = store.streams().allocate(store)?;
        let pos = ticket.pos();
        // A new snapshot even when only the current-state index changes: a snapshot names one
        // state, and what is derived from the state is kept by it (the push context).
        let generation = self.rooms.snapshots.write_entries(store, &mut self.batch, record.snapshot, pos, snapshot_changes, &self.snapshot_generations)?;
        self.snapshot_generations.insert(pos, generation);
        state::index_snapshot(&mut self.batch, &self.room_id, pos);
        record.snapshot = pos;
        for ((kind, state_key), event_id) in index_changes {
            let Some(pdu) = self.event(&event_id) else { continue };
            self.batch.put(tables::ROOM_STATE, &state::state_key(self.room_id.as_str(), &kind, &state_key), event_id.as_bytes());
            if pdu.kind == TimelineEventType::RoomMember {
                self.index_membership(&pdu, pos)?;
            }
            self.staged_state.insert((kind, state_key), pdu);
        }
        self.batch.put_json(tables::ROOMS, self.room_id.as_bytes(), &record)?;
        self.record = Some(record);
        self.tickets.push(ticket);
        Ok(())
    }

    /// Stages an event of a room's state received when joining it over federation (its
    /// signatures checked by the caller; the resident server vouched for it as state). It does
    /// not become a forward extremity.
    pub fn import(&mut self, signed: SignedPdu) -> Result<()> {
        let record = self.record.clone().ok_or_else(|| Error::not_found("unknown room"))?;
        let rules = self.rules.clone().ok_or_else(|| Error::not_found("unknown room"))?;
        if self.has_event(&signed.pdu.event_id)? {
            return Ok(());
        }
        let extremities = record.extremities.clone();
        self.stage(signed, record, &rules, None)?;
        if let Some(record) = self.record.as_mut() {
            record.extremities = extremities;
        }
        Ok(())
    }

    /// Whether the event is already in the room (an invite kept for a room this server was not
    /// in yet has no place in it).
    fn has_event(&self, event_id: &ruma::EventId) -> Result<bool> {
        Ok(self.staged_events.contains_key(event_id) || self.rooms.meta(event_id)?.is_some())
    }

    /// The event ids of the room's current state, staged events included.
    pub fn current_state_ids(&self) -> Result<Vec<OwnedEventId>> {
        let mut state: HashMap<(String, String), OwnedEventId> = self
            .rooms
            .current_state(&self.room_id)?
            .into_iter()
            .filter_map(|pdu| Some(((pdu.kind.to_string(), pdu.state_key.clone()?), pdu.event_id)))
            .collect();
        for (key, pdu) in &self.staged_state {
            state.insert(key.clone(), pdu.event_id.clone());
        }
        Ok(state.into_values().collect())
    }

    fn index_membership(&mut self, pdu: &Pdu, pos: u64) -> Result<()> {
        let user: OwnedUserId = pdu
            .state_key
            .as_deref()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| Error::bad_json("m.room.member state_key must be a user id"))?;
        let membership = Membership::of(&pdu.content_json()).ok_or_else(|| Error::bad_json("unknown membership"))?;
        let previous = match self.staged_members.get(&user) {
            Some(membership) => Some(*membership),
            None => self.rooms.membership(&self.room_id, &user)?,
        };
        self.staged_audit.push(membership_audit(pdu, &user, previous, membership));
        let room = self.room_id.as_str();
        self.batch.put_json(tables::ROOM_MEMBERS,
            &Key::new().str(room).str(user.as_str()).into_vec(),
            &membership,
        )?;
        self.batch.put_json(tables::USER_ROOMS,
            &Key::new().str(user.as_str()).str(room).into_vec(),
            &UserRoom { membership, event_id: pdu.event_id.clone(), pos, forgotten: false },
        )?;
        self.staged_members.insert(user, membership);
        Ok(())
    }

    /// Stages the stripping of `target`; true when it is one of the room's current state events.
    fn apply_redaction(&mut self, target: &ruma::EventId, redaction: &Pdu, rules: &RoomVersionRules) -> Result<bool> {
        let store = &self.rooms.store;
        let Some(stored) = store.get(tables::PDUS, target.as_bytes())? else {
            // Redactions of unknown events are kept; there is nothing to strip.
            return Ok(false);
        };
        let Some(mut meta) = self.rooms.meta(target)? else { return Ok(false) };
        let original = Pdu::from_stored(&stored)?;
        if original.room_id != self.room_id {
            return Err(Error::bad_json("cannot redact an event of another room"));
        }
        let redacted = redact_stored(&stored, rules, redaction)?;
        meta.redacted_by = Some(redaction.event_id.clone());
        // From here on this writer reads the event as redacted (the indexers of the redaction
        // itself included), never as it was.
        let stripped = Pdu::from_stored(&redacted)?;
        let current = match &original.state_key {
            Some(state_key) if self.state_event(&original.kind.to_string(), state_key)?.is_some_and(|pdu| pdu.event_id == target) => {
                self.staged_state.insert((original.kind.to_string(), state_key.clone()), stripped.clone());
                true
            }
            _ => false,
        };
        self.staged_events.insert(target.to_owned(), stripped);
        *lock(&self.reads) = StoredReads::private();
        // A redacted event no longer relates to anything and no longer matches searches.
        relations::unstage(&mut self.batch, &original, meta.pos);
        for indexer in &self.rooms.fanout().indexers {
            indexer.unstage(store, &mut self.batch, &original, meta.pos);
        }
        self.batch.put(tables::PDUS, target.as_bytes(), &redacted);
        // Every node forgets the event as it was.
        self.batch.announce(tables::PDUS, target.as_bytes());
        self.batch.put_json(tables::EVENT_META, target.as_bytes(), &meta)?;
        Ok(current)
    }

    /// The writer's batch, for records of other modules that belong with these events.
    pub fn batch(&mut self) -> &mut Batch {
        &mut self.batch
    }

    /// Adds an audit entry to be chained and written with this writer's batch.
    pub fn audit(&mut self, record: AuditRecord) {
        self.staged_audit.push(record);
    }

    /// Makes `batch` land only if no other node wrote to the room since this writer opened it.
    /// The writer's hold keeps them out; this keeps the room's history linear even if the hold
    /// ended early (its connection broke).
    pub fn condition(&self, batch: &mut Batch) {
        batch.expect(tables::ROOMS, self.room_id.as_bytes(), self.record_read.as_deref());
    }

    /// Commits this writer and `others` (writers of other rooms) in one atomic write: a
    /// session room and its breakout rooms change together or not at all.
    pub fn commit_with(mut self, others: Vec<RoomWriter<'_>>) -> Result<super::Committed> {
        // The other rooms stay locked until their events are written.
        let mut locks = Vec::with_capacity(others.len());
        for mut other in others {
            if !other.batch.is_empty() {
                let mut batch = std::mem::take(&mut other.batch);
                other.condition(&mut batch);
                self.batch.append(batch);
            }
            self.tickets.extend(other.tickets);
            self.staged_deliveries.extend(other.staged_deliveries);
            self.staged_audit.extend(other.staged_audit);
            self.staged_latest.extend(other.staged_latest);
            self.staged_order.extend(other.staged_order);
            locks.push((other._guard, other.claims));
        }
        let written = self.commit();
        drop(locks);
        written
    }

    /// Persists every staged event in one durable batch, then lets readers see them; what the
    /// after-commit hooks leave to do is returned (it runs in the background unless awaited).
    pub fn commit(self) -> Result<super::Committed> {
        let rooms = self.rooms;
        let events = self.persist()?;
        Ok(super::after_commit::run(&rooms.fanout().after_commit, &events))
    }

    /// Commits as [`Self::commit`] does, with each event's after-commit work apart (in the order
    /// the events were staged), for senders who each await their own.
    pub(super) fn commit_each(self) -> Result<Vec<super::Committed>> {
        let rooms = self.rooms;
        let events = self.persist()?;
        Ok(events.iter().map(|event| super::after_commit::run(&rooms.fanout().after_commit, std::slice::from_ref(event))).collect())
    }

    /// Writes the batch, lets readers see it and unlocks the room; the events committed, in order.
    fn persist(mut self) -> Result<Vec<Pdu>> {
        if self.broken {
            return Err(Error::internal("an event was staged halfway; the write was not made"));
        }
        if self.batch.is_empty() && self.staged_audit.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = std::mem::take(&mut self.batch);
        self.condition(&mut batch);
        let store = &self.rooms.store;
        if self.staged_audit.is_empty() {
            tokio::task::block_in_place(|| store.write(batch))?;
        } else {
            self.rooms.audit.write_with(store, batch, self.staged_audit)?;
        }
        self.rooms.note_latest(&self.staged_latest);
        // Finishing the tickets advances the stream watermark and wakes /sync.
        crate::store::StreamTicket::finish_all(self.tickets);
        // The room unlocks before the deliveries (they read each recipient's pushers) and the
        // hooks run: their follow-ups may write to it.
        drop(self._guard);
        for delivery in self.staged_deliveries {
            delivery(self.rooms);
        }
        Ok(self.staged_order)
    }
}

#[cfg(test)]
mod tests {
    use ruma::{OwnedUserId, owned_user_id, server_name};
    use serde_json::json;

    use crate::{
        events::{PduBuilder, PduPlacement, ServerSigningKey, SignedPdu, build_pdu},
        rooms::Rooms,
    };

    /// An event of the remote server's user, with the auth events the test chooses.
    fn remote_event(rooms: &Rooms, room: &ruma::RoomId, key: &ServerSigningKey, sender: &OwnedUserId, builder: PduBuilder, auth_events: Vec<ruma::OwnedEventId>) -> SignedPdu {
        let record = rooms.room(room).unwrap().unwrap();
        let rules = rooms.rules(room).unwrap();
        let placement = PduPlacement { room_id: room, sender, prev_events: record.extremities, auth_events, depth: record.depth + 1, rules: &rules };
        build_pdu(builder, placement, key).unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn writers_on_two_nodes_keep_one_linear_history() {
        let url = limbic_test_postgres::TempPostgres::shared().new_database("room_writers");
        let dir = tempfile::tempdir().unwrap();
        let [a, b] = <[_; 2]>::try_from(crate::test_nodes(&url, dir.path(), &["a", "b"])).ok().unwrap();
        let alice = owned_user_id!("@alice:test.local");
        let events = [PduBuilder::state("m.room.create", "", json!({})), PduBuilder::state("m.room.member", alice.as_str(), json!({ "membership": "join" }))];
        let writer = a.new_room(ruma::RoomVersionId::V12, &alice, events).await.unwrap();
        let room = writer.room_id().clone();
        writer.commit().unwrap();
        let senders: Vec<_> = [a.clone(), b.clone(), a.clone(), b.clone()]
            .into_iter()
            .enumerate()
            .map(|(sender, rooms)| {
                let (room, alice) = (room.clone(), alice.clone());
                tokio::spawn(async move {
                    for i in 0..10 {
                        let mut writer = rooms.writer(&room).await.unwrap();
                        writer.append(&alice, PduBuilder::message("m.room.message", json!({ "msgtype": "m.text", "body": format!("{sender}.{i}") })), None).unwrap();
                        writer.commit().unwrap();
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.await.unwrap();
        }
        // Either node reads the same history: each event follows the one before it, and only it.
        let history = |rooms: &Rooms| {
            let mut ids: Vec<_> = rooms.timeline_before(&room, u64::MAX).map(|item| item.unwrap().1).collect();
            ids.reverse();
            ids
        };
        let ids = history(&b);
        assert_eq!(ids.len(), 2 + 40, "every write landed");
        assert_eq!(ids, history(&a));
        for pair in ids.windows(2) {
            let later = b.pdu(&pair[1]).unwrap().unwrap();
            assert_eq!(later.prev_events, vec![pair[0].clone()], "one linear history");
        }
        assert_eq!(b.room(&room).unwrap().unwrap().extremities, vec![ids[41].clone()]);
    }

    /// A public room (v12) that alice created and mallory, of another server, joined: alice, the
    /// room, the other server's key, mallory and her join.
    async fn public_room_mallory_joined(rooms: &Rooms) -> (OwnedUserId, ruma::OwnedRoomId, ServerSigningKey, OwnedUserId, ruma::OwnedEventId) {
        let alice = owned_user_id!("@alice:test.local");
        let events = [
            PduBuilder::state("m.room.create", "", json!({})),
            PduBuilder::state("m.room.member", alice.as_str(), json!({ "membership": "join" })),
            PduBuilder::state("m.room.join_rules", "", json!({ "join_rule": "public" })),
        ];
        let writer = rooms.new_room(ruma::RoomVersionId::V12, &alice, events).await.unwrap();
        let room = writer.room_id().clone();
        writer.commit().unwrap();
        let remote = ServerSigningKey::generate(server_name!("remote.test").to_owned());
        let mallory = owned_user_id!("@mallory:remote.test");
        // The join rules it cites allow mallory's join.
        let join_rules = rooms.state_event(&room, "m.room.join_rules", "").unwrap().unwrap().event_id;
        let join = remote_event(rooms, &room, &remote, &mallory, PduBuilder::state("m.room.member", mallory.as_str(), json!({ "membership": "join" })), vec![join_rules]);
        let join = append_remote(rooms, &room, join).await.unwrap().event_id;
        (alice, room, remote, mallory, join)
    }

    /// Appends and commits another server's event.
    async fn append_remote(rooms: &Rooms, room: &ruma::RoomId, signed: SignedPdu) -> crate::error::Result<crate::events::Pdu> {
        let mut writer = rooms.writer(room).await.unwrap();
        writer.append_remote(signed).and_then(|pdu| writer.commit().map(|_| pdu))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_purge_takes_the_snapshots_of_a_rooms_forks_and_resolutions() {
        let dir = tempfile::tempdir().unwrap();
        let rooms = crate::test_rooms(dir.path());
        let (alice, room, remote, mallory, join) = public_room_mallory_joined(&rooms).await;
        let state_id = |kind: &str, key: &str| rooms.state_event(&room, kind, key).unwrap().unwrap().event_id;
        let append = |signed: SignedPdu| append_remote(&rooms, &room, signed);
        let mut writer = rooms.writer(&room).await.unwrap();
        writer.append(&alice, PduBuilder::message("m.room.message", json!({ "msgtype": "m.text", "body": "hi" })), None).unwrap();
        writer.commit().unwrap();

        // Mallory takes a name on a branch that has not seen alice's message: the event's
        // branch state and the resolution of the two branches are snapshots of their own.
        let record = rooms.room(&room).unwrap().unwrap();
        let rules = rooms.rules(&room).unwrap();
        let auth = vec![state_id("m.room.join_rules", ""), state_id("m.room.member", mallory.as_str())];
        let placement = PduPlacement { room_id: &room, sender: &mallory, prev_events: vec![join], auth_events: auth, depth: record.depth + 1, rules: &rules };
        let named = PduBuilder::state("m.room.member", mallory.as_str(), json!({ "membership": "join", "displayname": "Mal" }));
        append(build_pdu(named, placement, &remote).unwrap()).await.unwrap();
        assert_eq!(rooms.room(&room).unwrap().unwrap().extremities.len(), 2, "a fork");
        let left = |table| rooms.store().scan_prefix(table, Vec::new(), false).count();
        assert!(left(crate::store::tables::ROOM_SNAPSHOTS) >= 1, "the branch's snapshot is filed under the room");

        rooms.purge(&room).await.unwrap();
        assert_eq!(left(crate::store::tables::STATE_SNAPSHOTS), 0, "a snapshot outlived its room");
        assert_eq!(left(crate::store::tables::ROOM_SNAPSHOTS), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_remote_event_is_checked_against_its_own_auth_events() {
        let dir = tempfile::tempdir().unwrap();
        let rooms = crate::test_rooms(dir.path());
        let (_, room, remote, mallory, _) = public_room_mallory_joined(&rooms).await;
        let state_id = |kind: &str, key: &str| rooms.state_event(&room, kind, key).unwrap().unwrap().event_id;
        let append = |signed: SignedPdu| append_remote(&rooms, &room, signed);
        let message = || PduBuilder::message("m.room.message", json!({ "msgtype": "m.text", "body": "hi" }));

        // Current state would allow this message; its auth events (no membership of mallory) do not.
        let uncited = remote_event(&rooms, &room, &remote, &mallory, message(), vec![]);
        let error = append(uncited).await.unwrap_err();
        assert!(error.to_string().contains("by its auth events"), "{error}");
        // An auth event nobody has is refused too.
        let bogus: ruma::OwnedEventId = "$notanevent".try_into().unwrap();
        let error = append(remote_event(&rooms, &room, &remote, &mallory, message(), vec![bogus])).await.unwrap_err();
        assert!(error.to_string().contains("auth event"), "{error}");
        // With the right auth events it is accepted.
        let cited = remote_event(&rooms, &room, &remote, &mallory, message(), vec![state_id("m.room.member", mallory.as_str())]);
        let id = append(cited).await.unwrap().event_id;
        assert!(rooms.pdu(&id).unwrap().is_some());
    }
}
