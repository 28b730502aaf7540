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

async fn download_status(client: &Client, mxc: &str) -> StatusCode {
    let path = format!("{}/_matrix/client/v1/media/download/{}", client.base, mxc.trim_start_matches("mxc://"));
    client.http.get(path).bearer_auth(client.token.as_ref().unwrap()).send().await.unwrap().status()
}

/// The paths of every file in the server's media store (default: database path + "-media").
fn media_files(server: &TestServer) -> Vec<std::path::PathBuf> {
    let root = server.store_dir().join("db-media");
    // Content files are in directories named after their hashes' first two digits; recordings
    // being made are elsewhere.
    std::fs::read_dir(root)
        .unwrap()
        .map(|dir| dir.unwrap().path())
        .filter(|dir| dir.file_name().is_some_and(|name| name.len() == 2))
        .flat_map(|dir| std::fs::read_dir(dir).unwrap())
        .map(|entry| entry.unwrap().path())
        .collect()
}

fn content_file(server: &TestServer, bytes: &[u8]) -> std::path::PathBuf {
    use sha2::Digest;
    let sha256 = hex::encode(sha2::Sha256::digest(bytes));
    server.store_dir().join("db-media").join(&sha256[..2]).join(sha256)
}

/// A PNG that differs by `seed`.
fn png(seed: u8) -> Vec<u8> {
    let image = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, seed]));
    let mut bytes = Vec::new();
    image::DynamicImage::from(image).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

#[tokio::test]
async fn purged_messages_take_their_media_files_with_them() {
    const LIFETIME_MS: u64 = 3_000;
    let server = TestServer::start_with(&[("LIMBIC_CLINIC__RETENTION_INTERVAL_SECONDS", "1")]).await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({})).await;
    let kept_room = alice.create_room(json!({})).await;
    alice.ok(reqwest::Method::PUT, &format!("{CS}/rooms/{}/state/m.room.retention", enc(&room)), Some(json!({ "max_lifetime": LIFETIME_MS }))).await;

    // Only in a purged message; in a message redacted before the purge; also in a room that
    // keeps its messages; also the room's avatar (state, never purged); never sent at all.
    let bytes: Vec<Vec<u8>> = (1..=5).map(png).collect();
    let mut mxcs = Vec::new();
    for content in &bytes {
        mxcs.push(alice.upload(content, "image/png").await);
    }
    let [sent, redacted, shared, avatar, unsent] = [0, 1, 2, 3, 4].map(|i| mxcs[i].clone());
    let image = |mxc: &str| json!({ "msgtype": "m.image", "body": "scan.png", "url": mxc, "info": { "mimetype": "image/png" } });
    // A thumbnail is cached for the purged image: it goes too.
    let thumbnail = format!("{}/_matrix/client/v1/media/thumbnail/{}?width=32&height=32&method=crop", alice.base, sent.trim_start_matches("mxc://"));
    let response = alice.http.get(thumbnail).bearer_auth(alice.token.as_ref().unwrap()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(media_files(&server).len(), 6);

    send(&alice, &room, "m1", image(&sent)).await;
    let (_, body) = send(&alice, &room, "m2", image(&redacted)).await;
    let to_redact = body["event_id"].as_str().unwrap().to_owned();
    send(&alice, &room, "m3", image(&shared)).await;
    send(&alice, &kept_room, "k1", image(&shared)).await;
    send(&alice, &room, "m4", image(&avatar)).await;
    alice.ok(reqwest::Method::PUT, &format!("{CS}/rooms/{}/state/m.room.avatar", enc(&room)), Some(json!({ "url": avatar }))).await;
    alice.ok(reqwest::Method::PUT, &format!("{CS}/rooms/{}/redact/{}/r1", enc(&room), enc(&to_redact)), Some(json!({}))).await;
    tokio::time::sleep(Duration::from_millis(LIFETIME_MS + 300)).await;
    alice.send_text(&room, "n1", "fresh words").await;

    let deadline = Instant::now() + Duration::from_secs(5);
    while download_status(&alice, &sent).await != StatusCode::NOT_FOUND {
        assert!(Instant::now() < deadline, "the media of a purged message is still served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(download_status(&alice, &redacted).await, StatusCode::NOT_FOUND);
    for mxc in [&shared, &avatar, &unsent] {
        assert_eq!(download_status(&alice, mxc).await, StatusCode::OK, "{mxc}");
    }
    // Gone from the disk: both content files and the thumbnail.
    assert!(!content_file(&server, &bytes[0]).exists() && !content_file(&server, &bytes[1]).exists());
    let mut left = media_files(&server);
    left.sort();
    let mut expected: Vec<_> = bytes[2..].iter().map(|content| content_file(&server, content)).collect();
    expected.sort();
    assert_eq!(left, expected);
}

#[tokio::test]
async fn an_expired_redaction_of_a_state_event_leaves_the_rooms_state_whole() {
    const LIFETIME_MS: u64 = 3_000;
    let mut server = TestServer::start_with(&[("LIMBIC_CLINIC__RETENTION_INTERVAL_SECONDS", "1")]).await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({ "name": "session chat", "topic": "intake" })).await;
    alice.ok(reqwest::Method::PUT, &format!("{CS}/rooms/{}/state/m.room.retention", enc(&room)), Some(json!({ "max_lifetime": LIFETIME_MS }))).await;
    let state = alice.ok(reqwest::Method::GET, &format!("{CS}/rooms/{}/state", enc(&room)), None).await;
    let topic_id = state.as_array().unwrap().iter().find(|e| e["type"] == "m.room.topic").unwrap()["event_id"].as_str().unwrap().to_owned();
    // Redacting a current state event gives the room a new state, which later state builds on.
    let redaction = alice.ok(reqwest::Method::PUT, &format!("{CS}/rooms/{}/redact/{}/x1", enc(&room), enc(&topic_id)), Some(json!({}))).await;
    let redaction_id = redaction["event_id"].as_str().unwrap().to_owned();
    alice.ok(reqwest::Method::PUT, &format!("{CS}/rooms/{}/state/m.room.name", enc(&room)), Some(json!({ "name": "renamed" }))).await;
    tokio::time::sleep(Duration::from_millis(LIFETIME_MS + 300)).await;
    let latest = alice.send_text(&room, "n1", "latest words").await;

    let deadline = Instant::now() + Duration::from_secs(3);
    while has_event(&timeline(&alice, &room).await, &redaction_id) {
        assert!(Instant::now() < deadline, "the redaction did not expire");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Read from the store, not from what the server had in memory.
    server.restart().await;
    let (status, state) = alice.get(&format!("{CS}/rooms/{}/state", enc(&room))).await;
    assert_eq!(status, StatusCode::OK, "{state}");
    // The state at an event is read from the room's snapshots.
    let (status, context) = alice.get(&format!("{CS}/rooms/{}/context/{}?limit=0", enc(&room), enc(&latest))).await;
    assert_eq!(status, StatusCode::OK, "{context}");
    let names: Vec<&Value> = context["state"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.name").collect();
    assert_eq!(names.len(), 1, "{context}");
    assert_eq!(names[0]["content"]["name"], "renamed");
    let of_type = |kind: &str| state.as_array().unwrap().iter().find(|e| e["type"] == kind).cloned().unwrap_or_default();
    assert_eq!(of_type("m.room.name")["content"]["name"], "renamed");
    assert_eq!(of_type("m.room.topic")["content"], json!({}), "the topic stays redacted");
    alice.send_text(&room, "n2", "after the restart").await;
    let (status, body) = alice.put(&format!("{CS}/rooms/{}/state/m.room.topic", enc(&room)), json!({ "topic": "follow-up" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
