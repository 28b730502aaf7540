//! End-to-end tests: the message length limit and message retention (`m.room.retention`).

mod common;

use std::time::{Duration, Instant};

use common::{Client, TestServer, enc, errcode};
use reqwest::StatusCode;
use serde_json::{Value, json};

const CS: &str = "/_matrix/client/v3";

async fn send(client: &Client, room: &str, txn: &str, content: Value) -> (StatusCode, Value) {
    client.put(&format!("{CS}/rooms/{}/send/m.room.message/{txn}", enc(room)), content).await
}

/// Event ids and bodies of the room's latest 100 events, as /messages gives them.
async fn timeline(client: &Client, room: &str) -> Vec<(String, Value)> {
    let page = client.messages(room, "dir=b&limit=100").await;
    page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| (event["event_id"].as_str().unwrap().to_owned(), event.clone()))
        .collect()
}

fn has_event(events: &[(String, Value)], event_id: &str) -> bool {
    events.iter().any(|(id, _)| id == event_id)
}

async fn search_count(client: &Client, term: &str) -> u64 {
    let (status, body) = client
        .post(&format!("{CS}/search"), json!({ "search_categories": { "room_events": { "search_term": term } } }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["search_categories"]["room_events"]["count"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn over_long_messages_are_refused() {
    let server = TestServer::start_with(&[("LIMBIC_CLINIC__MAX_MESSAGE_LENGTH", "20")]).await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({})).await;

    // The limit counts characters, not bytes: 20 two-byte characters pass.
    let (status, body) = send(&alice, &room, "t1", json!({ "msgtype": "m.text", "body": "é".repeat(20) })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let original = body["event_id"].as_str().unwrap().to_owned();

    let (status, body) = send(&alice, &room, "t2", json!({ "msgtype": "m.text", "body": "é".repeat(21) })).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(errcode(&body), "M_TOO_LARGE");

    // An edit cannot smuggle a longer body in through m.new_content.
    let edit = json!({
        "msgtype": "m.text",
        "body": "* short",
        "m.new_content": { "msgtype": "m.text", "body": "x".repeat(21) },
        "m.relates_to": { "rel_type": "m.replace", "event_id": original },
    });
    let (status, body) = send(&alice, &room, "t3", edit).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(errcode(&body), "M_TOO_LARGE");

    // Other event types are not messages and keep their usual limits.
    let (status, body) = alice
        .put(&format!("{CS}/rooms/{}/send/org.example.note/t4", enc(&room)), json!({ "body": "y".repeat(100) }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn expired_messages_are_purged_and_the_room_stays_whole() {
    const LIFETIME_MS: u64 = 4_000;
    let mut server = TestServer::start_with(&[("LIMBIC_CLINIC__RETENTION_INTERVAL_SECONDS", "1")]).await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({ "name": "session chat" })).await;
    let kept_room = alice.create_room(json!({})).await;
    let bob = server.register("bob").await;
    alice.invite(&room, &bob.user_id).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    let (status, body) = alice
        .put(&format!("{CS}/rooms/{}/state/m.room.retention", enc(&room)), json!({ "max_lifetime": LIFETIME_MS }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let retention_event = body["event_id"].as_str().unwrap().to_owned();

    let old: Vec<String> = vec![
        alice.send_text(&room, "o1", "ancient words one").await,
        alice.send_text(&room, "o2", "ancient words two").await,
    ];
    let reaction = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": old[0], "key": "👍" } });
    let (status, body) = bob.put(&format!("{CS}/rooms/{}/send/m.reaction/r1", enc(&room)), reaction).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let kept = alice.send_text(&kept_room, "k1", "ancient but kept").await;
    tokio::time::sleep(Duration::from_millis(LIFETIME_MS + 300)).await;
    let fresh = alice.send_text(&room, "n1", "fresh words").await;
    let latest = alice.send_text(&room, "n2", "latest words").await;

    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let events = timeline(&alice, &room).await;
        if !old.iter().any(|id| has_event(&events, id)) {
            // Newer messages and every state event stay.
            assert!(has_event(&events, &fresh) && has_event(&events, &latest), "{events:?}");
            assert!(has_event(&events, &retention_event), "{events:?}");
            assert!(events.iter().any(|(_, e)| e["type"] == "m.room.create"), "{events:?}");
            // Bob's unread count no longer includes the removed messages (checked at once:
            // `fresh` expires in its turn a lifetime after it was sent).
            let bob_sync = bob.sync(None, 0).await;
            assert_eq!(bob_sync["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 2, "{bob_sync}");
            break;
        }
        assert!(Instant::now() < deadline, "expired messages were not purged: {events:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    for id in &old {
        let (status, body) = alice.get(&format!("{CS}/rooms/{}/event/{}", enc(&room), enc(id))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(errcode(&body), "M_NOT_FOUND");
        let (status, body) = alice.get(&format!("{CS}/rooms/{}/context/{}", enc(&room), enc(id))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
    let (status, body) = bob.get(&format!("{CS}/rooms/{}/relations/{}", enc(&room), enc(&old[0]))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // Only the room without a retention policy still has a message with the word.
    assert_eq!(search_count(&alice, "ancient").await, 1);
    assert!(has_event(&timeline(&alice, &kept_room).await, &kept));
    let sync = alice.sync(None, 0).await;
    let synced = sync["rooms"]["join"][&room]["timeline"]["events"].to_string();
    assert!(old.iter().all(|id| !synced.contains(id.as_str())), "{synced}");
    assert!(synced.contains(latest.as_str()), "{synced}");

    // The room keeps working, before and after a restart.
    let after = alice.send_text(&room, "n3", "after the purge").await;
    server.restart().await;
    let events = timeline(&alice, &room).await;
    assert!(has_event(&events, &after), "{events:?}");
    assert!(!old.iter().any(|id| has_event(&events, id)), "{events:?}");
    let (status, _) = alice.get(&format!("{CS}/rooms/{}/event/{}", enc(&room), enc(&old[0]))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    alice.send_text(&room, "n4", "and after the restart").await;
    let name = alice.ok(reqwest::Method::GET, &format!("{CS}/rooms/{}/state/m.room.name", enc(&room)), None).await;
    assert_eq!(name["name"], "session chat");
}
