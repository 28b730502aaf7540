//! End-to-end tests: who may look users up under `[privacy]` (profiles, presence, the user
//! directory; spec/behaviour.md "Looking users up"), and what the server leaves on disk
//! (directories and key files only its user may open; spec/plugins.md "Sealed values").

mod common;

use std::{os::unix::fs::MetadataExt, path::PathBuf};

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::json;

const PRIVATE: [(&str, &str); 2] = [
    ("LIMBIC_PRIVACY__REQUIRE_AUTH_FOR_PROFILE_REQUESTS", "true"),
    ("LIMBIC_PRIVACY__LIMIT_PROFILE_REQUESTS_TO_USERS_WHO_SHARE_ROOMS", "true"),
];

/// What `asker` gets for `user`'s profile, display name, avatar and presence.
async fn lookups(asker: &Client, user: &str) -> Vec<(StatusCode, String)> {
    let user = enc(user);
    let mut answers = Vec::new();
    for path in [
        format!("/_matrix/client/v3/profile/{user}"),
        format!("/_matrix/client/v3/profile/{user}/displayname"),
        format!("/_matrix/client/v3/profile/{user}/avatar_url"),
        format!("/_matrix/client/v3/presence/{user}/status"),
    ] {
        let (status, body) = asker.get(&path).await;
        answers.push((status, errcode(&body).to_owned()));
    }
    answers
}

fn all(status: StatusCode, errcode: &str) -> Vec<(StatusCode, String)> {
    vec![(status, errcode.to_owned()); 4]
}

/// The user ids the directory shows `asker` for `term`.
async fn directory(asker: &Client, term: &str) -> Vec<String> {
    let body = asker.ok(Method::POST, "/_matrix/client/v3/user_directory/search", Some(json!({ "search_term": term }))).await;
    body["results"].as_array().unwrap().iter().map(|r| r["user_id"].as_str().unwrap().to_owned()).collect()
}

/// A patient with a profile and presence, in a public room as well.
async fn patient(server: &TestServer) -> Client {
    let alice = server.register("alice").await;
    alice.ok(Method::PUT, &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)), Some(json!({ "displayname": "Alice Patient" }))).await;
    alice.ok(Method::PUT, &format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id)), Some(json!({ "presence": "online" }))).await;
    alice.create_room(json!({ "preset": "public_chat", "visibility": "public" })).await;
    alice
}

#[tokio::test]
async fn strangers_learn_nothing_about_a_user_until_they_share_a_room() {
    let server = TestServer::start_with(&PRIVATE).await;
    let alice = patient(&server).await;
    let bob = server.register("bob").await;

    // A stranger: refused alike for a user who exists and one who does not; not in the
    // directory, though alice is in a public room.
    assert_eq!(lookups(&bob, &alice.user_id).await, all(StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    assert_eq!(lookups(&bob, "@nobody:test.local").await, all(StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    assert!(directory(&bob, "alice").await.is_empty());
    // Without a token: 401 (presence always needed one).
    assert_eq!(lookups(&server.client(), &alice.user_id).await, all(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"));
    // Her own, always.
    assert!(lookups(&alice, &alice.user_id).await.iter().all(|(status, _)| *status == StatusCode::OK));
    assert_eq!(directory(&alice, "alice").await, vec![alice.user_id.clone()]);

    // Sharing a room, bob sees her; once he leaves it, no more.
    let room = alice.create_room(json!({ "preset": "private_chat" })).await;
    alice.invite(&room, &bob.user_id).await;
    assert_eq!(lookups(&bob, &alice.user_id).await, all(StatusCode::FORBIDDEN, "M_FORBIDDEN"), "an invite is no shared room");
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    assert!(lookups(&bob, &alice.user_id).await.iter().all(|(status, _)| *status == StatusCode::OK));
    let profile = bob.ok(Method::GET, &format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), None).await;
    assert_eq!(profile["displayname"], "Alice Patient");
    assert_eq!(directory(&bob, "alice").await, vec![alice.user_id.clone()]);
    bob.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(json!({}))).await;
    assert_eq!(lookups(&bob, &alice.user_id).await, all(StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    assert!(directory(&bob, "alice").await.is_empty());

    // A verified therapist's profile is the clinic's public face (the join page's waiting room
    // names them); their presence is not.
    let admin = server.register_admin("admin").await;
    let carol = server.register("carol").await;
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&carol.user_id)), Some(json!({ "verified": true }))).await;
    let answers = lookups(&bob, &carol.user_id).await;
    assert!(answers[..3].iter().all(|(status, _)| *status == StatusCode::OK), "{answers:?}");
    assert_eq!(answers[3], (StatusCode::FORBIDDEN, "M_FORBIDDEN".to_owned()));
    assert!(directory(&bob, "carol").await.is_empty());
}

#[tokio::test]
async fn with_the_options_off_profiles_and_presence_are_open_and_the_directory_shows_public_rooms() {
    let server = TestServer::start().await;
    let alice = patient(&server).await;
    let bob = server.register("bob").await;
    assert!(lookups(&bob, &alice.user_id).await.iter().all(|(status, _)| *status == StatusCode::OK));
    let answers = lookups(&server.client(), &alice.user_id).await;
    assert!(answers[..3].iter().all(|(status, _)| *status == StatusCode::OK), "{answers:?}");
    assert_eq!(directory(&bob, "alice").await, vec![alice.user_id.clone()]);
    // Synapse's `search_all_users: false`: nobody who is only in private rooms.
    let dave = server.register("dave").await;
    dave.create_room(json!({ "preset": "private_chat" })).await;
    assert!(directory(&bob, "dave").await.is_empty());
    // As before, a token the options do not need is not looked at.
    let mut stale = server.client();
    stale.token = Some("not-a-token".into());
    assert_eq!(stale.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id))).await.0, StatusCode::OK);
}

#[tokio::test]
async fn with_the_options_on_a_bad_token_is_refused() {
    let server = TestServer::start_with(&PRIVATE).await;
    let alice = server.register("alice").await;
    let mut stale = server.client();
    stale.token = Some("not-a-token".into());
    let (status, body) = stale.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"), "{body}");
}

fn mode(path: &PathBuf) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).mode() & 0o777
}

#[tokio::test]
async fn data_directories_are_0700_and_the_key_file_0600() {
    // A plugin, so that the server compiles it into its cache directory (nested, not there yet).
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let wasm = repo.join("plugins/target/wasm32-wasip2/release/wordfilter.wasm");
    assert!(wasm.exists(), "{} is missing: build the plugins (scripts/test does)", wasm.display());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache/plugins");
    let config = format!(
        "[plugin_host]\ncache_dir = {:?}\n[[plugins]]\nname = \"wordfilter\"\npath = {:?}\nmanifest = {:?}\ngrants = []\n",
        cache.display().to_string(),
        wasm.display().to_string(),
        repo.join("plugins/wordfilter/plugin.toml").display().to_string(),
    );
    let server = TestServer::start_with_toml(&config, &[]).await;
    let store = server.store_dir();
    for dir in [store.join("db"), store.join("db-media"), store.join("db-media/00"), dir.path().join("cache"), cache] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    assert_eq!(mode(&store.join("db.key")), 0o600);
    let key = std::fs::read_to_string(store.join("db.key")).unwrap();
    assert_eq!(key.trim().len(), 64, "256 bits, hex");
    // Not inside the store: a copy of the store alone carries no key.
    assert!(!std::fs::read_dir(store.join("db")).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".key")));
}
