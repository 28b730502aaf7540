//! What server administration needs from the room tables: every room, blocking a room, taking
//! it out of the directory, and purging everything stored about it.

use ruma::{EventId, OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomId, UserId};

use super::{Rooms, relations};
use crate::{
    error::{Error, Result},
    events::Pdu,
    store::{Batch, Key, Store, StreamPos, Table, tables},
};

impl Rooms {
    /// Every room this server knows, in room id order.
    pub fn room_ids(&self) -> Result<Vec<OwnedRoomId>> {
        self.store
            .scan_prefix(tables::ROOMS, Vec::new(), false)
            .map(|item| {
                let (key, _) = item?;
                OwnedRoomId::try_from(String::from_utf8_lossy(&key).into_owned())
                    .map_err(|_| Error::internal("corrupt room id in key"))
            })
            .collect()
    }

    /// The server admin who blocked the room, if it is blocked.
    pub fn blocked_by(&self, room_id: &RoomId) -> Result<Option<OwnedUserId>> {
        Ok(self
            .store
            .get(tables::BLOCKED_ROOMS, room_id.as_bytes())?
            .and_then(|user| String::from_utf8(user).ok())
            .and_then(|user| user.try_into().ok()))
    }

    /// Blocks the room for `by`, or unblocks it. Nobody may join, knock on or be invited to a
    /// blocked room; the block outlives a purge.
    pub fn set_blocked(&self, room_id: &RoomId, by: Option<&UserId>) -> Result<()> {
        let mut batch = self.store.batch();
        match by {
            Some(admin) => batch.put(tables::BLOCKED_ROOMS, room_id.as_bytes(), admin.as_bytes()),
            None => batch.delete(tables::BLOCKED_ROOMS, room_id.as_bytes()),
        }
        self.store.write(batch)?;
        Ok(())
    }

    /// Takes the room out of the public directory and drops its local aliases; returns them.
    pub fn unlist(&self, room_id: &RoomId) -> Result<Vec<OwnedRoomAliasId>> {
        let mut batch = self.store.batch();
        let aliases = self.stage_unlisting(&mut batch, room_id)?;
        self.store.write(batch)?;
        Ok(aliases)
    }

    fn stage_unlisting(&self, batch: &mut Batch, room_id: &RoomId) -> Result<Vec<OwnedRoomAliasId>> {
        let aliases = self.local_aliases(room_id)?;
        for alias in &aliases {
            batch.delete(tables::ALIASES, alias.as_bytes());
            batch.delete(tables::ALIASES, &Key::new().str("owner").str(alias.as_str()).into_vec());
        }
        batch.delete(tables::PUBLIC_ROOMS, room_id.as_bytes());
        Ok(aliases)
    }

    /// Deletes everything stored about the room in one batch: its events with their metadata,
    /// relation and search entries and transaction ids, the timeline, state and snapshots (its
    /// events' and those of its forks and state resolutions),
    /// memberships on both sides, receipts, aliases and directory entry. Returns the aliases.
    pub async fn purge(&self, room_id: &RoomId) -> Result<Vec<OwnedRoomAliasId>> {
        // The writer holds the room's lock: no event lands while the batch is built.
        let writer = self.writer(room_id).await?;
        if !writer.exists() {
            return Err(Error::not_found("unknown room"));
        }
        let store = &*self.store;
        let mut batch = store.batch();
        let room_prefix = Key::new().str(room_id.as_str()).into_vec();
        for item in self.history_after(room_id, (0, super::TIMELINE_ORDER), StreamPos::MAX) {
            let ((pos, _), event_id) = item?;
            let pdu = self.pdu(&event_id)?;
            self.stage_event_removal(&mut batch, room_id, pos, &event_id, pdu.as_ref(), Removal::RoomPurged)?;
        }
        let members: Vec<OwnedUserId> = self.members(room_id)?.into_iter().map(|(user_id, _)| user_id).collect();
        for user_id in &members {
            batch.delete(tables::USER_ROOMS, &Key::new().str(user_id.as_str()).str(room_id.as_str()).into_vec());
        }
        for indexer in &self.fanout().indexers {
            indexer.room_removed(store, &mut batch, room_id, &members)?;
        }
        super::state::stage_indexed_removal(store, &mut batch, room_id)?;
        for table in [tables::ROOM_STATE, tables::ROOM_MEMBERS, tables::RECEIPTS, tables::TYPING, tables::TYPING_ACTIVE, tables::BACKFILL] {
            stage_prefix_removal(store, &mut batch, table, &room_prefix)?;
        }
        let aliases = self.stage_unlisting(&mut batch, room_id)?;
        batch.delete(tables::ROOMS, room_id.as_bytes());
        writer.condition(&mut batch);
        tokio::task::block_in_place(|| store.write(batch))?;
        drop(writer);
        Ok(aliases)
    }

    /// Stages the removal of one event from every table that holds or indexes it: the timeline
    /// entry, PDU, metadata, relation and search entries and transaction id, and with the whole
    /// room its state snapshot.
    pub(super) fn stage_event_removal(
        &self,
        batch: &mut Batch,
        room_id: &RoomId,
        pos: StreamPos,
        event_id: &EventId,
        pdu: Option<&Pdu>,
        removal: Removal,
    ) -> Result<()> {
        let store = &*self.store;
        batch.delete(tables::TIMELINE, &Key::new().str(room_id.as_str()).u64(pos).into_vec());
        if let Some(pdu) = pdu {
            relations::unstage(batch, pdu, pos);
            for indexer in &self.fanout().indexers {
                indexer.unstage(store, batch, pdu, pos);
            }
            let meta = self.meta(event_id)?;
            // Each state event started the snapshot named by its position, and so did each
            // redaction of a current state event. Later snapshots are built on it: it goes only
            // with the room.
            if removal == Removal::RoomPurged && (pdu.is_state() || meta.as_ref().is_some_and(|meta| meta.state_after == pos)) {
                batch.delete(tables::STATE_SNAPSHOTS, &pos.to_be_bytes());
            }
            if let Some(txn) = meta.and_then(|meta| meta.txn) {
                batch.delete(tables::TXN_IDS, &super::txn_key(&pdu.sender, &txn));
            }
        }
        batch.delete(tables::PDUS, event_id.as_bytes());
        batch.announce(tables::PDUS, event_id.as_bytes());
        batch.delete(tables::EVENT_META, event_id.as_bytes());
        Ok(())
    }
}

/// Why an event is removed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Removal {
    /// Alone, its time over (retention): the room's state stays whole.
    Expired,
    /// With its whole room.
    RoomPurged,
}

fn stage_prefix_removal(store: &Store, batch: &mut Batch, table: Table, prefix: &[u8]) -> Result<()> {
    for item in store.scan_prefix(table, prefix.to_vec(), false) {
        batch.delete(table, &item?.0);
    }
    Ok(())
}
