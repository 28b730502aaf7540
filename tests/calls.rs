//! End-to-end tests: MatrixRTC discovery and the call-token service (MSC4195 `/get_token` and
//! the earlier `/sfu/get`), with the clinic's rules on who may join a call with what rights.

mod common;

use base64::Engine;
use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SERVICE: &str = "/_limbic/calls";

async fn openid(client: &Client) -> Value {
    client.ok(Method::POST, &format!("/_matrix/client/v3/user/{}/openid/request_token", enc(&client.user_id)), Some(json!({}))).await
}

/// The claims of a JWT (its signature is the SFU's business).
fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT has three parts");
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

async fn legacy_token(server: &TestServer, client: &Client, room: &str) -> (StatusCode, Value) {
    let body = json!({ "room": room, "openid_token": openid(client).await, "device_id": client.device_id });
    server.client().post(&format!("{SERVICE}/sfu/get"), body).await
}

async fn token(server: &TestServer, client: &Client, room: &str) -> (StatusCode, Value) {
    let body = json!({
        "room_id": room, "slot_id": "m.call#ROOM", "openid_token": openid(client).await,
        "member": { "id": format!("member-{}", client.device_id), "claimed_user_id": client.user_id, "claimed_device_id": client.device_id },
    });
    server.client().post(&format!("{SERVICE}/get_token"), body).await
}

#[tokio::test]
async fn discovery_names_the_token_service() {
    let server = TestServer::start().await;
    let ana = server.register("ana").await;
    let (_, well_known) = server.client().get("/.well-known/matrix/client").await;
    let foci = well_known["org.matrix.msc4143.rtc_foci"].as_array().expect("rtc_foci");
    assert_eq!(foci[0]["type"], "livekit");
    assert!(foci[0]["livekit_service_url"].as_str().unwrap().ends_with(SERVICE), "{well_known}");
    for path in ["/_matrix/client/v1/rtc/transports", "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports"] {
        let transports = ana.ok(Method::GET, path, None).await;
        assert_eq!(transports["rtc_transports"], json!(foci), "{path}");
        let (status, _) = server.client().get(path).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} without a token");
    }
}

#[tokio::test]
async fn members_get_call_tokens_and_others_do_not() {
    let server = TestServer::start().await;
    let (ana, ben, eve) = (server.register("ana").await, server.register("ben").await, server.register("eve").await);
    let room = ana.create_room(json!({ "preset": "private_chat", "invite": [ben.user_id] })).await;
    ben.join(&room).await;

    let (status, answer) = token(&server, &ben, &room).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["url"].as_str().unwrap().starts_with("ws://"), "{answer}");
    let jwt = claims(answer["jwt"].as_str().unwrap());
    assert_eq!(jwt["iss"], "limbic");
    assert_eq!(jwt["video"]["roomJoin"], true);
    assert_eq!(jwt["video"]["canPublish"], true);
    assert_eq!(jwt["video"]["canSubscribe"], true);
    assert_eq!(jwt["video"]["roomAdmin"], false, "ben is no moderator");
    assert_eq!(jwt["org.limbic.room_id"], room.as_str());
    assert!(jwt["exp"].as_u64().unwrap() > jwt["nbf"].as_u64().unwrap());
    // The room and identity are hashed as MSC4195's service does: the same for the same member.
    let again = claims(token(&server, &ben, &room).await.1["jwt"].as_str().unwrap());
    assert_eq!((&again["sub"], &again["video"]["room"]), (&jwt["sub"], &jwt["video"]["room"]));
    assert_ne!(jwt["video"]["room"], room.as_str());
    let creator = claims(token(&server, &ana, &room).await.1["jwt"].as_str().unwrap());
    assert_eq!(creator["video"]["roomAdmin"], true, "the creator moderates");
    assert_eq!(creator["video"]["room"], jwt["video"]["room"], "one call per room");

    // The earlier /sfu/get names the device plainly, and means the room's call slot: its
    // clients meet those of /get_token in one call.
    let (status, answer) = legacy_token(&server, &ben, &room).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let legacy = claims(answer["jwt"].as_str().unwrap());
    assert_eq!(legacy["video"]["room"], jwt["video"]["room"]);
    assert_eq!(legacy["sub"], format!("{}:{}", ben.user_id, ben.device_id));

    // Not a member, a forged OpenID token, someone else's identity: refused.
    let (status, body) = token(&server, &eve, &room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    let mut fake = openid(&ben).await;
    fake["access_token"] = json!("not-a-token");
    let (status, body) = server.client().post(&format!("{SERVICE}/sfu/get"), json!({ "room": room, "openid_token": fake, "device_id": "X" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"), "{body}");
    let body = json!({
        "room_id": room, "slot_id": "m.call#ROOM", "openid_token": openid(&eve).await,
        "member": { "id": "m", "claimed_user_id": ben.user_id, "claimed_device_id": ben.device_id },
    });
    let (status, body) = server.client().post(&format!("{SERVICE}/get_token"), body).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    let (status, body) = server.client().post(&format!("{SERVICE}/get_token"), json!({ "room_id": room })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"), "{body}");
}

#[tokio::test]
async fn a_session_call_opens_with_the_session_and_rights_follow_the_roles() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = server.register("therapist").await;
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
    let (client, observer) = (server.register("client").await, server.register("observer").await);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let created = therapist
        .ok(Method::POST, "/_limbic/client/v1/sessions", Some(json!({
            "kind": "group", "title": "Group", "starts_at": now, "ends_at": now + 3_600_000, "timezone": "UTC",
            "participants": [{ "user_id": client.user_id, "role": "client" }, { "user_id": observer.user_id, "role": "observer" }],
        })))
        .await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    for member in [&client, &observer] {
        let (status, body) = member.join(&room).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Scheduled: no call yet, for anyone.
    let (status, body) = token(&server, &therapist, &room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    assert!(body["error"].as_str().unwrap().contains("scheduled"), "{body}");

    let status_path = format!("/_limbic/client/v1/sessions/{}/status", enc(&room));
    therapist.ok(Method::PUT, &status_path, Some(json!({ "status": "open" }))).await;
    let rights = |answer: Value| {
        let jwt = claims(answer["jwt"].as_str().unwrap());
        let video = &jwt["video"];
        (video["canPublish"].as_bool().unwrap(), video["canSubscribe"].as_bool().unwrap(), video["roomAdmin"].as_bool().unwrap(), video["roomRecord"].as_bool().unwrap())
    };
    assert_eq!(rights(token(&server, &therapist, &room).await.1), (true, true, true, true));
    assert_eq!(rights(token(&server, &client, &room).await.1), (true, true, false, false));
    assert_eq!(rights(token(&server, &observer, &room).await.1), (false, true, false, false));

    // Once the session is over, the call is closed again.
    therapist.ok(Method::PUT, &status_path, Some(json!({ "status": "in_progress" }))).await;
    assert_eq!(token(&server, &client, &room).await.0, StatusCode::OK);
    therapist.ok(Method::PUT, &status_path, Some(json!({ "status": "completed" }))).await;
    let (status, body) = token(&server, &client, &room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
}

/// Signalling takes a call token only while it is valid, from the header or the query.
#[tokio::test]
async fn signalling_refuses_expired_tokens() {
    let server = TestServer::start_with(&[("LIMBIC_CALLS__TOKEN_LIFETIME_SECONDS", "1")]).await;
    let ana = server.register("ana").await;
    let room = ana.create_room(json!({ "preset": "private_chat" })).await;
    let jwt = token(&server, &ana, &room).await.1["jwt"].as_str().unwrap().to_owned();
    let validate = |bearer: bool| {
        let request = reqwest::Client::new().get(format!("{}/rtc/validate", server.base));
        if bearer { request.bearer_auth(&jwt) } else { request.query(&[("access_token", &jwt)]) }
    };
    for bearer in [true, false] {
        let answer = validate(bearer).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.text().await.unwrap(), "success");
    }
    let (status, _) = server.client().get("/rtc/validate").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token");
    // The single-connection path is not served, so LiveKit's SDKs fall back to /rtc.
    assert_eq!(server.client().get("/rtc/v1/validate").await.0, StatusCode::NOT_FOUND);

    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let answer = validate(true).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    assert!(answer.text().await.unwrap().contains("Expired"), "expired");
}
