use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use limbic_rust_sdk_tests::{Server, Syncing, wait_for};
use matrix_sdk::ruma::{
    OwnedEventId,
    events::{
        AnySyncMessageLikeEvent, AnySyncTimelineEvent,
        room::{member::MembershipState, message::RoomMessageEventContent},
    },
};
use matrix_sdk_ui::notification_client::{
    NotificationClient, NotificationEvent, NotificationProcessSetup, NotificationStatus,
};

/// A push notification as Element X on iOS resolves it while the app sleeps: the notification
/// client's own short sliding sync (a room subscription and the e2ee and to-device extensions)
/// finds bob's encrypted message in a direct chat, decrypts it with the room key it receives
/// itself, and names the sender and the room; bob's invite is resolved the same way.
#[tokio::test]
async fn a_notification_resolved_by_sliding_sync_while_the_app_sleeps() -> Result<()> {
    Server::run(async |server| {
        let alice = Syncing::start(server.user("alice").await?).await?;
        let alice_id = alice.client.user_id().context("alice")?.to_owned();
        let bob = Syncing::start(server.user("bob").await?).await?;
        bob.client.account().set_display_name(Some("Bob")).await?;
        let dm = bob.client.create_dm(&alice_id).await?;
        let room_id = dm.room_id().to_owned();

        // The invite, while alice's app is in the foreground.
        // The invite's event id, from the room's state as bob reads it.
        let state: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/_matrix/client/v3/rooms/{room_id}/state", server.base))
            .bearer_auth(bob.client.access_token().context("bob's token")?)
            .send()
            .await?
            .json()
            .await?;
        let invite_id: OwnedEventId = state
            .as_array()
            .and_then(|events| {
                events.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == alice_id.as_str())
            })
            .and_then(|event| event["event_id"].as_str())
            .with_context(|| format!("no invite of alice in {state}"))?
            .try_into()?;
        let notifications =
            NotificationClient::new(alice.client.clone(), NotificationProcessSetup::MultipleProcesses).await?;
        match notifications.get_notification_with_sliding_sync(&room_id, &invite_id).await? {
            NotificationStatus::Event(item) => {
                ensure!(
                    matches!(item.event, NotificationEvent::Invite(_)),
                    "the invite's notification is {:?}",
                    item.event
                );
                ensure!(
                    item.sender_display_name.as_deref() == Some("Bob"),
                    "invited by {:?}",
                    item.sender_display_name
                );
            }
            other => bail!("the invite's notification: {other:?}"),
        }

        alice.room(&room_id).await?.join().await?;
        wait_for("alice's join at bob", Duration::from_secs(20), || async {
            let member = dm.get_member_no_sync(&alice_id).await.ok().flatten()?;
            (*member.membership() == MembershipState::Join).then_some(())
        })
        .await?;

        // Alice's app goes to sleep; bob's first message in the room brings a new room key.
        alice.sync.stop().await;
        let event_id = dm.send(RoomMessageEventContent::text_plain("ping")).await?.response.event_id;
        let item = match notifications.get_notification_with_sliding_sync(&room_id, &event_id).await? {
            NotificationStatus::Event(item) => item,
            other => bail!("bob's message's notification: {other:?}"),
        };
        let text = match &item.event {
            NotificationEvent::Timeline(event) => match &**event {
                AnySyncTimelineEvent::MessageLike(AnySyncMessageLikeEvent::RoomMessage(message)) => {
                    message.as_original().map(|m| m.content.body().to_owned())
                }
                other => bail!("not a decrypted message: {:?}", other.event_type()),
            },
            other => bail!("not a timeline event: {other:?}"),
        };
        ensure!(text.as_deref() == Some("ping"), "the notification says {text:?}");
        ensure!(item.sender_display_name.as_deref() == Some("Bob"), "from {:?}", item.sender_display_name);
        ensure!(item.room_computed_display_name == "Bob", "in a room named {:?}", item.room_computed_display_name);
        ensure!(item.is_room_encrypted == Some(true), "room encrypted: {:?}", item.is_room_encrypted);
        ensure!(item.is_noisy == Some(true), "noisy: {:?} (actions {:?})", item.is_noisy, item.actions);
        Ok(())
    })
    .await
}
