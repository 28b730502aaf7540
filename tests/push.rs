//! End-to-end tests: push rules, notification counts, /notifications, pushers (which end with
//! the access token that set them) and delivery to push gateways (real HTTP servers on
//! loopback, which the server reaches only when its config allows loopback).

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Client, TestServer, enc, errcode};
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

/// Each room's notifications are kept apart (what unread counts read): the list merges them,
/// newest first, and pages through them without repeating or skipping one.
#[tokio::test]
async fn notifications_of_several_rooms_are_listed_newest_first() {
    let server = TestServer::start().await;
    let (alice, bob, first) = two_users_in_a_room(&server).await;
    let second = alice.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&second).await.0, StatusCode::OK);
    for (room, body) in [(&first, "one"), (&second, "two"), (&second, "three"), (&first, "four"), (&second, "five")] {
        alice.send_text(room, body, body).await;
    }
    send_mention(&alice, &first, "six", "six", &bob.user_id).await;
    let bodies = |list: &Value| list["notifications"].as_array().unwrap().iter().map(|n| n["event"]["content"]["body"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    let all = bodies(&bob.ok(Method::GET, "/_matrix/client/v3/notifications", None).await);
    assert_eq!(all, ["six", "five", "four", "three", "two", "one"]);
    let mut paged = Vec::new();
    let mut path = "/_matrix/client/v3/notifications?limit=4".to_owned();
    loop {
        let page = bob.ok(Method::GET, &path, None).await;
        paged.extend(bodies(&page));
        let Some(next) = page["next_token"].as_str() else { break };
        path = format!("/_matrix/client/v3/notifications?limit=4&from={next}");
    }
    assert_eq!(paged, all);
    let highlights = bob.ok(Method::GET, "/_matrix/client/v3/notifications?only=highlight", None).await;
    assert_eq!(bodies(&highlights), ["six"]);
    assert_eq!(highlights["notifications"][0]["room_id"], first.as_str());
    let counts = bob.sync(None, 0).await;
    assert_eq!(counts["rooms"]["join"][&second]["unread_notifications"], json!({ "notification_count": 3, "highlight_count": 0 }));
}

#[tokio::test]
async fn notifications_follow_power_levels_and_members_as_they_change() {
    let server = TestServer::start().await;
    let (alice, bob, room) = two_users_in_a_room(&server).await;
    let room_mention = |txn: &'static str| {
        let (bob, room) = (bob.clone(), room.clone());
        async move {
            let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room));
            bob.ok(Method::PUT, &path, Some(json!({ "msgtype": "m.text", "body": format!("@room {txn}"), "m.mentions": { "room": true } }))).await;
        }
    };
    // Alice's notifications: body → (highlight, whether it has a sound: a one-to-one room's).
    let alices = || async {
        let list = alice.ok(Method::GET, "/_matrix/client/v3/notifications", None).await;
        list["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                let tweak = |name: &str| n["actions"].as_array().unwrap().iter().any(|a| a["set_tweak"] == name && a["value"] != false);
                (n["event"]["content"]["body"].as_str().unwrap().to_owned(), (tweak("highlight"), tweak("sound")))
            })
            .collect::<std::collections::HashMap<_, _>>()
    };
    // Messages between the changes keep the room's push context; each change must renew it.
    bob.send_text(&room, "b1", "one to one").await;
    room_mention("before").await;
    let bob_may_notify = json!({ "users": { alice.user_id.clone(): 100, bob.user_id.clone(): 50 } });
    alice.ok(Method::PUT, &format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room)), Some(bob_may_notify)).await;
    room_mention("after").await;
    let carol = server.register("carol").await;
    assert_eq!(carol.join(&room).await.0, StatusCode::OK);
    bob.send_text(&room, "b2", "three of us").await;
    let notes = alices().await;
    assert_eq!(notes["one to one"], (false, true), "two members: a one-to-one room's sound");
    assert_eq!(notes["@room before"].0, false, "bob may not notify the room yet");
    assert_eq!(notes["@room after"].0, true, "bob may notify the room now");
    assert_eq!(notes["three of us"], (false, false), "three members: no longer one-to-one");
    // Carol, who joined after the context was first kept, is notified; bob, gone, is not.
    bob.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), json!({})).await;
    alice.send_text(&room, "a1", "after bob left").await;
    let bodies = |list: Value| list["notifications"].as_array().unwrap().iter().map(|n| n["event"]["content"]["body"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert!(bodies(carol.ok(Method::GET, "/_matrix/client/v3/notifications", None).await).contains(&"after bob left".to_owned()));
    assert!(!bodies(bob.ok(Method::GET, "/_matrix/client/v3/notifications", None).await).contains(&"after bob left".to_owned()));
}

#[tokio::test]
async fn a_redacted_display_name_no_longer_matches() {
    let server = TestServer::start().await;
    let (alice, bob, room) = two_users_in_a_room(&server).await;
    let member_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&alice.user_id));
    let named = alice.ok(Method::PUT, &member_path, Some(json!({ "membership": "join", "displayname": "Ally" }))).await["event_id"].as_str().unwrap().to_owned();
    let rule = json!({ "conditions": [{ "kind": "contains_display_name" }], "actions": ["notify", { "set_tweak": "highlight" }] });
    alice.ok(Method::PUT, "/_matrix/client/v3/pushrules/global/override/by_name", Some(rule)).await;
    let highlighted = || async {
        let list = alice.ok(Method::GET, "/_matrix/client/v3/notifications?only=highlight", None).await;
        list["notifications"].as_array().unwrap().iter().map(|n| n["event"]["content"]["body"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    bob.send_text(&room, "b1", "hello Ally").await;
    assert_eq!(highlighted().await, ["hello Ally"]);
    // Her member event redacted, her display name is gone (she is "alice" again), between two
    // messages that keep the room's push context.
    let path = format!("/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room), enc(&named));
    alice.ok(Method::PUT, &path, Some(json!({}))).await;
    bob.send_text(&room, "b2", "hello again Ally").await;
    bob.send_text(&room, "b3", "and alice").await;
    assert_eq!(highlighted().await, ["and alice", "hello Ally"]);
}

/// A push gateway on loopback: `url` (at `ip`) and every request body it got, in `hits`; it
/// fails its first `failures` requests with a 503, or answers each with a 307 to `redirect_to`.
/// `received` holds the bodies it accepted.
struct Gateway {
    url: String,
    port: u16,
    hits: Arc<Mutex<Vec<Value>>>,
    received: Arc<Mutex<Vec<Value>>>,
}

async fn gateway(ip: &str, failures: usize, redirect_to: Option<String>) -> Gateway {
    use axum::{http::StatusCode as Status, response::IntoResponse};
    let (hits, received) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let failures_left = Arc::new(Mutex::new(failures));
    let app = {
        let (hits, received) = (hits.clone(), received.clone());
        axum::Router::new().route(
            "/_matrix/push/v1/notify",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| async move {
                hits.lock().unwrap().push(body.clone());
                if let Some(target) = redirect_to {
                    return (Status::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, target)]).into_response();
                }
                let mut left = failures_left.lock().unwrap();
                if *left > 0 {
                    *left -= 1;
                    return (Status::SERVICE_UNAVAILABLE, axum::Json(json!({}))).into_response();
                }
                received.lock().unwrap().push(body);
                axum::Json(json!({ "rejected": [] })).into_response()
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Gateway { url: format!("http://{ip}:{port}/_matrix/push/v1/notify"), port, hits, received }
}

/// A server whose push gateways may be at the given internal networks (a TOML array).
async fn server_allowing_gateways_at(networks: &str) -> TestServer {
    TestServer::start_with(&[("LIMBIC_PUSH__ALLOWED_NETWORKS", networks)]).await
}

async fn set_pusher(client: &Client, pushkey: &str, url: &str) {
    client.ok(Method::POST, "/_matrix/client/v3/pushers/set", Some(json!({
        "kind": "http", "app_id": "org.limbic.test", "pushkey": pushkey, "app_display_name": "Test",
        "device_display_name": "Phone", "lang": "en", "data": { "url": url }
    }))).await;
}

/// The pushkeys of the caller's pushers, sorted.
async fn pushkeys(client: &Client) -> Vec<String> {
    let pushers = client.ok(Method::GET, "/_matrix/client/v3/pushers", None).await;
    let mut keys: Vec<String> = pushers["pushers"].as_array().unwrap().iter().map(|p| p["pushkey"].as_str().unwrap().to_owned()).collect();
    keys.sort();
    keys
}

/// A new device of `user` (registered by `common`, so with the password `<name>-password`).
async fn log_in(server: &TestServer, name: &str) -> Client {
    let body = server
        .client()
        .ok(Method::POST, "/_matrix/client/v3/login", Some(json!({
            "type": "m.login.password", "identifier": { "type": "m.id.user", "user": name }, "password": format!("{name}-password"),
        })))
        .await;
    let mut client = server.client();
    client.token = Some(body["access_token"].as_str().unwrap().to_owned());
    client.user_id = body["user_id"].as_str().unwrap().to_owned();
    client.device_id = body["device_id"].as_str().unwrap().to_owned();
    client
}

fn password_auth(name: &str, password: &str) -> Value {
    json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": name }, "password": password })
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushers_receive_notifications_with_retry() {
    let server = server_allowing_gateways_at(r#"["127.0.0.1"]"#).await;
    let (alice, bob, room) = two_users_in_a_room(&server).await;
    let gateway = gateway("127.0.0.1", 1, None).await;
    let (url, received) = (gateway.url.clone(), gateway.received.clone());

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
    wait_until("a notification reached the gateway", || !received.lock().unwrap().is_empty()).await;
    let body = received.lock().unwrap()[0].clone();
    let notification = &body["notification"];
    assert_eq!(notification["event_id"], event_id.as_str());
    assert_eq!(notification["room_id"], room.as_str());
    assert_eq!(notification["devices"][0]["pushkey"], "key1");
    assert_eq!(notification["counts"]["unread"], 1);
    assert_eq!(notification["prio"], "high", "a mention of bob highlights");
    assert!(notification.get("content").is_none(), "event_id_only format");

    // Removing the pusher stops delivery.
    bob.ok(Method::POST, "/_matrix/client/v3/pushers/set", Some(json!({ "kind": null, "app_id": "org.limbic.test", "pushkey": "key1" }))).await;
    assert_eq!(bob.ok(Method::GET, "/_matrix/client/v3/pushers", None).await["pushers"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pusher_ends_with_the_token_that_set_it() {
    let server = server_allowing_gateways_at(r#"["127.0.0.1"]"#).await;
    let (alice, _bob, room) = two_users_in_a_room(&server).await;
    let gateway = gateway("127.0.0.1", 0, None).await;
    // Token A (say, stolen) and token B each set a pusher.
    let (a, b) = (log_in(&server, "bob").await, log_in(&server, "bob").await);
    set_pusher(&a, "a", &gateway.url).await;
    set_pusher(&b, "b", &gateway.url).await;
    assert_eq!(pushkeys(&b).await, ["a", "b"]);

    // A logs out: its pusher goes with it, B's stays and still gets notifications.
    a.ok(Method::POST, "/_matrix/client/v3/logout", Some(json!({}))).await;
    assert_eq!(pushkeys(&b).await, ["b"]);
    send_mention(&alice, &room, "m1", "bob?", &b.user_id).await;
    wait_until("B's pusher was notified", || !gateway.received.lock().unwrap().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let notified: Vec<Value> = gateway.received.lock().unwrap().iter().map(|body| body["notification"]["devices"][0]["pushkey"].clone()).collect();
    assert_eq!(notified, [json!("b")], "only the pusher of the live token is notified");

    // Deleting a device (DELETE /devices, with the password) ends its pushers too.
    let c = log_in(&server, "bob").await;
    set_pusher(&c, "c", &gateway.url).await;
    let path = format!("/_matrix/client/v3/devices/{}", enc(&c.device_id));
    b.ok(Method::DELETE, &path, Some(json!({ "auth": password_auth("bob", "bob-password") }))).await;
    assert_eq!(pushkeys(&b).await, ["b"]);
}

#[tokio::test]
async fn logout_all_and_password_changes_end_the_pushers_of_the_other_tokens() {
    let server = TestServer::start().await;
    server.register("bob").await;
    let url = "https://push.example.org/_matrix/push/v1/notify";
    let (a, b, c) = (log_in(&server, "bob").await, log_in(&server, "bob").await, log_in(&server, "bob").await);
    for (client, key) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        set_pusher(client, key, url).await;
    }
    // A password change that keeps the other devices keeps their pushers.
    let change = |new: &str, old: &str, logout_devices: Option<bool>| {
        let mut body = json!({ "new_password": new, "auth": password_auth("bob", old) });
        if let Some(logout) = logout_devices {
            body["logout_devices"] = json!(logout);
        }
        body
    };
    c.ok(Method::POST, "/_matrix/client/v3/account/password", Some(change("second", "bob-password", Some(false)))).await;
    assert_eq!(pushkeys(&c).await, ["a", "b", "c"]);
    // One that signs the others out (the default) ends their pushers; the caller's stays.
    c.ok(Method::POST, "/_matrix/client/v3/account/password", Some(change("third", "second", None))).await;
    assert_eq!(pushkeys(&c).await, ["c"]);

    // logout/all ends every pusher.
    c.ok(Method::POST, "/_matrix/client/v3/logout/all", Some(json!({}))).await;
    let body = server.client().ok(Method::POST, "/_matrix/client/v3/login", Some(json!({
        "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "bob" }, "password": "third",
    }))).await;
    let mut d = server.client();
    d.token = Some(body["access_token"].as_str().unwrap().to_owned());
    assert_eq!(pushkeys(&d).await, Vec::<String>::new());
}

#[tokio::test]
async fn admin_device_deletion_password_reset_and_deactivation_end_the_pushers() {
    let server = TestServer::start().await;
    let admin = server.register_admin("root").await;
    let bob = server.register("bob").await;
    let url = "https://push.example.org/_matrix/push/v1/notify";
    let log_in_with = |password: &'static str| {
        let server = &server;
        async move {
            let body = server.client().ok(Method::POST, "/_matrix/client/v3/login", Some(json!({
                "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "bob" }, "password": password,
            }))).await;
            let mut client = server.client();
            client.token = Some(body["access_token"].as_str().unwrap().to_owned());
            client
        }
    };

    // An admin deletes one of bob's devices: its pusher goes, the other stays.
    let phone = log_in(&server, "bob").await;
    set_pusher(&phone, "phone", url).await;
    set_pusher(&bob, "bob", url).await;
    admin.ok(Method::DELETE, &format!("/_synapse/admin/v2/users/{}/devices/{}", enc(&bob.user_id), enc(&phone.device_id)), None).await;
    assert_eq!(pushkeys(&bob).await, ["bob"]);

    // An admin's password reset signs bob out everywhere, pushers included.
    admin.ok(Method::POST, &format!("/_synapse/admin/v1/reset_password/{}", enc(&bob.user_id)), Some(json!({ "new_password": "reset-password" }))).await;
    let bob = log_in_with("reset-password").await;
    assert_eq!(pushkeys(&bob).await, Vec::<String>::new());

    // Deactivation ends every pusher: after reactivation (which signs nobody out) there are none.
    set_pusher(&bob, "before-deactivation", url).await;
    bob.ok(Method::POST, "/_matrix/client/v3/account/deactivate", Some(json!({ "auth": password_auth("bob", "reset-password") }))).await;
    let path = format!("/_synapse/admin/v2/users/{}", enc("@bob:test.local"));
    admin.ok(Method::PUT, &path, Some(json!({ "deactivated": false, "password": "after-deactivation", "logout_devices": false }))).await;
    let bob = log_in_with("after-deactivation").await;
    assert_eq!(pushkeys(&bob).await, Vec::<String>::new());
}

/// Pushers stored before owners were recorded (the bare pusher) keep working, and end when the
/// user is signed out of every other session.
#[tokio::test]
async fn pushers_without_a_known_owner_end_when_the_user_signs_out_everywhere_else() {
    use limbic_server::store::{Key, tables};
    let mut server = TestServer::start().await;
    let bob = server.register("bob").await;
    let other = log_in(&server, "bob").await;
    server.stop().await;
    {
        let store = server.open_store();
        let pusher = json!({
            "kind": "http", "app_id": "org.limbic.test", "pushkey": "unowned", "app_display_name": "Test",
            "device_display_name": "Phone", "lang": "en", "data": { "url": "https://push.example.org/_matrix/push/v1/notify" }
        });
        let mut batch = store.batch();
        batch.put_json(tables::PUSHERS, &Key::new().str(&bob.user_id).str("org.limbic.test").str("unowned").into_vec(), &pusher).unwrap();
        store.write(batch).unwrap();
    }
    server.start_again().await;
    assert_eq!(pushkeys(&bob).await, ["unowned"]);
    // One session's logout leaves it (it may be another session's)...
    other.ok(Method::POST, "/_matrix/client/v3/logout", Some(json!({}))).await;
    assert_eq!(pushkeys(&bob).await, ["unowned"]);
    // ...signing out every other session ends it.
    let change = json!({ "new_password": "second", "auth": password_auth("bob", "bob-password") });
    bob.ok(Method::POST, "/_matrix/client/v3/account/password", Some(change)).await;
    assert_eq!(pushkeys(&bob).await, Vec::<String>::new());
}

#[tokio::test]
async fn gateway_urls_need_the_push_gateway_path_exactly() {
    let server = TestServer::start().await;
    let bob = server.register("bob").await;
    for url in [
        "ftp://push.example.org/_matrix/push/v1/notify",
        "https://push.example.org/elsewhere?/_matrix/push/v1/notify",
        "https://push.example.org/prefix/_matrix/push/v1/notify",
        "https://push.example.org/_matrix/push/v1/notify/",
        "https://push.example.org/#/_matrix/push/v1/notify",
        "https:///_matrix/push/v1/notify",
        "/_matrix/push/v1/notify",
    ] {
        let (status, body) = bob.post("/_matrix/client/v3/pushers/set", json!({
            "kind": "http", "app_id": "org.limbic.test", "pushkey": "k", "app_display_name": "Test",
            "device_display_name": "Phone", "lang": "en", "data": { "url": url }
        })).await;
        assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"), "{url}: {body}");
    }
    assert_eq!(pushkeys(&bob).await, Vec::<String>::new());
    set_pusher(&bob, "k", "https://push.example.org:8443/_matrix/push/v1/notify").await;
    assert_eq!(pushkeys(&bob).await, ["k"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_at_internal_addresses_get_nothing_unless_their_network_is_allowed() {
    // Loopback is internal; only 127.0.0.2 is allowed.
    let server = server_allowing_gateways_at(r#"["127.0.0.2/32"]"#).await;
    let (alice, bob, room) = two_users_in_a_room(&server).await;
    let refused = gateway("127.0.0.1", 0, None).await;
    let allowed = gateway("127.0.0.2", 0, None).await;
    // By name (resolved by the server, to 127.0.0.1) and as an IP literal.
    set_pusher(&bob, "by-name", &format!("http://localhost:{}/_matrix/push/v1/notify", refused.port)).await;
    set_pusher(&bob, "by-address", &refused.url).await;
    set_pusher(&bob, "allowed", &allowed.url).await;

    send_mention(&alice, &room, "m1", "bob?", &bob.user_id).await;
    wait_until("the allowed gateway was notified", || !allowed.received.lock().unwrap().is_empty()).await;
    // Delivery to the refused one would have started at the same time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(refused.hits.lock().unwrap().is_empty(), "a gateway on loopback was reached: {:?}", refused.hits.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_redirect_is_not_followed() {
    let server = server_allowing_gateways_at(r#"["127.0.0.1"]"#).await;
    let (alice, bob, room) = two_users_in_a_room(&server).await;
    let target = gateway("127.0.0.1", 0, None).await;
    let redirecting = gateway("127.0.0.1", 0, Some(target.url.clone())).await;
    set_pusher(&bob, "k", &redirecting.url).await;

    send_mention(&alice, &room, "m1", "bob?", &bob.user_id).await;
    wait_until("the redirecting gateway was asked", || !redirecting.hits.lock().unwrap().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(target.hits.lock().unwrap().is_empty(), "the redirect was followed");
    assert_eq!(redirecting.hits.lock().unwrap().len(), 1, "a redirect is final: not retried");
}
