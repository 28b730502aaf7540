use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, ensure};
use limbic_rust_sdk_tests::{Server, Syncing, body, create_room, event_items, wait_for_item};
use matrix_sdk::ruma::{
    TransactionId,
    api::client::delayed_events::{
        DelayParameters, delayed_message_event, delayed_state_event,
        update_delayed_event::unstable::{Request as UpdateRequest, UpdateAction},
    },
    events::room::{message::RoomMessageEventContent, topic::RoomTopicEventContent},
};
use matrix_sdk_ui::timeline::RoomExt as _;
use serde_json::Value;

const DELAY: Duration = Duration::from_secs(2);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64
}

/// Delayed events (MSC4140) as matrix-sdk sends them (ruma's unstable requests, as its widget
/// driver does for Element Call): a delayed message is sent by the server after its delay, a
/// cancelled delayed state event never is, the `send` action sends one at once, and a pending one
/// is still sent after a restart of the server.
#[tokio::test]
async fn a_delayed_event_fires_and_a_cancelled_one_does_not() -> Result<()> {
    Server::run(async |server| {
        let alice = server.user("alice").await?;
        let bob = server.user("bob").await?;
        let room = create_room(&alice, "later", &[bob.user_id().context("bob")?.to_owned()], false).await?;
        bob.join_room_by_id(room.room_id()).await?;
        let room_id = room.room_id().to_owned();
        let bob = Syncing::start(bob).await?;
        let timeline = bob.room(&room_id).await?.timeline().await?;

        let scheduled_at = now_ms();
        let delayed = alice
            .send(delayed_message_event::unstable::Request::new(
                room_id.clone(),
                TransactionId::new(),
                DelayParameters::Timeout { timeout: DELAY },
                &RoomMessageEventContent::text_plain("delayed"),
            )?)
            .await?
            .delay_id;
        let cancelled = alice
            .send(delayed_state_event::unstable::Request::new(
                room_id.clone(),
                String::new(),
                DelayParameters::Timeout { timeout: DELAY },
                &RoomTopicEventContent::new("cancelled topic".to_owned()),
            )?)
            .await?
            .delay_id;
        let sent_now = alice
            .send(delayed_message_event::unstable::Request::new(
                room_id.clone(),
                TransactionId::new(),
                DelayParameters::Timeout { timeout: Duration::from_secs(3600) },
                &RoomMessageEventContent::text_plain("sent at once"),
            )?)
            .await?
            .delay_id;
        alice.send(UpdateRequest::new(cancelled.clone(), UpdateAction::Cancel)).await?;

        // The owner's list: the pending ones, not the cancelled one.
        let listed = delayed_ids(&server, &alice).await?;
        ensure!(
            listed.contains(&delayed) && listed.contains(&sent_now),
            "pending delayed events missing from {listed:?}"
        );
        ensure!(!listed.contains(&cancelled), "the cancelled delayed event is still listed: {listed:?}");

        alice.send(UpdateRequest::new(sent_now, UpdateAction::Send)).await?;
        let now = wait_for_item(&timeline, "the delayed event sent with the send action", |item| {
            body(item) == Some("sent at once")
        })
        .await?;
        ensure!(now.sender() == alice.user_id().context("alice")?, "sent by {}", now.sender());

        let fired = wait_for_item(&timeline, "the delayed message", |item| body(item) == Some("delayed")).await?;
        let after = u64::from(fired.timestamp().0).saturating_sub(scheduled_at);
        ensure!(after + 100 >= DELAY.as_millis() as u64, "the delayed message was sent {after} ms after scheduling");

        // Well past the cancelled event's delay: no topic.
        tokio::time::sleep(DELAY).await;
        let topics: Vec<String> = event_items(&timeline)
            .await
            .iter()
            .filter_map(limbic_rust_sdk_tests::event_type)
            .filter(|t| t == "m.room.topic")
            .collect();
        ensure!(topics.is_empty(), "the cancelled topic was sent");
        let (status, topic) =
            get(&server, &alice, &format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.topic")).await?;
        ensure!(status == 404, "the room has a topic: {status} {topic}");
        ensure!(
            delayed_ids(&server, &alice).await?.is_empty(),
            "delayed events left after all fired or were cancelled"
        );

        // A pending delayed event survives a restart of the server (Element Call's delayed leave).
        alice
            .send(delayed_message_event::unstable::Request::new(
                room_id.clone(),
                TransactionId::new(),
                DelayParameters::Timeout { timeout: DELAY },
                &RoomMessageEventContent::text_plain("delayed across a restart"),
            )?)
            .await?;
        server.restart().await?;
        wait_for_item(&timeline, "the delayed message after a restart", |item| {
            body(item) == Some("delayed across a restart")
        })
        .await?;
        Ok(())
    })
    .await
}

async fn get(server: &Server, client: &matrix_sdk::Client, path: &str) -> Result<(u16, Value)> {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", server.base))
        .bearer_auth(client.access_token().context("token")?)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

/// The delay ids in `GET …/org.matrix.msc4140/delayed_events` (ruma 0.16 has no request for it).
async fn delayed_ids(server: &Server, client: &matrix_sdk::Client) -> Result<Vec<String>> {
    let (status, body) = get(server, client, "/_matrix/client/unstable/org.matrix.msc4140/delayed_events").await?;
    ensure!(status == 200, "listing delayed events: {status} {body}");
    let events = body["delayed_events"].as_array().with_context(|| format!("no delayed_events in {body}"))?;
    Ok(events.iter().filter_map(|event| event["delay_id"].as_str().map(str::to_owned)).collect())
}
