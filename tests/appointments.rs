//! End-to-end tests: appointment links — the booking service's endpoint, and the single-use,
//! audience-bound `org.matrix.login.jwt` login with a link's token.

mod common;

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const APPOINTMENTS: &str = "/_limbic/service/v1/appointments";
const SECRET: &str = "s3cret";
const JWT_SECRET: &str = "test-jwt-secret";
const HOUR_MS: u64 = 3_600_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

async fn start(extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![("LIMBIC_APPOINTMENTS__SHARED_SECRET", SECRET), ("LIMBIC_RATE_LIMITS__ENABLED", "false")];
    env.extend_from_slice(extra);
    TestServer::start_with(&env).await
}

async fn verified_therapist(server: &TestServer, admin: &Client, name: &str) -> Client {
    let therapist = server.register(name).await;
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
    therapist
}

fn appointment(id: &str, therapist: &str, client: &str) -> Value {
    let start = now_ms() + HOUR_MS;
    json!({
        "appointment_id": id, "therapist": therapist, "client": client, "title": "Intake",
        "starts_at": start, "ends_at": start + HOUR_MS, "timezone": "Europe/Berlin",
    })
}

/// Calls the service endpoint with `secret` as bearer token (none when `None`).
async fn book(server: &TestServer, secret: Option<&str>, body: Value) -> (StatusCode, Value) {
    let mut client = server.client();
    client.token = secret.map(str::to_owned);
    client.post(APPOINTMENTS, body).await
}

/// The token inside a link.
fn token_of(link: &Value) -> String {
    let link = link.as_str().unwrap();
    assert!(link.starts_with("http://127.0.0.1:8008/join?token="), "{link}");
    link.rsplit_once("?token=").unwrap().1.to_owned()
}

async fn jwt_login(server: &TestServer, token: &str) -> (StatusCode, Value) {
    server.client().post("/_matrix/client/v3/login", json!({ "type": "org.matrix.login.jwt", "token": token })).await
}

fn forge(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn claims(sub: &str, aud: &str) -> Value {
    let now = now_ms() / 1000;
    json!({ "sub": sub, "aud": aud, "iss": "test.local", "iat": now, "exp": now + 600, "jti": format!("forged-{sub}-{aud}") })
}

/// The caller a fresh access token belongs to.
async fn whoami(server: &TestServer, token: &str) -> String {
    let mut client = server.client();
    client.token = Some(token.to_owned());
    client.ok(Method::GET, "/_matrix/client/v3/account/whoami", None).await["user_id"].as_str().unwrap().to_owned()
}

fn assert_refused(status: StatusCode, body: &Value, needle: &str) {
    assert_eq!((status, errcode(body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains(needle), "expected {needle:?} in {body}");
}

#[tokio::test]
async fn links_log_in_their_user_once() {
    let server = start(&[("LIMBIC_APPOINTMENTS__JWT_SECRET", JWT_SECRET)]).await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let request = appointment("appt-1", &therapist.user_id, "@alice:test.local");

    // Only the booking service, with the shared secret, books appointments.
    let (status, body) = book(&server, None, request.clone()).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"), "{body}");
    let (status, body) = book(&server, Some("wrong"), request.clone()).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"), "{body}");
    let unverified = server.register("unverified").await;
    let (status, body) = book(&server, Some(SECRET), appointment("appt-x", &unverified.user_id, "@alice:test.local")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");

    let (status, booked) = book(&server, Some(SECRET), request.clone()).await;
    assert_eq!(status, StatusCode::OK, "{booked}");
    let room = booked["room_id"].as_str().unwrap().to_owned();
    let client_token = token_of(&booked["links"]["@alice:test.local"]);
    let therapist_token = token_of(&booked["links"][&therapist.user_id]);

    let flows = server.client().ok(Method::GET, "/_matrix/client/v3/login", None).await;
    assert!(flows["flows"].as_array().unwrap().iter().any(|f| f["type"] == "org.matrix.login.jwt"), "{flows}");

    // The session is the sessions API's: roles for both, the (new, passwordless) client invited.
    let view = therapist.ok(Method::GET, &format!("/_limbic/client/v1/sessions/{}", enc(&room)), None).await;
    assert_eq!(view["roles"][&therapist.user_id], "therapist");
    assert_eq!(view["roles"]["@alice:test.local"], "client");
    assert_eq!(view["session"]["kind"], "individual");

    // The client's link logs in exactly the client, with a working token, audited.
    let (status, login) = jwt_login(&server, &client_token).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    assert_eq!((login["user_id"].as_str(), login["org.limbic.room_id"].as_str()), (Some("@alice:test.local"), Some(room.as_str())));
    assert_eq!(whoami(&server, login["access_token"].as_str().unwrap()).await, "@alice:test.local");
    let audit = admin.ok(Method::GET, &format!("/_limbic/admin/v1/audit?user={}", enc("@alice:test.local")), None).await;
    let entry = audit["entries"].as_array().unwrap().iter().find(|e| e["action"] == "login").cloned().unwrap_or_default();
    assert_eq!((entry["details"]["type"].as_str(), entry["room_id"].as_str()), (Some("org.matrix.login.jwt"), Some(room.as_str())), "{audit}");

    // Replayed: refused.
    let (status, body) = jwt_login(&server, &client_token).await;
    assert_refused(status, &body, "used already");

    // Tampered (one character of the signature flipped): refused, and the link itself stays good.
    let (head, signature) = therapist_token.rsplit_once('.').unwrap();
    let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{head}.{flipped}{}", &signature[1..]);
    let (status, body) = jwt_login(&server, &tampered).await;
    assert_refused(status, &body, "signature");
    let (status, login) = jwt_login(&server, &therapist_token).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    assert_eq!(whoami(&server, login["access_token"].as_str().unwrap()).await, therapist.user_id);

    // A token names one user: naming someone else in the request changes nothing, another
    // audience or another key logs in nobody.
    let (_, again) = book(&server, Some(SECRET), request.clone()).await;
    let token = token_of(&again["links"]["@alice:test.local"]);
    let body = json!({ "type": "org.matrix.login.jwt", "token": token, "identifier": { "type": "m.id.user", "user": therapist.user_id } });
    let login = server.client().ok(Method::POST, "/_matrix/client/v3/login", Some(body)).await;
    assert_eq!(whoami(&server, login["access_token"].as_str().unwrap()).await, "@alice:test.local");
    let (status, body) = jwt_login(&server, &forge(JWT_SECRET, claims(&therapist.user_id, &format!("livekit:{room}")))).await;
    assert_refused(status, &body, "not an appointment link");
    let (status, body) = jwt_login(&server, &forge("another-key", claims(&therapist.user_id, &format!("limbic-join:{room}")))).await;
    assert_refused(status, &body, "signature");
}

#[tokio::test]
async fn booking_is_idempotent_per_appointment() {
    let server = start(&[]).await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let client = server.register("client").await;
    let request = appointment("appt-7", &therapist.user_id, &client.user_id);
    let first = book(&server, Some(SECRET), request.clone()).await.1;
    let (status, second) = book(&server, Some(SECRET), request.clone()).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(first["room_id"], second["room_id"]);
    assert_ne!(first["links"][&client.user_id], second["links"][&client.user_id], "links are fresh");
    let sessions = therapist.ok(Method::GET, "/_limbic/client/v1/sessions", None).await;
    assert_eq!(sessions["sessions"].as_array().unwrap().len(), 1, "{sessions}");

    // The appointment's participants are fixed: asking links for someone else is a conflict.
    let other = server.register("other").await;
    let (status, body) = book(&server, Some(SECRET), appointment("appt-7", &therapist.user_id, &other.user_id)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Both links of both calls work (the first call's were not revoked by the second).
    for response in [&first, &second] {
        let (status, login) = jwt_login(&server, &token_of(&response["links"][&client.user_id])).await;
        assert_eq!((status, login["user_id"].as_str()), (StatusCode::OK, Some(client.user_id.as_str())), "{login}");
    }
}

#[tokio::test]
async fn expired_links_are_refused() {
    let server = start(&[("LIMBIC_APPOINTMENTS__TOKEN_LIFETIME_SECONDS", "1")]).await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let booked = book(&server, Some(SECRET), appointment("appt-2", &therapist.user_id, "@bob:test.local")).await.1;
    let token = token_of(&booked["links"]["@bob:test.local"]);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, body) = jwt_login(&server, &token).await;
    assert_refused(status, &body, "expired");
}

#[tokio::test]
async fn generated_key_survives_restart_and_users_without_a_role_knock() {
    let mut server = start(&[]).await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let booked = book(&server, Some(SECRET), appointment("appt-3", &therapist.user_id, "@carol:test.local")).await.1;
    let room = booked["room_id"].as_str().unwrap().to_owned();
    let token = token_of(&booked["links"]["@carol:test.local"]);

    // The therapist takes carol's role away: her link now puts her in the waiting room.
    let path = format!("/_matrix/client/v3/rooms/{}/state/org.limbic.session.role/{}", enc(&room), enc("_@carol:test.local"));
    therapist.ok(Method::PUT, &path, Some(json!({ "role": null }))).await;
    let leave = format!("/_matrix/client/v3/rooms/{}/kick", enc(&room));
    therapist.ok(Method::POST, &leave, Some(json!({ "user_id": "@carol:test.local" }))).await;

    server.restart().await;
    let (status, login) = jwt_login(&server, &token).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let member = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc("@carol:test.local")), None).await;
    assert_eq!((member["membership"].as_str(), member["reason"].as_str()), (Some("knock"), Some("appointment link")), "{member}");
}

#[tokio::test]
async fn admins_and_therapists_are_never_booked_as_clients_nor_signed_in_by_a_link() {
    let server = start(&[]).await;
    let admin = server.register_admin("admin").await;
    let therapist = verified_therapist(&server, &admin, "therapist").await;
    let colleague = verified_therapist(&server, &admin, "colleague").await;
    let refused = |body: &Value, who: &str| body["error"].as_str().unwrap_or_default().contains(who);

    // An admin or a verified therapist as the client: refused, and no link for them.
    for (client, id) in [(&admin.user_id, "appt-admin"), (&colleague.user_id, "appt-colleague")] {
        let (status, body) = book(&server, Some(SECRET), appointment(id, &therapist.user_id, client)).await;
        assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
        assert!(refused(&body, client) && body.get("links").is_none(), "{body}");
    }
    // Nor a verified therapist who is also an admin as the therapist.
    admin.ok(Method::PUT, &format!("/_synapse/admin/v1/users/{}/admin", enc(&colleague.user_id)), Some(json!({ "admin": true }))).await;
    let (status, body) = book(&server, Some(SECRET), appointment("appt-admin-therapist", &colleague.user_id, "@dan:test.local")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");

    // A plain account is booked; if it is made an admin later, its link no longer signs it in.
    let client = server.register("client").await;
    let booked = book(&server, Some(SECRET), appointment("appt-plain", &therapist.user_id, &client.user_id)).await;
    assert_eq!(booked.0, StatusCode::OK, "{}", booked.1);
    let token = token_of(&booked.1["links"][&client.user_id]);
    admin.ok(Method::PUT, &format!("/_synapse/admin/v1/users/{}/admin", enc(&client.user_id)), Some(json!({ "admin": true }))).await;
    let (status, body) = jwt_login(&server, &token).await;
    assert_refused(status, &body, "admin");
    // And a repeat booking of that appointment no longer hands out links for them.
    let (status, body) = book(&server, Some(SECRET), appointment("appt-plain", &therapist.user_id, &client.user_id)).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
}

/// A therapist makes a sign-in link for a client of their session who has no Matrix app: it
/// signs that client in once, into that session. Nobody else may make one, and none is made for
/// someone who is not a client of the session, a former one, an admin, a therapist or a user of
/// another server.
#[tokio::test]
async fn therapists_make_sign_in_links_for_their_clients() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = server.register("theo").await;
    let other_therapist = server.register("tara").await;
    for who in [&therapist, &other_therapist] {
        admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&who.user_id)), Some(json!({ "verified": true }))).await;
    }
    let client = server.register("cleo").await;
    let second = server.register("cal").await;
    let stranger = server.register("sam").await;
    let start = now_ms() + 3_600_000;
    let session = json!({
        "kind": "group", "title": "Links", "starts_at": start, "ends_at": start + 3_600_000, "timezone": "UTC",
        "participants": [
            { "user_id": client.user_id, "role": "client" },
            { "user_id": second.user_id, "role": "client" },
            { "user_id": "@remote:elsewhere.example", "role": "client" },
        ],
    });
    let created = therapist.ok(Method::POST, "/_limbic/client/v1/sessions", Some(session)).await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    let link_path = |user: &str| format!("/_limbic/client/v1/sessions/{}/links/{}", enc(&room), enc(user));

    // The link signs in the client, once, into this session.
    let link = therapist.ok(Method::POST, &link_path(&client.user_id), None).await;
    assert!(link["expires_at"].as_u64().unwrap() > now_ms());
    let token = link["url"].as_str().unwrap().split("?token=").nth(1).unwrap().to_owned();
    let login = |token: String| {
        let http = reqwest::Client::new();
        let url = format!("{}/_matrix/client/v3/login", server.base);
        async move { http.post(url).json(&json!({ "type": "org.matrix.login.jwt", "token": token })).send().await.unwrap() }
    };
    let signed_in: Value = login(token.clone()).await.json().await.unwrap();
    assert_eq!((signed_in["user_id"].as_str(), signed_in["org.limbic.room_id"].as_str()), (Some(client.user_id.as_str()), Some(room.as_str())));
    assert_eq!(login(token).await.status(), StatusCode::FORBIDDEN, "a link signs in once");
    let audit = admin.ok(Method::GET, &format!("/_limbic/admin/v1/audit?action=link_created&room_id={}", enc(&room)), None).await;
    let entry = &audit["entries"][0];
    assert_eq!((entry["actor"].as_str(), entry["target"].as_str()), (Some(therapist.user_id.as_str()), Some(client.user_id.as_str())));

    // Who may not make one: a client of the session, another therapist, a stranger.
    for (who, status) in [(&second, StatusCode::FORBIDDEN), (&other_therapist, StatusCode::FORBIDDEN), (&stranger, StatusCode::FORBIDDEN)] {
        let (got, body) = who.request(Method::POST, &link_path(&client.user_id), None).await;
        assert_eq!((got, errcode(&body)), (status, "M_FORBIDDEN"), "{}: {body}", who.user_id);
    }
    // For whom none is made: someone outside the session, the therapist, a user of another server.
    let (status, body) = therapist.request(Method::POST, &link_path(&stranger.user_id), None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{body}");
    let (status, body) = therapist.request(Method::POST, &link_path(&therapist.user_id), None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{body}");
    let (status, body) = therapist.request(Method::POST, &link_path("@remote:elsewhere.example"), None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"), "{body}");
    // A former client: removed from the session, no link.
    therapist.ok(Method::DELETE, &format!("/_limbic/client/v1/sessions/{}/participants/{}", enc(&room), enc(&second.user_id)), None).await;
    let (status, body) = therapist.request(Method::POST, &link_path(&second.user_id), None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{body}");
    // A client who has since become a verified therapist: no password-less sign-in for them.
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&client.user_id)), Some(json!({ "verified": true }))).await;
    let (status, body) = therapist.request(Method::POST, &link_path(&client.user_id), None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
}
