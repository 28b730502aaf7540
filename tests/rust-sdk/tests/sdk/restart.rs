use anyhow::{Context as _, Result};
use limbic_rust_sdk_tests::{Server, Syncing, body, create_room, wait_for, wait_for_item};
use matrix_sdk::ruma::{
    OwnedUserId,
    events::room::{member::MembershipState, message::RoomMessageEventContent},
};
use matrix_sdk_ui::timeline::RoomExt as _;
use std::time::Duration;

/// A server restart under running sync services (offline mode, as Element X runs them): they
/// resume on their own; an encrypted message sent after the restart arrives, and a device that
/// logs in after it gets the room key over to-device messages (device lists and to-device
/// positions survive the restart).
#[tokio::test]
async fn sync_resumes_after_a_server_restart() -> Result<()> {
    Server::run(async |server| {
        let alice = Syncing::start(server.user("alice").await?).await?;
        let bob = Syncing::start(server.user("bob").await?).await?;
        let bob_id: OwnedUserId = bob.client.user_id().context("bob")?.to_owned();
        let room = create_room(&alice.client, "restart", &[bob_id.clone()], true).await?;
        bob.room(room.room_id()).await?.join().await?;
        wait_for("bob's join in alice's room", Duration::from_secs(20), || async {
            room.get_member_no_sync(&bob_id).await.ok().flatten().filter(|m| *m.membership() == MembershipState::Join)
        })
        .await?;
        let alice_timeline = alice.room(room.room_id()).await?.timeline().await?;
        let bob_timeline = bob.room(room.room_id()).await?.timeline().await?;
        bob_timeline.send(RoomMessageEventContent::text_plain("before the restart").into()).await?;
        wait_for_item(&alice_timeline, "bob's message before the restart", |item| {
            body(item) == Some("before the restart")
        })
        .await?;

        server.restart().await?;
        bob_timeline.send(RoomMessageEventContent::text_plain("after the restart").into()).await?;
        wait_for_item(&alice_timeline, "bob's message after the restart", |item| {
            body(item) == Some("after the restart")
        })
        .await?;

        let bob2 = Syncing::start(server.login("bob").await?).await?;
        let new_device = bob2.client.device_id().context("bob's new device")?.to_owned();
        wait_for("bob's new device known to alice", Duration::from_secs(20), || async {
            alice.client.encryption().get_device(&bob_id, &new_device).await.ok().flatten()
        })
        .await?;
        alice_timeline.send(RoomMessageEventContent::text_plain("to both of bob's devices").into()).await?;
        let new_timeline = bob2.room(room.room_id()).await?.timeline().await?;
        for (timeline, which) in [(&bob_timeline, "bob's first device"), (&new_timeline, "bob's new device")] {
            wait_for_item(timeline, &format!("alice's message on {which}"), |item| {
                body(item) == Some("to both of bob's devices")
            })
            .await?;
        }
        Ok(())
    })
    .await
}
