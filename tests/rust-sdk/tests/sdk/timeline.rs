use anyhow::{Context as _, Result, ensure};
use limbic_rust_sdk_tests::{Server, Syncing, body, create_room, event_items, event_type, wait_for_item};
use matrix_sdk::{
    room::edit::EditedContent,
    ruma::events::room::message::{RoomMessageEventContent, RoomMessageEventContentWithoutRelation},
};
use matrix_sdk_ui::timeline::{RoomExt as _, TimelineDetails, VirtualTimelineItem};

const HISTORY: usize = 60;

/// `Timeline` between two users: a message sent from one timeline arrives in the other, an edit
/// replaces it, a reaction shows on it, and back-pagination of a room with more than 50 messages
/// reaches the room's start with every message once, in order.
#[tokio::test]
async fn send_receive_edit_react_paginate() -> Result<()> {
    Server::run(async |server| {
        let alice = server.user("alice").await?;
        alice.account().set_display_name(Some("Alice Liddell")).await?;
        let bob = server.user("bob").await?;
        let room = create_room(&alice, "chat", &[bob.user_id().context("bob")?.to_owned()], false).await?;
        bob.join_room_by_id(room.room_id()).await?;
        // History for the pagination, before either timeline exists.
        for n in 0..HISTORY {
            room.send(RoomMessageEventContent::text_plain(format!("history {n}"))).await?;
        }

        let alice = Syncing::start(alice).await?;
        let bob = Syncing::start(bob).await?;
        let alice_timeline = alice.room(room.room_id()).await?.timeline().await?;
        let bob_timeline = bob.room(room.room_id()).await?.timeline().await?;

        alice_timeline.send(RoomMessageEventContent::text_plain("hello bob").into()).await?;
        let received =
            wait_for_item(&bob_timeline, "alice's message in bob's timeline", |item| body(item) == Some("hello bob"))
                .await?;
        ensure!(received.sender() == alice.client.user_id().context("alice")?, "sent by {}", received.sender());
        // The sender's name, from her member event (lazy-loaded members in required_state).
        wait_for_item(&bob_timeline, "alice's name on her message", |item| {
            body(item) == Some("hello bob")
                && matches!(item.sender_profile(), TimelineDetails::Ready(profile)
                    if profile.display_name.as_deref() == Some("Alice Liddell"))
        })
        .await?;

        // Alice edits her message (as remote, sent event).
        let sent =
            wait_for_item(&alice_timeline, "alice's message sent", |item| body(item) == Some("hello bob")).await?;
        alice_timeline
            .edit(
                &sent.identifier(),
                EditedContent::RoomMessage(RoomMessageEventContentWithoutRelation::text_plain("hello bob (edited)")),
            )
            .await?;
        let edited = wait_for_item(&bob_timeline, "the edit in bob's timeline", |item| {
            body(item) == Some("hello bob (edited)") && item.content().as_message().is_some_and(|m| m.is_edited())
        })
        .await?;
        ensure!(edited.event_id() == received.event_id(), "the edit is a new item, not the original's");

        // Bob reacts; alice sees the reaction on her message.
        bob_timeline.toggle_reaction(&edited.identifier(), "👍").await?;
        let bob_id = bob.client.user_id().context("bob")?.to_owned();
        wait_for_item(&alice_timeline, "bob's reaction on alice's message", |item| {
            item.event_id() == sent.event_id()
                && item
                    .content()
                    .reactions()
                    .and_then(|r| r.get("👍"))
                    .is_some_and(|senders| senders.contains_key(&bob_id))
        })
        .await?;

        // Back to the start of the room on a fresh timeline of bob's.
        let timeline = bob.room(room.room_id()).await?.timeline().await?;
        let mut reached_start = false;
        for _ in 0..20 {
            if timeline.paginate_backwards(20).await? {
                reached_start = true;
                break;
            }
        }
        ensure!(reached_start, "20 back-paginations of 20 events did not reach the room's start");
        let items = timeline.items().await;
        ensure!(
            items.iter().any(|item| matches!(item.as_virtual(), Some(VirtualTimelineItem::TimelineStart))),
            "no timeline start item after reaching the start"
        );
        let events = event_items(&timeline).await;
        let first_type = events.first().and_then(event_type);
        ensure!(first_type.as_deref() == Some("m.room.create"), "the oldest item is {first_type:?}, not m.room.create");
        let history: Vec<&str> = events.iter().filter_map(body).filter(|b| b.starts_with("history ")).collect();
        let expected: Vec<String> = (0..HISTORY).map(|n| format!("history {n}")).collect();
        ensure!(history == expected, "the history after pagination: {history:?}");
        Ok(())
    })
    .await
}

/// A gap: while alice's sync service is stopped bob sends more messages than a sync returns, so
/// the room comes back `limited`; back-pagination from its `prev_batch` fills the gap, and the
/// timeline holds every message once, in order, between what alice saw before and after.
#[tokio::test]
async fn a_gap_after_a_sync_pause_is_filled_by_pagination() -> Result<()> {
    Server::run(async |server| {
        let alice = Syncing::start(server.user("alice").await?).await?;
        let bob = server.user("bob").await?;
        let room = create_room(&alice.client, "gap", &[bob.user_id().context("bob")?.to_owned()], false).await?;
        let bobs_room = bob.join_room_by_id(room.room_id()).await?;
        let timeline = alice.room(room.room_id()).await?.timeline().await?;
        bobs_room.send(RoomMessageEventContent::text_plain("before the gap")).await?;
        wait_for_item(&timeline, "the message before the gap", |item| body(item) == Some("before the gap")).await?;

        alice.sync.stop().await;
        for n in 0..HISTORY {
            bobs_room.send(RoomMessageEventContent::text_plain(format!("gap {n}"))).await?;
        }
        alice.sync.start().await;
        bobs_room.send(RoomMessageEventContent::text_plain("after the gap")).await?;
        wait_for_item(&timeline, "the message after the gap", |item| body(item) == Some("after the gap")).await?;

        let expected: Vec<String> = std::iter::once("before the gap".to_owned())
            .chain((0..HISTORY).map(|n| format!("gap {n}")))
            .chain(std::iter::once("after the gap".to_owned()))
            .collect();
        for _ in 0..20 {
            let bodies: Vec<String> = event_items(&timeline).await.iter().filter_map(body).map(str::to_owned).collect();
            if bodies == expected {
                return Ok(());
            }
            if timeline.paginate_backwards(20).await? {
                break;
            }
        }
        let bodies: Vec<String> = event_items(&timeline).await.iter().filter_map(body).map(str::to_owned).collect();
        ensure!(bodies == expected, "after back-pagination the timeline holds {bodies:?}");
        Ok(())
    })
    .await
}
