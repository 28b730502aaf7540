//! Room EDUs: typing notifications (they expire) and receipts. Both are kept in the store, so
//! that every node sharing it serves the same.

use limbic_core::now_ms;
use std::time::Duration;

use ruma::{OwnedEventId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};

use super::Rooms;
use crate::{
    error::Result,
    store::{Key, KeyReader, StreamPos, tables},
};

/// A user's typing in a room: until when (ms since the epoch), and the stream position of the
/// last change. A user who stopped (or whose typing ran out) keeps an entry that says so, so
/// that the room's last change stays known.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TypingEntry {
    typing: bool,
    until_ms: u64,
    pos: StreamPos,
}


fn typing_key(room_id: &RoomId, user_id: &UserId) -> Vec<u8> {
    Key::new().str(room_id.as_str()).str(user_id.as_str()).into_vec()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Receipt {
    pub event_id: OwnedEventId,
    pub ts: u64,
    pub pos: StreamPos,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
}

impl Rooms {
    /// Starts (for `typing`) or stops a user's typing in the room.
    pub fn set_typing(&self, room_id: &RoomId, user_id: &UserId, typing: Option<Duration>) -> Result<()> {
        let ticket = self.store.streams().allocate(&self.store)?;
        let edu = serde_json::json!({ "edu_type": "m.typing", "content": { "room_id": room_id, "user_id": user_id, "typing": typing.is_some() } });
        let mut batch = self.store.batch();
        let federated = self.stage_edu(&mut batch, room_id, user_id, ticket.pos(), &edu)?;
        let key = typing_key(room_id, user_id);
        let entry = match typing {
            Some(timeout) => {
                let until_ms = now_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
                batch.put(tables::TYPING_ACTIVE, &key, &until_ms.to_be_bytes());
                TypingEntry { typing: true, until_ms, pos: ticket.pos() }
            }
            None => {
                batch.delete(tables::TYPING_ACTIVE, &key);
                TypingEntry { typing: false, until_ms: now_ms(), pos: ticket.pos() }
            }
        };
        batch.put_json(tables::TYPING, &key, &entry)?;
        // Typing lost in a crash does no harm; an EDU queued for other servers is kept.
        tokio::task::block_in_place(|| if federated { self.store.write(batch) } else { self.store.write_relaxed(batch) })?;
        drop(ticket);
        Ok(())
    }

    /// Users typing in the room now, and the position of the room's last typing change.
    pub fn typing(&self, room_id: &RoomId) -> Result<(Vec<OwnedUserId>, StreamPos)> {
        let now = now_ms();
        let (mut users, mut last) = (Vec::new(), 0);
        for item in self.store.scan_prefix(tables::TYPING, Key::new().str(room_id.as_str()).into_vec(), false) {
            let (key, value) = item?;
            let entry: TypingEntry = crate::store::decode(tables::TYPING, &value)?;
            last = last.max(entry.pos);
            let mut reader = KeyReader::new(&key);
            reader.str();
            if entry.typing && entry.until_ms > now
                && let Some(user) = reader.str().and_then(|user| OwnedUserId::try_from(user).ok())
            {
                users.push(user);
            }
        }
        Ok((users, last))
    }

    /// Queues an EDU about a local user for the other servers in the room; whether any.
    fn stage_edu(&self, batch: &mut crate::store::Batch, room_id: &RoomId, user_id: &UserId, pos: StreamPos, edu: &serde_json::Value) -> Result<bool> {
        let ours = self.key.server_name();
        if !self.federating || user_id.server_name() != ours {
            return Ok(false);
        }
        let servers = self.remote_servers(room_id)?;
        for server in &servers {
            batch.put_json(tables::FEDERATION_EDUS, &Key::new().str(server.as_str()).u64(pos).into_vec(), edu)?;
        }
        Ok(!servers.is_empty())
    }

    /// Ends the typing that ran out, each a change at a new position (which wakes the syncs of
    /// its room); called every second, by one node of those sharing the store.
    pub fn expire_typing(&self) -> Result<()> {
        let now = now_ms();
        let mut expired = Vec::new();
        for item in self.store.scan_prefix(tables::TYPING_ACTIVE, Vec::new(), false) {
            let (key, until) = item?;
            if until.as_ref().try_into().map(u64::from_be_bytes).is_ok_and(|until| until <= now) {
                expired.push((key, until));
            }
        }
        for (key, until) in expired {
            let ticket = self.store.streams().allocate(&self.store)?;
            let mut batch = self.store.batch();
            // A typing renewed meanwhile (through another node) is left running.
            batch.expect(tables::TYPING_ACTIVE, &key, Some(&until));
            batch.delete(tables::TYPING_ACTIVE, &key);
            batch.put_json(tables::TYPING, &key, &TypingEntry { typing: false, until_ms: now, pos: ticket.pos() })?;
            match self.store.write(batch) {
                Ok(()) | Err(crate::store::StoreError::Conflict { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    pub fn set_receipt(
        &self,
        room_id: &RoomId,
        receipt_type: &str,
        user_id: &UserId,
        event_id: OwnedEventId,
        thread_id: Option<String>,
    ) -> Result<()> {
        let store = &self.store;
        let ticket = store.streams().allocate(store)?;
        let receipt = Receipt {
            event_id,
            ts: ruma::MilliSecondsSinceUnixEpoch::now().0.into(),
            pos: ticket.pos(),
            thread_id,
        };
        let key = Key::new().str(room_id.as_str()).str(receipt_type).str(user_id.as_str()).into_vec();
        let mut batch = store.batch();
        batch.put_json(tables::RECEIPTS, &key, &receipt)?;
        if receipt_type == "m.read" {
            let mut data = serde_json::json!({ "ts": receipt.ts });
            if let Some(thread) = &receipt.thread_id {
                data["thread_id"] = serde_json::json!(thread);
            }
            let content = serde_json::json!({ room_id.as_str(): { "m.read": { user_id.as_str(): { "event_ids": [receipt.event_id], "data": data } } } });
            self.stage_edu(&mut batch, room_id, user_id, ticket.pos(), &serde_json::json!({ "edu_type": "m.receipt", "content": content }))?;
        }
        tokio::task::block_in_place(|| store.write(batch))?;
        drop(ticket);
        Ok(())
    }

    /// Receipts in a room changed after `since`: (receipt type, user, receipt).
    pub fn receipts_since(&self, room_id: &RoomId, since: StreamPos) -> Result<Vec<(String, OwnedUserId, Receipt)>> {
        let prefix = Key::new().str(room_id.as_str()).into_vec();
        let mut out = Vec::new();
        for item in self.store.scan_prefix(tables::RECEIPTS, prefix, false) {
            let (key, value) = item?;
            let receipt: Receipt = crate::store::decode(tables::RECEIPTS, &value)?;
            if receipt.pos <= since {
                continue;
            }
            let mut reader = KeyReader::new(&key);
            reader.str();
            let (Some(kind), Some(user)) = (reader.str(), reader.str()) else { continue };
            if let Ok(user) = OwnedUserId::try_from(user) {
                out.push((kind.to_owned(), user, receipt));
            }
        }
        Ok(out)
    }

    pub fn receipt(&self, room_id: &RoomId, receipt_type: &str, user_id: &UserId) -> Result<Option<Receipt>> {
        let key = Key::new().str(room_id.as_str()).str(receipt_type).str(user_id.as_str()).into_vec();
        Ok(self.store.get_json(tables::RECEIPTS, &key)?)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ruma::{owned_room_id, owned_user_id};

    #[tokio::test(flavor = "multi_thread")]
    async fn typing_set_through_one_node_is_seen_and_ends_on_another() {
        let url = limbic_test_postgres::TempPostgres::shared().new_database("typing_nodes");
        let dir = tempfile::tempdir().unwrap();
        let [a, b] = <[_; 2]>::try_from(crate::test_nodes(&url, dir.path(), &["a", "b"])).ok().unwrap();
        let (room, ana, ben) = (owned_room_id!("!r:test.local"), owned_user_id!("@ana:test.local"), owned_user_id!("@ben:test.local"));
        let mut woken = b.store().streams().subscribe();
        woken.mark_unchanged();
        a.set_typing(&room, &ana, Some(Duration::from_secs(30))).unwrap();
        b.set_typing(&room, &ben, Some(Duration::from_millis(300))).unwrap();
        let (typing, started) = b.typing(&room).unwrap();
        assert_eq!(typing, [ana.clone(), ben.clone()], "both, whichever node they typed through");
        assert_eq!(a.typing(&room).unwrap(), (typing, started));
        tokio::time::timeout(Duration::from_secs(5), woken.changed()).await.expect("b's syncs are woken").unwrap();
        // Ben's typing runs out; whichever node expires it, both see the change at a new position.
        tokio::time::sleep(Duration::from_millis(400)).await;
        a.expire_typing().unwrap();
        let (typing, expired) = b.typing(&room).unwrap();
        assert!(typing == [ana.clone()] && expired > started, "{typing:?} {expired} {started}");
        a.set_typing(&room, &ana, None).unwrap();
        let (typing, stopped) = b.typing(&room).unwrap();
        assert!(typing.is_empty() && stopped > expired);
        b.expire_typing().unwrap();
        assert_eq!(a.typing(&room).unwrap(), (Vec::new(), stopped), "nothing left to expire");
    }
}
