//! Group commit: local sends that reach a room while its writer is busy wait in the room's
//! queue, and whichever of them takes the writer next appends every waiting event, in arrival
//! order, and makes them durable in one write. Each event is authorized against the state the
//! ones before it leave, exactly as if it had been committed alone; one refused never stops the
//! others; each sender is answered only once its group's write is durable.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use tokio::sync::oneshot;

use super::{Committed, RoomWriter, Rooms, TxnInfo, pipeline::txn_key};
use crate::{
    error::{Error, Result},
    events::{Pdu, PduBuilder},
    store::{StoreError, tables},
};

/// An event sent, with the after-commit work it leaves (for its sender to await).
pub struct Sent {
    pub pdu: Pdu,
    pub committed: Committed,
}

/// A send waiting for its room's writer.
struct Waiting {
    id: u64,
    sender: OwnedUserId,
    builder: PduBuilder,
    txn: Option<TxnInfo>,
    answer: oneshot::Sender<Result<Sent>>,
}

/// The sends waiting, per room.
#[derive(Default)]
pub(super) struct SendQueues {
    next_id: AtomicU64,
    rooms: Mutex<HashMap<OwnedRoomId, Vec<Waiting>>>,
}

impl SendQueues {
    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<OwnedRoomId, Vec<Waiting>>> {
        self.rooms.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the send `id` is still waiting (no writer has taken it yet).
    fn waiting(&self, room_id: &RoomId, id: u64) -> bool {
        self.rooms().get(room_id).is_some_and(|queue| queue.iter().any(|w| w.id == id))
    }

    /// Every send waiting for the room, oldest first.
    fn take(&self, room_id: &RoomId) -> Vec<Waiting> {
        self.rooms().remove(room_id).unwrap_or_default()
    }
}

/// A send's place in its room's queue, given up if the send is dropped (its client went away)
/// before a writer took it.
struct Queued<'q> {
    queues: &'q SendQueues,
    room_id: &'q RoomId,
    id: u64,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut rooms = self.queues.rooms();
        if let Some(queue) = rooms.get_mut(self.room_id) {
            queue.retain(|w| w.id != self.id);
            if queue.is_empty() {
                rooms.remove(self.room_id);
            }
        }
    }
}

impl Rooms {
    /// Whether [`Self::send`] takes the event: one that changes no state. Not a redaction
    /// either: it changes a stored event (perhaps a state event), which the events after it in
    /// its group would still read as it was.
    pub fn groups(builder: &PduBuilder) -> bool {
        builder.state_key.is_none() && builder.kind != ruma::events::TimelineEventType::RoomRedaction
    }

    /// Appends an event of a local user and commits it, with the other sends that reach the room
    /// while its writer is busy (see the module's comment). The caller awaits the answer's
    /// [`Committed::finish`] when its own answer must reflect the after-commit work.
    pub async fn send(&self, sender: &UserId, room_id: &RoomId, builder: PduBuilder, txn: Option<TxnInfo>) -> Result<Sent> {
        if !Self::groups(&builder) {
            return Err(Error::internal(format!("a {} event is not sent in a group", builder.kind)));
        }
        let (answer, mut answered) = oneshot::channel();
        let id = self.sends.next_id.fetch_add(1, Ordering::Relaxed);
        self.sends.rooms().entry(room_id.to_owned()).or_default().push(Waiting { id, sender: sender.to_owned(), builder, txn, answer });
        let _queued = Queued { queues: &self.sends, room_id, id };
        let lock = self.locks.lock().expect("room locks").get(room_id);
        let guard = tokio::select! {
            biased;
            sent = &mut answered => return sent.unwrap_or_else(|_| Err(Error::internal("the room's writer went away"))),
            guard = lock.lock_owned() => guard,
        };
        // A writer that had the room before took this send with its own: its answer is coming.
        if self.sends.waiting(room_id, id) {
            let hold = self.store.hold(&format!("room {room_id}")).await?;
            let writer = RoomWriter::open(self, room_id.to_owned(), (guard, hold))?;
            self.commit_group(writer, self.sends.take(room_id));
        } else {
            drop(guard);
        }
        answered.await.unwrap_or_else(|_| Err(Error::internal("the room's writer went away")))
    }

    /// Appends the sends, in order, commits those appended in one write, and answers each.
    fn commit_group(&self, mut writer: RoomWriter<'_>, group: Vec<Waiting>) {
        if !writer.exists() {
            for waiting in group {
                let _ = waiting.answer.send(Err(Error::not_found("unknown room")));
            }
            return;
        }
        let mut sent_before = match self.sent_before(&group) {
            Ok(found) => found,
            Err(error) => return fail_all(group.into_iter().map(|w| w.answer), &error),
        };
        let mut appended = Vec::new();
        // Retries of a send made earlier in this group: answered with its event once it is durable.
        let mut retries = Vec::new();
        let mut group = group.into_iter();
        while let Some(waiting) = group.next() {
            let txn_key = waiting.txn.as_ref().map(|txn| txn_key(&waiting.sender, txn));
            // A retry of a send already made (in this group or before) gets the same event.
            if let Some(event_id) = txn_key.as_ref().and_then(|key| sent_before.get(key)) {
                if let Some(pdu) = writer.staged_event(event_id) {
                    retries.push((pdu, waiting.answer));
                    continue;
                }
                let pdu = self.pdu(event_id).and_then(|pdu| pdu.ok_or_else(|| Error::internal("a transaction's event is missing")));
                let _ = waiting.answer.send(pdu.map(|pdu| Sent { pdu, committed: Committed::default() }));
                continue;
            }
            match writer.append(&waiting.sender, waiting.builder, waiting.txn) {
                Ok(pdu) => {
                    if let Some(key) = txn_key {
                        sent_before.insert(key, pdu.event_id.clone());
                    }
                    appended.push((pdu, waiting.answer));
                }
                // The writer is as it was before this event: the others go on.
                Err(refused) if !writer.broken() => drop(waiting.answer.send(Err(refused))),
                // Its staging failed halfway: nothing of the group may be written.
                Err(error) => {
                    let pending = group.map(|w| w.answer).chain(appended.into_iter().chain(retries).map(|(_, answer)| answer));
                    fail_all(pending, &error);
                    let _ = waiting.answer.send(Err(error));
                    return;
                }
            }
        }
        match writer.commit_each() {
            Ok(committed) => {
                for ((pdu, answer), committed) in appended.into_iter().zip(committed) {
                    let _ = answer.send(Ok(Sent { pdu, committed }));
                }
                for (pdu, answer) in retries {
                    let _ = answer.send(Ok(Sent { pdu, committed: Committed::default() }));
                }
            }
            Err(error) => {
                fail_all(appended.into_iter().chain(retries).map(|(_, answer)| answer), &error);
            }
        }
    }

    /// The events the group's transaction ids were already sent as.
    fn sent_before(&self, group: &[Waiting]) -> Result<HashMap<Vec<u8>, OwnedEventId>> {
        let keys: Vec<Vec<u8>> = group.iter().filter_map(|w| w.txn.as_ref().map(|txn| txn_key(&w.sender, txn))).collect();
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let found = self.store.get_many(tables::TXN_IDS, &keys.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
        Ok(keys
            .into_iter()
            .zip(found)
            .filter_map(|(key, id)| Some((key, String::from_utf8(id?).ok()?.try_into().ok()?)))
            .collect())
    }
}

/// The error a group's write failed with, as each of its senders gets it.
fn for_each_sender(error: &Error) -> Error {
    match error {
        Error::Matrix { code, message, status } => Error::with_status(*code, *status, message.clone()),
        // Another node wrote first: nothing was written, and the same send again succeeds.
        Error::Store(StoreError::Conflict { .. } | StoreError::Contention) => Error::Store(StoreError::Contention),
        other => Error::internal(other),
    }
}

/// Answers each of `answers` with the group's failure.
fn fail_all(answers: impl IntoIterator<Item = oneshot::Sender<Result<Sent>>>, error: &Error) {
    for answer in answers {
        let _ = answer.send(Err(for_each_sender(error)));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, OnceLock, Weak};

    use ruma::{OwnedRoomId, OwnedUserId, owned_user_id};
    use serde_json::json;

    use super::super::{AfterCommit, Fanout, FollowUp, Indexer, RoomView, StagedEvent, Staging};
    use crate::{
        error::ErrorCode,
        events::{Pdu, PduBuilder},
        rooms::{Rooms, TxnInfo},
    };

    /// For each message committed, how many events its room's timeline held by then.
    #[derive(Default)]
    struct Witness {
        rooms: OnceLock<Weak<Rooms>>,
        stored: Mutex<Vec<usize>>,
    }

    impl AfterCommit for Witness {
        fn committed(&self, events: &[Pdu]) -> Option<FollowUp> {
            let rooms = self.rooms.get()?.upgrade()?;
            for event in events.iter().filter(|e| e.state_key.is_none()) {
                self.stored.lock().unwrap().push(history(&rooms, &event.room_id).len());
            }
            None
        }
    }

    /// Fails the staging of a message whose body is "breaks", after the event went into the batch.
    struct Breaker;

    impl Indexer for Breaker {
        fn stage(&self, _room: &dyn RoomView, event: &StagedEvent<'_>, _staging: &mut Staging<'_>) -> crate::Result<()> {
            if event.pdu.content_json().get("body").and_then(|b| b.as_str()) == Some("breaks") {
                return Err(crate::Error::internal("the test's indexer failed"));
            }
            Ok(())
        }
    }

    fn message(body: &str) -> PduBuilder {
        PduBuilder::message("m.room.message", json!({ "msgtype": "m.text", "body": body }))
    }

    fn txn(id: &str) -> Option<TxnInfo> {
        Some(TxnInfo { device_id: "DEVICE".to_owned(), txn_id: id.to_owned() })
    }

    /// Rooms with the witness and the breaker registered, and a room of alice's.
    async fn setup(dir: &std::path::Path) -> (Arc<Rooms>, Arc<Witness>, OwnedUserId, OwnedRoomId) {
        let rooms = Arc::new(crate::test_rooms(dir));
        let witness = Arc::new(Witness::default());
        witness.rooms.set(Arc::downgrade(&rooms)).unwrap();
        rooms.register(Fanout { indexers: vec![Arc::new(Breaker)], after_commit: vec![witness.clone()], ..Default::default() });
        let alice = owned_user_id!("@alice:test.local");
        let events = [PduBuilder::state("m.room.create", "", json!({})), PduBuilder::state("m.room.member", alice.as_str(), json!({ "membership": "join" }))];
        let writer = rooms.new_room(ruma::RoomVersionId::V12, &alice, events).await.unwrap();
        let room = writer.room_id().clone();
        writer.commit().unwrap().finish().await;
        (rooms, witness, alice, room)
    }

    /// The room's timeline, oldest first.
    fn history(rooms: &Rooms, room: &ruma::RoomId) -> Vec<Pdu> {
        let mut ids: Vec<_> = rooms.timeline_before(room, u64::MAX).map(|item| item.unwrap().1).collect();
        ids.reverse();
        ids.iter().map(|id| rooms.pdu(id).unwrap().unwrap()).collect()
    }

    fn bodies(rooms: &Rooms, room: &ruma::RoomId) -> Vec<String> {
        history(rooms, room).iter().filter_map(|pdu| pdu.content_json().get("body").and_then(|b| b.as_str()).map(str::to_owned)).collect()
    }

    /// Starts the sends one after the other while the test holds the room's writer, each once
    /// the one before it is queued.
    async fn queued(rooms: &Arc<Rooms>, room: &OwnedRoomId, sends: Vec<(OwnedUserId, PduBuilder, Option<TxnInfo>)>) -> Vec<tokio::task::JoinHandle<crate::Result<Pdu>>> {
        let waiting = || rooms.sends.rooms().get(room).map_or(0, Vec::len);
        let mut tasks = Vec::new();
        for (sender, builder, txn) in sends {
            let before = waiting();
            let (rooms, room) = (rooms.clone(), room.clone());
            tasks.push(tokio::spawn(async move { rooms.send(&sender, &room, builder, txn).await.map(|sent| sent.pdu) }));
            while waiting() == before {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
        tasks
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sends_waiting_for_the_writer_are_committed_in_one_write_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (rooms, witness, alice, room) = setup(dir.path()).await;
        let mallory = owned_user_id!("@mallory:test.local");
        let busy = rooms.writer(&room).await.unwrap();
        let sends = [(&alice, "one", "t1"), (&mallory, "not a member", "m1"), (&alice, "two", "t2"), (&alice, "two again", "t2"), (&alice, "three", "t3")];
        let tasks = queued(&rooms, &room, sends.into_iter().map(|(sender, body, txn_id)| (sender.clone(), message(body), txn(txn_id))).collect()).await;
        drop(busy);
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        // The stranger is refused; the others are not held up by it.
        let refused = answers.remove(1).unwrap_err();
        assert_eq!(refused.code(), ErrorCode::Forbidden, "{refused}");
        let ids: Vec<_> = answers.into_iter().map(|answer| answer.unwrap().event_id).collect();
        // A transaction sent twice in one group is one event.
        assert_eq!(ids[1], ids[2]);
        assert_eq!(bodies(&rooms, &room), ["one", "two", "three"]);
        let events = history(&rooms, &room);
        for pair in events.windows(2) {
            assert_eq!(pair[1].prev_events, vec![pair[0].event_id.clone()], "one linear history");
        }
        // One write: when the first message's hook ran, the last was already stored.
        assert_eq!(*witness.stored.lock().unwrap(), [events.len(); 3]);
        // The transaction is still known after the group: a retry gets the same event.
        let again = rooms.send(&alice, &room, message("three, retried"), txn("t3")).await.unwrap();
        assert_eq!(again.pdu.event_id, ids[3]);
        assert_eq!(bodies(&rooms, &room).len(), 3);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn after_a_rest_writers_read_the_state_again_and_see_it_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let (rooms, _, alice, room) = setup(dir.path()).await;
        let one = rooms.send(&alice, &room, message("one"), None).await.unwrap();
        let snapshot = rooms.meta(&one.pdu.event_id).unwrap().unwrap().state_after;
        let state = rooms.state_map(snapshot).unwrap();
        assert!(!rooms.state_reads.lock().unwrap().is_empty(), "the writer's state reads are kept");
        assert!(rooms.snapshots.entries() > 0, "the snapshots read are kept");

        rooms.rest();
        assert!(rooms.state_reads.lock().unwrap().is_empty(), "the writers' state reads are gone");
        assert_eq!(rooms.snapshots.entries(), 0, "and so are the snapshots");
        assert_eq!(rooms.state_map(snapshot).unwrap(), state, "a snapshot is read again as it was");
        let mut writer = rooms.writer(&room).await.unwrap();
        writer.append(&alice, PduBuilder::state("m.room.name", "", json!({ "name": "after the rest" })), None).unwrap();
        writer.commit().unwrap().finish().await;
        rooms.send(&alice, &room, message("two"), None).await.unwrap();
        let Err(stranger) = rooms.send(&owned_user_id!("@mallory:test.local"), &room, message("no"), None).await else {
            panic!("a stranger sent into the room");
        };
        assert_eq!(stranger.code(), ErrorCode::Forbidden, "{stranger}");
        assert_eq!(bodies(&rooms, &room), ["one", "two"]);
        assert_eq!(rooms.state_content(&room, "m.room.name", "").unwrap().unwrap()["name"], "after the rest");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_event_whose_staging_fails_halfway_writes_nothing_of_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let (rooms, _, alice, room) = setup(dir.path()).await;
        let busy = rooms.writer(&room).await.unwrap();
        // "before" is sent twice with one transaction id: the retry's answer waits for the write
        // too, and gets its failure rather than an event that was never written.
        let sends = [("before", "t1"), ("before, retried", "t1"), ("breaks", "t2"), ("after", "t3")];
        let tasks = queued(&rooms, &room, sends.into_iter().map(|(body, txn_id)| (alice.clone(), message(body), txn(txn_id))).collect()).await;
        drop(busy);
        for task in tasks {
            let error = task.await.unwrap().unwrap_err();
            assert!(matches!(error, crate::Error::Internal(_)), "{error}");
        }
        assert!(bodies(&rooms, &room).is_empty(), "nothing of the group was written");
        // The room goes on: the next send is written.
        rooms.send(&alice, &room, message("later"), None).await.unwrap();
        assert_eq!(bodies(&rooms, &room), ["later"]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_writer_broken_by_one_event_stays_broken_after_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (rooms, _, alice, room) = setup(dir.path()).await;
        let mut writer = rooms.writer(&room).await.unwrap();
        assert!(writer.append(&alice, message("breaks"), None).is_err());
        writer.append(&alice, message("fine"), None).unwrap();
        assert!(writer.broken());
        assert!(writer.commit().is_err(), "half an event is never written");
        assert!(bodies(&rooms, &room).is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_send_given_up_while_waiting_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let (rooms, _, alice, room) = setup(dir.path()).await;
        let busy = rooms.writer(&room).await.unwrap();
        let tasks = queued(&rooms, &room, vec![(alice.clone(), message("given up"), None)]).await;
        tasks[0].abort();
        assert!(tasks.into_iter().next().unwrap().await.unwrap_err().is_cancelled());
        assert!(rooms.sends.rooms().is_empty(), "its place in the queue went with it");
        drop(busy);
        rooms.send(&alice, &room, message("kept"), None).await.unwrap();
        assert_eq!(bodies(&rooms, &room), ["kept"]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn many_concurrent_senders_each_get_their_own_event() {
        let dir = tempfile::tempdir().unwrap();
        let (rooms, _, alice, room) = setup(dir.path()).await;
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let (rooms, room, alice) = (rooms.clone(), room.clone(), alice.clone());
                tokio::spawn(async move { rooms.send(&alice, &room, message(&format!("m{i}")), txn(&format!("c{i}"))).await.unwrap().pdu })
            })
            .collect();
        let mut answered = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            let pdu = task.await.unwrap();
            assert_eq!(pdu.content_json()["body"], format!("m{i}"), "each sender is answered with its own event");
            answered.push(pdu.event_id);
        }
        let stored: Vec<_> = history(&rooms, &room).into_iter().filter(|pdu| pdu.state_key.is_none()).map(|pdu| pdu.event_id).collect();
        assert_eq!(stored.len(), 64);
        answered.sort();
        let mut sorted = stored.clone();
        sorted.sort();
        assert_eq!(answered, sorted, "every acknowledged event is stored, once");
    }
}
