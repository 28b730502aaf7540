//! Room EDUs: typing notifications (in memory, they expire) and receipts (persisted).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};

use super::Rooms;
use crate::{
    error::Result,
    store::{Key, KeyReader, StreamPos, tables},
};

#[derive(Default)]
pub struct Typing {
    rooms: Mutex<HashMap<OwnedRoomId, RoomTyping>>,
}

#[derive(Default)]
struct RoomTyping {
    users: HashMap<OwnedUserId, Instant>,
    /// Stream position of the last change.
    pos: StreamPos,
}

impl Typing {
    /// Users typing in the room now and the position of the last change.
    pub fn typing(&self, room_id: &RoomId) -> (Vec<OwnedUserId>, StreamPos) {
        let rooms = self.rooms.lock().expect("typing lock");
        match rooms.get(room_id) {
            Some(room) => {
                let now = Instant::now();
                let users = room.users.iter().filter(|(_, until)| **until > now).map(|(u, _)| u.clone()).collect();
                (users, room.pos)
            }
            None => (Vec::new(), 0),
        }
    }

    fn update(&self, room_id: &RoomId, pos: StreamPos, change: impl FnOnce(&mut HashMap<OwnedUserId, Instant>)) {
        let mut rooms = self.rooms.lock().expect("typing lock");
        let room = rooms.entry(room_id.to_owned()).or_default();
        change(&mut room.users);
        room.pos = pos;
    }

    /// Drops expired entries, returning the rooms that changed so their syncs can be woken.
    fn expire(&self) -> Vec<OwnedRoomId> {
        let now = Instant::now();
        let mut rooms = self.rooms.lock().expect("typing lock");
        let mut changed = Vec::new();
        for (room_id, room) in rooms.iter_mut() {
            let before = room.users.len();
            room.users.retain(|_, until| *until > now);
            if room.users.len() != before {
                changed.push(room_id.clone());
            }
        }
        rooms.retain(|_, room| !room.users.is_empty() || room.pos > 0);
        changed
    }
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
    pub fn set_typing(&self, room_id: &RoomId, user_id: &UserId, typing: Option<Duration>) -> Result<()> {
        let ticket = self.store.streams().allocate(&self.store)?;
        let edu = serde_json::json!({ "edu_type": "m.typing", "content": { "room_id": room_id, "user_id": user_id, "typing": typing.is_some() } });
        let mut batch = self.store.batch();
        if self.stage_edu(&mut batch, room_id, user_id, ticket.pos(), &edu)? {
            tokio::task::block_in_place(|| self.store.write(batch))?;
        }
        self.typing.update(room_id, ticket.pos(), |users| match typing {
            Some(timeout) => {
                users.insert(user_id.to_owned(), Instant::now() + timeout);
            }
            None => {
                users.remove(user_id);
            }
        });
        Ok(())
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

    /// Expires typing notifications; called periodically.
    pub fn expire_typing(&self) -> Result<()> {
        for room_id in self.typing.expire() {
            let ticket = self.store.streams().allocate(&self.store)?;
            self.typing.update(&room_id, ticket.pos(), |_| {});
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
