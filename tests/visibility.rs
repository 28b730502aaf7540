//! End-to-end tests: who may read a room through the client API. Someone who knocked and left
//! (withdrawn or declined) reads nothing of it; a former member reads it as of their leave and no
//! further.

mod common;

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A room on `server` that `owner` created with a knock join rule and the given name.
async fn knock_room(owner: &Client, name: &str) -> String {
    owner
        .create_room(json!({
            "name": name,
            "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }],
        }))
        .await
}

/// The event id of `user`'s current membership event, as a member of the room reads it.
async fn membership_event(member: &Client, room: &str, user: &str) -> String {
    let state = member.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state", enc(room)), None).await;
    let event = state.as_array().unwrap().iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == user).unwrap();
    event["event_id"].as_str().unwrap().to_owned()
}

/// Every client read of the room is refused to `reader` with 403 `M_FORBIDDEN`.
async fn reads_nothing(reader: &Client, room: &str, events: &[&str]) {
    let base = format!("/_matrix/client/v3/rooms/{}", enc(room));
    let mut paths = vec![
        format!("{base}/state"),
        format!("{base}/state/m.room.name/"),
        format!("{base}/state/m.room.join_rules/"),
        format!("{base}/members"),
        format!("{base}/joined_members"),
        format!("{base}/messages?dir=b&limit=50"),
        format!("{base}/messages?dir=f&limit=50"),
        format!("/_matrix/client/v1/rooms/{}/timestamp_to_event?ts=0&dir=f", enc(room)),
    ];
    for event in events {
        paths.push(format!("{base}/event/{}", enc(event)));
        paths.push(format!("{base}/context/{}", enc(event)));
        paths.push(format!("/_matrix/client/v1/rooms/{}/relations/{}", enc(room), enc(event)));
    }
    for path in paths {
        let (status, body) = reader.get(&path).await;
        assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{} read {path}: {body}", reader.user_id);
    }
}

/// An initial /sync with left rooms: the room's entry, if any.
async fn left_room_in_sync(client: &Client, room: &str) -> Value {
    let filter = enc(&json!({ "room": { "include_leave": true } }).to_string());
    let synced = client.ok(Method::GET, &format!("/_matrix/client/v3/sync?timeout=0&filter={filter}"), None).await;
    synced["rooms"]["leave"][room].clone()
}

#[tokio::test]
async fn knockers_who_withdrew_or_were_declined_read_nothing_of_the_room() {
    let server = TestServer::start().await;
    let therapist = server.register("therapist").await;
    let (withdrawn, declined) = (server.register("withdrawn").await, server.register("declined").await);
    let room = knock_room(&therapist, "Intake: Jane Doe").await;
    let secret = therapist.send_text(&room, "t1", "the diagnosis is confidential").await;

    for who in [&withdrawn, &declined] {
        who.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(json!({ "reason": "let me in" }))).await;
    }
    withdrawn.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(json!({}))).await;
    therapist.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)), Some(json!({ "user_id": declined.user_id, "reason": "not today" }))).await;

    for who in [&withdrawn, &declined] {
        // Not the room's messages, nor the state at their own leave through /context.
        let own_leave = membership_event(&therapist, &room, &who.user_id).await;
        reads_nothing(who, &room, &[&secret, &own_leave]).await;
        // /sync shows the leave (the declined knocker learns the reason) and nothing else.
        let left = left_room_in_sync(who, &room).await;
        let timeline = left["timeline"]["events"].as_array().cloned().unwrap_or_default();
        assert!(timeline.iter().any(|e| e["event_id"] == own_leave.as_str()), "{left}");
        assert!(timeline.iter().all(|e| e["type"] == "m.room.member" && e["state_key"] == who.user_id.as_str()), "{left}");
        assert_eq!(left["state"]["events"].as_array().map_or(0, Vec::len), 0, "{left}");
    }
    // Knocking again and waiting reads nothing either.
    withdrawn.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(json!({}))).await;
    reads_nothing(&withdrawn, &room, &[&secret]).await;
}

#[tokio::test]
async fn a_former_member_reads_the_room_as_of_their_leave_and_no_further() {
    let server = TestServer::start().await;
    let therapist = server.register("therapist").await;
    let (former, later) = (server.register("former").await, server.register("later").await);
    let room = knock_room(&therapist, "Group").await;
    let base = format!("/_matrix/client/v3/rooms/{}", enc(&room));
    assert_eq!(therapist.invite(&room, &former.user_id).await.0, StatusCode::OK);
    assert_eq!(former.join(&room).await.0, StatusCode::OK);
    let during = therapist.send_text(&room, "t1", "while you were here").await;
    former.ok(Method::POST, &format!("{base}/leave"), Some(json!({}))).await;

    // After the leave: a new name, a new member, a message.
    therapist.ok(Method::PUT, &format!("{base}/state/m.room.name/"), Some(json!({ "name": "Renamed later" }))).await;
    assert_eq!(therapist.invite(&room, &later.user_id).await.0, StatusCode::OK);
    assert_eq!(later.join(&room).await.0, StatusCode::OK);
    let after = therapist.send_text(&room, "t2", "after you left").await;

    let name = former.ok(Method::GET, &format!("{base}/state/m.room.name/"), None).await;
    assert_eq!(name["name"], "Group");
    let state = former.ok(Method::GET, &format!("{base}/state"), None).await.to_string();
    assert!(!state.contains("Renamed later") && !state.contains(&later.user_id), "{state}");
    let members = former.ok(Method::GET, &format!("{base}/members"), None).await.to_string();
    assert!(!members.contains(&later.user_id), "{members}");
    let messages = former.messages(&room, "dir=b&limit=50").await.to_string();
    assert!(messages.contains("while you were here") && !messages.contains("after you left"), "{messages}");
    assert_eq!(former.get(&format!("{base}/event/{}", enc(&during))).await.0, StatusCode::OK);
    let (status, body) = former.get(&format!("{base}/event/{}", enc(&after))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{body}");
    let context = former.ok(Method::GET, &format!("{base}/context/{}", enc(&during)), None).await.to_string();
    assert!(!context.contains("after you left") && !context.contains("Renamed later"), "{context}");
    // Only a current member reads who is joined now.
    let (status, _) = former.get(&format!("{base}/joined_members")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Knocking again and leaving makes the former member a stranger who left: their stay ended
    // with the first leave, and the second tells nothing of what happened since.
    therapist.ok(Method::PUT, &format!("{base}/state/m.room.topic/"), Some(json!({ "topic": "while you knocked" }))).await;
    former.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(json!({}))).await;
    former.ok(Method::POST, &format!("{base}/leave"), Some(json!({}))).await;
    reads_nothing(&former, &room, &[&during, &after]).await;
    let left = left_room_in_sync(&former, &room).await.to_string();
    assert!(!left.contains("while you knocked") && !left.contains("Renamed later"), "{left}");
}
