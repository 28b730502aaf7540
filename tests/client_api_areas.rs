//! End-to-end tests of the client-server API by area (profile, devices, account data, receipts,
//! typing, filters, presence, directory, rate limits, admin registration, metrics).

mod common;

use common::{Client, TestServer, admin_mac, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const V3: &str = "/_matrix/client/v3";

/// A `m.login.password` UIA `auth` object for `user` (a localpart).
fn password_auth(user: &str, password: &str, session: Option<&str>) -> Value {
    let mut auth = json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": user },
        "password": password,
    });
    if let Some(session) = session {
        auth["session"] = json!(session);
    }
    auth
}

/// Logs `user` in with a password, returning the status and body.
async fn login(server: &TestServer, user: &str, password: &str, device_id: Option<&str>) -> (StatusCode, Value) {
    let mut body = json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": user },
        "password": password,
    });
    if let Some(device_id) = device_id {
        body["device_id"] = json!(device_id);
        body["initial_device_display_name"] = json!(format!("{device_id} display"));
    }
    server.client().post(&format!("{V3}/login"), body).await
}

/// Logs in and returns a client for the new device.
async fn login_client(server: &TestServer, user: &str, password: &str, device_id: Option<&str>) -> Client {
    let (status, body) = login(server, user, password, device_id).await;
    assert_eq!(status, StatusCode::OK, "login {user}: {body}");
    let mut client = server.client();
    client.token = Some(body["access_token"].as_str().unwrap().to_owned());
    client.user_id = body["user_id"].as_str().unwrap().to_owned();
    client.device_id = body["device_id"].as_str().unwrap().to_owned();
    client
}

/// Status and errcode of a whoami with the client's token.
async fn whoami_status(client: &Client) -> (StatusCode, String) {
    let (status, body) = client.get(&format!("{V3}/account/whoami")).await;
    (status, errcode(&body).to_owned())
}

/// `whoami` of a token just signed out: refused at once by the node that removed it, and by
/// the other nodes of a cluster once the database's notification of the removal arrives
/// (milliseconds; spec/security.md): so until it is refused, within 2 s.
async fn signed_out_status(client: &Client) -> (StatusCode, String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let answer = whoami_status(client).await;
        if answer.0 != StatusCode::OK || std::time::Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A /sync with extra query parameters (already encoded).
async fn sync_query(client: &Client, since: Option<&str>, query: &str) -> Value {
    let mut path = format!("{V3}/sync?timeout=0");
    if let Some(since) = since {
        path.push_str(&format!("&since={}", enc(since)));
    }
    if !query.is_empty() {
        path.push('&');
        path.push_str(query);
    }
    client.ok(Method::GET, &path, None).await
}

fn next_batch(sync: &Value) -> String {
    sync["next_batch"].as_str().unwrap().to_owned()
}

fn events(value: &Value) -> Vec<Value> {
    value.as_array().cloned().unwrap_or_default()
}

fn event_ids(value: &Value) -> Vec<String> {
    events(value).iter().map(|e| e["event_id"].as_str().unwrap_or_default().to_owned()).collect()
}

async fn state_content(client: &Client, room: &str, kind: &str) -> Value {
    client.ok(Method::GET, &format!("{V3}/rooms/{}/state/{kind}", enc(room)), None).await
}

// --- profile -------------------------------------------------------------------------------

#[tokio::test]
async fn profile_get_set_and_propagation() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let displayname = |u: &str| format!("{V3}/profile/{}/displayname", enc(u));
    let avatar = |u: &str| format!("{V3}/profile/{}/avatar_url", enc(u));

    // Alice is joined to two rooms and has left a third.
    let own_room = alice.create_room(json!({})).await;
    let bobs_room = bob.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(alice.join(&bobs_room).await.0, StatusCode::OK);
    let left_room = bob.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(alice.join(&left_room).await.0, StatusCode::OK);
    alice.ok(Method::POST, &format!("{V3}/rooms/{}/leave", enc(&left_room)), Some(json!({}))).await;

    alice.ok(Method::PUT, &displayname(&alice.user_id), Some(json!({ "displayname": "Alice Therapist" }))).await;
    alice.ok(Method::PUT, &avatar(&alice.user_id), Some(json!({ "avatar_url": "mxc://test.local/alicepic" }))).await;

    // Anyone can read them.
    let got = bob.ok(Method::GET, &displayname(&alice.user_id), None).await;
    assert_eq!(got["displayname"], "Alice Therapist");
    let got = bob.ok(Method::GET, &avatar(&alice.user_id), None).await;
    assert_eq!(got["avatar_url"], "mxc://test.local/alicepic");
    let profile = bob.ok(Method::GET, &format!("{V3}/profile/{}", enc(&alice.user_id)), None).await;
    assert_eq!(profile["displayname"], "Alice Therapist");
    assert_eq!(profile["avatar_url"], "mxc://test.local/alicepic");

    // Nobody can set someone else's profile.
    let (status, body) = bob.put(&displayname(&alice.user_id), json!({ "displayname": "hijacked" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let (status, body) = bob.put(&avatar(&alice.user_id), json!({ "avatar_url": "mxc://test.local/x" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    assert_eq!(bob.ok(Method::GET, &displayname(&alice.user_id), None).await["displayname"], "Alice Therapist");

    // Unknown users have no profile.
    for path in [format!("{V3}/profile/{}", enc("@nobody:test.local")), displayname("@nobody:test.local"), avatar("@nobody:test.local")] {
        let (status, body) = bob.get(&path).await;
        assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{path}: {body}");
    }

    // The new profile is in alice's member event of every joined room...
    for (reader, room) in [(&alice, &own_room), (&bob, &bobs_room)] {
        let member = reader.ok(Method::GET, &format!("{V3}/rooms/{}/state/m.room.member/{}", enc(room), enc(&alice.user_id)), None).await;
        assert_eq!(member["membership"], "join", "{room}: {member}");
        assert_eq!(member["displayname"], "Alice Therapist", "{room}: {member}");
        assert_eq!(member["avatar_url"], "mxc://test.local/alicepic", "{room}: {member}");
    }
    let joined = bob.ok(Method::GET, &format!("{V3}/rooms/{}/joined_members", enc(&bobs_room)), None).await;
    assert_eq!(joined["joined"][&alice.user_id]["display_name"], "Alice Therapist");
    // ...but she does not rejoin the room she left.
    let member = bob.ok(Method::GET, &format!("{V3}/rooms/{}/state/m.room.member/{}", enc(&left_room), enc(&alice.user_id)), None).await;
    assert_eq!(member["membership"], "leave");

    // A second change propagates too.
    alice.ok(Method::PUT, &displayname(&alice.user_id), Some(json!({ "displayname": "Dr. Alice" }))).await;
    let member = bob.ok(Method::GET, &format!("{V3}/rooms/{}/state/m.room.member/{}", enc(&bobs_room), enc(&alice.user_id)), None).await;
    assert_eq!(member["displayname"], "Dr. Alice");
    assert_eq!(member["avatar_url"], "mxc://test.local/alicepic");
}

// --- devices -------------------------------------------------------------------------------

#[tokio::test]
async fn devices_list_get_update_delete() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let phone = login_client(&server, "alice", "alice-password", Some("PHONE")).await;
    assert_eq!(phone.device_id, "PHONE");

    let devices = alice.ok(Method::GET, &format!("{V3}/devices"), None).await;
    let mut ids: Vec<&str> = devices["devices"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    ids.sort();
    let mut expected = vec![alice.device_id.as_str(), "PHONE"];
    expected.sort();
    assert_eq!(ids, expected);

    let device = alice.ok(Method::GET, &format!("{V3}/devices/PHONE"), None).await;
    assert_eq!(device["device_id"], "PHONE");
    assert_eq!(device["display_name"], "PHONE display");
    let (status, body) = alice.get(&format!("{V3}/devices/NOSUCHDEVICE")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    // Another user's device is not visible.
    let (status, body) = bob.get(&format!("{V3}/devices/PHONE")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));

    alice.ok(Method::PUT, &format!("{V3}/devices/PHONE"), Some(json!({ "display_name": "Work phone" }))).await;
    assert_eq!(alice.ok(Method::GET, &format!("{V3}/devices/PHONE"), None).await["display_name"], "Work phone");
    let (status, _) = alice.put(&format!("{V3}/devices/NOSUCHDEVICE"), json!({ "display_name": "x" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = bob.put(&format!("{V3}/devices/PHONE"), json!({ "display_name": "mine now" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(alice.ok(Method::GET, &format!("{V3}/devices/PHONE"), None).await["display_name"], "Work phone");

    // Deleting needs user-interactive auth with the password.
    let delete_path = format!("{V3}/devices/PHONE");
    let (status, challenge) = alice.request(Method::DELETE, &delete_path, Some(json!({}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    assert!(challenge["flows"].as_array().unwrap().iter().any(|f| f["stages"] == json!(["m.login.password"])), "{challenge}");
    let session = challenge["session"].as_str().expect("session").to_owned();
    let (status, body) = alice.request(Method::DELETE, &delete_path, Some(json!({ "auth": password_auth("alice", "wrong", Some(&session)) }))).await;
    assert!(matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), "{status}: {body}");
    assert_eq!(errcode(&body), "M_FORBIDDEN");
    // Bob authenticating as himself only ever addresses his own devices: alice's stays.
    bob.request(Method::DELETE, &delete_path, Some(json!({ "auth": password_auth("bob", "bob-password", None) }))).await;
    assert_eq!(whoami_status(&phone).await.0, StatusCode::OK);

    alice.ok(Method::DELETE, &delete_path, Some(json!({ "auth": password_auth("alice", "alice-password", Some(&session)) }))).await;
    assert_eq!(signed_out_status(&phone).await, (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN".to_owned()));
    assert_eq!(whoami_status(&alice).await.0, StatusCode::OK);
    let devices = alice.ok(Method::GET, &format!("{V3}/devices"), None).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1);
    let (status, _) = alice.get(&format!("{V3}/devices/PHONE")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Bulk deletion.
    let d1 = login_client(&server, "alice", "alice-password", Some("D1")).await;
    let d2 = login_client(&server, "alice", "alice-password", Some("D2")).await;
    let d3 = login_client(&server, "alice", "alice-password", Some("D3")).await;
    let (status, challenge) = alice.post(&format!("{V3}/delete_devices"), json!({ "devices": ["D1", "D2"] })).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenge["flows"].is_array() && challenge["session"].is_string(), "{challenge}");
    assert_eq!(whoami_status(&d1).await.0, StatusCode::OK);
    let (status, body) = alice.post(&format!("{V3}/delete_devices"), json!({ "devices": ["D1", "D2"], "auth": password_auth("alice", "nope", None) })).await;
    assert!(matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), "{status}: {body}");
    assert_eq!(errcode(&body), "M_FORBIDDEN");
    alice.ok(Method::POST, &format!("{V3}/delete_devices"), Some(json!({ "devices": ["D1", "D2"], "auth": password_auth("alice", "alice-password", None) }))).await;
    assert_eq!(signed_out_status(&d1).await, (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN".to_owned()));
    assert_eq!(signed_out_status(&d2).await, (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN".to_owned()));
    assert_eq!(whoami_status(&d3).await.0, StatusCode::OK);
    assert_eq!(whoami_status(&alice).await.0, StatusCode::OK);
    let devices = alice.ok(Method::GET, &format!("{V3}/devices"), None).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 2);
}

/// Spec: DELETE /devices/{deviceId} answers 200 when the device "was successfully removed, or
/// had been removed previously".
#[tokio::test]

async fn devices_delete_twice_is_ok() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    login_client(&server, "alice", "alice-password", Some("PHONE")).await;
    let auth = json!({ "auth": password_auth("alice", "alice-password", None) });
    alice.ok(Method::DELETE, &format!("{V3}/devices/PHONE"), Some(auth.clone())).await;
    let (status, body) = alice.request(Method::DELETE, &format!("{V3}/devices/PHONE"), Some(auth.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = alice.post(&format!("{V3}/delete_devices"), json!({ "devices": ["PHONE"], "auth": auth["auth"] })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

// --- password change and deactivation ------------------------------------------------------

#[tokio::test]
async fn password_change_and_deactivation() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let other = login_client(&server, "alice", "alice-password", None).await;
    let path = format!("{V3}/account/password");

    let (status, challenge) = alice.post(&path, json!({ "new_password": "new-secret" })).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenge["flows"].as_array().unwrap().iter().any(|f| f["stages"] == json!(["m.login.password"])), "{challenge}");
    let session = challenge["session"].as_str().unwrap().to_owned();
    let (status, body) = alice.post(&path, json!({ "new_password": "new-secret", "auth": password_auth("alice", "bad", Some(&session)) })).await;
    assert!(matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), "{status}: {body}");
    assert_eq!(errcode(&body), "M_FORBIDDEN");
    // Still the old password.
    assert_eq!(login(&server, "alice", "alice-password", None).await.0, StatusCode::OK);

    alice.ok(Method::POST, &path, Some(json!({
        "new_password": "new-secret", "logout_devices": true, "auth": password_auth("alice", "alice-password", Some(&session))
    }))).await;
    assert_eq!(signed_out_status(&other).await, (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN".to_owned()));
    assert_eq!(whoami_status(&alice).await.0, StatusCode::OK);
    let (status, body) = login(&server, "alice", "alice-password", None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let kept = login_client(&server, "alice", "new-secret", None).await;

    // Without logout_devices other sessions survive.
    alice.ok(Method::POST, &path, Some(json!({
        "new_password": "third-secret", "logout_devices": false, "auth": password_auth("alice", "new-secret", None)
    }))).await;
    assert_eq!(whoami_status(&kept).await.0, StatusCode::OK);
    assert_eq!(login(&server, "alice", "new-secret", None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(login(&server, "alice", "third-secret", None).await.0, StatusCode::OK);
    // logout_devices defaults to true.
    alice.ok(Method::POST, &path, Some(json!({ "new_password": "fourth-secret", "auth": password_auth("alice", "third-secret", None) }))).await;
    assert_eq!(signed_out_status(&kept).await, (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN".to_owned()));
    assert_eq!(whoami_status(&alice).await.0, StatusCode::OK);
    assert_eq!(login(&server, "alice", "fourth-secret", None).await.0, StatusCode::OK);

    // Deactivation: carol is in two rooms.
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = bob.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(carol.join(&room).await.0, StatusCode::OK);
    let carols_room = carol.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&carols_room).await.0, StatusCode::OK);
    let carol_phone = login_client(&server, "carol", "carol-password", None).await;

    let deactivate = format!("{V3}/account/deactivate");
    let (status, challenge) = carol.post(&deactivate, json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenge["flows"].is_array() && challenge["session"].is_string(), "{challenge}");
    let (status, body) = carol.post(&deactivate, json!({ "auth": password_auth("carol", "wrong", None) })).await;
    assert!(matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), "{status}: {body}");
    assert_eq!(errcode(&body), "M_FORBIDDEN");
    assert_eq!(whoami_status(&carol).await.0, StatusCode::OK);

    let done = carol.ok(Method::POST, &deactivate, Some(json!({ "auth": password_auth("carol", "carol-password", None) }))).await;
    assert!(done["id_server_unbind_result"].is_string(), "{done}");
    let (status, body) = login(&server, "carol", "carol-password", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(matches!(errcode(&body), "M_USER_DEACTIVATED" | "M_FORBIDDEN"), "{body}");
    assert_eq!(signed_out_status(&carol).await, (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN".to_owned()));
    assert_eq!(signed_out_status(&carol_phone).await, (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN".to_owned()));
    for r in [&room, &carols_room] {
        let member = bob.ok(Method::GET, &format!("{V3}/rooms/{}/state/m.room.member/{}", enc(r), enc(&carol.user_id)), None).await;
        assert_eq!(member["membership"], "leave", "{r}: {member}");
        let joined = bob.ok(Method::GET, &format!("{V3}/rooms/{}/joined_members", enc(r)), None).await;
        assert!(joined["joined"].get(&carol.user_id).is_none(), "{joined}");
    }
    // The user id cannot be registered again.
    let (status, body) = server.client().post(&format!("{V3}/register"), json!({
        "username": "carol", "password": "x", "auth": { "type": "m.login.dummy" }
    })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_USER_IN_USE"));
}

// --- account data --------------------------------------------------------------------------

#[tokio::test]
async fn account_data_global_and_per_room() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({})).await;
    let global = |u: &str, t: &str| format!("{V3}/user/{}/account_data/{t}", enc(u));
    let per_room = |u: &str, t: &str| format!("{V3}/user/{}/rooms/{}/account_data/{t}", enc(u), enc(&room));

    let (status, body) = alice.get(&global(&alice.user_id, "org.example.settings")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let (status, body) = alice.get(&per_room(&alice.user_id, "org.example.pinned")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));

    let since = next_batch(&alice.sync(None, 0).await);
    alice.ok(Method::PUT, &global(&alice.user_id, "org.example.settings"), Some(json!({ "theme": "dark" }))).await;
    alice.ok(Method::PUT, &per_room(&alice.user_id, "org.example.pinned"), Some(json!({ "pinned": true }))).await;
    assert_eq!(alice.ok(Method::GET, &global(&alice.user_id, "org.example.settings"), None).await, json!({ "theme": "dark" }));
    assert_eq!(alice.ok(Method::GET, &per_room(&alice.user_id, "org.example.pinned"), None).await, json!({ "pinned": true }));
    // Global and room data are separate namespaces.
    assert_eq!(alice.get(&global(&alice.user_id, "org.example.pinned")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(alice.get(&per_room(&alice.user_id, "org.example.settings")).await.0, StatusCode::NOT_FOUND);

    // Only the owner may read or write them.
    for (method, path) in [
        (Method::GET, global(&alice.user_id, "org.example.settings")),
        (Method::PUT, global(&alice.user_id, "org.example.settings")),
        (Method::GET, per_room(&alice.user_id, "org.example.pinned")),
        (Method::PUT, per_room(&alice.user_id, "org.example.pinned")),
    ] {
        let body = (method == Method::PUT).then(|| json!({ "theme": "evil" }));
        let (status, response) = bob.request(method.clone(), &path, body).await;
        assert_eq!((status, errcode(&response)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{method} {path}");
    }
    assert_eq!(alice.ok(Method::GET, &global(&alice.user_id, "org.example.settings"), None).await, json!({ "theme": "dark" }));

    // Incremental sync carries both.
    let synced = alice.sync(Some(&since), 0).await;
    let global_events = events(&synced["account_data"]["events"]);
    assert!(global_events.contains(&json!({ "type": "org.example.settings", "content": { "theme": "dark" } })), "{synced}");
    let room_events = events(&synced["rooms"]["join"][&room]["account_data"]["events"]);
    assert!(room_events.contains(&json!({ "type": "org.example.pinned", "content": { "pinned": true } })), "{synced}");
    assert!(!global_events.iter().any(|e| e["type"] == "org.example.pinned"));

    // The next incremental sync carries only what changed since.
    let since = next_batch(&synced);
    alice.ok(Method::PUT, &global(&alice.user_id, "org.example.other"), Some(json!({ "n": 1 }))).await;
    let synced = alice.sync(Some(&since), 0).await;
    let types: Vec<Value> = events(&synced["account_data"]["events"]).iter().map(|e| e["type"].clone()).collect();
    assert_eq!(types, vec![json!("org.example.other")], "{synced}");
    assert!(synced["rooms"]["join"].get(&room).is_none(), "{synced}");

    // An update replaces the content and is synced again.
    let since = next_batch(&synced);
    alice.ok(Method::PUT, &global(&alice.user_id, "org.example.settings"), Some(json!({ "theme": "light" }))).await;
    let synced = alice.sync(Some(&since), 0).await;
    assert_eq!(events(&synced["account_data"]["events"]), vec![json!({ "type": "org.example.settings", "content": { "theme": "light" } })]);

    // An initial sync has everything, current values.
    let initial = alice.sync(None, 0).await;
    let global_events = events(&initial["account_data"]["events"]);
    assert!(global_events.contains(&json!({ "type": "org.example.settings", "content": { "theme": "light" } })), "{initial}");
    assert!(global_events.iter().any(|e| e["type"] == "org.example.other"), "{initial}");
    assert!(events(&initial["rooms"]["join"][&room]["account_data"]["events"]).iter().any(|e| e["type"] == "org.example.pinned"));
    // Bob sees none of it.
    let bobs = bob.sync(None, 0).await;
    assert!(!events(&bobs["account_data"]["events"]).iter().any(|e| e["type"].as_str().unwrap_or_default().starts_with("org.example")), "{bobs}");

    // Non-object content is refused.
    let (status, body) = alice.put(&global(&alice.user_id, "org.example.list"), json!([1, 2])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(matches!(errcode(&body), "M_BAD_JSON" | "M_NOT_JSON"), "{body}");
}

/// Spec: setting server-controlled account data (`m.fully_read`) through the account data
/// endpoints is `405 M_BAD_JSON`.
#[tokio::test]

async fn account_data_server_controlled_types_are_405() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({})).await;
    let (status, body) = alice.put(&format!("{V3}/user/{}/account_data/m.fully_read", enc(&alice.user_id)), json!({ "event_id": "$x" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::METHOD_NOT_ALLOWED, "M_BAD_JSON"), "{body}");
    let (status, body) = alice.put(&format!("{V3}/user/{}/rooms/{}/account_data/m.fully_read", enc(&alice.user_id), enc(&room)), json!({ "event_id": "$x" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::METHOD_NOT_ALLOWED, "M_BAD_JSON"), "{body}");
}

// --- typing --------------------------------------------------------------------------------

fn typing_users(sync: &Value, room: &str) -> Option<Vec<String>> {
    events(&sync["rooms"]["join"][room]["ephemeral"]["events"])
        .iter()
        .find(|e| e["type"] == "m.typing")
        .map(|e| e["content"]["user_ids"].as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_owned()).collect())
}

#[tokio::test]
async fn typing_notifications() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    let typing = |u: &str| format!("{V3}/rooms/{}/typing/{}", enc(&room), enc(u));

    let since = next_batch(&bob.sync(None, 0).await);
    // A long-polling sync wakes up for a typing notification.
    let waiter = {
        let bob = bob.clone();
        let since = since.clone();
        tokio::spawn(async move { bob.sync(Some(&since), 10_000).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    alice.ok(Method::PUT, &typing(&alice.user_id), Some(json!({ "typing": true, "timeout": 30000 }))).await;
    let mut synced = waiter.await.unwrap();
    // The waiter may have woken for something else first (e.g. presence); sync again if so.
    if typing_users(&synced, &room).is_none() {
        synced = bob.sync(Some(&since), 5000).await;
    }
    assert_eq!(typing_users(&synced, &room), Some(vec![alice.user_id.clone()]), "{synced}");
    // The typist's own sync shows it too.
    assert_eq!(typing_users(&alice.sync(None, 0).await, &room), Some(vec![alice.user_id.clone()]));

    let since = next_batch(&synced);
    alice.ok(Method::PUT, &typing(&alice.user_id), Some(json!({ "typing": false }))).await;
    let synced = bob.sync(Some(&since), 5000).await;
    assert_eq!(typing_users(&synced, &room), Some(vec![]), "{synced}");
    let since = next_batch(&synced);
    let quiet = bob.sync(Some(&since), 0).await;
    assert_eq!(typing_users(&quiet, &room), None, "no typing change since: {quiet}");

    // Only for yourself, and only in rooms you are in.
    let (status, body) = alice.put(&typing(&bob.user_id), json!({ "typing": true, "timeout": 30000 })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let (status, body) = carol.put(&typing(&carol.user_id), json!({ "typing": true, "timeout": 30000 })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let synced = bob.sync(Some(&since), 0).await;
    assert_eq!(typing_users(&synced, &room), None, "{synced}");

    // A short timeout expires by itself.
    alice.ok(Method::PUT, &typing(&alice.user_id), Some(json!({ "typing": true, "timeout": 500 }))).await;
    assert_eq!(typing_users(&bob.sync(None, 0).await, &room), Some(vec![alice.user_id.clone()]));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let after = bob.sync(None, 0).await;
    assert!(typing_users(&after, &room).unwrap_or_default().is_empty(), "{after}");
}

// --- receipts and read markers -------------------------------------------------------------

/// The `m.receipt` content of a room's ephemeral events in a sync, if any.
fn receipt_content(sync: &Value, room: &str) -> Value {
    events(&sync["rooms"]["join"][room]["ephemeral"]["events"])
        .into_iter()
        .find(|e| e["type"] == "m.receipt")
        .map(|e| e["content"].clone())
        .unwrap_or(Value::Null)
}

fn notification_count(sync: &Value, room: &str) -> u64 {
    sync["rooms"]["join"][room]["unread_notifications"]["notification_count"].as_u64().unwrap_or_else(|| panic!("no notification_count: {sync}"))
}

#[tokio::test]
async fn receipts_read_markers_and_unread_counts() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    let receipt = |kind: &str, event: &str| format!("{V3}/rooms/{}/receipt/{kind}/{}", enc(&room), enc(event));

    assert_eq!(notification_count(&bob.sync(None, 0).await, &room), 0);
    let m1 = alice.send_text(&room, "m1", "one").await;
    let m2 = alice.send_text(&room, "m2", "two").await;
    let m3 = alice.send_text(&room, "m3", "three").await;
    bob.send_text(&room, "b1", "bob's own message does not count").await;
    assert_eq!(notification_count(&bob.sync(None, 0).await, &room), 3);
    assert_eq!(notification_count(&alice.sync(None, 0).await, &room), 1);

    let alice_since = next_batch(&alice.sync(None, 0).await);
    bob.ok(Method::POST, &receipt("m.read", &m1), Some(json!({}))).await;
    let synced = alice.sync(Some(&alice_since), 0).await;
    let content = receipt_content(&synced, &room);
    assert!(content[&m1]["m.read"][&bob.user_id]["ts"].is_u64(), "{synced}");
    assert_eq!(notification_count(&bob.sync(None, 0).await, &room), 2);

    // Private receipts: only the owner sees them.
    let alice_since = next_batch(&synced);
    let bob_since = next_batch(&bob.sync(None, 0).await);
    bob.ok(Method::POST, &receipt("m.read.private", &m2), Some(json!({}))).await;
    let synced = alice.sync(Some(&alice_since), 0).await;
    assert!(!synced.to_string().contains("m.read.private"), "{synced}");
    let bobs = bob.sync(Some(&bob_since), 0).await;
    assert!(receipt_content(&bobs, &room)[&m2]["m.read.private"][&bob.user_id].is_object(), "{bobs}");
    let bobs_initial = bob.sync(None, 0).await;
    assert_eq!(notification_count(&bobs_initial, &room), 1);
    let alices_initial = alice.sync(None, 0).await;
    assert!(!alices_initial.to_string().contains("m.read.private"), "{alices_initial}");
    assert!(receipt_content(&alices_initial, &room)[&m1]["m.read"][&bob.user_id].is_object(), "{alices_initial}");

    // Read markers: m.fully_read goes to room account data, m.read is a receipt.
    let alice_since = next_batch(&alices_initial);
    bob.ok(Method::POST, &format!("{V3}/rooms/{}/read_markers", enc(&room)), Some(json!({ "m.fully_read": m3, "m.read": m3 }))).await;
    let fully_read = bob.ok(Method::GET, &format!("{V3}/user/{}/rooms/{}/account_data/m.fully_read", enc(&bob.user_id), enc(&room)), None).await;
    assert_eq!(fully_read["event_id"], m3.as_str());
    let bobs = bob.sync(None, 0).await;
    assert_eq!(notification_count(&bobs, &room), 0);
    assert!(events(&bobs["rooms"]["join"][&room]["account_data"]["events"]).iter().any(|e| e["type"] == "m.fully_read" && e["content"]["event_id"] == m3.as_str()), "{bobs}");
    let synced = alice.sync(Some(&alice_since), 0).await;
    assert!(receipt_content(&synced, &room)[&m3]["m.read"][&bob.user_id].is_object(), "{synced}");

    // New messages count again; a receipt on the latest clears the count.
    alice.send_text(&room, "m4", "four").await;
    let m5 = alice.send_text(&room, "m5", "five").await;
    assert_eq!(notification_count(&bob.sync(None, 0).await, &room), 2);
    bob.ok(Method::POST, &receipt("m.read", &m5), Some(json!({}))).await;
    let bobs = bob.sync(None, 0).await;
    assert_eq!(notification_count(&bobs, &room), 0);
    assert_eq!(bobs["rooms"]["join"][&room]["unread_notifications"]["highlight_count"], 0);
    // Mentions (m.mentions, as current clients send them) highlight.
    let mention = format!("{V3}/rooms/{}/send/m.room.message/m6", enc(&room));
    alice.ok(Method::PUT, &mention, Some(json!({ "msgtype": "m.text", "body": "are you there?", "m.mentions": { "user_ids": [bob.user_id] } }))).await;
    alice.send_text(&room, "m7", "no mention").await;
    let bobs = bob.sync(None, 0).await;
    assert_eq!(notification_count(&bobs, &room), 2);
    assert_eq!(bobs["rooms"]["join"][&room]["unread_notifications"]["highlight_count"], 1, "{bobs}");

    // Receipts need an event of this room and membership.
    let (status, _) = bob.post(&receipt("m.read", "$nonexistent:test.local"), json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let carol = server.register("carol").await;
    let (status, body) = carol.post(&receipt("m.read", &m5), json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
}

// --- filters -------------------------------------------------------------------------------

#[tokio::test]
async fn filters_stored_and_inline() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = alice.create_room(json!({ "preset": "public_chat", "name": "busy" })).await;
    let other = alice.create_room(json!({ "name": "quiet" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    assert_eq!(carol.join(&room).await.0, StatusCode::OK);
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(alice.send_text(&room, &format!("t{i}"), &format!("message {i}")).await);
    }
    let bobs = bob.send_text(&room, "b", "bob speaks last").await;

    // Stored filters.
    let definition = json!({ "room": { "timeline": { "limit": 2 } } });
    let created = alice.ok(Method::POST, &format!("{V3}/user/{}/filter", enc(&alice.user_id)), Some(definition)).await;
    let filter_id = created["filter_id"].as_str().expect("filter_id").to_owned();
    let fetched = alice.ok(Method::GET, &format!("{V3}/user/{}/filter/{}", enc(&alice.user_id), enc(&filter_id)), None).await;
    assert_eq!(fetched["room"]["timeline"]["limit"], 2);
    let (status, body) = alice.get(&format!("{V3}/user/{}/filter/999999", enc(&alice.user_id))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let (status, body) = bob.get(&format!("{V3}/user/{}/filter/{}", enc(&alice.user_id), enc(&filter_id))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let (status, body) = bob.post(&format!("{V3}/user/{}/filter", enc(&alice.user_id)), json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));

    let synced = sync_query(&alice, None, &format!("filter={}", enc(&filter_id))).await;
    let timeline = &synced["rooms"]["join"][&room]["timeline"];
    assert_eq!(event_ids(&timeline["events"]), vec![sent[4].clone(), bobs.clone()], "{synced}");
    assert_eq!(timeline["limited"], true);
    let prev_batch = timeline["prev_batch"].as_str().expect("prev_batch");
    let older = alice.messages(&room, &format!("dir=b&limit=2&from={}", enc(prev_batch))).await;
    assert_eq!(event_ids(&older["chunk"]), vec![sent[3].clone(), sent[2].clone()], "{older}");

    // Inline filter: event types.
    let inline = json!({ "room": { "timeline": { "types": ["m.room.message"], "limit": 3 } } }).to_string();
    let synced = sync_query(&alice, None, &format!("filter={}", enc(&inline))).await;
    let timeline = &synced["rooms"]["join"][&room]["timeline"];
    let timeline_events = events(&timeline["events"]);
    assert_eq!(timeline_events.len(), 3, "{synced}");
    assert!(timeline_events.iter().all(|e| e["type"] == "m.room.message"), "{synced}");
    assert_eq!(timeline["limited"], true);
    // The other room has no messages at all.
    let other_timeline = events(&synced["rooms"]["join"][&other]["timeline"]["events"]);
    assert!(other_timeline.iter().all(|e| e["type"] == "m.room.message"), "{synced}");
    // Without a filter the room's timeline holds state events as well.
    let plain = sync_query(&alice, None, "filter=%7B%7D").await;
    assert!(events(&plain["rooms"]["join"][&other]["timeline"]["events"]).iter().any(|e| e["type"] != "m.room.message"), "{plain}");

    // Inline filter: rooms.
    let inline = json!({ "room": { "rooms": [other] } }).to_string();
    let synced = sync_query(&alice, None, &format!("filter={}", enc(&inline))).await;
    let joined: Vec<&String> = synced["rooms"]["join"].as_object().unwrap().keys().collect();
    assert_eq!(joined, vec![&other], "{synced}");

    // Lazy-loading members: only the timeline senders' member events (and possibly the
    // syncing user's own) are in state.
    let inline = json!({ "room": { "timeline": { "limit": 1 }, "state": { "lazy_load_members": true } } }).to_string();
    let synced = sync_query(&alice, None, &format!("filter={}", enc(&inline))).await;
    let joined_room = &synced["rooms"]["join"][&room];
    assert_eq!(event_ids(&joined_room["timeline"]["events"]), vec![bobs.clone()]);
    let state = events(&joined_room["state"]["events"]);
    let members: Vec<&str> = state.iter().filter(|e| e["type"] == "m.room.member").map(|e| e["state_key"].as_str().unwrap()).collect();
    assert!(members.contains(&bob.user_id.as_str()), "{members:?}");
    assert!(!members.contains(&carol.user_id.as_str()), "{members:?}");
    assert!(members.iter().all(|m| *m == bob.user_id || *m == alice.user_id), "{members:?}");
    assert!(state.iter().any(|e| e["type"] == "m.room.create"), "non-member state stays: {joined_room}");
    // Without lazy loading every member is there.
    let inline = json!({ "room": { "timeline": { "limit": 1 } } }).to_string();
    let synced = sync_query(&alice, None, &format!("filter={}", enc(&inline))).await;
    let members: Vec<String> = events(&synced["rooms"]["join"][&room]["state"]["events"])
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap().to_owned())
        .collect();
    for user in [&alice.user_id, &bob.user_id, &carol.user_id] {
        assert!(members.contains(user), "{user} missing from {members:?}");
    }
}

/// Spec (lazy-loading room members): with lazy loading the server may skip member events the
/// client was already sent, but a sender whose member event the client never got must come
/// with it, also in an incremental sync whose timeline is not limited.
#[tokio::test]

async fn sync_lazy_load_members_incremental_new_sender() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    assert_eq!(carol.join(&room).await.0, StatusCode::OK);
    bob.send_text(&room, "b1", "bob first").await;
    let filter = format!("filter={}", enc(&json!({ "room": { "timeline": { "limit": 1 }, "state": { "lazy_load_members": true } } }).to_string()));
    let initial = sync_query(&alice, None, &filter).await;
    let members = |sync: &Value| -> Vec<String> {
        let joined = &sync["rooms"]["join"][&room];
        events(&joined["state"]["events"]).iter().chain(events(&joined["timeline"]["events"]).iter())
            .filter(|e| e["type"] == "m.room.member")
            .map(|e| e["state_key"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(!members(&initial).contains(&carol.user_id), "{initial}");
    carol.send_text(&room, "c1", "carol speaks").await;
    let synced = sync_query(&alice, Some(&next_batch(&initial)), &filter).await;
    assert_eq!(events(&synced["rooms"]["join"][&room]["timeline"]["events"]).len(), 1, "{synced}");
    assert!(members(&synced).contains(&carol.user_id), "carol's member event was never sent: {synced}");
}

/// Spec (GET /sync `filter`): the server tells a filter id from an inline JSON filter by a
/// leading `{`; an inline filter that is not valid JSON is a client error (400), not an unknown
/// filter id (404).
#[tokio::test]

async fn sync_inline_filter_that_is_not_json_is_400() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let (status, body) = alice.get(&format!("{V3}/sync?timeout=0&filter={}", enc("{not json"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(matches!(errcode(&body), "M_BAD_JSON" | "M_NOT_JSON" | "M_INVALID_PARAM"), "{body}");
}

// --- /sync details -------------------------------------------------------------------------

#[tokio::test]
async fn sync_full_state_leave_invite_and_gaps() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat", "name": "Lobby" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);

    // full_state: a room without changes is left out of an incremental sync, unless full_state.
    let since = next_batch(&bob.sync(None, 0).await);
    let quiet = bob.sync(Some(&since), 0).await;
    assert!(quiet["rooms"]["join"].get(&room).is_none(), "{quiet}");
    let full = sync_query(&bob, Some(&since), "full_state=true").await;
    let state = events(&full["rooms"]["join"][&room]["state"]["events"]);
    for kind in ["m.room.create", "m.room.power_levels", "m.room.name", "m.room.join_rules"] {
        assert!(state.iter().any(|e| e["type"] == kind), "{kind} missing: {full}");
    }

    // Invite section.
    let private = alice.create_room(json!({ "name": "Private session" })).await;
    assert_eq!(alice.invite(&private, &bob.user_id).await.0, StatusCode::OK);
    let synced = bob.sync(Some(&since), 0).await;
    let invite_state = events(&synced["rooms"]["invite"][&private]["invite_state"]["events"]);
    let own = invite_state.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str()).unwrap_or_else(|| panic!("{synced}"));
    assert_eq!(own["content"]["membership"], "invite");
    assert_eq!(own["sender"], alice.user_id.as_str());
    assert!(invite_state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Private session"), "{synced}");
    assert!(synced["rooms"]["join"].get(&private).is_none());

    // Leave section.
    let since = next_batch(&synced);
    bob.ok(Method::POST, &format!("{V3}/rooms/{}/leave", enc(&room)), Some(json!({}))).await;
    let synced = bob.sync(Some(&since), 0).await;
    assert!(synced["rooms"]["join"].get(&room).is_none(), "{synced}");
    assert!(synced["rooms"]["leave"][&room].is_object(), "{synced}");
    // (That its timeline carries the leave event is `sync_leave_section_has_the_leave_event`.)
    // Messages after the leave are not synced to bob.
    let since = next_batch(&synced);
    alice.send_text(&room, "after-leave", "bob is gone").await;
    let synced = bob.sync(Some(&since), 0).await;
    assert!(synced["rooms"]["leave"].get(&room).is_none() && synced["rooms"]["join"].get(&room).is_none(), "{synced}");
    // A later initial sync does not list the left room unless include_leave.
    let initial = bob.sync(None, 0).await;
    assert!(initial["rooms"]["leave"].get(&room).is_none(), "{initial}");
    let with_leave = sync_query(&bob, None, &format!("filter={}", enc(&json!({ "room": { "include_leave": true } }).to_string()))).await;
    assert!(with_leave["rooms"]["leave"][&room].is_object(), "{with_leave}");

    // A gap in an incremental sync: limited, prev_batch, and /messages fills it.
    let busy = alice.create_room(json!({})).await;
    let since = next_batch(&alice.sync(None, 0).await);
    let mut sent = Vec::new();
    for i in 0..8 {
        sent.push(alice.send_text(&busy, &format!("g{i}"), &format!("gap {i}")).await);
    }
    let filter = enc(&json!({ "room": { "timeline": { "limit": 3 } } }).to_string());
    let synced = sync_query(&alice, Some(&since), &format!("filter={filter}")).await;
    let timeline = &synced["rooms"]["join"][&busy]["timeline"];
    assert_eq!(event_ids(&timeline["events"]), sent[5..].to_vec(), "{synced}");
    assert_eq!(timeline["limited"], true);
    let prev_batch = timeline["prev_batch"].as_str().expect("prev_batch");
    let page = alice.messages(&busy, &format!("dir=b&limit=10&from={}", enc(prev_batch))).await;
    let older: Vec<String> = event_ids(&page["chunk"]).into_iter().take(5).collect();
    let expected: Vec<String> = sent[..5].iter().rev().cloned().collect();
    assert_eq!(older, expected, "{page}");
    // Without a gap the timeline is not limited.
    let since = next_batch(&synced);
    let last = alice.send_text(&busy, "g8", "gap 8").await;
    let synced = sync_query(&alice, Some(&since), &format!("filter={filter}")).await;
    let timeline = &synced["rooms"]["join"][&busy]["timeline"];
    assert_eq!(event_ids(&timeline["events"]), vec![last]);
    assert_eq!(timeline["limited"], false);
}

/// Spec (/sync `rooms.leave`): the timeline runs "up to the point when the user left", so it
/// holds the user's own leave event; a kicked user sees the kick with its reason.
#[tokio::test]
async fn sync_leave_section_has_the_leave_event() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let kicked_from = alice.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    assert_eq!(bob.join(&kicked_from).await.0, StatusCode::OK);
    let since = next_batch(&bob.sync(None, 0).await);
    bob.ok(Method::POST, &format!("{V3}/rooms/{}/leave", enc(&room)), Some(json!({ "reason": "done" }))).await;
    alice.ok(Method::POST, &format!("{V3}/rooms/{}/kick", enc(&kicked_from)), Some(json!({ "user_id": bob.user_id, "reason": "session over" }))).await;
    let synced = bob.sync(Some(&since), 0).await;
    for (r, reason) in [(&room, "done"), (&kicked_from, "session over")] {
        let event = events(&synced["rooms"]["leave"][r]["timeline"]["events"])
            .into_iter()
            .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str())
            .unwrap_or_else(|| panic!("no leave event for {r}: {synced}"));
        assert_eq!(event["content"]["membership"], "leave");
        assert_eq!(event["content"]["reason"], reason);
    }
    // /messages as the departed user shows it too.
    let page = bob.messages(&kicked_from, "dir=b&limit=5").await;
    assert_eq!(page["chunk"][0]["content"]["membership"], "leave", "{page}");
}

// --- /context, /members, /joined_rooms, /state, forget ------------------------------------

#[tokio::test]
async fn context_members_state_and_forget() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    let mut sent = Vec::new();
    for i in 0..7 {
        sent.push(alice.send_text(&room, &format!("c{i}"), &format!("context {i}")).await);
    }

    let context = alice.ok(Method::GET, &format!("{V3}/rooms/{}/context/{}?limit=4", enc(&room), enc(&sent[3])), None).await;
    assert_eq!(context["event"]["event_id"], sent[3].as_str());
    let before = event_ids(&context["events_before"]);
    let after = event_ids(&context["events_after"]);
    assert!(before.len() + after.len() <= 4, "{context}");
    assert!(!before.is_empty() && !after.is_empty(), "{context}");
    // Before: reverse-chronological; after: chronological.
    let expected_before: Vec<String> = sent[..3].iter().rev().take(before.len()).cloned().collect();
    assert_eq!(before, expected_before);
    assert_eq!(after, sent[4..4 + after.len()].to_vec());
    assert!(context["start"].is_string() && context["end"].is_string(), "{context}");
    assert!(events(&context["state"]).iter().any(|e| e["type"] == "m.room.create"), "{context}");
    // Paginating on from `end` continues after the last event returned.
    let next = alice.messages(&room, &format!("dir=f&limit=1&from={}", enc(context["end"].as_str().unwrap()))).await;
    assert_eq!(event_ids(&next["chunk"]), vec![sent[4 + after.len()].clone()], "{next}");
    let (status, body) = alice.get(&format!("{V3}/rooms/{}/context/{}", enc(&room), enc("$unknown:test.local"))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    // Not visible to a non-member (the spec leaves 403 vs 404 to the server).
    let (status, body) = carol.get(&format!("{V3}/rooms/{}/context/{}", enc(&room), enc(&sent[3]))).await;
    assert!(matches!(status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND), "{status}: {body}");
    assert!(body.get("event").is_none(), "{body}");

    // /members with membership filters.
    assert_eq!(alice.invite(&room, &carol.user_id).await.0, StatusCode::OK);
    let state_keys = |v: &Value| {
        let mut keys: Vec<String> = events(&v["chunk"]).iter().map(|e| e["state_key"].as_str().unwrap().to_owned()).collect();
        keys.sort();
        keys
    };
    let members_path = format!("{V3}/rooms/{}/members", enc(&room));
    let mut joined = vec![alice.user_id.clone(), bob.user_id.clone()];
    joined.sort();
    assert_eq!(state_keys(&alice.ok(Method::GET, &format!("{members_path}?membership=join"), None).await), joined);
    assert_eq!(state_keys(&alice.ok(Method::GET, &format!("{members_path}?not_membership=invite"), None).await), joined);
    assert_eq!(state_keys(&alice.ok(Method::GET, &format!("{members_path}?membership=invite"), None).await), vec![carol.user_id.clone()]);
    assert_eq!(state_keys(&alice.ok(Method::GET, &members_path, None).await).len(), 3);
    let outsider = server.register("dave").await;
    let (status, body) = outsider.get(&members_path).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));

    // /joined_rooms and /state.
    let other = bob.create_room(json!({})).await;
    let mut rooms: Vec<String> = events(&bob.ok(Method::GET, &format!("{V3}/joined_rooms"), None).await["joined_rooms"]).iter().map(|r| r.as_str().unwrap().to_owned()).collect();
    rooms.sort();
    let mut expected = vec![room.clone(), other.clone()];
    expected.sort();
    assert_eq!(rooms, expected);
    assert!(events(&carol.ok(Method::GET, &format!("{V3}/joined_rooms"), None).await["joined_rooms"]).is_empty());
    let state = bob.ok(Method::GET, &format!("{V3}/rooms/{}/state", enc(&room)), None).await;
    let state = events(&state);
    for kind in ["m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.member"] {
        assert!(state.iter().any(|e| e["type"] == kind), "{kind} missing");
    }
    assert_eq!(state.iter().filter(|e| e["type"] == "m.room.member").count(), 3);
    assert!(!state.iter().any(|e| e["type"] == "m.room.message"));

    // Forget: only once left.
    let forget = format!("{V3}/rooms/{}/forget", enc(&room));
    let (status, _) = bob.post(&forget, json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    bob.ok(Method::POST, &format!("{V3}/rooms/{}/leave", enc(&room)), Some(json!({}))).await;
    let joined_rooms = bob.ok(Method::GET, &format!("{V3}/joined_rooms"), None).await;
    assert_eq!(events(&joined_rooms["joined_rooms"]), vec![json!(other)]);
    let include_leave = format!("filter={}", enc(&json!({ "room": { "include_leave": true } }).to_string()));
    assert!(sync_query(&bob, None, &include_leave).await["rooms"]["leave"][&room].is_object());
    bob.ok(Method::POST, &forget, Some(json!({}))).await;
    let synced = sync_query(&bob, None, &include_leave).await;
    assert!(synced["rooms"]["leave"].get(&room).is_none(), "forgotten rooms are not synced: {synced}");
}

// --- room directory ------------------------------------------------------------------------

fn public_room_ids(page: &Value) -> Vec<String> {
    events(&page["chunk"]).iter().map(|r| r["room_id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn directory_aliases_and_public_rooms() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({})).await;
    let alias_path = format!("{V3}/directory/room/{}", enc("#lobby:test.local"));

    let (status, body) = alice.get(&alias_path).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    alice.ok(Method::PUT, &alias_path, Some(json!({ "room_id": room }))).await;
    let resolved = bob.ok(Method::GET, &alias_path, None).await;
    assert_eq!(resolved["room_id"], room.as_str());
    assert!(events(&resolved["servers"]).contains(&json!("test.local")), "{resolved}");
    let (status, _) = alice.put(&alias_path, json!({ "room_id": room })).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let other_room = bob.create_room(json!({})).await;
    let (status, _) = bob.put(&alias_path, json!({ "room_id": other_room })).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let aliases = alice.ok(Method::GET, &format!("{V3}/rooms/{}/aliases", enc(&room)), None).await;
    assert_eq!(aliases["aliases"], json!(["#lobby:test.local"]));

    // Only the creator (or a room moderator) may delete it.
    let (status, body) = bob.request(Method::DELETE, &alias_path, None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    assert_eq!(bob.ok(Method::GET, &alias_path, None).await["room_id"], room.as_str());
    alice.ok(Method::DELETE, &alias_path, None).await;
    let (status, body) = bob.get(&alias_path).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let (status, body) = alice.request(Method::DELETE, &alias_path, None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    // Now free for someone else.
    bob.ok(Method::PUT, &alias_path, Some(json!({ "room_id": other_room }))).await;

    // createRoom with an alias and public visibility.
    let town = alice.create_room(json!({
        "room_alias_name": "townhall", "visibility": "public", "name": "Town Hall", "topic": "civic matters"
    })).await;
    let resolved = bob.ok(Method::GET, &format!("{V3}/directory/room/{}", enc("#townhall:test.local")), None).await;
    assert_eq!(resolved["room_id"], town.as_str());
    let (status, body) = bob.post(&format!("{V3}/createRoom"), json!({ "room_alias_name": "townhall" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_ROOM_IN_USE"));

    let page = bob.ok(Method::GET, &format!("{V3}/publicRooms"), None).await;
    assert_eq!(public_room_ids(&page), vec![town.clone()], "{page}");
    let entry = &page["chunk"][0];
    assert_eq!(entry["name"], "Town Hall");
    assert_eq!(entry["topic"], "civic matters");
    assert_eq!(entry["canonical_alias"], "#townhall:test.local");
    assert_eq!(entry["num_joined_members"], 1);
    assert_eq!(entry["join_rule"], "public");
    assert_eq!(entry["world_readable"], false);

    let search = |term: &str| json!({ "filter": { "generic_search_term": term } });
    let found = bob.ok(Method::POST, &format!("{V3}/publicRooms"), Some(search("town"))).await;
    assert_eq!(public_room_ids(&found), vec![town.clone()]);
    let found = bob.ok(Method::POST, &format!("{V3}/publicRooms"), Some(search("CIVIC"))).await;
    assert_eq!(public_room_ids(&found), vec![town.clone()]);
    let none = bob.ok(Method::POST, &format!("{V3}/publicRooms"), Some(search("nothing-like-this"))).await;
    assert!(public_room_ids(&none).is_empty(), "{none}");

    // Directory visibility of an existing room.
    let visibility = format!("{V3}/directory/list/room/{}", enc(&room));
    assert_eq!(bob.ok(Method::GET, &visibility, None).await["visibility"], "private");
    let (status, body) = bob.put(&visibility, json!({ "visibility": "public" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    alice.ok(Method::PUT, &visibility, Some(json!({ "visibility": "public" }))).await;
    assert_eq!(bob.ok(Method::GET, &visibility, None).await["visibility"], "public");
    let mut listed = public_room_ids(&bob.ok(Method::GET, &format!("{V3}/publicRooms"), None).await);
    listed.sort();
    let mut expected = vec![room.clone(), town.clone()];
    expected.sort();
    assert_eq!(listed, expected);
    // Paging.
    let first = bob.ok(Method::GET, &format!("{V3}/publicRooms?limit=1"), None).await;
    assert_eq!(public_room_ids(&first).len(), 1);
    let next = first["next_batch"].as_str().expect("next_batch");
    let second = bob.ok(Method::GET, &format!("{V3}/publicRooms?limit=1&since={}", enc(next)), None).await;
    assert_eq!(public_room_ids(&second).len(), 1);
    assert_ne!(public_room_ids(&first), public_room_ids(&second));
    alice.ok(Method::PUT, &visibility, Some(json!({ "visibility": "private" }))).await;
    assert_eq!(public_room_ids(&bob.ok(Method::GET, &format!("{V3}/publicRooms"), None).await), vec![town.clone()]);
    let (status, body) = bob.get(&format!("{V3}/directory/list/room/{}", enc("!nope:test.local"))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
}

// --- presence ------------------------------------------------------------------------------

#[tokio::test]
async fn presence_set_get_and_disabled() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let status_path = |u: &str| format!("{V3}/presence/{}/status", enc(u));

    alice.ok(Method::PUT, &status_path(&alice.user_id), Some(json!({ "presence": "unavailable", "status_msg": "in a session" }))).await;
    let got = bob.ok(Method::GET, &status_path(&alice.user_id), None).await;
    assert_eq!(got["presence"], "unavailable");
    assert_eq!(got["status_msg"], "in a session");
    assert!(got["last_active_ago"].is_u64(), "{got}");
    alice.ok(Method::PUT, &status_path(&alice.user_id), Some(json!({ "presence": "online" }))).await;
    let got = bob.ok(Method::GET, &status_path(&alice.user_id), None).await;
    assert_eq!(got["presence"], "online");
    assert_eq!(got["currently_active"], true);

    let (status, body) = bob.put(&status_path(&alice.user_id), json!({ "presence": "offline" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    assert_eq!(bob.ok(Method::GET, &status_path(&alice.user_id), None).await["presence"], "online");

    // Presence of users sharing a room shows up in /sync.
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    alice.ok(Method::PUT, &status_path(&alice.user_id), Some(json!({ "presence": "unavailable", "status_msg": "back soon" }))).await;
    let synced = sync_query(&bob, None, "set_presence=offline").await;
    let presence = events(&synced["presence"]["events"]).into_iter().find(|e| e["sender"] == alice.user_id.as_str()).unwrap_or_else(|| panic!("{synced}"));
    assert_eq!(presence["type"], "m.presence");
    assert_eq!(presence["content"]["presence"], "unavailable");
    assert_eq!(presence["content"]["status_msg"], "back soon");

    // Disabled presence.
    let server = TestServer::start_with(&[("LIMBIC_PRESENCE__ENABLED", "false")]).await;
    let alice = server.register("alice").await;
    let (status, body) = alice.put(&status_path(&alice.user_id), json!({ "presence": "online" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let (status, body) = alice.get(&status_path(&alice.user_id)).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let synced = alice.sync(None, 0).await;
    assert!(events(&synced["presence"]["events"]).is_empty(), "{synced}");
}

/// Spec: `presence` is one of `online`, `offline`, `unavailable`; anything else is refused.
#[tokio::test]

async fn presence_unknown_state_is_400() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let path = format!("{V3}/presence/{}/status", enc(&alice.user_id));
    let (status, body) = alice.put(&path, json!({ "presence": "dancing" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(matches!(errcode(&body), "M_BAD_JSON" | "M_INVALID_PARAM"), "{body}");
    assert_ne!(alice.ok(Method::GET, &path, None).await["presence"], "dancing");
}

// --- rate limits ---------------------------------------------------------------------------

#[tokio::test]
async fn login_rate_limit() {
    let server = TestServer::start_with(&[
        ("LIMBIC_RATE_LIMITS__ENABLED", "true"),
        ("LIMBIC_RATE_LIMITS__LOGIN", "{ per_second = 0.1, burst = 2 }"),
    ])
    .await;
    let alice = server.register("alice").await;
    assert_eq!(login(&server, "alice", "alice-password", None).await.0, StatusCode::OK);
    assert_eq!(login(&server, "alice", "alice-password", None).await.0, StatusCode::OK);
    let (status, body) = login(&server, "alice", "alice-password", None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"), "{body}");
    let retry = body["retry_after_ms"].as_u64().unwrap_or_else(|| panic!("retry_after_ms: {body}"));
    assert!(retry > 0 && retry <= 10_000, "{retry}");
    // Wrong passwords are limited too (no brute forcing around the limit).
    let (status, _) = login(&server, "alice", "guess", None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Other endpoints are unaffected.
    assert_eq!(whoami_status(&alice).await.0, StatusCode::OK);
}

// --- registration modes and shared-secret registration -------------------------------------

async fn admin_nonce(client: &Client) -> String {
    client.ok(Method::GET, "/_synapse/admin/v1/register", None).await["nonce"].as_str().expect("nonce").to_owned()
}

#[tokio::test]
async fn registration_modes_and_shared_secret() {
    // Closed: no self-registration, but the shared secret still works.
    let server = TestServer::start_with(&[("LIMBIC_REGISTRATION__MODE", "closed")]).await;
    let client = server.client();
    let (status, body) = client.post(&format!("{V3}/register"), json!({ "username": "eve", "password": "pw", "auth": { "type": "m.login.dummy" } })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let (status, _) = client.post(&format!("{V3}/register"), json!({ "username": "eve", "password": "pw" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let nonce = admin_nonce(&client).await;
    let (status, body) = client.post("/_synapse/admin/v1/register", json!({
        "nonce": nonce, "username": "frank", "password": "frank-pw", "admin": false,
        "mac": admin_mac(&nonce, "frank", "frank-pw", true),
    })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "mac over the wrong admin flag: {body}");
    let (status, body) = client.post("/_synapse/admin/v1/register", json!({
        "nonce": nonce, "username": "frank", "password": "frank-pw", "admin": false, "mac": "00ff",
    })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    assert_eq!(login(&server, "frank", "frank-pw", None).await.0, StatusCode::FORBIDDEN);

    let nonce = admin_nonce(&client).await;
    let registered = client.ok(Method::POST, "/_synapse/admin/v1/register", Some(json!({
        "nonce": nonce, "username": "frank", "password": "frank-pw", "admin": false, "displayname": "Frank",
        "mac": admin_mac(&nonce, "frank", "frank-pw", false),
    }))).await;
    assert_eq!(registered["user_id"], "@frank:test.local");
    assert_eq!(registered["home_server"], "test.local");
    let mut frank = server.client();
    frank.token = Some(registered["access_token"].as_str().unwrap().to_owned());
    assert_eq!(frank.ok(Method::GET, &format!("{V3}/account/whoami"), None).await["user_id"], "@frank:test.local");
    assert_eq!(frank.ok(Method::GET, &format!("{V3}/profile/{}/displayname", enc("@frank:test.local")), None).await["displayname"], "Frank");
    assert_eq!(login(&server, "frank", "frank-pw", None).await.0, StatusCode::OK);
    let nonce = admin_nonce(&client).await;
    let (status, body) = client.post("/_synapse/admin/v1/register", json!({
        "nonce": nonce, "username": "frank", "password": "other", "admin": false,
        "mac": admin_mac(&nonce, "frank", "other", false),
    })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_USER_IN_USE"), "{body}");

    // Token mode.
    let server = TestServer::start_with(&[("LIMBIC_REGISTRATION__MODE", "token"), ("LIMBIC_REGISTRATION__TOKENS", "[\"abc\"]")]).await;
    let client = server.client();
    let (status, challenge) = client.post(&format!("{V3}/register"), json!({ "username": "gina", "password": "pw" })).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    assert!(events(&challenge["flows"]).iter().any(|f| events(&f["stages"]).contains(&json!("m.login.registration_token"))), "{challenge}");
    assert!(!events(&challenge["flows"]).iter().any(|f| events(&f["stages"]).contains(&json!("m.login.dummy"))), "{challenge}");
    let session = challenge["session"].as_str().unwrap();
    let (status, body) = client.post(&format!("{V3}/register"), json!({ "username": "gina", "password": "pw", "auth": { "type": "m.login.dummy", "session": session } })).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "dummy auth is not enough: {body}");
    let (status, body) = client.post(&format!("{V3}/register"), json!({
        "username": "gina", "password": "pw", "auth": { "type": "m.login.registration_token", "token": "wrong", "session": session }
    })).await;
    assert!(matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), "{status}: {body}");
    assert_eq!(errcode(&body), "M_FORBIDDEN");
    assert_eq!(login(&server, "gina", "pw", None).await.0, StatusCode::FORBIDDEN);
    let registered = client.ok(Method::POST, &format!("{V3}/register"), Some(json!({
        "username": "gina", "password": "pw", "auth": { "type": "m.login.registration_token", "token": "abc", "session": session }
    }))).await;
    assert_eq!(registered["user_id"], "@gina:test.local");
    assert!(registered["access_token"].is_string());
    assert_eq!(login(&server, "gina", "pw", None).await.0, StatusCode::OK);
}

/// Synapse-compatible shared-secret registration only accepts nonces it issued, once each
/// (Synapse answers an unknown or reused nonce with `400 M_UNKNOWN "unrecognised nonce"`).
#[tokio::test]

async fn admin_register_rejects_unissued_and_reused_nonces() {
    let server = TestServer::start().await;
    let client = server.client();
    let made_up = "not-a-nonce-from-the-server";
    let (status, body) = client.post("/_synapse/admin/v1/register", json!({
        "nonce": made_up, "username": "mallory", "password": "pw", "admin": false,
        "mac": admin_mac(made_up, "mallory", "pw", false),
    })).await;
    assert!(matches!(status, StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN), "unissued nonce: {status} {body}");
    let nonce = admin_nonce(&client).await;
    client.ok(Method::POST, "/_synapse/admin/v1/register", Some(json!({
        "nonce": nonce, "username": "henry", "password": "pw", "admin": false, "mac": admin_mac(&nonce, "henry", "pw", false),
    }))).await;
    let (status, body) = client.post("/_synapse/admin/v1/register", json!({
        "nonce": nonce, "username": "henry2", "password": "pw", "admin": false, "mac": admin_mac(&nonce, "henry2", "pw", false),
    })).await;
    assert!(matches!(status, StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN), "reused nonce: {status} {body}");
}

// --- health and metrics --------------------------------------------------------------------

#[tokio::test]
async fn health_and_metrics() {
    let server = TestServer::start().await;
    let anonymous = server.client();
    for path in ["/health", "/_limbic/health"] {
        let (status, body) = anonymous.get(path).await;
        assert_eq!((status, body), (StatusCode::OK, Value::String("OK".into())), "{path}");
    }

    let alice = server.register("alice").await;
    let room = alice.create_room(json!({})).await;
    alice.send_text(&room, "t1", "counted").await;
    let _ = alice.get(&format!("{V3}/rooms/{}/state/m.room.nothing", enc(&room))).await;

    // Each node counts what it served (in cluster mode: Alice's node).
    let metrics = format!("{}/metrics", server.base_for(&alice));
    let response = reqwest::get(&metrics).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let send_line = text
        .lines()
        .find(|l| l.starts_with("limbic_http_requests_seconds_count{") && l.contains("method=\"PUT\"") && l.contains("route=\"/_matrix/client/v3/rooms/{") && l.contains("/send/") && l.contains("status=\"200\""))
        .unwrap_or_else(|| panic!("no count for the send route:\n{text}"));
    let count: u64 = send_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1, "{send_line}");
    // The route label is the template, not the concrete path.
    assert!(!text.contains(&room) && !text.contains(&enc(&room)), "concrete room ids leak into labels");
    assert!(text.lines().any(|l| l.starts_with("limbic_http_requests_seconds_count{") && l.contains("status=\"404\"")), "{text}");
    assert!(text.contains("# TYPE limbic_http_requests_seconds histogram"));
    let persisted: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("limbic_events_persisted_total "))
        .unwrap_or_else(|| panic!("no limbic_events_persisted_total:\n{text}"))
        .trim()
        .parse()
        .unwrap();
    assert!(persisted > 0, "{persisted}");
    for metric in ["limbic_sync_waiting ", "limbic_store_bytes "] {
        assert!(text.lines().any(|l| l.starts_with(metric)), "{metric} missing");
    }
    // One more event moves the counter.
    alice.send_text(&room, "t2", "counted too").await;
    let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
    let after: u64 = text.lines().find_map(|l| l.strip_prefix("limbic_events_persisted_total ")).unwrap().trim().parse().unwrap();
    assert_eq!(after, persisted + 1);
}

// --- createRoom options --------------------------------------------------------------------

#[tokio::test]
async fn create_room_options() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;

    // power_level_content_override.
    let room = alice.create_room(json!({ "preset": "public_chat", "power_level_content_override": { "users_default": 50 } })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    bob.ok(Method::PUT, &format!("{V3}/rooms/{}/state/m.room.name", enc(&room)), Some(json!({ "name": "renamed by bob" }))).await;
    let power = state_content(&alice, &room, "m.room.power_levels").await;
    assert_eq!(power["users_default"], 50);
    assert_eq!(power["users"][&alice.user_id], 100);
    let (status, _) = bob.put(&format!("{V3}/rooms/{}/state/m.room.power_levels", enc(&room)), json!({ "users_default": 100 })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // initial_state; name and topic take precedence over initial_state.
    let room = alice.create_room(json!({
        "initial_state": [
            { "type": "m.room.history_visibility", "state_key": "", "content": { "history_visibility": "joined" } },
            { "type": "m.room.name", "state_key": "", "content": { "name": "from initial_state" } },
            { "type": "org.limbic.test", "state_key": "k", "content": { "x": 1 } }
        ],
        "name": "from name"
    })).await;
    assert_eq!(state_content(&alice, &room, "m.room.history_visibility").await["history_visibility"], "joined");
    assert_eq!(state_content(&alice, &room, "m.room.name").await["name"], "from name");
    assert_eq!(alice.ok(Method::GET, &format!("{V3}/rooms/{}/state/org.limbic.test/k", enc(&room)), None).await["x"], 1);

    // is_direct invites.
    let since = next_batch(&bob.sync(None, 0).await);
    let dm = alice.create_room(json!({ "preset": "trusted_private_chat", "invite": [bob.user_id], "is_direct": true })).await;
    let member = alice.ok(Method::GET, &format!("{V3}/rooms/{}/state/m.room.member/{}", enc(&dm), enc(&bob.user_id)), None).await;
    assert_eq!(member["membership"], "invite");
    assert_eq!(member["is_direct"], true);
    let synced = bob.sync(Some(&since), 0).await;
    let invite = events(&synced["rooms"]["invite"][&dm]["invite_state"]["events"])
        .into_iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str())
        .unwrap_or_else(|| panic!("{synced}"));
    assert_eq!(invite["content"]["is_direct"], true);
    // trusted_private_chat: invitees get the creator's power level.
    let power = state_content(&alice, &dm, "m.room.power_levels").await;
    assert_eq!(power["users"][&bob.user_id], 100);
    assert_eq!(power["users"][&alice.user_id], 100);
    assert_eq!(state_content(&alice, &dm, "m.room.join_rules").await["join_rule"], "invite");
    // A plain private_chat invitee gets no power.
    let plain = alice.create_room(json!({ "preset": "private_chat", "invite": [bob.user_id] })).await;
    let power = state_content(&alice, &plain, "m.room.power_levels").await;
    assert!(power["users"].get(&bob.user_id).is_none(), "{power}");
    let member = alice.ok(Method::GET, &format!("{V3}/rooms/{}/state/m.room.member/{}", enc(&plain), enc(&bob.user_id)), None).await;
    assert!(member.get("is_direct").is_none() || member["is_direct"] == false, "{member}");

    // Room version 10.
    let v10 = alice.create_room(json!({ "room_version": "10" })).await;
    let create = state_content(&alice, &v10, "m.room.create").await;
    assert_eq!(create["room_version"], "10");
    assert_eq!(create["creator"], alice.user_id.as_str());
    alice.send_text(&v10, "v10", "works in v10").await;
    let default = alice.create_room(json!({})).await;
    assert_eq!(state_content(&alice, &default, "m.room.create").await["room_version"], "11");

    // creation_content.
    let local = alice.create_room(json!({ "creation_content": { "m.federate": false } })).await;
    let create = state_content(&alice, &local, "m.room.create").await;
    assert_eq!(create["m.federate"], false);
    assert_eq!(create["room_version"], "11");
    let (status, body) = alice.post(&format!("{V3}/createRoom"), json!({ "room_version": "999" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION"));
}

// --- tags, user directory, third-party ids ---------------------------------------------------

#[tokio::test]
async fn tags_user_directory_and_threepids() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = alice.create_room(json!({ "preset": "private_chat", "invite": [bob.user_id] })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);

    let tags = format!("{V3}/user/{}/rooms/{}/tags", enc(&alice.user_id), enc(&room));
    alice.ok(Method::PUT, &format!("{tags}/m.favourite"), Some(json!({ "order": 0.5 }))).await;
    alice.ok(Method::PUT, &format!("{tags}/u.work"), Some(json!({}))).await;
    let listed = alice.ok(Method::GET, &tags, None).await;
    assert_eq!(listed["tags"]["m.favourite"]["order"], 0.5);
    assert!(listed["tags"]["u.work"].is_object());
    alice.ok(Method::DELETE, &format!("{tags}/u.work"), None).await;
    let listed = alice.ok(Method::GET, &tags, None).await;
    assert!(listed["tags"].get("u.work").is_none());
    let (status, _) = bob.get(&tags).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Tags reach the client as room account data.
    let sync = alice.sync(None, 0).await;
    assert!(sync["rooms"]["join"][&room]["account_data"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.tag" && e["content"]["tags"]["m.favourite"].is_object()));

    // The directory finds people alice shares a room with, not strangers in private rooms.
    let found = alice.ok(Method::POST, &format!("{V3}/user_directory/search"), Some(json!({ "search_term": "bo" }))).await;
    assert_eq!(found["results"][0]["user_id"], bob.user_id.as_str());
    let found = alice.ok(Method::POST, &format!("{V3}/user_directory/search"), Some(json!({ "search_term": "carol" }))).await;
    assert_eq!(found["results"], json!([]));
    // Carol in a public room is findable.
    let public = carol.create_room(json!({ "preset": "public_chat", "visibility": "public" })).await;
    assert!(!public.is_empty());
    let found = alice.ok(Method::POST, &format!("{V3}/user_directory/search"), Some(json!({ "search_term": "carol", "limit": 5 }))).await;
    assert_eq!(found["results"][0]["user_id"], carol.user_id.as_str());
    assert_eq!(found["limited"], false);

    assert_eq!(alice.ok(Method::GET, &format!("{V3}/account/3pid"), None).await["threepids"], json!([]));
    assert_eq!(alice.ok(Method::GET, &format!("{V3}/thirdparty/protocols"), None).await, json!({}));
}

#[tokio::test]
async fn timestamp_to_event_finds_the_closest_visible_event() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let stranger = server.register("stranger").await;
    let room = alice.create_room(json!({ "preset": "private_chat" })).await;
    alice.invite(&room, &bob.user_id).await;
    bob.join(&room).await;
    let mut sent = Vec::new();
    for i in 0..3 {
        let event_id = alice.send_text(&room, &format!("t{i}"), &format!("m{i}")).await;
        let event = alice.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&event_id)), None).await;
        sent.push((event_id, event["origin_server_ts"].as_u64().unwrap()));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let find = |client: &Client, ts: u64, dir: &str| {
        let path = format!("/_matrix/client/v1/rooms/{}/timestamp_to_event?ts={ts}&dir={dir}", enc(&room));
        let client = client.clone();
        async move { client.get(&path).await }
    };
    let (status, body) = find(&bob, sent[1].1, "b").await;
    assert_eq!((status, body["event_id"].as_str()), (StatusCode::OK, Some(sent[1].0.as_str())), "{body}");
    assert_eq!(body["origin_server_ts"], sent[1].1);
    let (_, body) = find(&bob, sent[1].1 + 1, "f").await;
    assert_eq!(body["event_id"].as_str(), Some(sent[2].0.as_str()), "{body}");
    let (_, body) = find(&bob, sent[1].1 + 1, "b").await;
    assert_eq!(body["event_id"].as_str(), Some(sent[1].0.as_str()), "{body}");
    let (status, body) = find(&bob, 1, "b").await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{body}");
    let (status, body) = find(&bob, sent[2].1 + 60_000, "f").await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{body}");

    // Nobody outside the room finds anything; a former member finds nothing after leaving.
    let (status, body) = find(&stranger, sent[1].1, "b").await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    bob.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), json!({})).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let after = alice.send_text(&room, "t3", "after bob left").await;
    let (_, body) = find(&alice, sent[2].1 + 1, "f").await;
    assert_ne!(body["event_id"].as_str(), Some(sent[2].0.as_str()));
    let (status, body) = find(&bob, sent[2].1 + 60_000, "b").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ne!(body["event_id"].as_str(), Some(after.as_str()), "{body}");
    let (status, body) = bob.get(&format!("/_matrix/client/v1/rooms/{}/timestamp_to_event?ts=x&dir=b", enc(&room))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"), "{body}");
}

/// The room summary names heroes only while the room has neither a name nor a canonical alias,
/// as of the sync's timeline when it has one.
#[tokio::test]
async fn the_room_summary_names_heroes_until_the_room_is_named() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "private_chat", "invite": [bob.user_id] })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    let summary = |sync: &Value| sync["rooms"]["join"][&room]["summary"].clone();

    let initial = alice.sync(None, 0).await;
    assert_eq!(summary(&initial)["m.heroes"], json!([bob.user_id]), "{initial}");
    assert_eq!(summary(&initial)["m.joined_member_count"], 2);
    bob.send_text(&room, "t1", "hello").await;
    let unnamed = alice.sync(Some(&next_batch(&initial)), 0).await;
    assert_eq!(summary(&unnamed)["m.heroes"], json!([bob.user_id]), "{unnamed}");

    alice.ok(Method::PUT, &format!("/_matrix/client/v3/rooms/{}/state/m.room.name", enc(&room)), Some(json!({ "name": "Intake" }))).await;
    let renamed = alice.sync(Some(&next_batch(&unnamed)), 0).await;
    assert!(summary(&renamed).get("m.heroes").is_none(), "{renamed}");
    bob.send_text(&room, "t2", "named now").await;
    let later = alice.sync(Some(&next_batch(&renamed)), 0).await;
    assert!(summary(&later).get("m.heroes").is_none(), "{later}");
    assert_eq!(summary(&later)["m.joined_member_count"], 2);
}
