//! End-to-end tests: therapy sessions as rooms — verified therapists, the sessions API, and the
//! clinic rules enforced on raw Matrix events too.

mod common;

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SESSIONS: &str = "/_limbic/client/v1/sessions";

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

const HOUR: u64 = 3_600_000;

async fn verified_therapist(server: &TestServer, admin: &Client, name: &str) -> Client {
    let therapist = server.register(name).await;
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
    therapist
}

fn session_request(kind: &str, starts_at: u64, ends_at: u64, participants: Value) -> Value {
    json!({ "kind": kind, "title": "Weekly session", "starts_at": starts_at, "ends_at": ends_at, "timezone": "Europe/Berlin", "participants": participants })
}

async fn session_state(client: &Client, room: &str) -> Value {
    client.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/org.limbic.session/", enc(room)), None).await
}

async fn put_session(client: &Client, room: &str, content: &Value) -> (StatusCode, Value) {
    client.put(&format!("/_matrix/client/v3/rooms/{}/state/org.limbic.session/", enc(room)), content.clone()).await
}

#[tokio::test]
async fn only_verified_therapists_create_sessions() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = server.register("therapist").await;
    let client = server.register("client").await;
    let start = now_ms() + HOUR;
    let request = session_request("individual", start, start + HOUR, json!([{ "user_id": client.user_id, "role": "client" }]));
    let (status, body) = therapist.post(SESSIONS, request.clone()).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");

    // Only admins verify therapists; the verification is audited.
    let (status, _) = client.put(&format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), json!({ "verified": true })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
    let check = admin.ok(Method::GET, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), None).await;
    assert_eq!(check["verified"], true);
    let audit = admin.ok(Method::GET, &format!("/_limbic/admin/v1/audit?user={}", enc(&therapist.user_id)), None).await;
    assert!(audit["entries"].as_array().unwrap().iter().any(|e| e["action"] == "therapist_verified"));

    let created = therapist.ok(Method::POST, SESSIONS, Some(request)).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    assert_eq!(created["session"]["status"], "scheduled");
    assert_eq!(created["session"]["max_participants"], 2);

    // Any Matrix client sees the same session as state, and the client was invited.
    let state = session_state(&therapist, &room).await;
    assert_eq!((state["kind"].as_str(), state["status"].as_str()), (Some("individual"), Some("scheduled")));
    let sync = client.sync(None, 0).await;
    assert!(sync["rooms"]["invite"][&room].is_object());
    let view = client.ok(Method::GET, &format!("{SESSIONS}/{}", enc(&room)), None).await;
    assert_eq!(view["roles"][&therapist.user_id], "therapist");
    assert_eq!(view["roles"][&client.user_id], "client");
    let upcoming = client.ok(Method::GET, SESSIONS, None).await;
    assert_eq!(upcoming["sessions"][0]["room_id"], room.as_str());

    // A non-therapist cannot fake a session in an ordinary room either.
    let plain = client.create_room(json!({})).await;
    let (status, _) = put_session(&client, &plain, &json!({ "kind": "individual", "title": "x", "starts_at": start, "ends_at": start + HOUR, "timezone": "UTC", "status": "scheduled", "max_participants": 2 })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn status_workflow_limits_and_join_window() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    let partner = server.register("partner").await;
    let start = now_ms() + 2 * HOUR;
    let created = therapist.ok(Method::POST, SESSIONS, Some(session_request("individual", start, start + HOUR, json!([{ "user_id": client.user_id, "role": "client" }])))).await;
    let room = created["room_id"].as_str().unwrap().to_owned();

    // Outside the join window the scheduled client cannot join yet.
    let (status, body) = client.join(&room).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"].as_str().unwrap().contains("opens"), "{body}");

    // An individual session has room for two: a third role is refused, through any API.
    let role_path = format!("/_matrix/client/v3/rooms/{}/state/org.limbic.session.role/{}", enc(&room), enc(&format!("_{}", partner.user_id)));
    let (status, body) = therapist.put(&role_path, json!({ "role": "client" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"].as_str().unwrap().contains("full"), "{body}");
    let mut session = session_state(&therapist, &room).await;
    session["max_participants"] = json!(3);
    let (status, body) = put_session(&therapist, &room, &session).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"), "more than the kind allows");

    // The client cannot change the session; the therapist reschedules it to now.
    let mut session = session_state(&therapist, &room).await;
    session["starts_at"] = json!(now_ms() + 5 * 60_000);
    session["ends_at"] = json!(now_ms() + HOUR);
    let (status, _) = put_session(&client, &room, &session).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = put_session(&therapist, &room, &session).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(client.join(&room).await.0, StatusCode::OK);

    // Status only along the workflow.
    let status_path = format!("{SESSIONS}/{}/status", enc(&room));
    let (status, body) = therapist.put(&status_path, json!({ "status": "in_progress" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "scheduled cannot jump to in_progress: {body}");
    for next in ["open", "in_progress", "completed"] {
        therapist.ok(Method::PUT, &status_path, Some(json!({ "status": next }))).await;
    }
    let (status, _) = therapist.put(&status_path, json!({ "status": "cancelled" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a completed session is final");
    let (status, _) = client.put(&status_path, json!({ "status": "open" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = therapist.put(&status_path, json!({ "status": "nonsense" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"));
}

#[tokio::test]
async fn no_double_booking_and_the_waiting_room() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let stranger = server.register("stranger").await;
    let start = now_ms() + 3 * HOUR;
    let first = therapist.ok(Method::POST, SESSIONS, Some(session_request("group", start, start + HOUR, json!([])))).await;
    let first_room = first["room_id"].as_str().unwrap().to_owned();

    let (status, body) = therapist.post(SESSIONS, session_request("group", start + HOUR / 2, start + 2 * HOUR, json!([]))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].as_str().unwrap().contains("already booked"));
    therapist.ok(Method::POST, SESSIONS, Some(session_request("group", start + HOUR, start + 2 * HOUR, json!([])))).await;
    // Once the first is cancelled its time is free again.
    therapist.ok(Method::PUT, &format!("{SESSIONS}/{}/status", enc(&first_room)), Some(json!({ "status": "cancelled" }))).await;
    let now_group = therapist.ok(Method::POST, SESSIONS, Some(session_request("group", now_ms(), now_ms() + HOUR / 2, json!([])))).await;
    let room = now_group["room_id"].as_str().unwrap().to_owned();

    // Someone without a role cannot walk in: they knock, wait, and are admitted.
    let (status, _) = stranger.join(&room).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    stranger.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(json!({ "reason": "new here" }))).await;
    assert_eq!(therapist.invite(&room, &stranger.user_id).await.0, StatusCode::OK);
    assert_eq!(stranger.join(&room).await.0, StatusCode::OK);
    // A cancelled session takes no one.
    let (status, _) = stranger.post(&format!("/_matrix/client/v3/knock/{}", enc(&first_room)), json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn notes_are_for_therapists_only_and_keep_their_history() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    let observer = server.register("observer").await;
    let start = now_ms();
    let created = therapist.ok(Method::POST, SESSIONS, Some(json!({
        "kind": "group", "title": "Group", "starts_at": start, "ends_at": start + HOUR, "timezone": "UTC",
        "participants": [{ "user_id": client.user_id, "role": "client" }, { "user_id": observer.user_id, "role": "observer" }]
    }))).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    let notes = format!("{SESSIONS}/{}/notes", enc(&room));

    let first = therapist.ok(Method::PUT, &format!("{notes}/intake"), Some(json!({ "body": "first impression" }))).await;
    let notes_room = first["room_id"].as_str().unwrap().to_owned();
    therapist.ok(Method::PUT, &format!("{notes}/intake"), Some(json!({ "body": "revised impression" }))).await;
    let listed = therapist.ok(Method::GET, &notes, None).await;
    let versions: Vec<&str> = listed["notes"][0]["versions"].as_array().unwrap().iter().map(|v| v["content"]["body"].as_str().unwrap()).collect();
    assert_eq!(versions, ["revised impression", "first impression"]);

    // Neither the client nor the observer reads, writes, joins or peeks.
    for outsider in [&client, &observer] {
        assert_eq!(outsider.get(&notes).await.0, StatusCode::FORBIDDEN);
        assert_eq!(outsider.put(&format!("{notes}/intake"), json!({ "body": "x" })).await.0, StatusCode::FORBIDDEN);
        assert_eq!(outsider.join(&notes_room).await.0, StatusCode::FORBIDDEN);
        let (status, _) = outsider.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(&notes_room))).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, _) = outsider.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b", enc(&notes_room))).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let sync = outsider.sync(None, 0).await;
        assert!(sync["rooms"]["join"].get(&notes_room).is_none() && sync["rooms"]["invite"].get(&notes_room).is_none());
    }
    // Even the therapist cannot invite a client into the notes room, nor put a note in the session room.
    let (status, _) = therapist.invite(&notes_room, &client.user_id).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = therapist.put(&format!("/_matrix/client/v3/rooms/{}/state/org.limbic.session.note/x", enc(&room)), json!({ "body": "leak" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The notes room never federates.
    let create = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.room.create/", enc(&notes_room)), None).await;
    assert_eq!(create["m.federate"], false);
    // Reads and writes are audited.
    let audit = admin.ok(Method::GET, &format!("/_limbic/admin/v1/audit?room_id={}", enc(&room)), None).await;
    let actions: Vec<&str> = audit["entries"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert!(actions.contains(&"note_write") && actions.contains(&"note_read"), "{actions:?}");
}

#[tokio::test]
async fn session_changes_are_audited() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    let start = now_ms() + HOUR;
    let created = therapist.ok(Method::POST, SESSIONS, Some(session_request("couples", start, start + HOUR, json!([{ "user_id": client.user_id, "role": "client" }])))).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    therapist.ok(Method::PUT, &format!("{SESSIONS}/{}/status", enc(&room)), Some(json!({ "status": "open" }))).await;
    let mut session = session_state(&therapist, &room).await;
    session["starts_at"] = json!(start + 2 * HOUR);
    session["ends_at"] = json!(start + 3 * HOUR);
    assert_eq!(put_session(&therapist, &room, &session).await.0, StatusCode::OK);
    let role_path = format!("/_matrix/client/v3/rooms/{}/state/org.limbic.session.role/{}", enc(&room), enc(&format!("_{}", client.user_id)));
    therapist.ok(Method::PUT, &role_path, Some(json!({ "role": "observer" }))).await;

    let audit = admin.ok(Method::GET, &format!("/_limbic/admin/v1/audit?room_id={}", enc(&room)), None).await;
    let entries = audit["entries"].as_array().unwrap();
    let find = |action: &str| entries.iter().find(|e| e["action"] == action).unwrap_or_else(|| panic!("no {action} in {entries:?}"));
    assert_eq!(find("session_created")["details"]["status"], "scheduled");
    assert_eq!((find("session_status")["details"]["from"].as_str(), find("session_status")["details"]["to"].as_str()), (Some("scheduled"), Some("open")));
    assert!(find("session_rescheduled")["details"]["to"].is_array());
    let role_changes: Vec<(&str, &str)> = entries
        .iter()
        .filter(|e| e["action"] == "role_change" && e["target"] == client.user_id.as_str())
        .map(|e| (e["details"]["from"].as_str().unwrap_or("none"), e["details"]["to"].as_str().unwrap_or("none")))
        .collect();
    assert_eq!(role_changes, [("none", "client"), ("client", "observer")]);
}

#[tokio::test]
async fn participants_are_added_removed_and_related() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    let partner = server.register("partner").await;
    let stranger = server.register("stranger").await;
    let start = now_ms();
    let created = therapist.ok(Method::POST, SESSIONS, Some(session_request("couples", start, start + HOUR, json!([{ "user_id": client.user_id, "role": "client" }])))).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    let participant = |user: &str| format!("{SESSIONS}/{}/participants/{}", enc(&room), enc(user));

    // Adding a participant gives a role and an invitation; the partner can join.
    therapist.ok(Method::PUT, &participant(&partner.user_id), Some(json!({ "role": "client" }))).await;
    assert_eq!(partner.join(&room).await.0, StatusCode::OK);
    // The couples session is now full (three with the therapist).
    let (status, _) = therapist.put(&participant(&stranger.user_id), json!({ "role": "observer" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Only therapists manage participants.
    let (status, _) = client.put(&participant(&stranger.user_id), json!({ "role": "client" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Promoting to co-therapist raises the power level; removing takes role, power and membership.
    therapist.ok(Method::PUT, &participant(&partner.user_id), Some(json!({ "role": "co_therapist" }))).await;
    let power = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room)), None).await;
    assert_eq!(power["users"][&partner.user_id], 50);
    therapist.ok(Method::DELETE, &participant(&partner.user_id), None).await;
    let view = therapist.ok(Method::GET, &format!("{SESSIONS}/{}", enc(&room)), None).await;
    assert!(view["roles"].get(&partner.user_id).is_none());
    let power = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room)), None).await;
    assert!(power["users"].get(&partner.user_id).is_none());
    let members = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), None).await;
    assert!(members["joined"].get(&partner.user_id).is_none());
    let (status, _) = therapist.request(Method::DELETE, &participant(&stranger.user_id), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The relationship check.
    let ask = |t: &str, c: &str| format!("/_limbic/client/v1/relationship?therapist={}&client={}", enc(t), enc(c));
    let shared = client.ok(Method::GET, &ask(&therapist.user_id, &client.user_id), None).await;
    assert_eq!((shared["shared"].as_bool(), shared["sessions"][0].as_str()), (Some(true), Some(room.as_str())));
    let none = admin.ok(Method::GET, &ask(&therapist.user_id, &stranger.user_id), None).await;
    assert_eq!(none["shared"], false);
    let (status, _) = stranger.get(&ask(&therapist.user_id, &client.user_id)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn passcodes_guard_knocks_and_joins_and_are_never_stored() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    let stranger = server.register("stranger").await;
    let mut request = session_request("group", now_ms(), now_ms() + HOUR, json!([{ "user_id": client.user_id, "role": "client" }]));
    request["passcode"] = json!("blue-otter-42");
    let room = therapist.ok(Method::POST, SESSIONS, Some(request)).await["room_id"].as_str().unwrap().to_owned();
    let join = format!("/_matrix/client/v3/join/{}", enc(&room));
    let knock = format!("/_matrix/client/v3/knock/{}", enc(&room));

    let (status, body) = client.post(&join, json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"].as_str().unwrap().contains("passcode"), "{body}");
    assert_eq!(client.post(&join, json!({ "org.limbic.passcode": "wrong" })).await.0, StatusCode::FORBIDDEN);
    client.ok(Method::POST, &join, Some(json!({ "org.limbic.passcode": "blue-otter-42" }))).await;

    // Raw membership events are held to the same rule.
    let raw = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&stranger.user_id));
    assert_eq!(stranger.put(&raw, json!({ "membership": "knock" })).await.0, StatusCode::FORBIDDEN);
    assert_eq!(stranger.post(&knock, json!({})).await.0, StatusCode::FORBIDDEN);
    stranger.ok(Method::POST, &knock, Some(json!({ "org.limbic.passcode": "blue-otter-42", "reason": "hi" }))).await;

    // The passcode never reaches the stored events.
    let state = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)), None).await;
    assert!(!state.to_string().contains("blue-otter-42"));
    assert!(state.as_array().unwrap().iter().any(|e| e["state_key"] == stranger.user_id.as_str() && e["content"]["membership"] == "knock"));
}

#[tokio::test]
async fn therapists_export_transcripts() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    let room = therapist.ok(Method::POST, SESSIONS, Some(session_request("individual", now_ms(), now_ms() + HOUR, json!([{ "user_id": client.user_id, "role": "client" }])))).await["room_id"].as_str().unwrap().to_owned();
    assert_eq!(client.join(&room).await.0, StatusCode::OK);
    client.send_text(&room, "c1", "I slept better this week").await;
    therapist.ok(Method::PUT, &format!("{SESSIONS}/{}/status", enc(&room)), Some(json!({ "status": "open" }))).await;

    let url = |format: &str| format!("{}{SESSIONS}/{}/transcript{format}", therapist.base, enc(&room));
    let get = |client: &Client, url: String| {
        let request = client.http.get(url).bearer_auth(client.token.clone().unwrap());
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()), response.text().await.unwrap())
        }
    };
    let (status, content_type, markdown) = get(&therapist, url("")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.unwrap().starts_with("text/markdown"));
    assert!(markdown.starts_with("# Weekly session"), "{markdown}");
    assert!(markdown.contains(&format!("{} (client)", client.user_id)));
    assert!(markdown.contains(&format!("{}: I slept better this week", client.user_id)));
    assert!(markdown.contains("session status: open"));
    let (_, content_type, text) = get(&therapist, url("?format=text")).await;
    assert!(content_type.unwrap().starts_with("text/plain"));
    assert!(text.contains("] ") && !text.contains('`'));
    let (status, _, _) = get(&therapist, url("?format=pdf")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = get(&client, url("")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let audit = admin.ok(Method::GET, &format!("/_limbic/admin/v1/audit?room_id={}", enc(&room)), None).await;
    assert!(audit["entries"].as_array().unwrap().iter().any(|e| e["action"] == "export"));
}

#[tokio::test]
async fn reschedule_join_window_and_the_waiting_room_api() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    let (early, late) = (server.register("early").await, server.register("late").await);
    let start = now_ms() + 2 * HOUR;
    let created = therapist.ok(Method::POST, SESSIONS, Some(session_request("group", start, start + HOUR, json!([{ "user_id": client.user_id, "role": "client" }])))).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    let path = format!("{SESSIONS}/{}", enc(&room));

    // Someone arriving early learns when the session opens: in the refusal and the session view.
    let view = client.ok(Method::GET, &path, None).await;
    let opens_at = start - 15 * 60_000;
    assert_eq!(view["join_window"], json!({ "opens_at": opens_at, "closes_at": start + HOUR, "open": false }));
    let (status, body) = client.join(&room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    assert_eq!(body["org.limbic.opens_at"], opens_at, "{body}");

    // Rescheduling: therapists only, valid fields only, never onto another booking.
    let (status, body) = client.request(Method::PATCH, &path, Some(json!({ "starts_at": start + HOUR }))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let (status, body) = therapist.request(Method::PATCH, &path, Some(json!({ "starts_on": start }))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"));
    let (status, body) = therapist.request(Method::PATCH, &path, Some(json!({ "ends_at": start - 1 }))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"));
    therapist.ok(Method::POST, SESSIONS, Some(session_request("group", start + 3 * HOUR, start + 4 * HOUR, json!([])))).await;
    let (status, _) = therapist.request(Method::PATCH, &path, Some(json!({ "starts_at": start + 3 * HOUR, "ends_at": start + 5 * HOUR }))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let now = now_ms();
    let moved = therapist.ok(Method::PATCH, &path, Some(json!({ "starts_at": now, "ends_at": now + HOUR, "title": "Moved up" }))).await;
    assert_eq!((moved["session"]["starts_at"].as_u64(), moved["session"]["title"].as_str()), (Some(now), Some("Moved up")));
    let name = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room)), None).await;
    assert_eq!(name["name"], "Moved up");
    assert_eq!(client.ok(Method::GET, &path, None).await["join_window"]["open"], true);
    assert_eq!(client.join(&room).await.0, StatusCode::OK);

    // The waiting room: knocks with reasons, listed for therapists, admitted or declined.
    for (who, reason) in [(&early, "intake at nine"), (&late, "running late")] {
        who.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(json!({ "reason": reason }))).await;
    }
    let waiting_path = format!("{path}/waiting");
    let (status, _) = client.get(&waiting_path).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let waiting = therapist.ok(Method::GET, &waiting_path, None).await;
    let queue: Vec<(&str, &str)> = waiting["waiting"].as_array().unwrap().iter().map(|w| (w["user_id"].as_str().unwrap(), w["reason"].as_str().unwrap())).collect();
    assert_eq!(queue, [(early.user_id.as_str(), "intake at nine"), (late.user_id.as_str(), "running late")]);
    // A knocker may read the session, to see when it opens.
    assert_eq!(late.ok(Method::GET, &path, None).await["session"]["title"], "Moved up");

    let (status, _) = client.post(&format!("{waiting_path}/{}/admit", enc(&early.user_id)), json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    therapist.ok(Method::POST, &format!("{waiting_path}/{}/admit", enc(&early.user_id)), Some(json!({}))).await;
    assert_eq!(early.join(&room).await.0, StatusCode::OK);
    let late_since = late.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    therapist.ok(Method::POST, &format!("{waiting_path}/{}/decline", enc(&late.user_id)), Some(json!({ "reason": "please book another time" }))).await;
    let member = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&late.user_id)), None).await;
    assert_eq!((member["membership"].as_str(), member["reason"].as_str()), (Some("leave"), Some("please book another time")));
    assert_eq!(late.join(&room).await.0, StatusCode::FORBIDDEN);
    // The declined knocker's sync shows their leave, with the reason.
    let sync = late.sync(Some(&late_since), 0).await;
    let left = sync["rooms"]["leave"][&room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    assert!(left.iter().any(|e| e["type"] == "m.room.member" && e["content"]["reason"] == "please book another time"), "{sync}");
    let (status, body) = therapist.post(&format!("{waiting_path}/{}/admit", enc(&late.user_id)), json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    assert_eq!(therapist.ok(Method::GET, &waiting_path, None).await["waiting"], json!([]));

    let log = admin.ok(Method::GET, &format!("/_limbic/admin/v1/audit?room_id={}", enc(&room)), None).await;
    let actions: Vec<&str> = log["entries"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    for action in ["session_rescheduled", "knock", "admit", "decline"] {
        assert!(actions.contains(&action), "{action} missing from {actions:?}");
    }
}

/// A user's membership in a room, read through the admin API (which sees rooms everyone left).
async fn member_state(admin: &Client, room: &str, user: &str) -> Option<String> {
    let state = admin.ok(Method::GET, &format!("/_synapse/admin/v1/rooms/{}/state", enc(room)), None).await;
    state["state"].as_array().unwrap().iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == user).map(|e| e["content"]["membership"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn breakouts_split_a_group_session_and_return_everyone() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let (ann, bob, cat) = (server.register("ann").await, server.register("bob").await, server.register("cat").await);
    let stranger = server.register("stranger").await;
    let now = now_ms();
    let participants = json!([
        { "user_id": ann.user_id, "role": "client" }, { "user_id": bob.user_id, "role": "client" }, { "user_id": cat.user_id, "role": "client" },
    ]);
    let created = therapist.ok(Method::POST, SESSIONS, Some(session_request("group", now, now + HOUR, participants))).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    for client in [&ann, &bob, &cat] {
        assert_eq!(client.join(&room).await.0, StatusCode::OK);
    }
    let breakouts = format!("{SESSIONS}/{}/breakouts", enc(&room));

    // Only therapists split a session, only a multi-client one, and only among its participants.
    let (status, _) = ann.post(&breakouts, json!({ "name": "Pair 1" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = therapist.post(&breakouts, json!({ "name": "Pair 1", "participants": [stranger.user_id] })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
    let single = therapist.ok(Method::POST, SESSIONS, Some(session_request("individual", now + 2 * HOUR, now + 3 * HOUR, json!([])))).await;
    let (status, _) = therapist.post(&format!("{SESSIONS}/{}/breakouts", enc(single["room_id"].as_str().unwrap())), json!({ "name": "x" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let first = therapist.ok(Method::POST, &breakouts, Some(json!({ "name": "Pair 1", "participants": [ann.user_id, bob.user_id] }))).await["room_id"].as_str().unwrap().to_owned();
    let second = therapist.ok(Method::POST, &breakouts, Some(json!({ "name": "Solo", "participants": [cat.user_id] }))).await["room_id"].as_str().unwrap().to_owned();
    // Linked both ways, as any Matrix client reads spaces.
    let child = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.space.child/{}", enc(&room), enc(&first)), None).await;
    assert_eq!(child["via"], json!(["test.local"]));
    assert_eq!(member_state(&admin, &first, &ann.user_id).await.as_deref(), Some("invite"));
    assert_eq!(ann.join(&first).await.0, StatusCode::OK);
    let parent = ann.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.space.parent/{}", enc(&first), enc(&room)), None).await;
    assert_eq!(parent["canonical"], true);

    // Nobody else gets in, through any API; its state is the therapists'.
    assert_eq!(cat.join(&first).await.0, StatusCode::FORBIDDEN);
    let (status, body) = therapist.invite(&first, &stranger.user_id).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = ann.put(&format!("/_matrix/client/v3/rooms/{}/state/org.limbic.breakout/", enc(&first)), json!({ "session_room": room, "name": "ours", "closed": false })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let plain = stranger.create_room(json!({})).await;
    let (status, _) = stranger.put(&format!("/_matrix/client/v3/rooms/{}/state/org.limbic.breakout/", enc(&plain)), json!({ "session_room": room, "name": "fake" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Moving ann to the other breakout takes her out of the first, in one write.
    therapist.ok(Method::PUT, &format!("{breakouts}/{}/participants/{}", enc(&second), enc(&ann.user_id)), Some(json!({}))).await;
    assert_eq!(member_state(&admin, &first, &ann.user_id).await.as_deref(), Some("leave"));
    assert_eq!(member_state(&admin, &second, &ann.user_id).await.as_deref(), Some("invite"));
    assert_eq!(ann.join(&second).await.0, StatusCode::OK);
    therapist.ok(Method::DELETE, &format!("{breakouts}/{}/participants/{}", enc(&first), enc(&bob.user_id)), None).await;
    assert_eq!(member_state(&admin, &first, &bob.user_id).await.as_deref(), Some("leave"));
    let (status, _) = therapist.request(Method::DELETE, &format!("{breakouts}/{}/participants/{}", enc(&first), enc(&bob.user_id)), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let listed = cat.ok(Method::GET, &breakouts, None).await;
    let summary: Vec<(&str, bool, usize)> = listed["breakouts"].as_array().unwrap().iter().map(|b| (b["name"].as_str().unwrap(), b["closed"].as_bool().unwrap(), b["members"].as_array().unwrap().len())).collect();
    assert!(summary.contains(&("Pair 1", false, 1)) && summary.contains(&("Solo", false, 3)), "{summary:?}");

    // Closing returns everyone: they leave the breakout, and ann, who had left the main room,
    // is invited back. A closed breakout stays closed.
    ann.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(json!({}))).await;
    let (status, _) = ann.request(Method::DELETE, &format!("{breakouts}/{}", enc(&second)), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    therapist.ok(Method::DELETE, &format!("{breakouts}/{}", enc(&second)), None).await;
    for user in [&ann.user_id, &cat.user_id, &therapist.user_id] {
        assert_eq!(member_state(&admin, &second, user).await.as_deref(), Some("leave"), "{user}");
    }
    assert_eq!(member_state(&admin, &room, &ann.user_id).await.as_deref(), Some("invite"));
    assert_eq!(member_state(&admin, &room, &cat.user_id).await.as_deref(), Some("join"));
    let child = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.space.child/{}", enc(&room), enc(&second)), None).await;
    assert_eq!(child, json!({}));
    assert_eq!(cat.join(&second).await.0, StatusCode::FORBIDDEN);
    let listed = therapist.ok(Method::GET, &breakouts, None).await;
    assert!(listed["breakouts"].as_array().unwrap().iter().any(|b| b["room_id"] == second.as_str() && b["closed"] == true));
    let (status, _) = therapist.request(Method::DELETE, &format!("{breakouts}/{}", enc(&second)), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let log = admin.ok(Method::GET, &format!("/_limbic/admin/v1/audit?room_id={}", enc(&room)), None).await;
    let actions: Vec<&str> = log["entries"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions.iter().filter(|a| **a == "breakout_created").count(), 2);
    assert!(actions.contains(&"breakout_closed"));
}

#[tokio::test]
async fn raw_state_cannot_bend_roles_notes_or_session_views() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let (client, other) = (server.register("client").await, server.register("other").await);
    let now = now_ms();
    let created = therapist.ok(Method::POST, SESSIONS, Some(session_request("group", now, now + HOUR, json!([{ "user_id": client.user_id, "role": "client" }])))).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    let role_path = |user: &str| format!("/_matrix/client/v3/rooms/{}/state/org.limbic.session.role/{}", enc(&room), enc(&format!("_{user}")));

    // A role event says what the role is; null removes it, an empty object is an error.
    let (status, body) = therapist.put(&role_path(&client.user_id), json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"));
    // Removing the role by raw state leaves the scheduling invite behind, which admits nobody.
    therapist.put(&role_path(&client.user_id), json!({ "role": null })).await;
    let (status, body) = client.join(&room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    // Nor do they still see the session once they are gone.
    client.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(json!({}))).await;
    let (status, _) = client.get(&format!("{SESSIONS}/{}", enc(&room))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Notes rooms are made by the session's therapists, never federate, and hold notes with a body.
    let notes_for = |target: &str| format!("/_matrix/client/v3/rooms/{}/state/org.limbic.session.notes_for/", enc(target));
    let federating = therapist.create_room(json!({})).await;
    let (status, body) = therapist.put(&notes_for(&federating), json!({ "room_id": room })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    let private = other.create_room(json!({ "creation_content": { "m.federate": false } })).await;
    let (status, body) = other.put(&notes_for(&private), json!({ "room_id": room })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    let (status, body) = other.put(&notes_for(&private), json!({ "room_id": "garbage" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"), "{body}");
    other.send_text(&private, "t1", "still an ordinary room").await;

    let written = therapist.ok(Method::PUT, &format!("{SESSIONS}/{}/notes/intake", enc(&room)), Some(json!({ "body": "first" }))).await;
    let notes_room = written["room_id"].as_str().unwrap();
    let (status, body) = therapist.put(&format!("/_matrix/client/v3/rooms/{}/state/org.limbic.session.note/raw", enc(notes_room)), json!({ "text": 5 })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"), "{body}");
    therapist.ok(Method::PUT, &format!("/_matrix/client/v3/rooms/{}/state/org.limbic.session.note/raw", enc(notes_room)), Some(json!({ "body": "by any client" }))).await;
    let notes = therapist.ok(Method::GET, &format!("{SESSIONS}/{}/notes", enc(&room)), None).await;
    assert_eq!(notes["notes"].as_array().unwrap().len(), 2);
}

/// Whether `body` appears anywhere in what a (former) member reads of a room: `/messages`
/// back from the end, `/state`, and an incremental `/sync` from `since` (a refusal reads
/// nothing).
async fn reads_note(client: &Client, room: &str, since: &str, body: &str) -> Vec<&'static str> {
    let mut seen = Vec::new();
    let (status, messages) = client.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(room))).await;
    if status == StatusCode::OK && messages.to_string().contains(body) {
        seen.push("/messages");
    }
    let (status, state) = client.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(room))).await;
    if status == StatusCode::OK && state.to_string().contains(body) {
        seen.push("/state");
    }
    if client.sync(Some(since), 0).await.to_string().contains(body) {
        seen.push("/sync");
    }
    seen
}

/// `user`'s membership in `room`, as `reader` (a member) reads it.
async fn membership_of(reader: &Client, room: &str, user: &str) -> Option<String> {
    let (status, member) = reader.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(room), enc(user))).await;
    (status == StatusCode::OK).then(|| member["membership"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn demoted_or_removed_co_therapists_leave_the_notes_room_and_breakouts_in_the_same_write() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let (demoted, removed, raw) = (server.register("demoted").await, server.register("removed").await, server.register("raw").await);
    let ann = server.register("ann").await;
    let now = now_ms();
    let participants = json!([
        { "user_id": demoted.user_id, "role": "co_therapist" }, { "user_id": removed.user_id, "role": "co_therapist" },
        { "user_id": raw.user_id, "role": "co_therapist" }, { "user_id": ann.user_id, "role": "client" },
    ]);
    let created = therapist.ok(Method::POST, SESSIONS, Some(session_request("group", now, now + HOUR, participants))).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    let participant = |user: &str| format!("{SESSIONS}/{}/participants/{}", enc(&room), enc(user));
    let notes = format!("{SESSIONS}/{}/notes", enc(&room));
    let notes_room = therapist.ok(Method::PUT, &format!("{notes}/intake"), Some(json!({ "body": "before any change" }))).await["room_id"].as_str().unwrap().to_owned();
    let breakout = therapist
        .ok(Method::POST, &format!("{SESSIONS}/{}/breakouts", enc(&room)), Some(json!({ "name": "Pair", "participants": [ann.user_id] })))
        .await["room_id"].as_str().unwrap().to_owned();
    // The co-therapists are in the session, its notes room and its breakout, and read notes by /sync.
    let mut since = Vec::new();
    for co in [&demoted, &removed, &raw] {
        assert_eq!(co.join(&room).await.0, StatusCode::OK);
        therapist.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/invite", enc(&notes_room)), Some(json!({ "user_id": co.user_id }))).await;
        assert_eq!(co.join(&notes_room).await.0, StatusCode::OK);
        assert_eq!(co.join(&breakout).await.0, StatusCode::OK);
        let sync = co.sync(None, 0).await;
        assert!(sync["rooms"]["join"][&notes_room].is_object());
        since.push(sync["next_batch"].as_str().unwrap().to_owned());
    }

    // Demoted to client through the sessions API, removed through it, demoted by raw state: as
    // soon as each call returns, the notes room and the breakout show them gone.
    therapist.ok(Method::PUT, &participant(&demoted.user_id), Some(json!({ "role": "client" }))).await;
    assert_eq!(membership_of(&therapist, &notes_room, &demoted.user_id).await.as_deref(), Some("leave"));
    assert_eq!(membership_of(&therapist, &breakout, &demoted.user_id).await.as_deref(), Some("leave"));
    therapist.ok(Method::DELETE, &participant(&removed.user_id), None).await;
    assert_eq!(membership_of(&therapist, &notes_room, &removed.user_id).await.as_deref(), Some("leave"));
    assert_eq!(membership_of(&therapist, &breakout, &removed.user_id).await.as_deref(), Some("leave"));
    let role_path = format!("/_matrix/client/v3/rooms/{}/state/org.limbic.session.role/{}", enc(&room), enc(&format!("_{}", raw.user_id)));
    therapist.ok(Method::PUT, &role_path, Some(json!({ "role": "observer" }))).await;
    assert_eq!(membership_of(&therapist, &notes_room, &raw.user_id).await.as_deref(), Some("leave"));
    assert_eq!(membership_of(&therapist, &breakout, &raw.user_id).await.as_deref(), Some("leave"));
    // The demoted stay in the session room as what they now are; the removed do not.
    assert_eq!(membership_of(&therapist, &room, &demoted.user_id).await.as_deref(), Some("join"));
    assert_eq!(membership_of(&therapist, &room, &removed.user_id).await.as_deref(), Some("leave"));

    // Later notes reach none of them, by any read; and they cannot come back.
    therapist.ok(Method::PUT, &format!("{notes}/later"), Some(json!({ "body": "written after the change" }))).await;
    therapist.send_text(&notes_room, "later", "a later remark in the notes room").await;
    for (co, since) in [&demoted, &removed, &raw].into_iter().zip(&since) {
        for body in ["written after the change", "a later remark"] {
            assert_eq!(reads_note(co, &notes_room, since, body).await, Vec::<&str>::new(), "{} reads {body:?}", co.user_id);
        }
        assert_eq!(co.join(&notes_room).await.0, StatusCode::FORBIDDEN);
        assert_eq!(co.get(&notes).await.0, StatusCode::FORBIDDEN);
    }
    // The therapist, who never lost the role, still reads everything.
    assert_eq!(reads_note(&therapist, &notes_room, &since[0], "written after the change").await.len(), 3);
}

#[tokio::test]
async fn call_membership_state_keys_belong_to_their_sender_in_session_rooms() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let (ann, bob) = (server.register("ann").await, server.register("bob").await);
    let now = now_ms();
    let participants = json!([{ "user_id": ann.user_id, "role": "client" }, { "user_id": bob.user_id, "role": "client" }]);
    let created = therapist.ok(Method::POST, SESSIONS, Some(session_request("group", now, now + HOUR, participants))).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    for client in [&ann, &bob] {
        assert_eq!(client.join(&room).await.0, StatusCode::OK);
    }
    let call_member = |key: &str| format!("/_matrix/client/v3/rooms/{}/state/org.matrix.msc3401.call.member/{}", enc(&room), enc(key));
    let membership = json!({ "application": "m.call", "call_id": "", "scope": "m.room", "device_id": "DEV", "focus_active": { "type": "livekit" }, "foci_preferred": [] });

    // Ann's own keys: MSC4143's `_@ann_DEVICE`, MSC3779's `@ann_DEVICE` and her bare user id.
    for key in [format!("_{}_DEV", ann.user_id), format!("_{}_DEV_m.call", ann.user_id), ann.user_id.clone()] {
        let (status, body) = ann.put(&call_member(&key), membership.clone()).await;
        assert_eq!(status, StatusCode::OK, "{key}: {body}");
    }
    // Someone else's, or one that only starts like hers: refused, even by a therapist.
    for key in [format!("_{}_DEV", bob.user_id), format!("_{}x_DEV", ann.user_id), format!("_{}", ann.user_id), "shared".to_owned(), format!("{}_DEV", bob.user_id)] {
        let (status, body) = ann.put(&call_member(&key), membership.clone()).await;
        assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{key}: {body}");
    }
    let (status, body) = therapist.put(&call_member(&format!("_{}_DEV", bob.user_id)), json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    let (status, _) = bob.get(&call_member(&format!("_{}_DEV", bob.user_id))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nobody put bob in the call");
    // MSC4143's per-device membership is owned the same way (a therapist's power level would
    // otherwise let them write it).
    let rtc_member = |key: &str| format!("/_matrix/client/v3/rooms/{}/state/org.matrix.msc4143.rtc.member/{}", enc(&room), enc(key));
    let (status, body) = therapist.put(&rtc_member(&format!("_{}_DEV", bob.user_id)), json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    let (status, body) = therapist.put(&rtc_member(&format!("_{}_DEV", therapist.user_id)), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// A calendar's range: every status, past sessions too, only the caller's, overlap counts; a
/// participant removed from a session no longer sees it, a stranger never does.
#[tokio::test]
async fn sessions_in_a_range_are_the_callers_of_every_status() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    let stranger = server.register("stranger").await;
    let participants = json!([{ "user_id": client.user_id, "role": "client" }]);
    let start = now_ms() + HOUR;
    let later = therapist.ok(Method::POST, SESSIONS, Some(session_request("individual", start, start + HOUR, participants.clone()))).await;
    let cancelled = therapist.ok(Method::POST, SESSIONS, Some(session_request("individual", start + 2 * HOUR, start + 3 * HOUR, participants.clone()))).await;
    let cancelled_room = cancelled["room_id"].as_str().unwrap();
    therapist.ok(Method::PUT, &format!("{SESSIONS}/{}/status", enc(cancelled_room)), Some(json!({ "status": "cancelled" }))).await;
    let elsewhere = therapist.ok(Method::POST, SESSIONS, Some(session_request("individual", start + 30 * HOUR, start + 31 * HOUR, json!([])))).await;

    let ids = |sessions: &[&Value]| sessions.iter().map(|s| s["room_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    // The day: both of the client's sessions, the cancelled one too, in order; the therapist's
    // other session is outside it. A session overlapping an edge counts.
    assert_eq!(in_range(&therapist, start, start + 24 * HOUR).await, ids(&[&later, &cancelled]));
    assert_eq!(in_range(&client, start + HOUR / 2, start + 2 * HOUR + 1).await, ids(&[&later, &cancelled]));
    assert_eq!(in_range(&therapist, start, start + 40 * HOUR).await, ids(&[&later, &cancelled, &elsewhere]));
    // Without a range: the upcoming live sessions only (the cancelled one is not).
    let upcoming = therapist.ok(Method::GET, SESSIONS, None).await;
    assert_eq!(upcoming["sessions"].as_array().unwrap().len(), 2);

    // A stranger sees nothing; a removed participant no longer sees the session.
    assert!(in_range(&stranger, start, start + 40 * HOUR).await.is_empty());
    let later_room = later["room_id"].as_str().unwrap();
    therapist.ok(Method::DELETE, &format!("{SESSIONS}/{}/participants/{}", enc(later_room), enc(&client.user_id)), None).await;
    assert_eq!(in_range(&client, start, start + 24 * HOUR).await, ids(&[&cancelled]));

    // Bad ranges are refused with a reason.
    for query in ["?from=10", "?to=10", "?from=20&to=10", "?from=0&to=99999999999999", "?from=x&to=1"] {
        let (status, body) = therapist.get(&format!("{SESSIONS}{query}")).await;
        assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"), "{query}: {body}");
    }
}

/// The room ids of `client`'s sessions in `[from, to)`.
async fn in_range(client: &Client, from: u64, to: u64) -> Vec<String> {
    let body = client.ok(Method::GET, &format!("{SESSIONS}?from={from}&to={to}"), None).await;
    body["sessions"].as_array().unwrap().iter().map(|s| s["room_id"].as_str().unwrap().to_owned()).collect()
}

/// `/me` says who the caller is to the clinic, and only ever about the caller.
#[tokio::test]
async fn me_tells_a_user_their_own_standing() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    for (who, admin_flag, verified) in [(&admin, true, false), (&therapist, false, true), (&client, false, false)] {
        let me = who.ok(Method::GET, "/_limbic/client/v1/me", None).await;
        assert_eq!(me["user_id"], who.user_id.as_str());
        assert_eq!((me["admin"].as_bool(), me["verified_therapist"].as_bool()), (Some(admin_flag), Some(verified)), "{me}");
    }
    let anonymous = reqwest::get(format!("{}/_limbic/client/v1/me", server.base)).await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
}

/// The recordings of a session are the files its therapists announced in the room; a client's
/// message dressed up as one, or one naming another server's file, is not listed. Only the
/// session's therapists list them.
#[tokio::test]
async fn recordings_are_what_the_therapists_announced() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    let stranger = server.register("stranger").await;
    // Inside the join window, so that the client can come in.
    let start = now_ms() + 60_000;
    // A group: room for a co-therapist besides the therapist and the client.
    let created = therapist.ok(Method::POST, SESSIONS, Some(session_request("group", start, start + HOUR, json!([{ "user_id": client.user_id, "role": "client" }])))).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    client.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(json!({}))).await;
    let announce = |who: &Client, url: &str, txn: &str| {
        let body = json!({
            "msgtype": "m.audio", "body": "recording.ogg", "filename": "recording.ogg", "url": url,
            "info": { "mimetype": "audio/ogg", "size": 1234, "duration": 3000 }, "org.limbic.recording_of": client.user_id,
        });
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room));
        let who = who.clone();
        async move { who.ok(Method::PUT, &path, Some(body)).await }
    };
    let real = announce(&therapist, "mxc://test.local/recorded", "t1").await;
    announce(&client, "mxc://test.local/forged", "c1").await;
    announce(&therapist, "mxc://elsewhere.example/foreign", "t2").await;

    let listed = therapist.ok(Method::GET, &format!("{SESSIONS}/{}/recordings", enc(&room)), None).await;
    let recordings = listed["recordings"].as_array().unwrap();
    assert_eq!(recordings.len(), 1, "{listed}");
    assert_eq!(recordings[0]["event_id"], real["event_id"]);
    assert_eq!((recordings[0]["owner"].as_str(), recordings[0]["kind"].as_str()), (Some(client.user_id.as_str()), Some("m.audio")));
    assert_eq!((recordings[0]["duration"].as_u64(), recordings[0]["size"].as_u64()), (Some(3000), Some(1234)));

    // A co-therapist lists them, until their role is taken away; the session's client and a
    // stranger never do.
    let co = verified_therapist(&server, &admin, "cotherapist").await;
    let co_path = format!("{SESSIONS}/{}/participants/{}", enc(&room), enc(&co.user_id));
    therapist.ok(Method::PUT, &co_path, Some(json!({ "role": "co_therapist" }))).await;
    co.ok(Method::GET, &format!("{SESSIONS}/{}/recordings", enc(&room)), None).await;
    therapist.ok(Method::DELETE, &co_path, None).await;
    for who in [&client, &stranger, &co] {
        let (status, body) = who.get(&format!("{SESSIONS}/{}/recordings", enc(&room))).await;
        assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{}: {body}", who.user_id);
    }
}

/// A full session admits nobody from its waiting room: the therapist hears why, and the person
/// stays in the waiting room (rather than being let in to a join the policy then refuses).
#[tokio::test]
async fn a_full_session_admits_nobody() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    let knocker = server.register("knocker").await;
    let start = now_ms() + 60_000;
    let mut request = session_request("individual", start, start + HOUR, json!([{ "user_id": client.user_id, "role": "client" }]));
    request["max_participants"] = json!(2);
    let created = therapist.ok(Method::POST, SESSIONS, Some(request)).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    client.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(json!({}))).await;
    knocker.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(json!({}))).await;

    let admit = format!("{SESSIONS}/{}/waiting/{}/admit", enc(&room), enc(&knocker.user_id));
    let (status, body) = therapist.post(&admit, json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    assert_eq!(body["error"], "the session is full (2 participants)");
    assert_eq!(member_state(&admin, &room, &knocker.user_id).await.as_deref(), Some("knock"), "still waiting");

    // Once the client leaves, there is room again.
    client.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(json!({}))).await;
    therapist.ok(Method::POST, &admit, Some(json!({}))).await;
    assert_eq!(member_state(&admin, &room, &knocker.user_id).await.as_deref(), Some("invite"));
}
