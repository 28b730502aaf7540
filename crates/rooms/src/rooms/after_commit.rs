//! What follows a commit: hooks registered at start-up that run once events are durable and
//! visible, whichever path committed them (a client's send, a session endpoint, federation, a
//! plugin, an administrator). The pipeline does not know what the hooks are.

use std::{future::Future, pin::Pin, sync::Arc};

use crate::events::Pdu;

/// Slow work a hook leaves for after the commit (e.g. stopping a recording, which commits events
/// of its own in the same room).
pub type FollowUp = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A consumer of committed events.
pub trait AfterCommit: Send + Sync {
    /// Called as soon as `events` (in the order they were staged) are durable and visible, with
    /// the room unlocked. Quick work is done here; slow work is returned.
    fn committed(&self, events: &[Pdu]) -> Option<FollowUp>;
}

/// Calls each hook with the committed events; what they leave to do is returned.
pub(super) fn run(hooks: &[Arc<dyn AfterCommit>], events: &[Pdu]) -> Committed {
    let follow_ups = if events.is_empty() { Vec::new() } else { hooks.iter().filter_map(|hook| hook.committed(events)).collect() };
    Committed { follow_ups }
}

/// The follow-up work of one commit. A request whose answer must reflect it (a withdrawn consent
/// has stopped the recording when the `PUT` returns) awaits [`Committed::finish`]; dropped, the
/// work runs in the background, so no path that commits events skips it.
#[derive(Default)]
pub struct Committed {
    follow_ups: Vec<FollowUp>,
}

impl Committed {
    /// Runs the follow-up work, in the order the hooks were registered.
    pub async fn finish(mut self) {
        for follow_up in std::mem::take(&mut self.follow_ups) {
            follow_up.await;
        }
    }
}

impl Drop for Committed {
    fn drop(&mut self) {
        if self.follow_ups.is_empty() {
            return;
        }
        let follow_ups = std::mem::take(&mut self.follow_ups);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(Committed { follow_ups }.finish())),
            Err(_) => tracing::error!(count = follow_ups.len(), "after-commit work dropped outside the runtime"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::events::PduBuilder;

    /// Records what it saw, and leaves a follow-up that reports on `done`.
    #[derive(Default)]
    struct Witness {
        seen: Mutex<Vec<String>>,
        done: Mutex<Option<tokio::sync::oneshot::Sender<usize>>>,
    }

    impl AfterCommit for Witness {
        fn committed(&self, events: &[Pdu]) -> Option<FollowUp> {
            self.seen.lock().unwrap().extend(events.iter().map(|pdu| pdu.kind.to_string()));
            let done = self.done.lock().unwrap().take()?;
            let count = events.len();
            Some(Box::pin(async move { done.send(count).ok(); }))
        }
    }

    /// A room of alice's, created and committed (its follow-ups dropped, so run in the background).
    async fn alices_room(rooms: &crate::rooms::Rooms) -> (ruma::OwnedUserId, ruma::OwnedRoomId) {
        let alice = ruma::owned_user_id!("@alice:test.local");
        let events = [
            PduBuilder::state("m.room.create", "", serde_json::json!({})),
            PduBuilder::state("m.room.member", alice.as_str(), serde_json::json!({ "membership": "join" })),
        ];
        let writer = rooms.new_room(ruma::RoomVersionId::V12, &alice, events).await.unwrap();
        let room = writer.room_id().clone();
        drop(writer.commit().unwrap());
        (alice, room)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn follow_ups_run_when_awaited_and_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let rooms = crate::test_rooms(dir.path());
        let witness = Arc::new(Witness::default());
        let hooks: Vec<Arc<dyn AfterCommit>> = vec![witness.clone()];
        let (_, room) = alices_room(&rooms).await;
        let pdus = [rooms.state_event(&room, "m.room.create", "").unwrap().unwrap()];

        // Awaited: the follow-up has run when finish returns.
        let (done, mut report) = tokio::sync::oneshot::channel();
        *witness.done.lock().unwrap() = Some(done);
        run(&hooks, &pdus).finish().await;
        assert_eq!(report.try_recv(), Ok(1));

        // Dropped: it still runs, in the background.
        let (done, report) = tokio::sync::oneshot::channel();
        *witness.done.lock().unwrap() = Some(done);
        drop(run(&hooks, &pdus));
        assert_eq!(tokio::time::timeout(std::time::Duration::from_secs(5), report).await, Ok(Ok(1)));
        assert_eq!(*witness.seen.lock().unwrap(), ["m.room.create", "m.room.create"]);

        // Nothing committed: no hook is called.
        run(&hooks, &[]).finish().await;
        assert_eq!(witness.seen.lock().unwrap().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_registered_hooks_see_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let rooms = crate::test_rooms(dir.path());
        let witness = Arc::new(Witness::default());
        rooms.register(crate::rooms::Fanout { after_commit: vec![witness.clone()], ..Default::default() });
        // A room created and committed, its follow-ups never awaited.
        let (alice, room) = alices_room(&rooms).await;
        assert_eq!(*witness.seen.lock().unwrap(), ["m.room.create", "m.room.member"]);
        // A message, then two writes of one room committed together: each commit, in order.
        let mut writer = rooms.writer(&room).await.unwrap();
        writer.append(&alice, PduBuilder::message("m.room.message", serde_json::json!({ "msgtype": "m.text", "body": "hi" })), None).unwrap();
        writer.append(&alice, PduBuilder::state("m.room.topic", "", serde_json::json!({ "topic": "t" })), None).unwrap();
        writer.commit().unwrap().finish().await;
        assert_eq!(witness.seen.lock().unwrap()[2..], ["m.room.message", "m.room.topic"]);
        // A writer that staged nothing calls no hook.
        rooms.writer(&room).await.unwrap().commit().unwrap().finish().await;
        assert_eq!(witness.seen.lock().unwrap().len(), 4);
    }
}
