//! End-to-end tests: federation between Limbic servers on loopback, over TLS with a test CA —
//! key servers and notaries, X-Matrix signatures on every request, profiles, device keys and
//! OpenID tokens across servers, and the peer allow/deny lists.

mod common;

use common::{
    TestServer, enc, errcode,
    federation::{Federated, TestCa, federated, federated_with, https, test_ca},
    signalling::Signalling,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn get(client: &reqwest::Client, url: &str) -> (StatusCode, Value) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn servers_exchange_keys_profiles_device_keys_and_openid_identities() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (a, b) = (federated(&ca, "").await, federated(&ca, "").await);
    let https = https(&ca);

    // A's key server response verifies, and B relays it as a notary with its own signature.
    let (status, keys) = get(&https, &format!("https://{}/_matrix/key/v2/server", a.name)).await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    let server_name = ruma::OwnedServerName::try_from(a.name.as_str()).unwrap();
    limbic_server::federation::keys::verify_response(&server_name, &keys, 0).unwrap();
    let (status, relayed) = get(&https, &format!("https://{}/_matrix/key/v2/query/{}", b.name, a.name)).await;
    assert_eq!(status, StatusCode::OK, "{relayed}");
    let signers: Vec<&String> = relayed["server_keys"][0]["signatures"].as_object().unwrap().keys().collect();
    assert!(signers.contains(&&a.name) && signers.contains(&&b.name), "{relayed}");
    let (_, version) = get(&https, &format!("https://{}/_matrix/federation/v1/version", a.name)).await;
    assert_eq!(version["server"]["name"], "Limbic");

    // Profiles across servers, through the client API.
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    bob.ok(Method::PUT, &format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.user_id)), Some(json!({ "displayname": "Bob at B" }))).await;
    let profile = alice.ok(Method::GET, &format!("/_matrix/client/v3/profile/{}", enc(&bob.user_id)), None).await;
    assert_eq!(profile["displayname"], "Bob at B");
    let name = alice.ok(Method::GET, &format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.user_id)), None).await;
    assert_eq!(name, json!({ "displayname": "Bob at B" }));
    let (status, body) = alice.get(&format!("/_matrix/client/v3/profile/{}", enc(&format!("@nobody:{}", b.name)))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{body}");

    // Device keys across servers.
    let device_keys = json!({
        "user_id": bob.user_id, "device_id": bob.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": { format!("curve25519:{}", bob.device_id): "curve", format!("ed25519:{}", bob.device_id): "ed" },
        "signatures": {},
    });
    bob.ok(Method::POST, "/_matrix/client/v3/keys/upload", Some(json!({ "device_keys": device_keys }))).await;
    let queried = alice.ok(Method::POST, "/_matrix/client/v3/keys/query", Some(json!({ "device_keys": { &bob.user_id: [] } }))).await;
    assert_eq!(queried["device_keys"][&bob.user_id][&bob.device_id]["keys"], device_keys["keys"], "{queried}");
    assert_eq!(queried["failures"], json!({}));
    // One-time keys are claimed from the user's server, once.
    bob.ok(Method::POST, "/_matrix/client/v3/keys/upload", Some(json!({ "one_time_keys": { "signed_curve25519:AAAAAQ": { "key": "otk", "signatures": {} } } }))).await;
    let claim = json!({ "one_time_keys": { &bob.user_id: { &bob.device_id: "signed_curve25519" } } });
    let claimed = alice.ok(Method::POST, "/_matrix/client/v3/keys/claim", Some(claim.clone())).await;
    assert_eq!(claimed["one_time_keys"][&bob.user_id][&bob.device_id]["signed_curve25519:AAAAAQ"]["key"], "otk", "{claimed}");
    let again = alice.ok(Method::POST, "/_matrix/client/v3/keys/claim", Some(claim)).await;
    assert!(again["one_time_keys"][&bob.user_id][&bob.device_id].get("signed_curve25519:AAAAAQ").is_none(), "{again}");

    // OpenID: A vouches for alice to anyone holding her token, once.
    let token = alice.ok(Method::POST, &format!("/_matrix/client/v3/user/{}/openid/request_token", enc(&alice.user_id)), Some(json!({}))).await;
    assert_eq!(token["matrix_server_name"], a.name.as_str());
    let access = token["access_token"].as_str().unwrap();
    let (status, info) = get(&https, &format!("https://{}/_matrix/federation/v1/openid/userinfo?access_token={access}", a.name)).await;
    assert_eq!((status, info["sub"].as_str()), (StatusCode::OK, Some(alice.user_id.as_str())));
    let (status, info) = get(&https, &format!("https://{}/_matrix/federation/v1/openid/userinfo?access_token=forged", a.name)).await;
    assert_eq!((status, errcode(&info)), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"));
    let (status, _) = alice.post(&format!("/_matrix/client/v3/user/{}/openid/request_token", enc(&bob.user_id)), json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// Sends a federation request to `server`, signed with `key` as `origin` for `destination`.
async fn signed_request(https: &reqwest::Client, server: &str, path: &str, origin: &str, destination: &str, key: &ruma::signatures::Ed25519KeyPair) -> (StatusCode, Value) {
    send_signed(https, http::Method::GET, &format!("https://{server}{path}"), None, origin, destination, key).await
}

/// Sends a federation request with an optional JSON body, signed with `key` as `origin` for
/// `destination`.
async fn send_signed(https: &reqwest::Client, method: http::Method, url: &str, body: Option<&Value>, origin: &str, destination: &str, key: &ruma::signatures::Ed25519KeyPair) -> (StatusCode, Value) {
    use ruma::api::federation::authentication::{XMatrix, XMatrixSigningInput};
    let body = body.map(|b| serde_json::to_vec(b).unwrap()).unwrap_or_default();
    let mut request = http::Request::builder().method(method).uri(url).header(http::header::CONTENT_TYPE, "application/json").body(body).unwrap();
    let input = XMatrixSigningInput::new(origin.try_into().unwrap(), destination.try_into().unwrap(), key);
    let header = XMatrix::sign_http_request(&request, input).unwrap();
    request.headers_mut().insert(http::header::AUTHORIZATION, http::HeaderValue::from(&header));
    let response = https.execute(reqwest::Request::try_from(request).unwrap()).await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn unsigned_forged_and_unwelcome_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let a = federated(&ca, "").await;
    let b = federated(&ca, &format!("deny_servers = [{:?}]", a.name)).await;
    let https = https(&ca);
    let bob = b.server.register("bob").await;
    let path = format!("/_matrix/federation/v1/query/profile?user_id={}", enc(&bob.user_id));

    let (status, body) = get(&https, &format!("https://{}{path}", b.name)).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED"), "{body}");
    // Signed by a key the claimed origin does not have.
    let forger = ruma::signatures::Ed25519KeyPair::from_der(&ruma::signatures::Ed25519KeyPair::generate(), "forged".into()).unwrap();
    let third = federated(&ca, "").await;
    let (status, body) = signed_request(&https, &b.name, &path, &third.name, &b.name, &forger).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED"), "{body}");
    // Addressed to another server.
    let (status, body) = signed_request(&https, &b.name, &path, &third.name, &a.name, &forger).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED"), "{body}");

    // A server on B's deny list gets nothing, even with a good signature; the third gets in.
    let alice = a.server.register("alice").await;
    let (status, body) = alice.get(&format!("/_matrix/client/v3/profile/{}", enc(&bob.user_id))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    let carol = third.server.register("carol").await;
    assert_eq!(carol.get(&format!("/_matrix/client/v3/profile/{}", enc(&bob.user_id))).await.0, StatusCode::OK);
}

/// Without `allowed_networks`, a server reaches no internal address, whoever names it: as a
/// notary it relays no keys of a server on loopback, and it cannot confirm that server's OpenID
/// tokens. (The test harness allows loopback to every other test server.)
#[tokio::test(flavor = "multi_thread")]
async fn a_server_reaches_internal_addresses_only_in_allowed_networks() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let a = federated_with(&ca, "", &[(common::FEDERATION_ALLOWED_NETWORKS, "[]")]).await;
    let b = federated(&ca, "").await;
    let https = https(&ca);
    // B, which allows loopback, relays A's keys; A relays none of B's.
    let (status, relayed) = get(&https, &format!("https://{}/_matrix/key/v2/query/{}", b.name, a.name)).await;
    assert_eq!((status, relayed["server_keys"].as_array().map(Vec::len)), (StatusCode::OK, Some(1)), "{relayed}");
    let (status, relayed) = get(&https, &format!("https://{}/_matrix/key/v2/query/{}", a.name, b.name)).await;
    assert_eq!((status, relayed["server_keys"].clone()), (StatusCode::OK, json!([])), "{relayed}");
    // A cannot ask B whose OpenID token bob's is, so A's call-token service refuses it.
    let bob = b.server.register("bob").await;
    let openid = bob.ok(Method::POST, &format!("/_matrix/client/v3/user/{}/openid/request_token", enc(&bob.user_id)), Some(json!({}))).await;
    let alice = a.server.register("alice").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    let request = json!({ "room": room, "openid_token": openid, "device_id": bob.device_id });
    let (status, body) = a.server.client().post("/_limbic/calls/sfu/get", request).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"), "{body}");
}

/// A therapist of `server`, verified by an admin of it.
/// Servers A and B, and a public room alice of A created; `joiner` is a user of B, not in it yet.
async fn public_room_on_a(ca: &TestCa, joiner: &str) -> (Federated, Federated, common::Client, common::Client, String) {
    let (a, b) = (federated(ca, "").await, federated(ca, "").await);
    let alice = a.server.register("alice").await;
    let joiner = b.server.register(joiner).await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    (a, b, alice, joiner, room)
}

async fn verified_therapist(server: &TestServer) -> common::Client {
    let admin = server.register_admin("admin").await;
    let therapist = server.register("therapist").await;
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
    therapist
}

/// Waits until `client`'s sync shows `body` in `room`'s timeline.
async fn eventually_sees(client: &common::Client, room: &str, body: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let messages = client.messages(room, "dir=b&limit=50").await;
        if messages["chunk"].as_array().is_some_and(|chunk| chunk.iter().any(|e| e["content"]["body"] == body)) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{} never saw {body:?} in {room}: {messages}", client.user_id);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Two federating clinics: a verified therapist on A, a user `client` on B (and the directory
/// holding their test CA, which must outlive them).
struct TwoClinics {
    _dir: tempfile::TempDir,
    a: Federated,
    b: Federated,
    therapist: common::Client,
    client: common::Client,
}

async fn two_clinics() -> TwoClinics {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (a, b) = (federated(&ca, "").await, federated(&ca, "").await);
    let therapist = verified_therapist(&a.server).await;
    let client = b.server.register("client").await;
    TwoClinics { _dir: dir, a, b, therapist, client }
}

/// Asks `ask` until its answer satisfies `done`, for at most 15 s; that answer.
async fn eventually<F: Future<Output = Value>>(what: &str, ask: impl Fn() -> F, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let answer = ask().await;
        if done(&answer) {
            return answer;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {answer}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A session of `therapist` starting now, for an hour, with `fields` (kind, title, participants,
/// …) over the times; its room id.
async fn session_now(therapist: &common::Client, mut fields: Value) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    fields["starts_at"] = json!(now);
    fields["ends_at"] = json!(now + 3_600_000);
    fields["timezone"] = json!("UTC");
    let created = therapist.ok(Method::POST, "/_limbic/client/v1/sessions", Some(fields)).await;
    created["room_id"].as_str().unwrap().to_owned()
}

/// Waits until a full sync of `client` satisfies `seen`.
async fn eventually_syncs(client: &common::Client, seen: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let sync = client.sync(None, 0).await;
        if seen(&sync) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{} never saw it: {sync}", client.user_id);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_joins_a_room_on_another_server_and_messages_flow_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (a, mut b) = (federated(&ca, "").await, federated(&ca, "").await);
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat", "name": "Across clinics" })).await;
    alice.send_text(&room, "before", "sent before bob joined").await;

    let joined = bob.ok(Method::POST, &format!("/_matrix/client/v3/join/{}?via={}", enc(&room), enc(&a.name)), Some(json!({}))).await;
    assert_eq!(joined["room_id"], room.as_str());
    // Both servers now have bob's join, and the room's state on B is A's.
    let name = bob.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room)), None).await;
    assert_eq!(name["name"], "Across clinics");
    let members = alice.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), None).await;
    assert!(members["joined"].get(&bob.user_id).is_some(), "{members}");
    // The late joiner sees what was said before (backfill at the join), older than the join.
    let history = bob.messages(&room, "dir=b&limit=50").await;
    let chunk = history["chunk"].as_array().unwrap();
    let position = |pred: &dyn Fn(&Value) -> bool| chunk.iter().position(|e| pred(e));
    let before = position(&|e: &Value| e["content"]["body"] == "sent before bob joined").expect("history before the join");
    let join = position(&|e: &Value| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str()).unwrap();
    assert!(join < before, "newest first: the join comes before the earlier message");

    alice.send_text(&room, "a1", "hello from A").await;
    eventually_sees(&bob, &room, "hello from A").await;
    bob.send_text(&room, "b1", "hello from B").await;
    eventually_sees(&alice, &room, "hello from B").await;

    // Typing and read receipts cross too.
    bob.ok(Method::PUT, &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&bob.user_id)), Some(json!({ "typing": true, "timeout": 20000 }))).await;
    let typing = |sync: &Value| sync["rooms"]["join"][&room]["ephemeral"]["events"].as_array().into_iter().flatten().any(|e| e["type"] == "m.typing" && e["content"]["user_ids"].as_array().is_some_and(|u| u.iter().any(|u| u == bob.user_id.as_str())));
    eventually_syncs(&alice, typing).await;
    let last = alice.messages(&room, "dir=b&limit=1").await["chunk"][0]["event_id"].as_str().unwrap().to_owned();
    alice.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&last)), Some(json!({}))).await;
    let receipt = |sync: &Value| sync["rooms"]["join"][&room]["ephemeral"]["events"].as_array().into_iter().flatten().any(|e| e["type"] == "m.receipt" && e["content"][&last]["m.read"].get(&alice.user_id).is_some());
    eventually_syncs(&bob, receipt).await;

    // To-device messages and device-list changes cross, as end-to-end encryption needs.
    alice.ok(Method::PUT, "/_matrix/client/v3/sendToDevice/m.room_key_request/td1", Some(json!({ "messages": { &bob.user_id: { &bob.device_id: { "note": "for bob's device" } } } }))).await;
    eventually_syncs(&bob, |sync: &Value| sync["to_device"]["events"].as_array().into_iter().flatten().any(|e| e["content"]["note"] == "for bob's device" && e["sender"] == alice.user_id.as_str())).await;
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let keys = json!({ "user_id": bob.user_id, "device_id": bob.device_id, "algorithms": ["m.megolm.v1.aes-sha2"], "keys": { format!("ed25519:{}", bob.device_id): "k" }, "signatures": {} });
    bob.ok(Method::POST, "/_matrix/client/v3/keys/upload", Some(json!({ "device_keys": keys }))).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let sync = alice.sync(Some(&since), 0).await;
        if sync["device_lists"]["changed"].as_array().is_some_and(|c| c.iter().any(|u| u == bob.user_id.as_str())) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "alice never saw bob's device list change: {sync}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Presence too.
    bob.ok(Method::PUT, &format!("/_matrix/client/v3/presence/{}/status", enc(&bob.user_id)), Some(json!({ "presence": "online", "status_msg": "in a session" }))).await;
    eventually_syncs(&alice, |sync: &Value| sync["presence"]["events"].as_array().into_iter().flatten().any(|e| e["sender"] == bob.user_id.as_str() && e["content"]["status_msg"] == "in a session")).await;

    // B goes down; what A sends meanwhile is queued and delivered when B is back.
    b.server.stop().await;
    alice.send_text(&room, "a2", "while B was down").await;
    b.server.start_again().await;
    eventually_sees(&bob, &room, "while B was down").await;
    // A's own events stay in order on B.
    let messages = bob.messages(&room, "dir=f&limit=100").await;
    let bodies: Vec<&str> = messages["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    let position = |body: &str| bodies.iter().position(|b| *b == body);
    assert!(position("hello from A") < position("while B was down"), "{bodies:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_of_another_clinic_is_invited_to_and_joins_a_therapy_session() {
    let TwoClinics { _dir, a: _a, b, therapist, client } = two_clinics().await;
    let stranger = b.server.register("stranger").await;

    // A session hosted on A with a client of B: the invitation reaches B through /invite.
    let participants = json!([{ "user_id": client.user_id, "role": "client" }]);
    let room = session_now(&therapist, json!({ "kind": "individual", "title": "Cross-clinic intake", "participants": participants })).await;
    let invited = |sync: &Value| {
        let events = sync["rooms"]["invite"][&room]["invite_state"]["events"].as_array().cloned().unwrap_or_default();
        events.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Cross-clinic intake")
            && events.iter().any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "invite")
    };
    eventually_syncs(&client, invited).await;

    // The clinic rules hold over federation: the scheduled client joins, a stranger of B cannot.
    let (status, body) = stranger.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    client.ok(Method::POST, &format!("/_matrix/client/v3/join/{}", enc(&room)), Some(json!({}))).await;
    let session = client.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/org.limbic.session/", enc(&room)), None).await;
    assert_eq!(session["title"], "Cross-clinic intake");
    therapist.send_text(&room, "t1", "welcome from the clinic").await;
    eventually_sees(&client, &room, "welcome from the clinic").await;
    client.send_text(&room, "c1", "thank you").await;
    eventually_sees(&therapist, &room, "thank you").await;
}

/// A participant of another clinic withdraws consent on their own server: the recording on the
/// session's server stops as it does for a local withdrawal (the after-commit hooks run for
/// events arriving over federation too).
#[tokio::test(flavor = "multi_thread")]
async fn consent_withdrawn_over_federation_stops_the_recording() {
    let TwoClinics { _dir, a, b: _b, therapist, client } = two_clinics().await;
    let participants = json!([{ "user_id": client.user_id, "role": "client" }]);
    let room = session_now(&therapist, json!({ "kind": "individual", "title": "Recorded", "recording_policy": "with_consent", "participants": participants })).await;
    eventually_syncs(&client, |sync| sync["rooms"]["invite"][&room].is_object()).await;
    client.ok(Method::POST, &format!("/_matrix/client/v3/join/{}", enc(&room)), Some(json!({}))).await;
    therapist.ok(Method::PUT, &format!("/_limbic/client/v1/sessions/{}/status", enc(&room)), Some(json!({ "status": "open" }))).await;
    let consent_path = |who: &common::Client| format!("/_matrix/client/v3/rooms/{}/state/org.limbic.recording.consent/{}", enc(&room), enc(&who.user_id));
    client.ok(Method::PUT, &consent_path(&client), Some(json!({ "consent": true }))).await;
    therapist.ok(Method::PUT, &consent_path(&therapist), Some(json!({ "consent": true }))).await;

    // The therapist joins the call on A and starts recording it.
    let openid = therapist.ok(Method::POST, &format!("/_matrix/client/v3/user/{}/openid/request_token", enc(&therapist.user_id)), Some(json!({}))).await;
    let token = a.server.client().ok(Method::POST, "/_limbic/calls/sfu/get", Some(json!({ "room": room, "openid_token": openid, "device_id": therapist.device_id }))).await;
    let _call = Signalling::join(&a.server, token["jwt"].as_str().unwrap()).await;
    therapist.ok(Method::PUT, &format!("/_limbic/client/v1/sessions/{}/recording", enc(&room)), Some(json!({ "recording": true }))).await;
    let recording_path = format!("/_matrix/client/v3/rooms/{}/state/org.limbic.recording/", enc(&room));
    assert_eq!(therapist.ok(Method::GET, &recording_path, None).await["recording"], true);

    // The client withdraws consent on B: A stops the recording when the event arrives.
    client.ok(Method::PUT, &consent_path(&client), Some(json!({ "consent": false }))).await;
    let state = eventually("still recording after the withdrawal arrived", || therapist.ok(Method::GET, &recording_path, None), |state| state["recording"] == false).await;
    assert!(state["stopped_because"].as_str().is_some_and(|why| why.contains("withdrew")), "{state}");
}

/// A therapist of another server demotes a local co-therapist: the co-therapist leaves the
/// session's notes room on this server (which the other server cannot reach: notes rooms never
/// federate), so that nothing of the notes reaches them any more.
#[tokio::test(flavor = "multi_thread")]
async fn a_co_therapist_demoted_from_another_server_leaves_the_notes_room() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (a, b) = (federated(&ca, "").await, federated(&ca, "").await);
    let therapist = verified_therapist(&a.server).await;
    let colleague = a.server.register("colleague").await;
    let remote = b.server.register("remote").await;
    let participants = json!([{ "user_id": colleague.user_id, "role": "co_therapist" }, { "user_id": remote.user_id, "role": "therapist" }]);
    let room = session_now(&therapist, json!({ "kind": "group", "title": "Shared group", "participants": participants })).await;
    colleague.ok(Method::POST, &format!("/_matrix/client/v3/join/{}", enc(&room)), Some(json!({}))).await;
    eventually_syncs(&remote, |sync| sync["rooms"]["invite"][&room].is_object()).await;
    remote.ok(Method::POST, &format!("/_matrix/client/v3/join/{}", enc(&room)), Some(json!({}))).await;

    // The co-therapist writes a note: the notes room is made, with them in it.
    let note = colleague.ok(Method::PUT, &format!("/_limbic/client/v1/sessions/{}/notes/n1", enc(&room)), Some(json!({ "body": "private" }))).await;
    let notes_room = note["room_id"].as_str().unwrap().to_owned();
    let membership_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&notes_room), enc(&colleague.user_id));
    assert_eq!(colleague.ok(Method::GET, &membership_path, None).await["membership"], "join");

    // The remote therapist makes them a client, on B.
    let demote = format!("/_limbic/client/v1/sessions/{}/participants/{}", enc(&room), enc(&colleague.user_id));
    remote.ok(Method::PUT, &demote, Some(json!({ "role": "client" }))).await;
    let membership = || async { colleague.get(&membership_path).await.1 };
    eventually("still in the notes room after the demotion arrived", membership, |membership| membership["membership"] == "leave").await;
    let (status, body) = colleague.get(&format!("/_limbic/client/v1/sessions/{}/notes", enc(&room))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

/// A version 12 room id names no server: an invited user's server reaches the room through the
/// inviter's server, and the creator acts with implied power.
#[tokio::test(flavor = "multi_thread")]
async fn an_invite_to_a_version_12_room_is_joined_through_the_inviters_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (a, b) = (federated(&ca, "").await, federated(&ca, "").await);
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "private_chat", "room_version": "12", "invite": [bob.user_id] })).await;
    let create = alice.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.room.create/", enc(&room)), None).await;
    assert_eq!(create["room_version"], "12");
    eventually_syncs(&bob, |sync: &Value| sync["rooms"]["invite"].get(&room).is_some()).await;
    bob.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(json!({}))).await;
    bob.send_text(&room, "b1", "joined a hash-named room").await;
    eventually_sees(&alice, &room, "joined a hash-named room").await;
    // The creator is in no power level list, yet may change the power levels and kick.
    let power = power_levels_of(&alice, &room).await;
    assert!(power["users"].get(&alice.user_id).is_none(), "{power}");
    alice.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)), Some(json!({ "user_id": bob.user_id }))).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while bob.ok(Method::GET, "/_matrix/client/v3/joined_rooms", None).await["joined_rooms"].as_array().unwrap().iter().any(|r| r == room.as_str()) {
        assert!(std::time::Instant::now() < deadline, "bob's server never heard of the kick");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A user of another server gets a call token for a room here: their OpenID token is confirmed
/// by their own server's `openid/userinfo`.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_of_another_server_gets_a_call_token_confirmed_by_their_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (a, _b, _alice, bob, room) = public_room_on_a(&ca, "bob").await;
    let request = |openid: Value| json!({ "room": room, "openid_token": openid, "device_id": bob.device_id });
    let openid = bob.ok(Method::POST, &format!("/_matrix/client/v3/user/{}/openid/request_token", enc(&bob.user_id)), Some(json!({}))).await;
    // Not in the room yet: refused.
    let (status, body) = a.server.client().post("/_limbic/calls/sfu/get", request(openid.clone())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    bob.ok(Method::POST, &format!("/_matrix/client/v3/join/{}?via={}", enc(&room), enc(&a.name)), Some(json!({}))).await;
    let answer = a.server.client().ok(Method::POST, "/_limbic/calls/sfu/get", Some(request(openid.clone()))).await;
    assert!(answer["jwt"].as_str().is_some_and(|jwt| jwt.split('.').count() == 3), "{answer}");
    // A token B never issued is refused.
    let mut forged = openid;
    forged["access_token"] = json!("forged");
    let (status, body) = a.server.client().post("/_limbic/calls/sfu/get", request(forged)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

/// A late joiner gets the last events at the join; paging back further fetches the rest from
/// the other server, in order, and the second walk reads it from the store.
#[tokio::test(flavor = "multi_thread")]
async fn paging_back_past_the_join_time_history_backfills_from_the_other_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (a, _b, alice, bob, room) = public_room_on_a(&ca, "bob").await;
    let sent: Vec<String> = (0..120).map(|n| format!("history {n}")).collect();
    for (n, body) in sent.iter().enumerate() {
        alice.send_text(&room, &format!("h{n}"), body).await;
    }
    bob.ok(Method::POST, &format!("/_matrix/client/v3/join/{}?via={}", enc(&room), enc(&a.name)), Some(json!({}))).await;

    let walk_back = || async {
        let (mut bodies, mut from, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let query = if from.is_empty() { "dir=b&limit=25".to_owned() } else { format!("dir=b&limit=25&from={from}") };
            let page = bob.messages(&room, &query).await;
            bodies.extend(page["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)));
            pages += 1;
            match page["end"].as_str() {
                Some(end) => from = end.to_owned(),
                None => break,
            }
            assert!(pages < 40, "paging back never ends: {bodies:?}");
        }
        bodies.reverse();
        bodies
    };
    // Oldest first, every message once, as sent.
    assert_eq!(walk_back().await, sent);
    assert_eq!(walk_back().await, sent);
    // Forwards from the start, the backfilled history comes in the same order.
    let (mut forward, mut from) = (Vec::new(), String::new());
    for _ in 0..40 {
        let page = bob.messages(&room, &format!("dir=f&limit=25{from}")).await;
        let chunk = page["chunk"].as_array().unwrap();
        forward.extend(chunk.iter().filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)));
        match page["end"].as_str() {
            Some(end) if !chunk.is_empty() => from = format!("&from={end}"),
            _ => break,
        }
    }
    assert_eq!(forward, sent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passcode_protected_session_admits_nobody_from_another_server() {
    let TwoClinics { _dir, a: _a, b: _b, therapist, client } = two_clinics().await;
    let participants = json!([{ "user_id": client.user_id, "role": "client" }]);
    let room = session_now(&therapist, json!({ "kind": "individual", "title": "Protected", "participants": participants, "passcode": "4711" })).await;
    eventually_syncs(&client, |sync: &Value| sync["rooms"]["invite"].get(&room).is_some()).await;
    // The passcode cannot travel between servers (it would be stored in the signed event).
    for body in [json!({}), json!({ "org.limbic.passcode": "4711" })] {
        let (status, answer) = client.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), body).await;
        assert_eq!((status, errcode(&answer)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{answer}");
    }
    let members = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), None).await;
    assert!(members["joined"].get(&client.user_id).is_none(), "{members}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_acl_shuts_a_server_out_of_a_room() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (a, _b, alice, bob, room) = public_room_on_a(&ca, "bob").await;
    bob.ok(Method::POST, &format!("/_matrix/client/v3/join/{}?via={}", enc(&room), enc(&a.name)), Some(json!({}))).await;
    bob.send_text(&room, "b1", "before the acl").await;
    eventually_sees(&alice, &room, "before the acl").await;

    // Server names are matched without their port: on loopback, denying IP literals shuts B out.
    alice.ok(Method::PUT, &format!("/_matrix/client/v3/rooms/{}/state/m.room.server_acl/", enc(&room)), Some(json!({ "allow": ["*"], "allow_ip_literals": false }))).await;
    bob.send_text(&room, "b2", "after the acl").await;
    alice.send_text(&room, "a1", "not for B").await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let on_a = alice.messages(&room, "dir=b&limit=50").await.to_string();
    let on_b = bob.messages(&room, "dir=b&limit=50").await.to_string();
    assert!(!on_a.contains("after the acl"), "A accepted an event from a denied server");
    assert!(!on_b.contains("not for B"), "A sent to a denied server");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_missed_events_fetches_them_when_the_next_one_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (mut a, mut b, alice, bob, room) = public_room_on_a(&ca, "bob").await;
    bob.ok(Method::POST, &format!("/_matrix/client/v3/join/{}?via={}", enc(&room), enc(&a.name)), Some(json!({}))).await;

    // B is down while alice writes, and A loses its queue for B: B never gets those events sent.
    b.server.stop().await;
    alice.send_text(&room, "m1", "missed one").await;
    alice.send_text(&room, "m2", "missed two").await;
    a.server.stop().await;
    {
        use limbic_server::store::tables;
        let store = a.server.open_store();
        let keys: Vec<_> = store.scan_prefix(tables::FEDERATION_OUTBOX, Vec::new(), false).map(|item| item.unwrap().0).collect();
        assert!(!keys.is_empty(), "the events were queued for B");
        let mut batch = store.batch();
        for key in keys {
            batch.delete(tables::FEDERATION_OUTBOX, &key);
        }
        store.write(batch).unwrap();
    }
    a.server.start_again().await;
    b.server.start_again().await;

    // The next event points at the missed ones: B fetches them (get_missing_events) first.
    alice.send_text(&room, "m3", "the next one").await;
    eventually_sees(&bob, &room, "the next one").await;
    eventually_sees(&bob, &room, "missed one").await;
    eventually_sees(&bob, &room, "missed two").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_of_another_clinic_wait_in_the_waiting_room_and_are_admitted_or_declined() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (a, b) = (federated(&ca, "").await, federated(&ca, "").await);
    let therapist = verified_therapist(&a.server).await;
    let (guest, other) = (b.server.register("guest").await, b.server.register("other").await);
    let room = session_now(&therapist, json!({ "kind": "group", "title": "Open group" })).await;
    let waiting_path = format!("/_limbic/client/v1/sessions/{}/waiting", enc(&room));

    // Both knock from B (make_knock/send_knock); the therapist on A sees them waiting.
    for (client, reason) in [(&guest, "referred by my GP"), (&other, "curious")] {
        client.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(json!({ "reason": reason }))).await;
    }
    eventually_syncs(&guest, |sync: &Value| sync["rooms"]["knock"][&room]["knock_state"]["events"].as_array().is_some_and(|e| e.iter().any(|e| e["type"] == "m.room.name"))).await;
    let waiting = therapist.ok(Method::GET, &waiting_path, None).await;
    let queue: Vec<&str> = waiting["waiting"].as_array().unwrap().iter().map(|w| w["reason"].as_str().unwrap()).collect();
    assert_eq!(queue, ["referred by my GP", "curious"]);

    // Admitted: the invite reaches B, and the guest joins.
    therapist.ok(Method::POST, &format!("{waiting_path}/{}/admit", enc(&guest.user_id)), Some(json!({}))).await;
    eventually_syncs(&guest, |sync: &Value| sync["rooms"]["invite"].get(&room).is_some()).await;
    guest.ok(Method::POST, &format!("/_matrix/client/v3/join/{}", enc(&room)), Some(json!({}))).await;
    therapist.send_text(&room, "t1", "welcome to the group").await;
    eventually_sees(&guest, &room, "welcome to the group").await;

    // Declined: the other knocker's sync on B shows the leave.
    therapist.ok(Method::POST, &format!("{waiting_path}/{}/decline", enc(&other.user_id)), Some(json!({ "reason": "the group is full today" }))).await;
    eventually_syncs(&other, |sync: &Value| sync["rooms"]["knock"].get(&room).is_none() && sync["rooms"]["invite"].get(&room).is_none()).await;
    let (status, _) = other.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_key_stays_published_as_an_old_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let mut a = federated(&ca, "").await;
    let https = https(&ca);
    let (_, before) = get(&https, &format!("https://{}/_matrix/key/v2/server", a.name)).await;
    let old_id = before["verify_keys"].as_object().unwrap().keys().next().unwrap().clone();

    a.server.stop().await;
    let output = a.server.run_cli(&["keys", "rotate"], "");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    a.server.start_again().await;

    let (_, after) = get(&https, &format!("https://{}/_matrix/key/v2/server", a.name)).await;
    let server_name = ruma::OwnedServerName::try_from(a.name.as_str()).unwrap();
    limbic_server::federation::keys::verify_response(&server_name, &after, 0).unwrap();
    assert!(after["verify_keys"].get(&old_id).is_none(), "{after}");
    assert_eq!(after["old_verify_keys"][&old_id]["key"], before["verify_keys"][&old_id]["key"], "{after}");
    assert!(after["old_verify_keys"][&old_id]["expired_ts"].as_u64().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_state_changes_on_two_servers_resolve_to_the_same_state_on_all_three() {
    concurrent_state_changes_converge("11").await;
}

/// Version 12: room ids are the create event's hash (so joins need `via`), the creator's power
/// is implied, and state resolution is v2.1.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_state_changes_converge_in_a_version_12_room() {
    concurrent_state_changes_converge("12").await;
}

async fn concurrent_state_changes_converge(room_version: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (a, b, c) = (federated(&ca, "").await, federated(&ca, "").await, federated(&ca, "").await);
    let alice = a.server.register("alice").await;
    let (bob, carol) = (b.server.register("bob").await, c.server.register("carol").await);
    let room = alice.create_room(json!({ "preset": "public_chat", "name": "Original", "room_version": room_version })).await;
    assert_eq!(room.contains(':'), room_version != "12", "a version {room_version} room id: {room}");
    for client in [&bob, &carol] {
        client.ok(Method::POST, &format!("/_matrix/client/v3/join/{}?via={}", enc(&room), enc(&a.name)), Some(json!({}))).await;
    }
    let state_path = |kind: &str| format!("/_matrix/client/v3/rooms/{}/state/{kind}/", enc(&room));
    let mut power = alice.ok(Method::GET, &state_path("m.room.power_levels"), None).await;
    // Since v12 the creator is in no power level list: their power is implied.
    assert_eq!(power["users"].get(&alice.user_id).is_some(), room_version != "12", "{power}");
    power["users"][&bob.user_id] = json!(100);
    power["users"][&carol.user_id] = json!(100);
    alice.ok(Method::PUT, &state_path("m.room.power_levels"), Some(power)).await;
    for client in [&bob, &carol] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while client.ok(Method::GET, &state_path("m.room.power_levels"), None).await["users"][&carol.user_id] != 100 {
            assert!(std::time::Instant::now() < deadline, "{} never saw the new power levels", client.user_id);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    // B and C rename the room and change the power levels at the same moment: two branches.
    let (mut from_b, mut from_c) = (power_levels_of(&bob, &room).await, power_levels_of(&carol, &room).await);
    from_b["state_default"] = json!(60);
    from_c["events_default"] = json!(10);
    let (name_path, power_path) = (state_path("m.room.name"), state_path("m.room.power_levels"));
    let (rb, rc, pb, pc) = tokio::join!(
        bob.put(&name_path, json!({ "name": "Named on B" })),
        carol.put(&name_path, json!({ "name": "Named on C" })),
        bob.put(&power_path, from_b),
        carol.put(&power_path, from_c),
    );
    for (status, body) in [rb, rc, pb, pc] {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Every server ends with the same state, whatever order the branches arrived in.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut seen = Vec::new();
        for client in [&alice, &bob, &carol] {
            let name = client.ok(Method::GET, &state_path("m.room.name"), None).await;
            seen.push((name, power_levels_of(client, &room).await));
        }
        if seen.windows(2).all(|pair| pair[0] == pair[1]) && seen[0].0["name"] != "Original" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the servers did not converge: {seen:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn power_levels_of(client: &common::Client, room: &str) -> Value {
    client.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(room)), None).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_sent_before_its_sender_heard_of_their_ban_is_soft_failed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (a, mut b, alice, carol, room) = public_room_on_a(&ca, "carol").await;
    carol.ok(Method::POST, &format!("/_matrix/client/v3/join/{}?via={}", enc(&room), enc(&a.name)), Some(json!({}))).await;
    carol.send_text(&room, "c1", "before the ban").await;
    eventually_sees(&alice, &room, "before the ban").await;

    // A bans carol while B is down; A's queue for B backs off, so B comes back not knowing.
    b.server.stop().await;
    alice.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)), Some(json!({ "user_id": carol.user_id, "reason": "test" }))).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    b.server.start_again().await;
    let (status, body) = carol.put(&format!("/_matrix/client/v3/rooms/{}/send/m.room.message/c2", enc(&room)), json!({ "msgtype": "m.text", "body": "after the ban" })).await;
    assert_eq!(status, StatusCode::OK, "B should not know of the ban yet: {body}");

    // A keeps the event (B's next events may point at it) but shows it to nobody.
    let event_id = body["event_id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while alice.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&event_id))).await.0 != StatusCode::OK {
        assert!(std::time::Instant::now() < deadline, "the event never reached A");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let on_a = alice.messages(&room, "dir=b&limit=50").await.to_string();
    assert!(on_a.contains("before the ban"));
    assert!(!on_a.contains("after the ban"), "a soft-failed event reached A's clients");
}

/// A federated server's signing key, read from its store while it is stopped for a moment.
async fn signing_key_of(server: &mut Federated) -> limbic_server::events::ServerSigningKey {
    server.server.stop().await;
    let key = {
        let store = server.server.open_store();
        limbic_server::events::ServerSigningKey::load_or_generate(&store, server.name.as_str().try_into().unwrap()).unwrap()
    };
    server.server.start_again().await;
    key
}

/// One server asking another's federation API, signed with its own key.
struct Asker<'a> {
    https: &'a reqwest::Client,
    origin: &'a str,
    destination: &'a str,
    key: &'a limbic_server::events::ServerSigningKey,
}

impl Asker<'_> {
    async fn send(&self, method: http::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let url = format!("https://{}{path}", self.destination);
        send_signed(self.https, method, &url, body.as_ref(), self.origin, self.destination, self.key.key_pair()).await
    }

    /// `/event`, `/state`, `/state_ids`, `/backfill` and `/get_missing_events` around `event`.
    async fn history(&self, room: &str, event: &str) -> Vec<(String, StatusCode, Value)> {
        let (room_path, event_path) = (enc(room), enc(event));
        let mut answers = Vec::new();
        for path in [
            format!("/_matrix/federation/v1/event/{event_path}"),
            format!("/_matrix/federation/v1/state/{room_path}?event_id={event_path}"),
            format!("/_matrix/federation/v1/state_ids/{room_path}?event_id={event_path}"),
            format!("/_matrix/federation/v1/backfill/{room_path}?v={event_path}&limit=50"),
        ] {
            let (status, body) = self.send(http::Method::GET, &path, None).await;
            answers.push((path, status, body));
        }
        let path = format!("/_matrix/federation/v1/get_missing_events/{room_path}");
        let missing = json!({ "earliest_events": [], "latest_events": [event], "limit": 50 });
        let (status, body) = self.send(http::Method::POST, &path, Some(missing)).await;
        answers.push((path, status, body));
        answers
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_whose_users_only_knock_or_are_invited_reads_no_history() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (a, mut b) = (federated(&ca, "").await, federated(&ca, "").await);
    let key = signing_key_of(&mut b).await;
    let https = https(&ca);
    let as_b = Asker { https: &https, origin: &b.name, destination: &a.name, key: &key };
    let therapist = a.server.register("therapist").await;
    let (knocker, invitee) = (b.server.register("knocker").await, b.server.register("invitee").await);
    let room = therapist
        .create_room(json!({ "name": "Session", "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }] }))
        .await;
    let secret = therapist.send_text(&room, "t1", "what was said in the session").await;
    knocker.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}?via={}", enc(&room), enc(&a.name)), Some(json!({ "reason": "let me in" }))).await;
    assert_eq!(therapist.invite(&room, &invitee.user_id).await.0, StatusCode::OK);
    let members = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/members", enc(&room)), None).await.to_string();
    assert!(members.contains(&knocker.user_id) && members.contains(&invitee.user_id), "{members}");

    // Knocking and invited users give their server no history of the room.
    for (path, status, body) in as_b.history(&room, &secret).await {
        assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{path}: {body}");
    }
    // Once one of them joins, the same requests are answered.
    invitee.ok(Method::POST, &format!("/_matrix/client/v3/join/{}?via={}", enc(&room), enc(&a.name)), Some(json!({}))).await;
    let after = therapist.send_text(&room, "t2", "welcome").await;
    for (path, status, body) in as_b.history(&room, &after).await {
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_joined_server_gets_only_the_history_its_users_may_see() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (mut a, mut b) = (federated(&ca, "").await, federated(&ca, "").await);
    let key = signing_key_of(&mut b).await;
    let a_key = signing_key_of(&mut a).await;
    let https = https(&ca);
    let as_b = Asker { https: &https, origin: &b.name, destination: &a.name, key: &key };
    let alice = a.server.register("alice").await;
    let bob = b.server.register("bob").await;
    let room = alice
        .create_room(json!({ "preset": "public_chat", "initial_state": [{ "type": "m.room.history_visibility", "state_key": "", "content": { "history_visibility": "joined" } }] }))
        .await;
    let before = alice.send_text(&room, "a1", "before B joined").await;
    bob.ok(Method::POST, &format!("/_matrix/client/v3/join/{}?via={}", enc(&room), enc(&a.name)), Some(json!({}))).await;
    let after = alice.send_text(&room, "a2", "after B joined").await;

    // Events from before B's user joined go out redacted: in the DAG, without their content.
    let answers = as_b.history(&room, &after).await;
    for (path, status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{path}: {body}");
        assert!(!body.to_string().contains("before B joined"), "{path}: {body}");
    }
    let backfilled = answers.iter().find(|(path, ..)| path.contains("/backfill/")).unwrap().2["pdus"].as_array().unwrap().clone();
    let messages: Vec<&Value> = backfilled.iter().filter(|pdu| pdu["type"] == "m.room.message").collect();
    assert_eq!(messages.len(), 2, "{backfilled:?}");
    assert!(messages.iter().any(|pdu| pdu["content"]["body"] == "after B joined"), "{backfilled:?}");
    assert!(messages.iter().any(|pdu| pdu["content"] == json!({})), "{backfilled:?}");
    // A's events are signed as they leave, though built unsigned (B's join by B and A); one
    // redacted for B is signed as the original (its content no longer matches its hash).
    let version = backfilled.iter().find(|pdu| pdu["type"] == "m.room.create").unwrap()["content"]["room_version"].as_str().unwrap().to_owned();
    let rules = limbic_server::events::rules_for(&ruma::RoomVersionId::try_from(version.as_str()).unwrap()).unwrap();
    let keys = ruma::signatures::PublicKeyMap::from([(a.name.clone(), a_key.public_key_set()), (b.name.clone(), key.public_key_set())]);
    for pdu in &backfilled {
        let object: ruma::CanonicalJsonObject = serde_json::from_value(pdu.clone()).unwrap();
        let redacted = pdu["content"] == json!({}) && pdu["type"] == "m.room.message";
        let expected = if redacted { ruma::signatures::Verified::Signatures } else { ruma::signatures::Verified::All };
        assert_eq!(ruma::signatures::verify_event(&keys, &object, &rules).unwrap(), expected, "{pdu}");
    }
    let (status, event) = as_b.send(http::Method::GET, &format!("/_matrix/federation/v1/event/{}", enc(&before)), None).await;
    assert_eq!((status, &event["pdus"][0]["content"]), (StatusCode::OK, &json!({})), "{event}");

    // The state at an event goes only to a server that was in the room then.
    for path in [
        format!("/_matrix/federation/v1/state/{}?event_id={}", enc(&room), enc(&before)),
        format!("/_matrix/federation/v1/state_ids/{}?event_id={}", enc(&room), enc(&before)),
    ] {
        let (status, body) = as_b.send(http::Method::GET, &path, None).await;
        assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn profile_queries_of_other_servers_are_answered_whatever_the_privacy_options() {
    // As in Synapse, `[privacy]` rules the look-ups of this server's clients; another server's
    // query is answered, and that server applies its own rules to its users.
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let a = federated(&ca, "[privacy]\nrequire_auth_for_profile_requests = true\nlimit_profile_requests_to_users_who_share_rooms = true").await;
    let b = federated(&ca, "").await;
    let alice = a.server.register("alice").await;
    alice.ok(Method::PUT, &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)), Some(json!({ "displayname": "Alice at A" }))).await;
    let bob = b.server.register("bob").await;
    let profile = bob.ok(Method::GET, &format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), None).await;
    assert_eq!(profile["displayname"], "Alice at A");
    // A's own clients are held to A's rules, for local and remote users alike.
    let carol = a.server.register("carol").await;
    for (asker, user) in [(&carol, &alice.user_id), (&alice, &bob.user_id)] {
        let (status, body) = asker.get(&format!("/_matrix/client/v3/profile/{}", enc(user))).await;
        assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{} about {user}: {body}", asker.user_id);
    }
}

/// Device names ("Ann's work phone") say who uses the server; as in Synapse
/// (`allow_device_name_lookup_over_federation: false`), other servers never get them.
#[tokio::test(flavor = "multi_thread")]
async fn device_names_never_leave_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (mut a, b) = (federated(&ca, "").await, federated(&ca, "").await);
    let https = https(&ca);
    let ann = b.server.register("ann").await;
    let bob = b.server.register("bob").await;
    let alice = a.server.register("alice").await;
    ann.ok(Method::PUT, &format!("/_matrix/client/v3/devices/{}", enc(&ann.device_id)), Some(json!({ "display_name": "Ann's work phone" }))).await;
    let device_keys = json!({
        "user_id": ann.user_id, "device_id": ann.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": { format!("curve25519:{}", ann.device_id): "curve", format!("ed25519:{}", ann.device_id): "ed" },
        "signatures": {},
    });
    ann.ok(Method::POST, "/_matrix/client/v3/keys/upload", Some(json!({ "device_keys": device_keys }))).await;
    let query = json!({ "device_keys": { &ann.user_id: [] } });

    // A user of the same server sees the name; a user of another server gets the keys only.
    let local = bob.ok(Method::POST, "/_matrix/client/v3/keys/query", Some(query.clone())).await;
    assert_eq!(local["device_keys"][&ann.user_id][&ann.device_id]["unsigned"]["device_display_name"], "Ann's work phone", "{local}");
    let remote = alice.ok(Method::POST, "/_matrix/client/v3/keys/query", Some(query.clone())).await;
    let device = &remote["device_keys"][&ann.user_id][&ann.device_id];
    assert_eq!(device["keys"], device_keys["keys"], "{remote}");
    assert!(!remote.to_string().contains("work phone"), "{remote}");

    // Asked directly, signed by A: neither the device list nor the key query names the device.
    let key = signing_key_of(&mut a).await;
    let asker = Asker { https: &https, origin: &a.name, destination: &b.name, key: &key };
    let (status, devices) = asker.send(http::Method::GET, &format!("/_matrix/federation/v1/user/devices/{}", enc(&ann.user_id)), None).await;
    assert_eq!(status, StatusCode::OK, "{devices}");
    assert_eq!(devices["devices"][0]["device_id"], ann.device_id.as_str(), "{devices}");
    let (status, keys) = asker.send(http::Method::POST, "/_matrix/federation/v1/user/keys/query", Some(query)).await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    for answer in [&devices, &keys] {
        assert!(!answer.to_string().contains("work phone"), "{answer}");
    }
}
