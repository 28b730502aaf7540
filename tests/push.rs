//! End-to-end tests: push rules, notification counts, /notifications, pushers and delivery to a
//! push gateway (a real HTTP server on loopback).

mod common;

use std::sync::{Arc, Mutex};

use common::{TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Sends a message that mentions `user` the way current clients do (`m.mentions`).
async fn send_mention(sender: &common::Client, room: &str, txn: &str, text: &str, user: &str) -> String {
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room));
    sender.ok(Method::PUT, &path, Some(json!({ "msgtype": "m.text", "body": text, "m.mentions": { "user_ids": [user] } }))).await["event_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn two_users_in_a_room(server: &TestServer) -> (common::Client, common::Client, String) {
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    (alice, bob, room)
}

#[tokio::test]
async fn push_rules_crud() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let rules = alice.ok(Method::GET, "/_matrix/client/v3/pushrules/", None).await;
    let overrides = rules["global"]["override"].as_array().unwrap();
    assert!(overrides.iter().any(|r| r["rule_id"] == ".m.rule.master"));
    assert!(rules["global"]["underride"].as_array().unwrap().iter().any(|r| r["rule_id"] == ".m.rule.message"));

    let path = "/_matrix/client/v3/pushrules/global/content/therapy";
    alice.ok(Method::PUT, path, Some(json!({ "pattern": "therapy", "actions": ["notify"] }))).await;
    let rule = alice.ok(Method::GET, path, None).await;
    assert_eq!(rule["pattern"], "therapy");
    assert_eq!(rule["enabled"], true);
    alice.ok(Method::PUT, &format!("{path}/enabled"), Some(json!({ "enabled": false }))).await;
    assert_eq!(alice.ok(Method::GET, &format!("{path}/enabled"), None).await["enabled"], false);
    alice.ok(Method::PUT, &format!("{path}/actions"), Some(json!({ "actions": [] }))).await;
    assert_eq!(alice.ok(Method::GET, &format!("{path}/actions"), None).await["actions"], json!([]));
    // The rules are account data, so clients see them in sync.
    let sync = alice.sync(None, 0).await;
    assert!(sync["account_data"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.push_rules"));

    alice.ok(Method::DELETE, path, None).await;
    let (status, body) = alice.get(path).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let (status, _) = alice.request(Method::DELETE, "/_matrix/client/v3/pushrules/global/override/.m.rule.master", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "server-default rules cannot be deleted");
    let (status, _) = alice.put("/_matrix/client/v3/pushrules/global/content/.mine", json!({ "pattern": "x", "actions": [] })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn notification_counts_follow_rules_and_receipts() {
    let server = TestServer::start().await;
    let (alice, bob, room) = two_users_in_a_room(&server).await;
    alice.send_text(&room, "a1", "hello").await;
    send_mention(&alice, &room, "a2", "are you there bob?", &bob.user_id).await;
    let counts = |sync: &Value| sync["rooms"]["join"][&room]["unread_notifications"].clone();
    let sync = bob.sync(None, 0).await;
    assert_eq!(counts(&sync), json!({ "notification_count": 2, "highlight_count": 1 }));

    // Bob mutes the room with a room rule: new messages no longer count.
    bob.ok(Method::PUT, &format!("/_matrix/client/v3/pushrules/global/room/{}", enc(&room)), Some(json!({ "actions": [] }))).await;
    let last = alice.send_text(&room, "a3", "muted now").await;
    let sync = bob.sync(None, 0).await;
    assert_eq!(counts(&sync)["notification_count"], 2);

    // A read receipt on the latest event clears the counts.
    bob.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&last)), Some(json!({}))).await;
    let sync = bob.sync(None, 0).await;
    assert_eq!(counts(&sync), json!({ "notification_count": 0, "highlight_count": 0 }));

    // /notifications lists them, newest first, with highlight filtering and read flags.
    let list = bob.ok(Method::GET, "/_matrix/client/v3/notifications", None).await;
    let notes = list["notifications"].as_array().unwrap();
    assert_eq!(notes.len(), 2);
    assert_eq!(notes[0]["event"]["content"]["body"], "are you there bob?");
    assert_eq!(notes[0]["read"], true);
    let highlights = bob.ok(Method::GET, "/_matrix/client/v3/notifications?only=highlight", None).await;
    assert_eq!(highlights["notifications"].as_array().unwrap().len(), 1);
    let page = bob.ok(Method::GET, "/_matrix/client/v3/notifications?limit=1", None).await;
    let next = page["next_token"].as_str().unwrap();
    let rest = bob.ok(Method::GET, &format!("/_matrix/client/v3/notifications?limit=1&from={next}"), None).await;
    assert_eq!(rest["notifications"][0]["event"]["content"]["body"], "hello");
    // Alice's own messages never notify her.
    let own = alice.ok(Method::GET, "/_matrix/client/v3/notifications", None).await;
    assert!(own["notifications"].as_array().unwrap().is_empty());
}

/// A push gateway on loopback that fails its first request, then records what it receives.
async fn fake_gateway() -> (String, Arc<Mutex<Vec<Value>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let failures_left = Arc::new(Mutex::new(1));
    let app = {
        let received = received.clone();
        axum::Router::new().route(
            "/_matrix/push/v1/notify",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let received = received.clone();
                let failures_left = failures_left.clone();
                async move {
                    let mut left = failures_left.lock().unwrap();
                    if *left > 0 {
                        *left -= 1;
                        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({})));
                    }
                    received.lock().unwrap().push(body);
                    (axum::http::StatusCode::OK, axum::Json(json!({ "rejected": [] })))
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/_matrix/push/v1/notify", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushers_receive_notifications_with_retry() {
    let server = TestServer::start().await;
    let (alice, bob, room) = two_users_in_a_room(&server).await;
    let (url, received) = fake_gateway().await;

    let (status, body) = bob.post("/_matrix/client/v3/pushers/set", json!({
        "kind": "http", "app_id": "org.limbic.test", "pushkey": "key1", "app_display_name": "Test",
        "device_display_name": "Phone", "lang": "en", "data": { "url": "ftp://nope" }
    })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
    bob.ok(Method::POST, "/_matrix/client/v3/pushers/set", Some(json!({
        "kind": "http", "app_id": "org.limbic.test", "pushkey": "key1", "app_display_name": "Test",
        "device_display_name": "Phone", "lang": "en", "data": { "url": url, "format": "event_id_only" }
    }))).await;
    let pushers = bob.ok(Method::GET, "/_matrix/client/v3/pushers", None).await;
    assert_eq!(pushers["pushers"][0]["pushkey"], "key1");

    let event_id = send_mention(&alice, &room, "p1", "ping bob", &bob.user_id).await;
    // The gateway fails once; delivery retries after a backoff.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(body) = received.lock().unwrap().first().cloned() {
            let notification = &body["notification"];
            assert_eq!(notification["event_id"], event_id.as_str());
            assert_eq!(notification["room_id"], room.as_str());
            assert_eq!(notification["devices"][0]["pushkey"], "key1");
            assert_eq!(notification["counts"]["unread"], 1);
            assert_eq!(notification["prio"], "high", "a mention of bob highlights");
            assert!(notification.get("content").is_none(), "event_id_only format");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no notification reached the gateway");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Removing the pusher stops delivery.
    bob.ok(Method::POST, "/_matrix/client/v3/pushers/set", Some(json!({ "kind": null, "app_id": "org.limbic.test", "pushkey": "key1" }))).await;
    assert_eq!(bob.ok(Method::GET, "/_matrix/client/v3/pushers", None).await["pushers"], json!([]));
}
