//! End-to-end tests of the client-server API against the real `limbic` binary.

mod common;

use common::{TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn discovery_endpoints() {
    let server = TestServer::start().await;
    let client = server.client();
    let (status, versions) = client.get("/_matrix/client/versions").await;
    assert_eq!(status, StatusCode::OK);
    assert!(versions["versions"].as_array().unwrap().iter().any(|v| v == "v1.1"));
    let (status, well_known) = client.get("/.well-known/matrix/client").await;
    assert_eq!(status, StatusCode::OK);
    assert!(well_known["m.homeserver"]["base_url"].as_str().unwrap().starts_with("http"));
    let alice = server.register("alice").await;
    let caps = alice.ok(Method::GET, "/_matrix/client/v3/capabilities", None).await;
    assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "11");
    let (status, body) = client.get("/_matrix/client/v3/capabilities").await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"));
    let (status, body) = client.get("/_matrix/client/v3/no/such/endpoint").await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"));
}

#[tokio::test]
async fn register_login_logout_whoami() {
    let server = TestServer::start().await;
    let client = server.client();
    // Without auth the server answers with the UIA flows.
    let (status, body) = client.post("/_matrix/client/v3/register", json!({ "username": "bob", "password": "pw" })).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["flows"][0]["stages"][0], "m.login.dummy");
    assert!(body["session"].is_string());

    let bob = server.register("bob").await;
    assert_eq!(bob.user_id, "@bob:test.local");
    let (status, body) = client.post("/_matrix/client/v3/register", json!({ "username": "bob", "password": "x", "auth": { "type": "m.login.dummy" } })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_USER_IN_USE"));
    let (status, body) = client.post("/_matrix/client/v3/register", json!({ "username": "Bad Name!", "password": "x", "auth": { "type": "m.login.dummy" } })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_USERNAME"));

    let whoami = bob.ok(Method::GET, "/_matrix/client/v3/account/whoami", None).await;
    assert_eq!(whoami["user_id"], "@bob:test.local");
    assert_eq!(whoami["device_id"], bob.device_id.as_str());

    let (status, body) = client.post("/_matrix/client/v3/login", json!({
        "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "bob" }, "password": "wrong"
    })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let login = client.ok(Method::POST, "/_matrix/client/v3/login", Some(json!({
        "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "bob" }, "password": "bob-password",
        "initial_device_display_name": "laptop"
    }))).await;
    let mut second = server.client();
    second.token = Some(login["access_token"].as_str().unwrap().to_owned());
    let devices = bob.ok(Method::GET, "/_matrix/client/v3/devices", None).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 2);

    // The r0 alias answers too.
    let whoami = second.ok(Method::GET, "/_matrix/client/r0/account/whoami", None).await;
    assert_eq!(whoami["user_id"], "@bob:test.local");

    second.ok(Method::POST, "/_matrix/client/v3/logout", Some(json!({}))).await;
    let (status, body) = second.get("/_matrix/client/v3/account/whoami").await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"));
    bob.ok(Method::POST, "/_matrix/client/v3/logout/all", Some(json!({}))).await;
    let (status, _) = bob.get("/_matrix/client/v3/account/whoami").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn malformed_requests_get_matrix_errors() {
    let server = TestServer::start_with(&[("LIMBIC_LIMITS__MAX_REQUEST_BODY", "2048")]).await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t1", enc(&room));
    let response = alice.http.put(format!("{}{path}", alice.base)).bearer_auth(alice.token.as_ref().unwrap()).body("{not json").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(errcode(&body), "M_NOT_JSON");

    let (status, body) = alice.put(&path, json!({ "body": "x".repeat(4096) })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"));

    let (status, body) = alice.post("/_matrix/client/v3/createRoom", json!({ "room_version": "1" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION"));
    let (status, body) = alice.post("/_matrix/client/v3/createRoom", json!({ "invite": "not-a-list" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"));
    let (status, body) = alice.get("/_matrix/client/v3/rooms/!nope:test.local/state").await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let (status, body) = alice.put("/_matrix/client/v3/rooms/!nope:test.local/send/m.room.message/t2", json!({ "body": "x" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let (status, body) = alice.put(&path.replace("/t1", "/t3"), json!({ "body": "x", "n": 1.5 })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"));
}

#[tokio::test]
async fn rooms_messages_and_sync() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({ "name": "Therapy", "topic": "weekly", "preset": "private_chat" })).await;

    let first = alice.sync(None, 0).await;
    let joined = &first["rooms"]["join"][&room];
    let state_types: Vec<&str> = joined["state"]["events"].as_array().unwrap().iter().chain(joined["timeline"]["events"].as_array().unwrap()).map(|e| e["type"].as_str().unwrap()).collect();
    for kind in ["m.room.create", "m.room.member", "m.room.power_levels", "m.room.name", "m.room.topic", "m.room.join_rules"] {
        assert!(state_types.contains(&kind), "{kind} missing from {state_types:?}");
    }

    // Bob cannot join an invite-only room until invited.
    let (status, body) = bob.join(&room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let bob_sync = bob.sync(None, 0).await;
    let since = bob_sync["next_batch"].as_str().unwrap().to_owned();
    let (status, _) = alice.invite(&room, &bob.user_id).await;
    assert_eq!(status, StatusCode::OK);
    let invited = bob.sync(Some(&since), 5000).await;
    assert!(invited["rooms"]["invite"][&room]["invite_state"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.name"));
    let (status, _) = bob.join(&room).await;
    assert_eq!(status, StatusCode::OK);

    // Transaction ids make sends idempotent.
    let a = alice.send_text(&room, "txn1", "hello").await;
    let again = alice.send_text(&room, "txn1", "hello").await;
    assert_eq!(a, again);

    // A long-polling sync wakes up for a new message.
    let bob_since = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let waiter = {
        let bob = bob.clone();
        let since = bob_since.clone();
        tokio::spawn(async move { bob.sync(Some(&since), 10_000).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let b = alice.send_text(&room, "txn2", "are you there?").await;
    let woke = waiter.await.unwrap();
    let events = woke["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap();
    assert!(events.iter().any(|e| e["event_id"] == b.as_str()), "{woke}");

    // /messages backwards then forwards returns the same events in opposite orders.
    let back = alice.messages(&room, "dir=b&limit=2").await;
    let chunk = back["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 2);
    assert_eq!(chunk[0]["event_id"], b.as_str());
    assert_eq!(chunk[1]["event_id"], a.as_str());
    let end = back["end"].as_str().unwrap();
    let forward = alice.messages(&room, &format!("dir=f&from={}&limit=2", enc(end))).await;
    let chunk = forward["chunk"].as_array().unwrap();
    assert_eq!(chunk[0]["event_id"], a.as_str());
    assert_eq!(chunk[1]["event_id"], b.as_str());

    // The sender sees its transaction id; others do not.
    let event = alice.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&a)), None).await;
    assert_eq!(event["unsigned"]["transaction_id"], "txn1");
    let event = bob.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&a)), None).await;
    assert!(event["unsigned"].get("transaction_id").is_none());
}

#[tokio::test]
async fn power_levels_kick_ban_and_redaction() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);

    // Bob (power 0) cannot change the name; alice can.
    let name_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.name", enc(&room));
    let (status, body) = bob.put(&name_path, json!({ "name": "hijack" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    alice.ok(Method::PUT, &name_path, Some(json!({ "name": "Group" }))).await;
    let name = bob.ok(Method::GET, &name_path, None).await;
    assert_eq!(name["name"], "Group");

    // Bob cannot redact alice's message; alice can redact bob's.
    let msg = alice.send_text(&room, "m1", "secret").await;
    let (status, _) = bob.put(&format!("/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room), enc(&msg)), json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let bobs = bob.send_text(&room, "m2", "oops").await;
    alice.ok(Method::PUT, &format!("/_matrix/client/v3/rooms/{}/redact/{}/r2", enc(&room), enc(&bobs)), Some(json!({ "reason": "spam" }))).await;
    let redacted = alice.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&bobs)), None).await;
    assert_eq!(redacted["content"], json!({}));
    assert_eq!(redacted["unsigned"]["redacted_because"]["content"]["reason"], "spam");

    // Kick, then ban: a banned user cannot rejoin; unban lets them.
    let kick = format!("/_matrix/client/v3/rooms/{}/kick", enc(&room));
    let (status, _) = bob.post(&kick, json!({ "user_id": alice.user_id })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    alice.ok(Method::POST, &kick, Some(json!({ "user_id": bob.user_id, "reason": "bye" }))).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    alice.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)), Some(json!({ "user_id": bob.user_id }))).await;
    let (status, body) = bob.join(&room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    alice.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/unban", enc(&room)), Some(json!({ "user_id": bob.user_id }))).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
}

#[tokio::test]
async fn knock_and_admit() {
    let server = TestServer::start().await;
    let therapist = server.register("therapist").await;
    let client = server.register("client").await;
    let room = therapist.create_room(json!({
        "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }]
    })).await;
    assert_eq!(client.join(&room).await.0, StatusCode::FORBIDDEN);
    let knock = client.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(json!({ "reason": "I have an appointment" }))).await;
    assert_eq!(knock["room_id"], room.as_str());
    let members = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/members?membership=knock", enc(&room)), None).await;
    assert_eq!(members["chunk"][0]["state_key"], client.user_id.as_str());
    assert_eq!(members["chunk"][0]["content"]["reason"], "I have an appointment");
    let synced = client.sync(None, 0).await;
    assert!(synced["rooms"]["knock"][&room].is_object());
    assert_eq!(therapist.invite(&room, &client.user_id).await.0, StatusCode::OK);
    assert_eq!(client.join(&room).await.0, StatusCode::OK);
    let joined = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), None).await;
    assert!(joined["joined"].get(&client.user_id).is_some());
}

#[tokio::test]
async fn everything_survives_restart_and_crash() {
    let mut server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({ "room_alias_name": "clinic" })).await;
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(alice.send_text(&room, &format!("t{i}"), &format!("message {i}")).await);
    }
    server.restart().await;
    let resolved = alice.ok(Method::GET, "/_matrix/client/v3/directory/room/%23clinic:test.local", None).await;
    assert_eq!(resolved["room_id"], room.as_str());
    server.kill9();
    server.start_again().await;
    let page = alice.messages(&room, "dir=b&limit=100").await;
    let ids: Vec<&str> = page["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.message").map(|e| e["event_id"].as_str().unwrap()).collect();
    let expected: Vec<&str> = sent.iter().rev().map(String::as_str).collect();
    assert_eq!(ids, expected);
    // New writes are accepted and tokens keep increasing after the restart.
    let before = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    alice.send_text(&room, "after", "after crash").await;
    let after = alice.sync(Some(&before), 5000).await;
    assert_eq!(after["rooms"]["join"][&room]["timeline"]["events"][0]["content"]["body"], "after crash");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_while_groups_of_sends_are_written_loses_no_acknowledged_message() {
    let mut server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let mut senders = vec![alice.clone()];
    for i in 0..7 {
        let member = server.register(&format!("member{i}")).await;
        assert_eq!(member.join(&room).await.0, StatusCode::OK);
        senders.push(member);
    }
    // Eight senders at once, each sending until the server is gone: their sends are grouped.
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = senders
        .iter()
        .cloned()
        .enumerate()
        .map(|(sender, client)| {
            let (room, written) = (room.clone(), written.clone());
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for i in 0.. {
                    let path = format!("{}/_matrix/client/v3/rooms/{}/send/m.room.message/c{i}", client.base, enc(&room));
                    let request = client.http.put(path).bearer_auth(client.token.as_deref().unwrap()).json(&json!({ "msgtype": "m.text", "body": format!("{sender}.{i}") }));
                    let Ok(response) = request.send().await else { return (acknowledged, i) };
                    let Ok(body) = response.json::<serde_json::Value>().await else { return (acknowledged, i) };
                    acknowledged.push(body["event_id"].as_str().expect("an event id").to_owned());
                    written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                unreachable!()
            })
        })
        .collect();
    while written.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    server.kill9();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    server.start_again().await;
    let page = alice.messages(&room, "dir=f&limit=1000").await;
    let stored: Vec<(String, String)> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| (e["event_id"].as_str().unwrap().to_owned(), e["content"]["body"].as_str().unwrap().to_owned()))
        .collect();
    let acknowledged: usize = outcomes.iter().map(|(ids, _)| ids.len()).sum();
    assert!(acknowledged < 900, "{acknowledged} acknowledged: more than a page of history");
    for (sender, (ids, in_flight)) in outcomes.iter().enumerate() {
        // Every acknowledged send is stored, in the order its sender sent it; the one in flight
        // at the crash is stored or not, and nothing after it.
        let mine: Vec<&(String, String)> = stored.iter().filter(|(_, body)| body.split('.').next() == Some(&sender.to_string())).collect();
        assert!(mine.len() == ids.len() || mine.len() == ids.len() + 1, "sender {sender}: {} stored, {} acknowledged", mine.len(), ids.len());
        assert_eq!(mine.iter().take(ids.len()).map(|(id, _)| id).collect::<Vec<_>>(), ids.iter().collect::<Vec<_>>());
        // Its retry gets the event it became, or makes it now: one event either way.
        let retried = senders[sender].send_text(&room, &format!("c{in_flight}"), &format!("{sender}.{in_flight}")).await;
        if let Some((id, _)) = mine.get(ids.len()) {
            assert_eq!(&retried, id, "sender {sender}: the retry answers with the stored event");
        }
    }
    let after = alice.messages(&room, "dir=f&limit=1000").await;
    let bodies: Vec<&str> = after["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.message").map(|e| e["content"]["body"].as_str().unwrap()).collect();
    assert_eq!(bodies.len(), acknowledged + senders.len(), "each send once: {bodies:?}");
}

#[tokio::test]
async fn sigterm_answers_long_polls_and_exits_promptly() {
    let mut server = TestServer::start().await;
    let alice = server.register("alice").await;
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let poll = {
        let alice = alice.clone();
        tokio::spawn(async move {
            let path = format!("/_matrix/client/v3/sync?timeout=60000&since={since}");
            alice.get(&path).await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    server.stop().await;
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "shutdown took {:?}", started.elapsed());
    let (status, body) = poll.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["next_batch"].is_string());
}

#[tokio::test]
async fn history_visibility_limits_what_late_joiners_see() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let bodies = |page: &serde_json::Value| -> Vec<String> {
        page["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
    };
    // Shared (the default): a late joiner reads the earlier history.
    let shared = alice.create_room(json!({ "preset": "public_chat" })).await;
    alice.send_text(&shared, "s1", "before bob").await;
    assert_eq!(bob.join(&shared).await.0, StatusCode::OK);
    assert_eq!(bodies(&bob.messages(&shared, "dir=b&limit=50").await), ["before bob"]);

    // Joined: only what was sent after joining.
    let joined = alice.create_room(json!({ "preset": "public_chat", "initial_state": [
        { "type": "m.room.history_visibility", "state_key": "", "content": { "history_visibility": "joined" } }
    ] })).await;
    alice.send_text(&joined, "j1", "secret before bob").await;
    assert_eq!(bob.join(&joined).await.0, StatusCode::OK);
    alice.send_text(&joined, "j2", "after bob").await;
    assert_eq!(bodies(&bob.messages(&joined, "dir=b&limit=50").await), ["after bob"]);
    let sync = bob.sync(None, 0).await;
    let timeline: Vec<&str> = sync["rooms"]["join"][&joined]["timeline"]["events"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(timeline, ["after bob"]);
    let (status, _) = bob.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&joined), enc(&alice.send_text(&joined, "j3", "x").await))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_or_unauthenticated_requests_get_matrix_errors_not_dropped_connections() {
    let server = TestServer::start().await;
    let anonymous = server.client();
    for path in ["/_matrix/client/v3/account/password", "/_matrix/client/v3/account/deactivate"] {
        let (status, body) = anonymous.post(path, json!({ "new_password": "x" })).await;
        assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"), "{path}: {body}");
    }
    for body in [json!({}), json!({ "identifier": { "type": "m.id.user" } }), json!({ "type": 5 })] {
        let (status, answer) = anonymous.post("/_matrix/client/v3/login", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(answer["errcode"].as_str().is_some_and(|c| c.starts_with("M_")), "{body}: {answer}");
    }
    // The server is still serving.
    assert_eq!(anonymous.get("/_matrix/client/versions").await.0, StatusCode::OK);
}
