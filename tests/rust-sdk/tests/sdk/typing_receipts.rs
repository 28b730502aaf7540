use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use limbic_rust_sdk_tests::{Server, Syncing, create_room, wait_for};
use matrix_sdk::ruma::{
    api::client::receipt::create_receipt::v3::ReceiptType,
    events::{
        receipt::{ReceiptThread, ReceiptType as EventReceiptType},
        room::message::RoomMessageEventContent,
    },
};

/// Typing notices and read receipts of one user reach the other through the sliding sync
/// `typing` and `receipts` extensions.
#[tokio::test]
async fn typing_and_read_receipts_reach_the_other_user() -> Result<()> {
    Server::run(async |server| {
        let alice = Syncing::start(server.user("alice").await?).await?;
        let bob = Syncing::start(server.user("bob").await?).await?;
        let alice_id = alice.client.user_id().context("alice")?.to_owned();
        let room =
            create_room(&alice.client, "chat", &[bob.client.user_id().context("bob")?.to_owned()], false).await?;
        let bobs_room = bob.room(room.room_id()).await?;
        bobs_room.join().await?;
        let alices_room = alice.room(room.room_id()).await?;

        let (_guard, mut typing) = bobs_room.subscribe_to_typing_notifications();
        alices_room.typing_notice(true).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, typing.recv()).await {
                Err(_) => bail!("bob never saw alice typing"),
                Ok(users) => {
                    if users?.contains(&alice_id) {
                        break;
                    }
                }
            }
        }
        alices_room.typing_notice(false).await?;
        loop {
            match tokio::time::timeout_at(deadline + Duration::from_secs(20), typing.recv()).await {
                Err(_) => bail!("bob never saw alice stop typing"),
                Ok(users) => {
                    if !users?.contains(&alice_id) {
                        break;
                    }
                }
            }
        }

        // Bob's message, read by alice: bob sees her receipt on it.
        let event_id = bobs_room.send(RoomMessageEventContent::text_plain("read me")).await?.response.event_id;
        alices_room.send_single_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, event_id.clone()).await?;
        let (receipt_on, _) = wait_for("alice's read receipt at bob", Duration::from_secs(20), || async {
            bobs_room
                .load_user_receipt(EventReceiptType::Read, ReceiptThread::Unthreaded, &alice_id)
                .await
                .ok()
                .flatten()
        })
        .await?;
        ensure!(receipt_on == event_id, "alice's receipt is on {receipt_on}, not {event_id}");
        Ok(())
    })
    .await
}
