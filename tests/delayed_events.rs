//! End-to-end tests: delayed events (MSC4140) as Element Call and matrix-js-sdk use them —
//! `?org.matrix.msc4140.delay=` on the send and state endpoints, the list, and the cancel,
//! restart and send actions; durability across restarts and crashes; the limits; and who may
//! schedule, see and update them.

mod common;

use std::time::{Duration, Instant};

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const UNSTABLE: &str = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events";
const CALL_MEMBER: &str = "org.matrix.msc3401.call.member";

async fn delayed_message(client: &Client, room: &str, txn: &str, body: &str, delay_ms: u64) -> (StatusCode, Value) {
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}?org.matrix.msc4140.delay={delay_ms}", enc(room));
    client.put(&path, json!({ "msgtype": "m.text", "body": body })).await
}

async fn delayed_state(client: &Client, room: &str, kind: &str, state_key: &str, content: Value, delay_ms: u64) -> (StatusCode, Value) {
    let path = format!("/_matrix/client/v3/rooms/{}/state/{kind}/{}?org.matrix.msc4140.delay={delay_ms}", enc(room), enc(state_key));
    client.put(&path, content).await
}

/// Schedules a message and answers its delay id.
async fn schedule(client: &Client, room: &str, txn: &str, body: &str, delay_ms: u64) -> String {
    let (status, answer) = delayed_message(client, room, txn, body, delay_ms).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer.get("event_id").is_none(), "a delayed send has no event yet: {answer}");
    answer["delay_id"].as_str().expect("delay_id").to_owned()
}

async fn update(client: &Client, delay_id: &str, action: &str) -> (StatusCode, Value) {
    client.post(&format!("{UNSTABLE}/{}", enc(delay_id)), json!({ "action": action })).await
}

async fn listed(client: &Client) -> Vec<Value> {
    client.ok(Method::GET, UNSTABLE, None).await["delayed_events"].as_array().expect("delayed_events").clone()
}

fn ids(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["delay_id"].as_str().unwrap()).collect()
}

/// The bodies of the room's messages, oldest first.
async fn bodies(client: &Client, room: &str) -> Vec<String> {
    let page = client.messages(room, "dir=b&limit=100").await;
    let mut bodies: Vec<String> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect();
    bodies.reverse();
    bodies
}

/// Waits until the room has a message with `body`, and answers how long that took.
async fn wait_for_message(client: &Client, room: &str, body: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if bodies(client, room).await.iter().any(|b| b == body) {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{body:?} was not sent within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn state(client: &Client, room: &str, kind: &str, state_key: &str) -> (StatusCode, Value) {
    client.get(&format!("/_matrix/client/v3/rooms/{}/state/{kind}/{}", enc(room), enc(state_key))).await
}

/// A room of `owner` that `members` joined, where everyone may send call membership state.
async fn call_room(owner: &Client, members: &[&Client]) -> String {
    let invite: Vec<&str> = members.iter().map(|m| m.user_id.as_str()).collect();
    let room = owner
        .create_room(json!({
            "preset": "private_chat", "invite": invite,
            "power_level_content_override": { "events": { CALL_MEMBER: 0 } },
        }))
        .await;
    for member in members {
        let (status, body) = member.join(&room).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    room
}

#[tokio::test]
async fn a_delayed_message_is_sent_after_its_delay_and_reaches_sync() {
    let server = TestServer::start().await;
    let (ana, ben) = (server.register("ana").await, server.register("ben").await);
    let room = call_room(&ana, &[&ben]).await;
    let versions = server.client().ok(Method::GET, "/_matrix/client/versions", None).await;
    assert_eq!(versions["unstable_features"]["org.matrix.msc4140"], true, "{versions}");

    let mut since = ben.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let scheduled_at = Instant::now();
    let delay_id = schedule(&ana, &room, "t1", "see you later", 1500).await;
    assert!(delay_id.len() >= 22, "a delay id is an unguessable capability: {delay_id}");

    let mine = listed(&ana).await;
    assert_eq!(ids(&mine), [delay_id.as_str()]);
    let entry = &mine[0];
    assert_eq!(entry["room_id"], room.as_str());
    assert_eq!(entry["type"], "m.room.message");
    assert_eq!(entry["content"]["body"], "see you later");
    assert_eq!(entry["delay"], 1500);
    assert!(entry.get("state_key").is_none(), "{entry}");
    assert!(entry["running_since"].as_u64().unwrap() > 0, "{entry}");
    assert!(!bodies(&ben, &room).await.contains(&"see you later".to_owned()), "sent before its time");

    // Ben's long-poll wakes when the event is sent, not before its delay.
    let event = loop {
        let response = ben.sync(Some(&since), 5000).await;
        since = response["next_batch"].as_str().unwrap().to_owned();
        let timeline = response["rooms"]["join"][room.as_str()]["timeline"]["events"].as_array().cloned().unwrap_or_default();
        if let Some(event) = timeline.into_iter().find(|e| e["content"]["body"] == "see you later") {
            break event;
        }
        assert!(scheduled_at.elapsed() < Duration::from_secs(10), "the delayed message never reached /sync");
    };
    assert!(scheduled_at.elapsed() >= Duration::from_millis(1500), "sent after {:?}", scheduled_at.elapsed());
    assert_eq!(event["sender"], ana.user_id.as_str());
    assert!(listed(&ana).await.is_empty(), "a sent event is no longer scheduled");
    // Updating it now finds nothing.
    assert_eq!(update(&ana, &delay_id, "send").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn cancel_restart_and_send() {
    let server = TestServer::start().await;
    let ana = server.register("ana").await;
    let room = call_room(&ana, &[]).await;

    let cancelled = schedule(&ana, &room, "c", "cancelled", 800).await;
    let restarted = schedule(&ana, &room, "r", "restarted", 1500).await;
    let sent_now = schedule(&ana, &room, "s", "sent now", 3_600_000).await;
    let start = Instant::now();

    assert_eq!(update(&ana, &cancelled, "cancel").await, (StatusCode::OK, json!({})));
    assert_eq!(update(&ana, &cancelled, "cancel").await.0, StatusCode::NOT_FOUND, "cancelled twice");

    // Send: at once, whatever the delay.
    assert_eq!(update(&ana, &sent_now, "send").await, (StatusCode::OK, json!({})));
    assert!(bodies(&ana, &room).await.contains(&"sent now".to_owned()), "send did not send at once");

    // Restart twice, 1 s apart: each time the full delay counts again from now.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(update(&ana, &restarted, "restart").await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Taken before the request: the server's clock starts between the two.
    let restarted_at = Instant::now();
    assert_eq!(update(&ana, &restarted, "restart").await.0, StatusCode::OK);
    assert!(!bodies(&ana, &room).await.contains(&"restarted".to_owned()), "restart did not postpone");
    assert_eq!(ids(&listed(&ana).await), [restarted.as_str()]);
    wait_for_message(&ana, &room, "restarted", Duration::from_secs(10)).await;
    // The due time is kept in whole milliseconds, so it may come up to 1 ms early.
    assert!(restarted_at.elapsed() >= Duration::from_millis(1499), "fired {:?} after the last restart", restarted_at.elapsed());

    // Long past its first delay, the cancelled one never came.
    assert!(start.elapsed() > Duration::from_millis(2000));
    let all = bodies(&ana, &room).await;
    assert!(!all.contains(&"cancelled".to_owned()), "{all:?}");
    assert_eq!(all.iter().filter(|b| *b == "sent now").count(), 1, "sent once: {all:?}");
    assert!(listed(&ana).await.is_empty());
}

#[tokio::test]
async fn a_call_members_delayed_leave_replaces_its_membership() {
    let server = TestServer::start().await;
    let (ana, ben) = (server.register("ana").await, server.register("ben").await);
    let room = call_room(&ana, &[&ben]).await;
    // What matrix-js-sdk's MembershipManager does: schedule the leave, then join the call.
    let state_key = format!("_{}_{}", ben.user_id, ben.device_id);
    let (status, answer) = delayed_state(&ben, &room, CALL_MEMBER, &state_key, json!({}), 1500).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let delay_id = answer["delay_id"].as_str().unwrap().to_owned();
    let membership = json!({
        "application": "m.call", "call_id": "", "scope": "m.room", "device_id": ben.device_id,
        "focus_active": { "type": "livekit", "focus_selection": "oldest_membership" },
        "foci_preferred": [{ "type": "livekit", "livekit_service_url": "http://127.0.0.1/_limbic/calls" }],
    });
    ben.ok(Method::PUT, &format!("/_matrix/client/v3/rooms/{}/state/{CALL_MEMBER}/{}", enc(&room), enc(&state_key)), Some(membership.clone())).await;
    // Setting one's own state keeps one's own delayed leave scheduled.
    let mine = listed(&ben).await;
    assert_eq!(ids(&mine), [delay_id.as_str()]);
    assert_eq!(mine[0]["state_key"], state_key.as_str());
    assert_eq!(mine[0]["type"], CALL_MEMBER);
    assert_eq!(mine[0]["content"], json!({}));

    // The app keeps restarting it; then it dies.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(update(&ben, &delay_id, "restart").await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(state(&ana, &room, CALL_MEMBER, &state_key).await.1, membership, "left before the delay");
    let start = Instant::now();
    loop {
        let (_, content) = state(&ana, &room, CALL_MEMBER, &state_key).await;
        if content == json!({}) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the delayed leave never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = ana.messages(&room, "dir=b&limit=5").await;
    let leave = events["chunk"].as_array().unwrap().iter().find(|e| e["type"] == CALL_MEMBER && e["content"] == json!({})).cloned().unwrap();
    assert_eq!(leave["sender"], ben.user_id.as_str());
    assert_eq!(leave["state_key"], state_key.as_str());
}

#[tokio::test]
async fn another_users_state_cancels_a_delayed_state_event() {
    let server = TestServer::start().await;
    let (ana, ben) = (server.register("ana").await, server.register("ben").await);
    let room = call_room(&ana, &[&ben]).await;
    let (status, answer) = delayed_state(&ana, &room, CALL_MEMBER, "shared", json!({ "by": "ana, delayed" }), 1200).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    ben.ok(Method::PUT, &format!("/_matrix/client/v3/rooms/{}/state/{CALL_MEMBER}/shared", enc(&room)), Some(json!({ "by": "ben" }))).await;
    assert!(listed(&ana).await.is_empty(), "ben's state superseded ana's delayed one");
    let delay_id = answer["delay_id"].as_str().unwrap();
    assert_eq!(update(&ana, delay_id, "restart").await.0, StatusCode::NOT_FOUND);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(state(&ana, &room, CALL_MEMBER, "shared").await.1, json!({ "by": "ben" }));
}

#[tokio::test]
async fn scheduled_events_survive_a_restart_and_a_crash() {
    let mut server = TestServer::start().await;
    let ana = server.register("ana").await;
    let room = call_room(&ana, &[]).await;

    // Due while the server is stopped: sent when it starts.
    schedule(&ana, &room, "a", "due while stopped", 1000).await;
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.start_again().await;
    wait_for_message(&ana, &room, "due while stopped", Duration::from_secs(5)).await;

    // A crash right after scheduling: one falls due while down, one after the start.
    schedule(&ana, &room, "b", "due while crashed", 800).await;
    let later = schedule(&ana, &room, "c", "due after the crash", 4000).await;
    let scheduled_at = Instant::now();
    server.kill9();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    server.start_again().await;
    wait_for_message(&ana, &room, "due while crashed", Duration::from_secs(5)).await;
    assert_eq!(ids(&listed(&ana).await), [later.as_str()], "the later one is still scheduled");
    assert!(!bodies(&ana, &room).await.contains(&"due after the crash".to_owned()));
    wait_for_message(&ana, &room, "due after the crash", Duration::from_secs(10)).await;
    assert!(scheduled_at.elapsed() >= Duration::from_millis(4000));

    // Each was sent exactly once.
    let all = bodies(&ana, &room).await;
    for body in ["due while stopped", "due while crashed", "due after the crash"] {
        assert_eq!(all.iter().filter(|b| *b == body).count(), 1, "{body}: {all:?}");
    }
    assert!(listed(&ana).await.is_empty());
}

#[tokio::test]
async fn limits_on_delay_and_number() {
    let server = TestServer::start_with(&[("LIMBIC_DELAYED_EVENTS__MAX_DELAY_MS", "5000"), ("LIMBIC_DELAYED_EVENTS__MAX_PER_USER", "2")]).await;
    let ana = server.register("ana").await;
    let room = call_room(&ana, &[]).await;

    // Over the maximum: the error matrix-js-sdk reads to retry with the maximum.
    let (status, error) = delayed_message(&ana, &room, "long", "too late", 5001).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(errcode(&error), "M_UNKNOWN");
    assert_eq!(error["org.matrix.msc4140.errcode"], "M_MAX_DELAY_EXCEEDED");
    assert_eq!(error["org.matrix.msc4140.max_delay"], 5000);
    let (status, error) = delayed_state(&ana, &room, CALL_MEMBER, "k", json!({}), 60_000).await;
    assert_eq!((status, error["org.matrix.msc4140.errcode"].as_str()), (StatusCode::BAD_REQUEST, Some("M_MAX_DELAY_EXCEEDED")));
    // A zero delay: sent as soon as possible.
    let (status, answer) = delayed_message(&ana, &room, "now", "right away", 0).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/x?org.matrix.msc4140.delay=soon", enc(&room));
    let (status, error) = ana.put(&path, json!({ "msgtype": "m.text", "body": "x" })).await;
    assert_eq!((status, errcode(&error)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"), "{error}");

    // A retried request (same transaction) schedules once.
    let first = schedule(&ana, &room, "same", "once", 5000).await;
    assert_eq!(schedule(&ana, &room, "same", "once", 5000).await, first);
    wait_for_message(&ana, &room, "right away", Duration::from_secs(5)).await;
    assert_eq!(listed(&ana).await.len(), 1);

    // The per-user limit.
    schedule(&ana, &room, "second", "two", 5000).await;
    let (status, error) = delayed_message(&ana, &room, "third", "three", 5000).await;
    assert_eq!((status, errcode(&error)), (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"), "{error}");
}

#[tokio::test]
async fn strangers_and_the_powerless_are_refused_at_scheduling() {
    let server = TestServer::start().await;
    let (ana, ben, eve) = (server.register("ana").await, server.register("ben").await, server.register("eve").await);
    let room = call_room(&ana, &[&ben]).await;

    let (status, error) = delayed_message(&eve, &room, "t", "let me in", 1000).await;
    assert_eq!((status, errcode(&error)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{error}");
    let (status, error) = delayed_state(&eve, &room, CALL_MEMBER, &format!("_{}_X", eve.user_id), json!({}), 1000).await;
    assert_eq!((status, errcode(&error)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{error}");
    // Ben is a member, but the topic needs power he lacks.
    let (status, error) = delayed_state(&ben, &room, "m.room.topic", "", json!({ "topic": "mine" }), 1000).await;
    assert_eq!((status, errcode(&error)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{error}");
    // Events the send endpoint refuses are refused delayed too.
    let (status, _) = delayed_state(&ana, &room, "m.room.create", "", json!({}), 1000).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Without an access token there is nothing to schedule with.
    let (status, _) = delayed_message(&server.client(), &room, "t", "anonymous", 1000).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(listed(&eve).await.is_empty());
    assert!(listed(&ben).await.is_empty());
}

#[tokio::test]
async fn others_cannot_see_or_update_your_delayed_events() {
    let server = TestServer::start().await;
    let (ana, ben) = (server.register("ana").await, server.register("ben").await);
    let room = call_room(&ana, &[&ben]).await;
    let delay_id = schedule(&ana, &room, "t", "ana's", 60_000).await;

    assert!(listed(&ben).await.is_empty(), "ben sees ana's delayed event");
    for action in ["cancel", "restart", "send"] {
        let (status, error) = update(&ben, &delay_id, action).await;
        assert_eq!((status, errcode(&error)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{action}: {error}");
    }
    let anonymous = server.client();
    let (status, _) = update(&anonymous, &delay_id, "cancel").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the body-action endpoint needs a token");
    let (status, _) = anonymous.get(UNSTABLE).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The path-action endpoint takes no token: only the delay id itself opens it.
    for action in ["cancel", "restart", "send"] {
        let (status, error) = anonymous.post(&format!("{UNSTABLE}/{}x/{action}", enc(&delay_id)), json!({})).await;
        assert_eq!((status, errcode(&error)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{action}: {error}");
        let (status, _) = anonymous.post(&format!("{UNSTABLE}/guess/{action}"), json!({})).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    assert_eq!(ids(&listed(&ana).await), [delay_id.as_str()], "still scheduled");
    assert!(!bodies(&ana, &room).await.contains(&"ana's".to_owned()));

    // Bad actions.
    let (status, error) = update(&ana, &delay_id, "explode").await;
    assert_eq!((status, errcode(&error)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"), "{error}");
    let (status, error) = ana.post(&format!("{UNSTABLE}/{}", enc(&delay_id)), json!({})).await;
    assert_eq!((status, errcode(&error)), (StatusCode::BAD_REQUEST, "M_MISSING_PARAM"), "{error}");

    // Whoever holds the id may use it without a token (an SFU the client handed it to).
    let (status, _) = anonymous.post(&format!("{UNSTABLE}/{}/send", enc(&delay_id)), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(bodies(&ana, &room).await.contains(&"ana's".to_owned()));
}

#[tokio::test]
async fn a_member_removed_before_the_delay_sends_nothing() {
    let server = TestServer::start().await;
    let (ana, ben) = (server.register("ana").await, server.register("ben").await);
    let room = call_room(&ana, &[&ben]).await;
    let delay_id = schedule(&ben, &room, "t", "from beyond", 1000).await;
    let leave_key = format!("_{}_{}", ben.user_id, ben.device_id);
    let (status, _) = delayed_state(&ben, &room, CALL_MEMBER, &leave_key, json!({}), 1000).await;
    assert_eq!(status, StatusCode::OK);
    ana.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)), Some(json!({ "user_id": ben.user_id }))).await;

    // Sending it now is refused, and it stays scheduled (MSC4140).
    let (status, error) = update(&ben, &delay_id, "send").await;
    assert_eq!((status, errcode(&error)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{error}");
    assert_eq!(listed(&ben).await.len(), 2);

    // When it falls due it fails, and is dropped.
    let start = Instant::now();
    while !listed(&ben).await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "the failed events were never dropped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!bodies(&ana, &room).await.contains(&"from beyond".to_owned()));
    assert_eq!(state(&ana, &room, CALL_MEMBER, &leave_key).await.0, StatusCode::NOT_FOUND);
}
