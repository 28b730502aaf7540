//! What the room pipeline fans out to, registered at start-up behind small traits: policies that
//! may refuse an event, indexers that stage what their concern keeps about it into the event's
//! own batch, and after-commit hooks. The pipeline names none of them; `Server::open` wires
//! them, in the order they run.

use std::{collections::HashMap, sync::Arc};

use ruma::{OwnedUserId, RoomId, UserId, room_version_rules::RoomVersionRules};

use super::{AfterCommit, Membership, Rooms};
use crate::{
    audit::AuditRecord,
    error::Result,
    events::{Pdu, PduBuilder},
    store::{Batch, Store, StreamPos},
};

/// A room as its writer sees it: the stored state with the staged events over it.
pub trait RoomView {
    fn room_id(&self) -> &RoomId;
    /// The other rooms' committed state (e.g. for double-booking checks).
    fn rooms(&self) -> &Rooms;
    fn state(&self, kind: &str, state_key: &str) -> Result<Option<Pdu>>;
    /// Every (state key, event) of a state type.
    fn state_of_type(&self, kind: &str) -> Result<Vec<(String, Pdu)>>;
    /// Every membership, staged ones included.
    fn members(&self) -> Result<HashMap<OwnedUserId, Membership>>;
    fn rules(&self) -> Result<&RoomVersionRules>;
    /// Claims `name` (a therapist's bookings, say: what checks across rooms read) until the
    /// writer commits, so that no other writer, of this process or another node, checks against
    /// it meanwhile; false if another writer has it now (the caller refuses, to be tried again).
    fn claim(&self, name: &str) -> Result<bool>;
}

/// Rules beyond the room version's that an event must pass.
pub trait Policy: Send + Sync {
    /// Before a local event is built; may take fields out of its content that must never be
    /// stored (a passcode, checked here).
    fn prepare(&self, _room: &dyn RoomView, _sender: &UserId, _builder: &mut PduBuilder) -> Result<()> {
        Ok(())
    }

    /// Before another server's event is checked further.
    fn prepare_remote(&self, _room: &dyn RoomView, _pdu: &Pdu) -> Result<()> {
        Ok(())
    }

    /// After the room version's auth rules allowed the event.
    fn authorize(&self, room: &dyn RoomView, pdu: &Pdu) -> Result<()>;

    /// Whether someone outside the room could knock on it now as far as this policy is
    /// concerned (a room summary shows a waiting room only then).
    fn open_to_knocks(&self, _room_id: &RoomId) -> Result<bool> {
        Ok(true)
    }
}

/// An event being staged, after its own state is staged.
pub struct StagedEvent<'a> {
    pub pdu: &'a Pdu,
    pub pos: StreamPos,
    /// The state event it replaces, for a state event.
    pub replaced: Option<&'a Pdu>,
    /// Whether it came from a local user (and is this server's to send to others).
    pub local: bool,
    /// The room's state snapshot with the event: the same for events that change no state, and
    /// never the same for two different states (so what is derived from the state may be kept
    /// by it).
    pub state: StreamPos,
}

/// Work to do once the write is durable, with the room unlocked (e.g. push delivery).
pub type Delivery = Box<dyn FnOnce(&Rooms) + Send>;

/// Where an indexer stages its records: the event's own batch, the write's audit entries, and
/// deliveries that follow the commit.
pub struct Staging<'w> {
    pub(super) store: &'w Store,
    pub(super) batch: &'w mut Batch,
    pub(super) audit: &'w mut Vec<AuditRecord>,
    pub(super) deliveries: &'w mut Vec<Delivery>,
}

impl<'w> Staging<'w> {
    pub fn store(&self) -> &'w Store {
        self.store
    }

    pub fn batch(&mut self) -> &mut Batch {
        self.batch
    }

    pub fn audit(&mut self, record: AuditRecord) {
        self.audit.push(record);
    }

    pub fn after_commit(&mut self, delivery: Delivery) {
        self.deliveries.push(delivery);
    }
}

/// A concern that keeps records about events (search, media references, bookings, outboxes,
/// notification counts), staged into the same atomic write as the event.
pub trait Indexer: Send + Sync {
    /// A new event of the room's timeline (or state imported on a join).
    fn stage(&self, room: &dyn RoomView, event: &StagedEvent<'_>, staging: &mut Staging<'_>) -> Result<()>;

    /// An event went (redacted, expired or removed with its room): what it added goes too.
    fn unstage(&self, _store: &Store, _batch: &mut Batch, _pdu: &Pdu, _pos: StreamPos) {}

    /// History fetched from another server, placed before the timeline.
    fn stage_backfilled(&self, _store: &Store, _batch: &mut Batch, _pdu: &Pdu) -> Result<()> {
        Ok(())
    }

    /// Retention removed an event that `members` could see.
    fn expired(&self, _store: &Store, _batch: &mut Batch, _room_id: &RoomId, _pdu: &Pdu, _pos: StreamPos, _members: &[OwnedUserId]) -> Result<()> {
        Ok(())
    }

    /// An administrator removed the room; `members` were in it.
    fn room_removed(&self, _store: &Store, _batch: &mut Batch, _room_id: &RoomId, _members: &[OwnedUserId]) -> Result<()> {
        Ok(())
    }

    /// The node went idle: what is kept in memory only for speed can go.
    fn rest(&self) {}
}

/// Everything registered, in the order it runs.
#[derive(Default)]
pub struct Fanout {
    pub policies: Vec<Arc<dyn Policy>>,
    pub indexers: Vec<Arc<dyn Indexer>>,
    pub after_commit: Vec<Arc<dyn AfterCommit>>,
}
