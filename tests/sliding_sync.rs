//! End-to-end tests: simplified sliding sync (MSC4186) — lists, ranges and recency, per-connection
//! deltas, long-polling, subscriptions, extensions, and the same visibility and clinic rules as
//! /sync v3.

mod common;

use std::time::{Duration, Instant};

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SLIDING: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
const SESSIONS: &str = "/_limbic/client/v1/sessions";
const HOUR: u64 = 3_600_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// One sliding sync request; `pos` and `timeout` go in the query string.
async fn sliding(client: &Client, pos: Option<&str>, timeout_ms: u64, body: Value) -> (StatusCode, Value) {
    let mut path = format!("{SLIDING}?timeout={timeout_ms}");
    if let Some(pos) = pos {
        path.push_str(&format!("&pos={}", enc(pos)));
    }
    client.post(&path, body).await
}

async fn sliding_ok(client: &Client, pos: Option<&str>, timeout_ms: u64, body: &Value) -> Value {
    let (status, response) = sliding(client, pos, timeout_ms, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert!(response["pos"].is_string(), "{response}");
    response
}

fn pos(response: &Value) -> String {
    response["pos"].as_str().unwrap().to_owned()
}

fn rooms(response: &Value) -> Vec<String> {
    response["rooms"].as_object().map(|r| r.keys().cloned().collect()).unwrap_or_default()
}

fn timeline_bodies(room: &Value) -> Vec<String> {
    room["timeline"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)).collect()
}

fn list_request(range_end: u64, timeline_limit: u64) -> Value {
    json!({
        "lists": { "all": {
            "ranges": [[0, range_end]],
            "timeline_limit": timeline_limit,
            "required_state": [["m.room.name", ""], ["m.room.member", "$ME"], ["m.room.member", "$LAZY"]],
        } }
    })
}

async fn named_room(client: &Client, name: &str) -> String {
    client.create_room(json!({ "name": name, "preset": "private_chat" })).await
}

#[tokio::test]
async fn versions_advertise_sliding_sync() {
    let server = TestServer::start().await;
    let versions = server.client().ok(Method::GET, "/_matrix/client/versions", None).await;
    assert_eq!(versions["unstable_features"]["org.matrix.simplified_msc3575"], true, "{versions}");
}

#[tokio::test]
async fn lists_follow_recency_and_send_only_what_changed() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let first = named_room(&alice, "first").await;
    let second = named_room(&alice, "second").await;
    let third = named_room(&alice, "third").await;
    alice.invite(&first, &bob.user_id).await;
    assert_eq!(bob.join(&first).await.0, StatusCode::OK);
    for i in 0..5 {
        bob.send_text(&first, &format!("b{i}"), &format!("first {i}")).await;
    }
    alice.send_text(&third, "t0", "third 0").await;

    // A window of two out of three rooms: the most recently active first.
    let request = list_request(1, 3);
    let initial = sliding_ok(&alice, None, 0, &request).await;
    assert_eq!(initial["lists"]["all"]["count"], 3, "{initial}");
    let mut window = rooms(&initial);
    window.sort();
    let mut expected = vec![third.clone(), first.clone()];
    expected.sort();
    assert_eq!(window, expected, "{initial}");
    let room = &initial["rooms"][&first];
    assert_eq!(room["initial"], true);
    assert_eq!(room["name"], "first");
    assert_eq!(timeline_bodies(room), ["first 2", "first 3", "first 4"]);
    assert_eq!(room["limited"], true);
    assert_eq!(room["joined_count"], 2);
    assert!(initial["rooms"][&third]["bump_stamp"].as_u64().unwrap() > room["bump_stamp"].as_u64().unwrap());
    // required_state: the name, the user's own member event, and the timeline's senders.
    let state: Vec<(String, String)> = room["required_state"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["type"].as_str().unwrap().to_owned(), e["state_key"].as_str().unwrap().to_owned()))
        .collect();
    assert!(state.contains(&("m.room.name".into(), String::new())), "{state:?}");
    assert!(state.contains(&("m.room.member".into(), alice.user_id.clone())), "{state:?}");
    assert!(state.contains(&("m.room.member".into(), bob.user_id.clone())), "{state:?}");
    assert!(!state.iter().any(|(kind, _)| kind == "m.room.power_levels" || kind == "m.room.join_rules"), "{state:?}");
    // The prev_batch token pages back with /messages.
    let prev = room["prev_batch"].as_str().unwrap();
    let older = alice.messages(&first, &format!("dir=b&limit=2&from={}", enc(prev))).await;
    let older: Vec<&str> = older["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(older, ["first 1", "first 0"]);

    // Nothing changed: no rooms, and the list count is not repeated as news.
    let quiet = sliding_ok(&alice, Some(&pos(&initial)), 0, &request).await;
    assert!(rooms(&quiet).is_empty(), "{quiet}");
    assert_eq!(quiet["lists"]["all"]["count"], 3);

    // Activity in the room outside the window moves it in; only the new event is sent for a
    // room the client has.
    alice.send_text(&second, "s0", "second 0").await;
    let moved = sliding_ok(&alice, Some(&pos(&quiet)), 0, &request).await;
    assert_eq!(rooms(&moved), [second.clone()], "{moved}");
    assert_eq!(moved["rooms"][&second]["initial"], true);
    bob.send_text(&first, "b5", "first 5").await;
    let delta = sliding_ok(&alice, Some(&pos(&moved)), 0, &request).await;
    assert_eq!(rooms(&delta), [first.clone()], "{delta}");
    let room = &delta["rooms"][&first];
    assert!(room.get("initial").is_none(), "{room}");
    assert_eq!(timeline_bodies(room), ["first 5"]);
    assert_eq!(room["num_live"], 1);
    assert_eq!(room["limited"], false);

    // The previous position can be repeated (a lost response); an unknown one cannot.
    let again = sliding_ok(&alice, Some(&pos(&moved)), 0, &request).await;
    assert_eq!(timeline_bodies(&again["rooms"][&first]), ["first 5"]);
    for bad in ["nonsense", "1_1", &pos(&initial)] {
        let (status, body) = sliding(&alice, Some(bad), 0, request.clone()).await;
        assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_UNKNOWN_POS"), "{bad}: {body}");
    }
    // A position belongs to its user and device: nobody else continues it.
    let (status, body) = sliding(&bob, Some(&pos(&delta)), 0, request.clone()).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_UNKNOWN_POS"), "{body}");
    // A membership change reaches required_state even beyond the timeline's window: a client
    // that took the removed member for a present one would share room keys with them.
    alice.post(&format!("/_matrix/client/v3/rooms/{}/kick", enc(&first)), json!({ "user_id": bob.user_id })).await;
    alice.send_text(&first, "k1", "after the kick").await;
    let kicked = sliding_ok(&alice, Some(&pos(&again)), 0, &list_request(1, 1)).await;
    let state = kicked["rooms"][&first]["required_state"].as_array().unwrap();
    assert!(state.iter().any(|e| e["state_key"] == bob.user_id.as_str() && e["content"]["membership"] == "leave"), "{kicked}");
    assert_eq!(kicked["rooms"][&first]["joined_count"], 1);

    // Without a token there is no sliding sync.
    let (status, body) = sliding(&server.client(), None, 0, request.clone()).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"), "{body}");
}

#[tokio::test]
async fn a_waiting_connection_wakes_on_a_message() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = named_room(&alice, "talk").await;
    alice.invite(&room, &bob.user_id).await;
    bob.join(&room).await;
    let request = list_request(10, 5);
    let initial = sliding_ok(&alice, None, 0, &request).await;

    let sender = tokio::spawn({
        let (bob, room) = (bob.clone(), room.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            bob.send_text(&room, "late", "are you there?").await;
        }
    });
    let started = Instant::now();
    let woke = sliding_ok(&alice, Some(&pos(&initial)), 20_000, &request).await;
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_eq!(timeline_bodies(&woke["rooms"][&room]), ["are you there?"], "{woke}");
    sender.await.unwrap();

    // With nothing new, the request waits out its timeout and answers empty.
    let started = Instant::now();
    let empty = sliding_ok(&alice, Some(&pos(&woke)), 600, &request).await;
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(rooms(&empty).is_empty(), "{empty}");
}

#[tokio::test]
async fn subscriptions_filters_invites_and_leaving() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let stranger = server.register("stranger").await;
    let direct = alice.create_room(json!({ "is_direct": true, "invite": [bob.user_id], "preset": "trusted_private_chat" })).await;
    let space = alice.create_room(json!({ "name": "clinic space", "creation_content": { "type": "m.space" } })).await;
    let child = named_room(&alice, "child").await;
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.space.child/{}", enc(&space), enc(&child));
    alice.ok(Method::PUT, &path, Some(json!({ "via": ["test.local"] }))).await;
    let private = named_room(&stranger, "not yours").await;
    alice
        .ok(Method::PUT, &format!("/_matrix/client/v3/user/{}/account_data/m.direct", enc(&alice.user_id)), Some(json!({ bob.user_id.clone(): [direct] })))
        .await;

    let lists = |extra: Value| {
        let mut body = json!({ "lists": {
            "dms": { "ranges": [[0, 10]], "timeline_limit": 1, "filters": { "is_dm": true } },
            "no_spaces": { "ranges": [[0, 10]], "timeline_limit": 1, "filters": { "not_room_types": ["m.space"] } },
            "in_space": { "ranges": [[0, 10]], "timeline_limit": 1, "filters": { "spaces": [space] } },
        } });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let response = sliding_ok(&alice, None, 0, &lists(json!({}))).await;
    assert_eq!(response["lists"]["dms"]["count"], 1, "{response}");
    assert_eq!(response["lists"]["no_spaces"]["count"], 2, "{response}");
    assert_eq!(response["lists"]["in_space"]["count"], 1, "{response}");
    assert_eq!(response["rooms"][&direct]["is_dm"], true);
    assert!(response["rooms"][&child].get("is_dm").is_none());

    // An invite arrives with its stripped state; the is_invite filter finds it.
    let bob_request = json!({ "lists": {
        "invites": { "ranges": [[0, 10]], "timeline_limit": 1, "filters": { "is_invite": true } },
        "all": { "ranges": [[0, 10]], "timeline_limit": 5, "required_state": [["*", "*"]] },
    } });
    let invited = sliding_ok(&bob, None, 0, &bob_request).await;
    assert_eq!(invited["lists"]["invites"]["count"], 1, "{invited}");
    let invite = &invited["rooms"][&direct];
    let invite_state = invite["invite_state"].as_array().unwrap();
    assert!(invite_state.iter().any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "invite"), "{invite}");
    // The inviter's membership names the invite in clients.
    assert!(invite_state.iter().any(|e| e["state_key"] == alice.user_id.as_str() && e["content"]["membership"] == "join"), "{invite}");
    assert!(invite.get("timeline").is_none());
    // Joining turns it into a full room.
    bob.join(&direct).await;
    let joined = sliding_ok(&bob, Some(&pos(&invited)), 0, &bob_request).await;
    assert_eq!(joined["lists"]["invites"]["count"], 0);
    assert_eq!(joined["rooms"][&direct]["initial"], true, "{joined}");
    assert!(joined["rooms"][&direct]["required_state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.power_levels"));

    // A room without a name is named by its heroes, sent again when one of them changes.
    let heroes = &joined["rooms"][&direct]["heroes"];
    assert_eq!(heroes[0]["user_id"], alice.user_id.as_str(), "{joined}");
    alice.ok(Method::PUT, &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)), Some(json!({ "displayname": "Alice A." }))).await;
    let renamed = sliding_ok(&bob, Some(&pos(&joined)), 0, &bob_request).await;
    assert_eq!(renamed["rooms"][&direct]["heroes"][0]["displayname"], "Alice A.", "{renamed}");
    let joined = renamed;

    // A subscription reaches a room outside every window; a room the user is not in is ignored.
    let window = json!({ "lists": { "top": { "ranges": [[0, 0]], "timeline_limit": 1 } } });
    let base = sliding_ok(&alice, None, 0, &window).await;
    alice.send_text(&child, "c1", "newest").await;
    let top = sliding_ok(&alice, Some(&pos(&base)), 0, &window).await;
    assert_eq!(rooms(&top), [child.clone()]);
    let mut subscribed = window.clone();
    subscribed["room_subscriptions"] = json!({ direct.clone(): { "timeline_limit": 2 }, private.clone(): { "timeline_limit": 5 } });
    let response = sliding_ok(&alice, Some(&pos(&top)), 0, &subscribed).await;
    assert_eq!(rooms(&response), [direct.clone()], "{response}");
    // Unsubscribed, its news no longer arrive (while another room stays on top).
    bob.send_text(&direct, "d1", "unseen").await;
    alice.send_text(&child, "c2", "still on top").await;
    let after = sliding_ok(&alice, Some(&pos(&response)), 0, &window).await;
    assert!(!rooms(&after).contains(&direct), "{after}");

    // Leaving: the room comes once more with the leave, then no longer.
    bob.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&direct)), json!({})).await;
    let left = sliding_ok(&bob, Some(&pos(&joined)), 0, &bob_request).await;
    let leave = &left["rooms"][&direct];
    assert!(leave["timeline"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "leave"), "{left}");
    let fresh = sliding_ok(&bob, None, 0, &bob_request).await;
    assert!(!rooms(&fresh).contains(&direct), "{fresh}");
}

#[tokio::test]
async fn extensions_carry_to_device_keys_account_data_receipts_and_typing() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = named_room(&alice, "talk").await;
    alice.invite(&room, &bob.user_id).await;
    bob.join(&room).await;
    let request = json!({
        "lists": { "all": { "ranges": [[0, 10]], "timeline_limit": 1 } },
        "extensions": {
            "to_device": { "enabled": true },
            "e2ee": { "enabled": true },
            "account_data": { "enabled": true },
            "receipts": { "enabled": true },
            "typing": { "enabled": true },
        }
    });
    let initial = sliding_ok(&alice, None, 0, &request).await;
    let ext = &initial["extensions"];
    assert!(ext["to_device"]["next_batch"].is_string(), "{ext}");
    // What matrix-sdk needs to upload keys: the curve25519 count even at zero, the fallback types.
    assert_eq!(ext["e2ee"]["device_one_time_keys_count"]["signed_curve25519"], 0, "{ext}");
    assert!(ext["e2ee"]["device_unused_fallback_key_types"].is_array(), "{ext}");
    // The push rules come with the first global account data, defaults included.
    let global = ext["account_data"]["global"].as_array().unwrap();
    assert!(global.iter().any(|e| e["type"] == "m.push_rules" && e["content"]["global"]["override"].is_array()), "{ext}");

    // Every request carries its whole configuration: one without extensions gets none.
    let bare = json!({ "lists": { "all": { "ranges": [[0, 10]], "timeline_limit": 1 } } });
    let without = sliding_ok(&alice, Some(&pos(&initial)), 0, &bare).await;
    assert!(without["extensions"].as_object().is_none_or(|e| e.is_empty()), "{without}");
    let sticky = request.clone();
    bob.ok(Method::PUT, "/_matrix/client/v3/sendToDevice/m.test/t1", Some(json!({ "messages": { alice.user_id.clone(): { alice.device_id.clone(): { "hello": "alice" } } } }))).await;
    alice.ok(Method::PUT, &format!("/_matrix/client/v3/user/{}/account_data/m.test.global", enc(&alice.user_id)), Some(json!({ "a": 1 }))).await;
    alice
        .ok(Method::PUT, &format!("/_matrix/client/v3/user/{}/rooms/{}/account_data/m.test.room", enc(&alice.user_id), enc(&room)), Some(json!({ "b": 2 })))
        .await;
    let event = bob.send_text(&room, "m1", "read me").await;
    bob.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&event)), Some(json!({}))).await;
    bob.ok(Method::PUT, &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&bob.user_id)), Some(json!({ "typing": true, "timeout": 30000 }))).await;
    let one_time_keys = json!({ "one_time_keys": { "signed_curve25519:AAAA": { "key": "abc", "signatures": {} } } });
    alice.ok(Method::POST, "/_matrix/client/v3/keys/upload", Some(one_time_keys)).await;

    let next = sliding_ok(&alice, Some(&pos(&without)), 0, &sticky).await;
    let ext = &next["extensions"];
    let to_device = ext["to_device"]["events"].as_array().unwrap();
    assert_eq!(to_device.len(), 1, "{ext}");
    assert_eq!((to_device[0]["type"].as_str(), to_device[0]["sender"].as_str()), (Some("m.test"), Some(bob.user_id.as_str())));
    assert_eq!(ext["e2ee"]["device_one_time_keys_count"]["signed_curve25519"], 1, "{ext}");
    assert!(ext["account_data"]["global"].as_array().unwrap().iter().any(|e| e["type"] == "m.test.global"), "{ext}");
    assert_eq!(ext["account_data"]["rooms"][&room][0]["type"], "m.test.room", "{ext}");
    assert_eq!(ext["receipts"]["rooms"][&room]["content"][&event]["m.read"][&bob.user_id]["ts"].is_u64(), true, "{ext}");
    assert_eq!(ext["typing"]["rooms"][&room]["content"]["user_ids"], json!([bob.user_id]), "{ext}");

    // Acknowledged to-device messages are gone; unacknowledged ones come again.
    let repeat = sliding_ok(&alice, Some(&pos(&next)), 0, &sticky).await;
    assert_eq!(repeat["extensions"]["to_device"]["events"].as_array().unwrap().len(), 1);
    let mut acknowledged = sticky.clone();
    acknowledged["extensions"]["to_device"]["since"] = next["extensions"]["to_device"]["next_batch"].clone();
    let after = sliding_ok(&alice, Some(&pos(&repeat)), 0, &acknowledged).await;
    assert_eq!(after["extensions"]["to_device"]["events"].as_array().map_or(0, Vec::len), 0, "{after}");
}

async fn verified_therapist(server: &TestServer, admin: &Client, name: &str) -> Client {
    let therapist = server.register(name).await;
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
    therapist
}

#[tokio::test]
async fn clinic_rules_hold_in_sliding_sync() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    let knocker = server.register("knocker").await;
    let start = now_ms();
    let created = therapist
        .ok(Method::POST, SESSIONS, Some(json!({
            "kind": "group", "title": "Group", "starts_at": start, "ends_at": start + HOUR, "timezone": "UTC",
            "participants": [{ "user_id": client.user_id, "role": "client" }]
        })))
        .await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    assert_eq!(client.join(&room).await.0, StatusCode::OK);
    let notes = therapist.ok(Method::PUT, &format!("{SESSIONS}/{}/notes/intake", enc(&room)), Some(json!({ "body": "private" }))).await;
    let notes_room = notes["room_id"].as_str().unwrap().to_owned();
    let everything = json!({ "lists": { "all": { "ranges": [[0, 50]], "timeline_limit": 50, "required_state": [["*", "*"]] } } });

    // The client never learns of the notes room, even by subscribing to it.
    let mut probing = everything.clone();
    probing["room_subscriptions"] = json!({ notes_room.clone(): { "timeline_limit": 10, "required_state": [["*", "*"]] } });
    let seen = sliding_ok(&client, None, 0, &probing).await;
    assert!(rooms(&seen).contains(&room) && !rooms(&seen).contains(&notes_room), "{seen}");
    assert_eq!(seen["lists"]["all"]["count"], 1);
    assert!(!seen.to_string().contains("private"));
    // The therapist has both.
    let own = sliding_ok(&therapist, None, 0, &everything).await;
    assert!(rooms(&own).contains(&notes_room));

    // A knocker sees the waiting room's stripped state; once declined, only their own leave.
    knocker.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(json!({ "reason": "hello" }))).await;
    let knocked = sliding_ok(&knocker, None, 0, &everything).await;
    let waiting = &knocked["rooms"][&room];
    assert!(waiting["invite_state"].as_array().unwrap().iter().any(|e| e["content"]["membership"] == "knock"), "{knocked}");
    assert!(waiting.get("timeline").is_none() && waiting.get("required_state").is_none(), "{waiting}");
    assert!(!knocked.to_string().contains("org.limbic.session.role"), "{knocked}");
    therapist
        .ok(Method::POST, &format!("{SESSIONS}/{}/waiting/{}/decline", enc(&room), enc(&knocker.user_id)), Some(json!({ "reason": "not today" })))
        .await;
    let declined = sliding_ok(&knocker, Some(&pos(&knocked)), 0, &everything).await;
    let left = &declined["rooms"][&room];
    let timeline = left["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 1, "{left}");
    assert_eq!((timeline[0]["content"]["membership"].as_str(), timeline[0]["content"]["reason"].as_str()), (Some("leave"), Some("not today")));
    let state = left["required_state"].as_array().unwrap();
    assert!(state.iter().all(|e| e["type"] == "m.room.member" && e["state_key"] == knocker.user_id.as_str()), "{left}");
    assert!(left.get("joined_count").is_none() && left.get("heroes").is_none(), "attendance leaked: {left}");
    assert!(!declined.to_string().contains(&client.user_id), "a declined knocker learns who attends: {declined}");

    // A participant removed from the session stops receiving its messages.
    let before = sliding_ok(&client, None, 0, &everything).await;
    therapist.post(&format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)), json!({ "user_id": client.user_id, "reason": "ended" })).await;
    let after = therapist.send_text(&room, "after", "after the kick").await;
    therapist.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&after)), Some(json!({}))).await;
    therapist.ok(Method::PUT, &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&therapist.user_id)), Some(json!({ "typing": true, "timeout": 30000 }))).await;
    let mut with_extensions = everything.clone();
    with_extensions["extensions"] = json!({ "receipts": { "enabled": true }, "typing": { "enabled": true } });
    let removed = sliding_ok(&client, Some(&pos(&before)), 0, &with_extensions).await;
    assert!(!removed.to_string().contains("after the kick") && !removed.to_string().contains(&after), "{removed}");
    assert!(removed["extensions"]["typing"]["rooms"].get(&room).is_none(), "{removed}");
    let later = sliding_ok(&client, Some(&pos(&removed)), 0, &everything).await;
    assert!(!later.to_string().contains("after the kick"), "{later}");
    // Who joins after the removal stays unknown to the removed member.
    let newcomer = server.register("newcomer").await;
    assert_eq!(therapist.invite(&room, &newcomer.user_id).await.0, StatusCode::OK);
    // On a new connection the room is still listed as the client left it: up to the removal.
    let fresh = sliding_ok(&client, None, 0, &everything).await;
    assert_eq!(fresh["rooms"][&room]["invited_count"], 0, "{fresh}");
    assert!(!fresh.to_string().contains(&newcomer.user_id), "{fresh}");
    let removed_room = &fresh["rooms"][&room];
    assert!(removed_room["timeline"].as_array().unwrap().iter().any(|e| e["content"]["membership"] == "leave"), "{fresh}");
    assert!(!fresh.to_string().contains("after the kick"), "{fresh}");
    // And the declined knocker's new connection shows their leave only.
    let declined_again = sliding_ok(&knocker, None, 0, &everything).await;
    let state = declined_again["rooms"][&room]["required_state"].as_array().unwrap();
    assert!(state.iter().all(|e| e["state_key"] == knocker.user_id.as_str()), "{declined_again}");
    assert!(!declined_again.to_string().contains(&client.user_id), "{declined_again}");
}
