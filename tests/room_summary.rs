//! End-to-end tests: room summaries (MSC3266, `GET /_matrix/client/v1/room_summary`) — who may
//! see a room's summary, what a session room shows outsiders (its waiting room, no more), notes
//! rooms kept to their members — and the spec versions and unstable features `/versions` claims.

mod common;

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SESSIONS: &str = "/_limbic/client/v1/sessions";
const MINUTE: u64 = 60_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The stable path, then the two unstable ones, which must answer the same.
async fn summary(client: &Client, room: &str) -> (StatusCode, Value) {
    let (status, body) = client.get(&format!("/_matrix/client/v1/room_summary/{}", enc(room))).await;
    for path in [
        format!("/_matrix/client/unstable/im.nheko.summary/rooms/{}/summary", enc(room)),
        format!("/_matrix/client/unstable/im.nheko.summary/summary/{}", enc(room)),
    ] {
        assert_eq!(client.get(&path).await, (status, body.clone()), "{path} differs from the stable path");
    }
    (status, body)
}

/// A summary that must be there.
async fn visible(client: &Client, room: &str) -> Value {
    let (status, body) = summary(client, room).await;
    assert_eq!(status, StatusCode::OK, "summary of {room} for {}: {body}", client.user_id);
    body
}

/// A summary that must not be: the same 404 as for a room that does not exist.
async fn hidden(client: &Client, room: &str) {
    let (status, body) = summary(client, room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "summary of {room} for {:?}: {body}", client.user_id);
}

async fn put_state(client: &Client, room: &str, kind: &str, content: Value) -> (StatusCode, Value) {
    client.put(&format!("/_matrix/client/v3/rooms/{}/state/{kind}/", enc(room)), content).await
}

#[tokio::test]
async fn public_rooms_are_summarised_for_anyone() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let anonymous = server.client();
    let room = alice
        .create_room(json!({ "preset": "public_chat", "name": "Lobby", "topic": "All welcome", "room_alias_name": "lobby" }))
        .await;

    let seen = visible(&bob, &room).await;
    assert_eq!(seen["room_id"], room.as_str());
    assert_eq!(seen["name"], "Lobby");
    assert_eq!(seen["topic"], "All welcome");
    assert_eq!(seen["canonical_alias"], "#lobby:test.local");
    assert_eq!(seen["join_rule"], "public", "join_rule is sent even when public: {seen}");
    assert_eq!(seen["num_joined_members"], 1);
    assert_eq!(seen["world_readable"], false);
    assert_eq!(seen["guest_can_join"], false);
    assert_eq!(seen["room_version"], "11");
    assert_eq!(seen["membership"], "leave", "a signed-in caller gets their membership: {seen}");
    assert!(seen.get("encryption").is_none() && seen.get("room_type").is_none(), "{seen}");

    // Without an access token: the same summary, without a membership.
    let anonymous_view = visible(&anonymous, &room).await;
    assert!(anonymous_view.get("membership").is_none(), "{anonymous_view}");
    assert_eq!(anonymous_view["num_joined_members"], 1);

    // By alias, and after joining.
    assert_eq!(visible(&bob, "#lobby:test.local").await["room_id"], room.as_str());
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    let joined = visible(&bob, &room).await;
    assert_eq!((joined["membership"].as_str(), joined["num_joined_members"].as_u64()), (Some("join"), Some(2)));

    // An invalid token is refused, not treated as anonymous.
    let mut forged = anonymous.clone();
    forged.token = Some("not-a-token".into());
    let (status, body) = forged.get(&format!("/_matrix/client/v1/room_summary/{}", enc(&room))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"));
}

#[tokio::test]
async fn private_rooms_only_for_members_and_invitees() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let stranger = server.register("stranger").await;
    let anonymous = server.client();
    let encryption = json!({ "type": "m.room.encryption", "state_key": "", "content": { "algorithm": "m.megolm.v1.aes-sha2" } });
    let room = alice
        .create_room(json!({ "preset": "private_chat", "name": "Secret", "room_alias_name": "secret", "initial_state": [encryption] }))
        .await;

    // Outsiders learn nothing, by id or alias, and get the answer an unknown room gets.
    hidden(&stranger, &room).await;
    hidden(&anonymous, &room).await;
    hidden(&stranger, "#secret:test.local").await;
    hidden(&stranger, "!unknown:test.local").await;
    hidden(&stranger, "#unknown:test.local").await;
    let (status, body) = summary(&stranger, "not-a-room").await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"), "{body}");

    let own = visible(&alice, &room).await;
    assert_eq!((own["name"].as_str(), own["join_rule"].as_str()), (Some("Secret"), Some("invite")));
    assert_eq!(own["encryption"], "m.megolm.v1.aes-sha2");
    assert_eq!(own["membership"], "join");

    // An invitee sees it, then as a member; once they leave, nothing again.
    assert_eq!(alice.invite(&room, &bob.user_id).await.0, StatusCode::OK);
    assert_eq!(visible(&bob, &room).await["membership"], "invite");
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    assert_eq!(visible(&bob, &room).await["num_joined_members"], 2);
    bob.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(json!({}))).await;
    hidden(&bob, &room).await;
    assert_eq!(visible(&alice, &room).await["num_joined_members"], 1);
}

#[tokio::test]
async fn knock_restricted_and_world_readable_rooms() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let carol = server.register("carol").await;
    let anonymous = server.client();

    // Knockable rooms show themselves, to anonymous callers too (the spec allows it).
    let knock = alice
        .create_room(json!({ "preset": "private_chat", "name": "Knock here", "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }] }))
        .await;
    let seen = visible(&carol, &knock).await;
    assert_eq!((seen["join_rule"].as_str(), seen["membership"].as_str()), (Some("knock"), Some("leave")));
    assert_eq!(visible(&anonymous, &knock).await["name"], "Knock here");

    // A restricted room: only to members of a room it names, which the summary lists.
    let space = alice.create_room(json!({ "preset": "private_chat", "name": "Team" })).await;
    let allow = json!({ "join_rule": "restricted", "allow": [{ "type": "m.room_membership", "room_id": space }] });
    let restricted = alice
        .create_room(json!({ "preset": "private_chat", "name": "Team only", "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": allow }] }))
        .await;
    hidden(&carol, &restricted).await;
    hidden(&anonymous, &restricted).await;
    assert_eq!(alice.invite(&space, &carol.user_id).await.0, StatusCode::OK);
    hidden(&carol, &restricted).await; // invited to the named room is not joined to it
    assert_eq!(carol.join(&space).await.0, StatusCode::OK);
    let seen = visible(&carol, &restricted).await;
    assert_eq!(seen["join_rule"], "restricted");
    assert_eq!(seen["allowed_room_ids"], json!([space]));
    hidden(&anonymous, &restricted).await;

    // World-readable history opens an invite-only room to anyone.
    let readable = alice
        .create_room(json!({ "preset": "private_chat", "initial_state": [{ "type": "m.room.history_visibility", "state_key": "", "content": { "history_visibility": "world_readable" } }] }))
        .await;
    assert_eq!(visible(&anonymous, &readable).await["world_readable"], true);
}

async fn verified_therapist(server: &TestServer, name: &str) -> Client {
    let admin = server.register_admin(&format!("{name}-admin")).await;
    let therapist = server.register(name).await;
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
    therapist
}

/// A group session starting in five minutes (its join window is open), with `client`.
async fn group_session(therapist: &Client, client: &Client, title: &str, passcode: Option<&str>) -> String {
    let start = now_ms() + 5 * MINUTE;
    let mut request = json!({
        "kind": "group", "title": title, "starts_at": start, "ends_at": start + 60 * MINUTE, "timezone": "Europe/Berlin",
        "participants": [{ "user_id": client.user_id, "role": "client" }],
    });
    if let Some(passcode) = passcode {
        request["passcode"] = json!(passcode);
    }
    therapist.ok(Method::POST, SESSIONS, Some(request)).await["room_id"].as_str().unwrap().to_owned()
}

/// The waiting room's view: the stripped state only — no member count (0), history visibility
/// or guest access (false), whatever the room says.
fn assert_waiting_room_view(seen: &Value, title: &str, membership: &str) {
    assert_eq!(seen["name"], title, "{seen}");
    assert_eq!(seen["topic"], "Tuesday evenings", "{seen}");
    assert_eq!(seen["join_rule"], "knock", "{seen}");
    assert_eq!(seen["room_version"], "11", "{seen}");
    assert_eq!(seen["membership"], membership, "{seen}");
    assert_eq!(seen["num_joined_members"], 0, "attendance is not shown: {seen}");
    assert_eq!((seen["world_readable"].as_bool(), seen["guest_can_join"].as_bool()), (Some(false), Some(false)), "{seen}");
}

#[tokio::test]
async fn a_session_room_shows_outsiders_only_its_waiting_room() {
    let server = TestServer::start().await;
    let therapist = verified_therapist(&server, "therapist").await;
    let client = server.register("client").await;
    let stranger = server.register("stranger").await;
    let banned = server.register("banned").await;
    let anonymous = server.client();
    let room = group_session(&therapist, &client, "Grief group", None).await;
    assert_eq!(put_state(&therapist, &room, "m.room.topic", json!({ "topic": "Tuesday evenings" })).await.0, StatusCode::OK);
    // Settings the waiting room does not show, and which must not leak through the summary.
    assert_eq!(put_state(&therapist, &room, "m.room.guest_access", json!({ "guest_access": "can_join" })).await.0, StatusCode::OK);
    assert_eq!(put_state(&therapist, &room, "m.room.history_visibility", json!({ "history_visibility": "world_readable" })).await.0, StatusCode::OK);
    assert_eq!(client.join(&room).await.0, StatusCode::OK);

    // Members see it all.
    let full = visible(&therapist, &room).await;
    assert_eq!(full["num_joined_members"], 2, "{full}");
    assert_eq!((full["world_readable"].as_bool(), full["guest_can_join"].as_bool()), (Some(true), Some(true)), "{full}");
    assert_eq!(visible(&client, &room).await["membership"], "join");

    // A signed-in outsider sees what knocking would show them, and nothing more.
    assert_waiting_room_view(&visible(&stranger, &room).await, "Grief group", "leave");
    // Nobody anonymous can knock: nothing, though the room is public-ish by Matrix rules.
    hidden(&anonymous, &room).await;

    // In the waiting room: the same view.
    stranger.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(json!({ "reason": "hello" }))).await;
    assert_waiting_room_view(&visible(&stranger, &room).await, "Grief group", "knock");

    // Someone banned cannot knock, so sees nothing.
    therapist
        .ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)), Some(json!({ "user_id": banned.user_id })))
        .await;
    hidden(&banned, &room).await;

    // Once the session is over nobody can knock: outsiders see nothing; the knocker still
    // sees their waiting room.
    therapist.ok(Method::PUT, &format!("{SESSIONS}/{}/status", enc(&room)), Some(json!({ "status": "cancelled" }))).await;
    let outsider = server.register("latecomer").await;
    hidden(&outsider, &room).await;
    assert_waiting_room_view(&visible(&stranger, &room).await, "Grief group", "knock");

    // A session behind a passcode: whoever lacks it cannot reach its waiting room.
    let guarded = group_session(&therapist, &client, "Private group", Some("teal-heron-7")).await;
    hidden(&outsider, &guarded).await;
    // Invited participants see its waiting room too.
    let invited = visible(&client, &guarded).await;
    assert_eq!((invited["membership"].as_str(), invited["num_joined_members"].as_u64()), (Some("invite"), Some(0)), "{invited}");
}

#[tokio::test]
async fn a_notes_room_is_summarised_only_to_its_members() {
    let server = TestServer::start().await;
    let therapist = verified_therapist(&server, "therapist").await;
    let client = server.register("client").await;
    let stranger = server.register("stranger").await;
    let anonymous = server.client();
    let room = group_session(&therapist, &client, "Grief group", None).await;
    assert_eq!(client.join(&room).await.0, StatusCode::OK);
    let note = therapist.ok(Method::PUT, &format!("{SESSIONS}/{}/notes/intake", enc(&room)), Some(json!({ "body": "first session" }))).await;
    let notes_room = note["room_id"].as_str().unwrap().to_owned();

    assert_eq!(visible(&therapist, &notes_room).await["membership"], "join");
    // Even if its therapist opened it up by Matrix rules, nobody else learns of it — not the
    // session's client.
    assert_eq!(put_state(&therapist, &notes_room, "m.room.join_rules", json!({ "join_rule": "public" })).await.0, StatusCode::OK);
    assert_eq!(put_state(&therapist, &notes_room, "m.room.history_visibility", json!({ "history_visibility": "world_readable" })).await.0, StatusCode::OK);
    assert_eq!(visible(&therapist, &notes_room).await["join_rule"], "public");
    for outsider in [&client, &stranger, &anonymous] {
        hidden(outsider, &notes_room).await;
    }
}

#[tokio::test]
async fn versions_claims_only_what_is_served() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let versions = server.client().ok(Method::GET, "/_matrix/client/versions", None).await;
    let claimed: Vec<&str> = versions["versions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let stable: Vec<String> = (1..=15).map(|minor| format!("v1.{minor}")).collect();
    let expected: Vec<&str> = ["r0.5.0", "r0.6.0", "r0.6.1"].into_iter().chain(stable.iter().map(String::as_str)).collect();
    assert_eq!(claimed, expected, "{versions}");
    for feature in ["org.matrix.msc3266", "org.matrix.msc3916.stable", "org.matrix.msc4140", "org.matrix.simplified_msc3575"] {
        assert_eq!(versions["unstable_features"][feature], true, "{feature}: {versions}");
    }
    assert!(versions["unstable_features"].as_object().unwrap().values().all(|v| v == true), "{versions}");

    // The endpoint v1.6 added is served (tests/client_api_areas.rs tests it in full); v1.16's
    // custom profile fields are not, so v1.16 is not claimed.
    let room = alice.create_room(json!({})).await;
    let (status, body) = alice.get(&format!("/_matrix/client/v1/rooms/{}/timestamp_to_event?ts=0&dir=f", enc(&room))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = alice.get(&format!("/_matrix/client/v3/profile/{}/org.example.custom", enc(&alice.user_id))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"), "{body}");
    // The features listed are served: room summaries, authenticated media.
    assert_eq!(visible(&alice, &room).await["room_id"], room.as_str());
    assert_eq!(alice.get("/_matrix/client/v1/media/config").await.0, StatusCode::OK);
    // v1.15's OAuth 2.0 metadata: a server without the OAuth 2.0 API answers 404 M_UNRECOGNIZED,
    // as the spec asks.
    let (status, body) = server.client().get("/_matrix/client/v1/auth_metadata").await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"), "{body}");
}
