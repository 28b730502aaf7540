//! End-to-end tests: rate limits counted per account and per client address (with
//! `X-Forwarded-For` believed only from trusted proxies), limits on passcode guesses and
//! re-authentication, small bodies for strangers, and quotas on filters, account data and
//! OpenID tokens.

mod common;

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const V3: &str = "/_matrix/client/v3";

/// The same client, sending every request through a proxy that reports `address`.
fn via(client: &Client, address: &str) -> Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-forwarded-for", address.parse().unwrap());
    Client { http: reqwest::Client::builder().default_headers(headers).build().unwrap(), ..client.clone() }
}

/// A server with rate limits on, messages limited to a burst of 3, and `extra` env overrides.
async fn limited_server(extra: &[(&str, &str)]) -> TestServer {
    let mut env = vec![
        ("LIMBIC_RATE_LIMITS__ENABLED", "true"),
        ("LIMBIC_RATE_LIMITS__MESSAGE", "{ per_second = 0.001, burst = 3 }"),
        ("LIMBIC_RATE_LIMITS__REGISTRATION", "{ per_second = 10.0, burst = 20 }"),
        ("LIMBIC_RATE_LIMITS__CREATE_ROOM", "{ per_second = 10.0, burst = 20 }"),
    ];
    env.extend_from_slice(extra);
    TestServer::start_with(&env).await
}

async fn send(client: &Client, room: &str, txn: &str) -> (StatusCode, Value) {
    client.put(&format!("{V3}/rooms/{}/send/m.room.message/{txn}", enc(room)), json!({ "msgtype": "m.text", "body": txn })).await
}

fn assert_limited((status, body): (StatusCode, Value)) {
    assert_eq!((status, errcode(&body)), (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"), "{body}");
    assert!(body["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{body}");
}

#[tokio::test]
async fn two_accounts_from_one_address_share_its_limit() {
    let server = limited_server(&[]).await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let alices = alice.create_room(json!({})).await;
    let bobs = bob.create_room(json!({})).await;
    for txn in ["a1", "a2", "a3"] {
        assert_eq!(send(&alice, &alices, txn).await.0, StatusCode::OK);
    }
    assert_limited(send(&alice, &alices, "a4").await);
    // Bob's account has sent nothing, but his address has used its burst.
    assert_limited(send(&bob, &bobs, "b1").await);
}

#[tokio::test]
async fn forwarded_for_is_ignored_from_untrusted_peers() {
    let server = limited_server(&[]).await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({})).await;
    let bobs = bob.create_room(json!({})).await;
    for txn in ["a1", "a2", "a3"] {
        assert_eq!(send(&via(&alice, "198.51.100.1"), &room, txn).await.0, StatusCode::OK);
    }
    // Claiming another address changes nothing: the peer is not a trusted proxy.
    assert_limited(send(&via(&bob, "198.51.100.2"), &bobs, "b1").await);
    // What a device records is the peer's address.
    let mut login = server.client();
    let body = via(&login, "198.51.100.3")
        .ok(Method::POST, &format!("{V3}/login"), Some(json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "alice-password" })))
        .await;
    login.token = body["access_token"].as_str().map(str::to_owned);
    let device = login.ok(Method::GET, &format!("{V3}/devices/{}", body["device_id"].as_str().unwrap()), None).await;
    assert_eq!(device["last_seen_ip"], "127.0.0.1", "{device}");
}

#[tokio::test]
async fn forwarded_for_is_believed_from_trusted_proxies() {
    let server = limited_server(&[("LIMBIC_RATE_LIMITS__TRUSTED_PROXIES", "[\"127.0.0.1/32\"]")]).await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = alice.create_room(json!({})).await;
    let bobs = bob.create_room(json!({})).await;
    let carols = carol.create_room(json!({})).await;
    // The client put 6.6.6.6 in front: only the hop the proxy added counts.
    for txn in ["a1", "a2", "a3"] {
        assert_eq!(send(&via(&alice, "6.6.6.6, 198.51.100.1"), &room, txn).await.0, StatusCode::OK);
    }
    // Another account from the same client address shares its limit …
    assert_limited(send(&via(&bob, "198.51.100.1"), &bobs, "b1").await);
    // … another client address has its own …
    assert_eq!(send(&via(&bob, "198.51.100.2"), &bobs, "b2").await.0, StatusCode::OK);
    // … and one account does not get around its own limit from other addresses.
    assert_limited(send(&via(&alice, "198.51.100.9"), &room, "a4").await);
    assert_eq!(send(&via(&carol, "198.51.100.9"), &carols, "c1").await.0, StatusCode::OK);
    // Devices record the client's address, not the proxy's.
    let mut login = server.client();
    let body = via(&login, "198.51.100.3")
        .ok(Method::POST, &format!("{V3}/login"), Some(json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "carol" }, "password": "carol-password" })))
        .await;
    login.token = body["access_token"].as_str().map(str::to_owned);
    let device = login.ok(Method::GET, &format!("{V3}/devices/{}", body["device_id"].as_str().unwrap()), None).await;
    assert_eq!(device["last_seen_ip"], "198.51.100.3", "{device}");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test]
async fn passcode_guessing_is_limited_per_user_room_and_per_address() {
    let server = limited_server(&[("LIMBIC_RATE_LIMITS__TRUSTED_PROXIES", "[\"127.0.0.1/32\"]")]).await;
    let admin = server.register_admin("admin").await;
    let therapist = server.register("therapist").await;
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
    let mallory = server.register("mallory").await;
    let trudy = server.register("trudy").await;
    let eve = server.register("eve").await;
    let client = server.register("client").await;
    let request = json!({
        "kind": "group", "title": "Group", "starts_at": now_ms(), "ends_at": now_ms() + 3_600_000, "timezone": "Europe/Berlin",
        "participants": [], "passcode": "blue-otter-42",
    });
    let room = therapist.ok(Method::POST, "/_limbic/client/v1/sessions", Some(request)).await["room_id"].as_str().unwrap().to_owned();
    let knock = format!("{V3}/knock/{}", enc(&room));
    let guess = |who: &Client, address: &str, passcode: &str| {
        let who = via(who, address);
        let knock = knock.clone();
        let passcode = passcode.to_owned();
        async move { who.post(&knock, json!({ "org.limbic.passcode": passcode })).await }
    };

    for n in 0..5 {
        assert_eq!(guess(&mallory, "198.51.100.1", &format!("guess-{n}")).await.0, StatusCode::FORBIDDEN);
    }
    assert_limited(guess(&mallory, "198.51.100.1", "guess-5").await);
    // A raw membership event is the same guess.
    let raw = format!("{V3}/rooms/{}/state/m.room.member/{}", enc(&room), enc(&trudy.user_id));
    let raw_guess = json!({ "membership": "knock", "org.limbic.passcode": "guess" });
    for _ in 0..5 {
        assert_eq!(via(&trudy, "198.51.100.5").put(&raw, raw_guess.clone()).await.0, StatusCode::FORBIDDEN);
    }
    assert_limited(via(&trudy, "198.51.100.6").put(&raw, raw_guess).await);
    // Neither the right passcode nor another address helps that user with that room …
    assert_limited(guess(&mallory, "198.51.100.2", "blue-otter-42").await);
    // … nor another account from the guessing address.
    assert_limited(guess(&eve, "198.51.100.1", "blue-otter-42").await);
    // Others elsewhere are not affected, and a right passcode does not count.
    for address in ["198.51.100.3", "198.51.100.4"] {
        let (status, body) = guess(&client, address, "blue-otter-42").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        client.post(&format!("{V3}/rooms/{}/leave", enc(&room)), json!({})).await;
    }
}

#[tokio::test]
async fn wrong_passwords_in_reauthentication_are_limited() {
    let server = limited_server(&[]).await;
    let alice = server.register("alice").await;
    let path = format!("{V3}/account/password");
    let auth = |password: &str| json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": alice.user_id }, "password": password });
    let change = |password: &str| json!({ "new_password": "alice-password", "logout_devices": false, "auth": auth(password) });
    // Successes do not count.
    for _ in 0..6 {
        alice.ok(Method::POST, &path, Some(change("alice-password"))).await;
    }
    for _ in 0..5 {
        assert_eq!(alice.post(&path, change("guess")).await.0, StatusCode::UNAUTHORIZED);
    }
    assert_limited(alice.post(&path, change("guess")).await);
    // Deleting a device (another kind of re-authentication) is limited as well.
    let (status, body) = alice
        .request(Method::DELETE, &format!("{V3}/devices/{}", alice.device_id), Some(json!({ "auth": auth("alice-password") })))
        .await;
    assert_limited((status, body));
}

#[tokio::test]
async fn state_events_and_search_are_limited() {
    let server = limited_server(&[
        ("LIMBIC_RATE_LIMITS__STATE_EVENT", "{ per_second = 0.001, burst = 2 }"),
        ("LIMBIC_RATE_LIMITS__SEARCH", "{ per_second = 0.001, burst = 2 }"),
    ])
    .await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({})).await;
    let topic = format!("{V3}/rooms/{}/state/m.room.topic/", enc(&room));
    for n in 0..2 {
        assert_eq!(alice.put(&topic, json!({ "topic": format!("t{n}") })).await.0, StatusCode::OK);
    }
    assert_limited(alice.put(&topic, json!({ "topic": "t2" })).await);
    let search = json!({ "search_categories": { "room_events": { "search_term": "hello" } } });
    for _ in 0..2 {
        assert_eq!(alice.post(&format!("{V3}/search"), search.clone()).await.0, StatusCode::OK);
    }
    assert_limited(alice.post(&format!("{V3}/search"), search).await);
}

#[tokio::test]
async fn strangers_bodies_are_small() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let padding = "x".repeat(100 * 1024);
    let stranger = server.client();
    let login = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "alice-password", "pad": padding });
    let (status, body) = stranger.post(&format!("{V3}/login"), login).await;
    assert_eq!((status, errcode(&body)), (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"), "{body}");
    let register = json!({ "username": "bob", "password": "bob-password", "auth": { "type": "m.login.dummy" }, "pad": padding });
    let (status, body) = stranger.post(&format!("{V3}/register"), register).await;
    assert_eq!((status, errcode(&body)), (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"), "{body}");
    let shared_secret = json!({ "nonce": "n", "username": "bob", "password": "bob-password", "mac": "00", "pad": padding });
    let (status, body) = stranger.post("/_synapse/admin/v1/register", shared_secret).await;
    assert_eq!((status, errcode(&body)), (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"), "{body}");
    // A user's body of the same size is fine.
    let messages = json!({ "messages": { (alice.user_id.clone()): { "*": { "pad": padding } } } });
    let (status, body) = alice.put(&format!("{V3}/sendToDevice/org.example.pad/t1"), messages).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn filters_are_deduplicated_and_bounded() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let path = format!("{V3}/user/{}/filter", enc(&alice.user_id));
    let filter = |n: usize| json!({ "room": { "timeline": { "limit": n + 1 } } });
    let first = alice.ok(Method::POST, &path, Some(filter(0))).await["filter_id"].clone();
    // The same filter again is the same filter.
    assert_eq!(alice.ok(Method::POST, &path, Some(filter(0))).await["filter_id"], first);
    for n in 1..100 {
        alice.ok(Method::POST, &path, Some(filter(n))).await;
    }
    let (status, body) = alice.post(&path, filter(100)).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_RESOURCE_LIMIT_EXCEEDED"), "{body}");
    // Known filters are still handed back and usable.
    assert_eq!(alice.ok(Method::POST, &path, Some(filter(0))).await["filter_id"], first);
    alice.ok(Method::GET, &format!("{path}/{}", first.as_str().unwrap()), None).await;
}

#[tokio::test]
async fn account_data_is_bounded_in_size_and_count() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let key = |kind: &str| format!("{V3}/user/{}/account_data/{kind}", enc(&alice.user_id));
    let (status, body) = alice.put(&key("org.example.big"), json!({ "pad": "x".repeat(65 * 1024) })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"), "{body}");
    alice.ok(Method::PUT, &key("org.example.big"), Some(json!({ "pad": "x".repeat(60 * 1024) }))).await;
    // New entries until the account holds 1,000: besides the one above, it holds at most what
    // its sync shows (which includes the push rules, stored or not).
    let shown = alice.sync(None, 0).await["account_data"]["events"].as_array().unwrap().len();
    let mut added = 0;
    let refusal = loop {
        let (status, body) = alice.put(&key(&format!("org.example.{added}")), json!({ "n": added })).await;
        if status != StatusCode::OK || added == 1000 {
            break (status, body);
        }
        added += 1;
    };
    assert_eq!((refusal.0, errcode(&refusal.1)), (StatusCode::BAD_REQUEST, "M_RESOURCE_LIMIT_EXCEEDED"), "{}", refusal.1);
    assert!((1000 - shown..1000).contains(&added), "{added} entries added, {shown} shown before");
    // Entries that exist may still change.
    alice.ok(Method::PUT, &key("org.example.0"), Some(json!({ "n": "changed" }))).await;
}

#[tokio::test]
async fn openid_tokens_are_bounded_oldest_first() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let path = format!("{V3}/user/{}/openid/request_token", enc(&alice.user_id));
    let mut tokens = Vec::new();
    for _ in 0..11 {
        tokens.push(alice.ok(Method::POST, &path, Some(json!({}))).await["access_token"].as_str().unwrap().to_owned());
    }
    let userinfo = |token: &str| {
        let client = server.client();
        let path = format!("/_matrix/federation/v1/openid/userinfo?access_token={}", enc(token));
        async move { client.get(&path).await }
    };
    // The oldest was dropped when the eleventh was issued; the newest ten still work.
    let (status, body) = userinfo(&tokens[0]).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"), "{body}");
    for token in &tokens[1..] {
        let (status, body) = userinfo(token).await;
        assert_eq!((status, body["sub"].as_str()), (StatusCode::OK, Some(alice.user_id.as_str())), "{body}");
    }
}
