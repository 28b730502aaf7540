//! Calls: call tokens from the token service, and a therapy session to call in.

use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::{Client, TestServer, enc};

/// Where the token service is.
pub const SERVICE: &str = "/_limbic/calls";

pub async fn openid(client: &Client) -> Value {
    client.ok(Method::POST, &format!("/_matrix/client/v3/user/{}/openid/request_token", enc(&client.user_id)), Some(json!({}))).await
}

/// The claims of a JWT (its signature is the SFU's business).
pub fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT has three parts");
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// `client`'s request for a token to the call of `room` (MSC4195), made to `server`.
pub async fn token(server: &TestServer, client: &Client, room: &str) -> (StatusCode, Value) {
    let body = json!({
        "room_id": room, "slot_id": "m.call#ROOM", "openid_token": openid(client).await,
        "member": { "id": format!("member-{}", client.device_id), "claimed_user_id": client.user_id, "claimed_device_id": client.device_id },
    });
    server.client().post(&format!("{SERVICE}/get_token"), body).await
}

/// The call token [`token`] gets.
pub async fn jwt(server: &TestServer, client: &Client, room: &str) -> String {
    let (status, answer) = token(server, client, room).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["jwt"].as_str().unwrap().to_owned()
}

/// A group session of a verified therapist with a client and an observer, both joined; its room.
pub async fn group_session(server: &TestServer) -> (Client, Client, Client, String) {
    group_session_with(server, json!({})).await
}

/// [`group_session`] with more of the session's fields (`recording_policy`, say).
pub async fn group_session_with(server: &TestServer, fields: Value) -> (Client, Client, Client, String) {
    let admin = server.register_admin("admin").await;
    let therapist = server.register("therapist").await;
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
    let (client, observer) = (server.register("client").await, server.register("observer").await);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let mut session = json!({
        "kind": "group", "title": "Group", "starts_at": now, "ends_at": now + 3_600_000, "timezone": "UTC",
        "participants": [{ "user_id": client.user_id, "role": "client" }, { "user_id": observer.user_id, "role": "observer" }],
    });
    session.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
    let created = therapist.ok(Method::POST, "/_limbic/client/v1/sessions", Some(session)).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    for member in [&client, &observer] {
        let (status, body) = member.join(&room).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    (therapist, client, observer, room)
}

pub async fn set_status(therapist: &Client, room: &str, status: &str) {
    therapist.ok(Method::PUT, &format!("/_limbic/client/v1/sessions/{}/status", enc(room)), Some(json!({ "status": status }))).await;
}
