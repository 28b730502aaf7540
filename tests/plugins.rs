//! End-to-end tests: WebAssembly plugins in a running server — the sandbox holding against
//! deliberately bad plugins, check-event refusals reaching clients, hot reload, and the
//! first-party plugins. The components are built by `scripts/test` (see the README) into
//! plugins/target/wasm32-wasip2/release.

mod common;

use std::{path::PathBuf, time::Duration};

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A built plugin component; a missing one fails the test with the command that builds it.
fn component(name: &str) -> PathBuf {
    let path = repo().join("plugins/target/wasm32-wasip2/release").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} is missing: build the plugins with `cargo build --manifest-path plugins/Cargo.toml --target-dir plugins/target --target wasm32-wasip2 --release` (scripts/test does)", path.display());
    path
}

/// The `[plugin_host]` and `[[plugins]]` sections for `plugins`: (name, component, manifest,
/// grants, extra TOML lines for the entry).
fn plugin_config(host: &str, plugins: &[(&str, PathBuf, &str, &[&str], &str)]) -> String {
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugin-cache");
    let mut config = format!("[plugin_host]\ncache_dir = {:?}\n{host}\n", cache.display().to_string());
    for (name, path, manifest, grants, extra) in plugins {
        config.push_str(&format!(
            "[[plugins]]\nname = {name:?}\npath = {:?}\nmanifest = {:?}\ngrants = {grants:?}\n{extra}\n",
            path.display().to_string(),
            repo().join(manifest).display().to_string(),
        ));
    }
    config
}

async fn status(admin: &Client, name: &str) -> Value {
    let all = admin.ok(Method::GET, "/_limbic/admin/v1/plugins", None).await;
    all["plugins"].as_array().unwrap().iter().find(|p| p["name"] == name).cloned().unwrap()
}

async fn send(client: &Client, room: &str, txn: &str, body: &str) -> (StatusCode, Value) {
    client.put(&format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room)), json!({ "msgtype": "m.text", "body": body })).await
}

#[tokio::test]
async fn bad_plugins_are_contained_and_the_server_keeps_serving() {
    let config = plugin_config(
        "call_budget_ms = 300\ncheck_event_budget_ms = 20\nmemory_limit_mb = 32\nmax_failures = 50",
        &[("misbehave", component("misbehave"), "plugins/testing/misbehave/plugin.toml", &["kv"], "")],
    );
    let server = TestServer::start_with_toml(&config, &[]).await;
    let admin = server.register_admin("admin").await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({})).await;
    let route = |path: &str| format!("/_limbic/plugins/misbehave{path}");

    let ok = alice.ok(Method::GET, &route("/ok"), None).await;
    assert_eq!(ok["ok"], true);
    for (path, failure) in [("/loop", "an infinite loop"), ("/bomb", "a memory bomb"), ("/trap", "a trap")] {
        let started = std::time::Instant::now();
        let (status, body) = alice.get(&route(path)).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{failure}: {body}");
        assert!(started.elapsed() < Duration::from_secs(10), "{failure} took {:?}", started.elapsed());
        // The server and the plugin (on a fresh instance) answer right after.
        assert_eq!(alice.ok(Method::GET, &route("/ok"), None).await["ok"], true, "after {failure}");
        assert_eq!(send(&alice, &room, &format!("after{}", &path[1..]), "still here").await.0, StatusCode::OK);
    }
    let health = status(&admin, "misbehave").await;
    assert_eq!((health["enabled"].as_bool(), health["restarts"].as_u64()), (Some(true), Some(3)), "{health}");

    // A capability the plugin lacks fails inside the plugin and never reaches the resource.
    let ungranted = alice.ok(Method::GET, &route("/ungranted"), None).await;
    assert!(ungranted.to_string().contains("not-granted"), "{ungranted}");

    // check-event: a refusal reaches the client as a Matrix error; a plugin stuck in a loop
    // cannot hold the room, and its event is refused (on_check_failure = deny).
    let (status, body) = send(&alice, &room, "deny", "please deny-me").await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    let started = std::time::Instant::now();
    let (status, body) = send(&alice, &room, "loop", "loop-in-check").await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    assert!(body["error"].as_str().unwrap().contains("could not check"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(send(&alice, &room, "fine", "an ordinary message").await.0, StatusCode::OK);
    let messages = alice.messages(&room, "dir=b&limit=20").await;
    let bodies: Vec<&str> = messages["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
    assert!(!bodies.iter().any(|b| b.contains("deny-me") || b.contains("loop-in-check")), "{bodies:?}");
}

#[tokio::test]
async fn a_crash_looping_plugin_is_disabled_until_its_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("misbehave.wasm");
    std::fs::copy(component("misbehave"), &wasm).unwrap();
    let config = plugin_config(
        "call_budget_ms = 300\nmax_failures = 2\nfailure_window_seconds = 60\nreload_interval_seconds = 1",
        &[("misbehave", wasm.clone(), "plugins/testing/misbehave/plugin.toml", &["kv"], "on_check_failure = \"allow\"")],
    );
    let server = TestServer::start_with_toml(&config, &[]).await;
    let admin = server.register_admin("admin").await;
    let alice = server.register("alice").await;
    for _ in 0..2 {
        assert_eq!(alice.get("/_limbic/plugins/misbehave/trap").await.0, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(status(&admin, "misbehave").await["enabled"], false);
    let (status_code, body) = alice.get("/_limbic/plugins/misbehave/ok").await;
    assert_eq!(status_code, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    // A new build of the plugin is picked up while the server runs, and enabled again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::copy(component("misbehave"), &wasm).unwrap();
    let file = std::fs::File::options().append(true).open(&wasm).unwrap();
    file.set_modified(std::time::SystemTime::now()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if status(&admin, "misbehave").await["enabled"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the plugin was not reloaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(alice.ok(Method::GET, "/_limbic/plugins/misbehave/ok", None).await["ok"], true);
}

#[tokio::test]
async fn wordfilter_refuses_blocked_words_through_any_client_api() {
    let config = plugin_config(
        "",
        &[("wordfilter", component("wordfilter"), "plugins/wordfilter/plugin.toml", &[], "[plugins.config]\nwords = [\"forbidden\"]")],
    );
    let server = TestServer::start_with_toml(&config, &[]).await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({})).await;
    let (status, body) = send(&alice, &room, "t1", "this is FORBIDDEN talk").await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    assert!(body["error"].as_str().unwrap().contains("blocked word"), "{body}");
    assert_eq!(send(&alice, &room, "t2", "this is fine").await.0, StatusCode::OK);
    // Unknown plugins and plugins without routes are 404s.
    assert_eq!(alice.get("/_limbic/plugins/wordfilter/anything").await.0, StatusCode::NOT_FOUND);
    assert_eq!(alice.get("/_limbic/plugins/nonexistent/").await.0, StatusCode::NOT_FOUND);
}

const SESSIONS: &str = "/_limbic/client/v1/sessions";
const HOUR: u64 = 3_600_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A verified therapist's group session starting now, its clients joined; returns the room.
async fn group_session(server: &TestServer, admin: &Client, therapist: &Client, clients: &[&Client]) -> String {
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
    let participants: Vec<Value> = clients.iter().map(|c| json!({ "user_id": c.user_id, "role": "client" })).collect();
    let now = now_ms();
    let created = therapist
        .ok(Method::POST, SESSIONS, Some(json!({ "kind": "group", "title": "Tuesday group", "starts_at": now, "ends_at": now + HOUR, "timezone": "UTC", "participants": participants })))
        .await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    for client in clients {
        assert_eq!(client.join(&room).await.0, StatusCode::OK);
    }
    let _ = server;
    room
}

async fn set_status(therapist: &Client, room: &str, statuses: &[&str]) {
    for status in statuses {
        therapist.ok(Method::PUT, &format!("{SESSIONS}/{}/status", enc(room)), Some(json!({ "status": status }))).await;
    }
}

/// Polls a plugin route until it answers 200.
async fn eventually(client: &Client, path: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = client.get(path).await;
        if status == StatusCode::OK {
            return body;
        }
        assert!(std::time::Instant::now() < deadline, "{path} still answers {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn followup_opens_one_chat_for_a_completed_group_session() {
    let grants: &[&str] = &["kv", "rooms.read", "rooms.send", "rooms.create", "rooms.invite", "users.act-as"];
    let config = plugin_config("", &[("followup", component("followup"), "plugins/followup/plugin.toml", grants, "[plugins.config]\nwelcome = \"Welcome back, {title}!\"")]);
    let mut server = TestServer::start_with_toml(&config, &[]).await;
    let admin = server.register_admin("admin").await;
    let therapist = server.register("therapist").await;
    let (ann, bob, outsider) = (server.register("ann").await, server.register("bob").await, server.register("outsider").await);
    let room = group_session(&server, &admin, &therapist, &[&ann, &bob]).await;
    let route = format!("/_limbic/plugins/followup/rooms/{}", enc(&room));
    set_status(&therapist, &room, &["open", "in_progress"]).await;
    assert_eq!(therapist.get(&route).await.0, StatusCode::NOT_FOUND, "no follow-up before the session completes");
    set_status(&therapist, &room, &["completed"]).await;

    let followup = eventually(&ann, &route).await["room_id"].as_str().unwrap().to_owned();
    assert_eq!(outsider.get(&route).await.0, StatusCode::FORBIDDEN);
    // Linked from the session room by the therapist, and every participant is invited.
    let link = ann.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/org.limbic.followup/", enc(&room)), None).await;
    assert_eq!(link["room_id"], followup.as_str());
    for client in [&ann, &bob, &therapist] {
        assert_eq!(client.join(&followup).await.0, StatusCode::OK, "{}", client.user_id);
    }
    let power = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&followup)), None).await;
    assert_eq!(power["users"][&therapist.user_id], 100);
    let messages = bob.messages(&followup, "dir=b&limit=50").await;
    let welcome: Vec<&str> = messages["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == "m.room.message").filter_map(|e| e["content"]["body"].as_str()).collect();
    assert_eq!(welcome, ["Welcome back, Tuesday group!"]);

    // Exactly once, across a restart too.
    server.restart().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rooms = admin.ok(Method::GET, "/_synapse/admin/v1/rooms?limit=100", None).await;
    let followups = rooms["rooms"].as_array().unwrap().iter().filter(|r| r["name"].as_str().is_some_and(|n| n.ends_with("follow-up"))).count();
    assert_eq!(followups, 1, "{rooms}");
    assert_eq!(eventually(&ann, &route).await["room_id"], followup.as_str());
}

#[tokio::test]
async fn rooms_read_and_check_event_never_reach_a_notes_room() {
    let config = plugin_config("", &[("misbehave", component("misbehave"), "plugins/testing/misbehave/plugin.toml", &["kv", "rooms.read"], "")]);
    let server = TestServer::start_with_toml(&config, &[]).await;
    let common::SessionWithNote { admin: _, therapist, room, notes_room } = server.session_with_a_note().await;
    let read = |room: String| {
        let therapist = therapist.clone();
        async move { therapist.ok(Method::GET, &format!("/_limbic/plugins/misbehave/room?room_id={}", enc(&room)), None).await }
    };

    // The session room reads as usual; the notes room exactly as a room that does not exist.
    let session_room = read(room.clone()).await;
    assert_eq!(session_room["create"], true, "{session_room}");
    assert!(session_room["members"].as_array().unwrap().iter().any(|m| m == therapist.user_id.as_str()), "{session_room}");
    let missing = read("!nowhere:test.local".to_owned()).await;
    assert_eq!(missing, json!({ "state": [], "members": [], "create": false }));
    let notes = read(notes_room.clone()).await;
    assert_eq!(notes, missing, "a plugin with rooms.read read the notes room");

    // check-event sees no notes-room event either: the plugin denies `deny-me` in the session
    // room but never gets to judge the same words among the notes.
    let (status, _) = send(&therapist, &room, "s1", "please deny-me").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = send(&therapist, &notes_room, "n1", "a note saying deny-me").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flat_map(|entry| {
            let path = entry.unwrap().path();
            if path.is_dir() { files_under(&path) } else { vec![path] }
        })
        .collect()
}

#[tokio::test]
async fn a_stored_caldav_password_is_sealed_on_disk_and_read_back_after_a_restart() {
    let config = plugin_config("", &[("calendar", component("calendar"), "plugins/calendar/plugin.toml", &["kv", "rooms.read", "http"], "")]);
    let mut server = TestServer::start_with_toml(&config, &[]).await;
    let kim = server.register("kim").await;
    let password = format!("caldav-password-{}", now_ms());
    let caldav = json!({ "url": "http://127.0.0.1:9/kim/", "username": "kim-at-dav", "password": password });
    kim.ok(Method::PUT, "/_limbic/plugins/calendar/caldav", Some(caldav)).await;
    server.stop().await;
    // The engine's files, write-ahead log included: the server's directory, or PostgreSQL's
    // (the cluster all the tests of this binary share).
    let files = if common::on_postgres() {
        let mut files = files_under(server.store_dir());
        files.extend(files_under(&limbic_test_postgres::TempPostgres::shared().data_dir()));
        assert!(files.iter().any(|f| f.parent().is_some_and(|p| p.ends_with("pg_wal"))), "PostgreSQL's write-ahead log is among {files:?}");
        files
    } else {
        let files = files_under(server.store_dir());
        assert!(files.iter().any(|f| f.extension().is_some_and(|e| e == "log")), "the store's write-ahead log is among {files:?}");
        files
    };
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        assert!(!bytes.windows(password.len()).any(|w| w == password.as_bytes()), "the password in plaintext in {}", file.display());
    }
    // The plugin reads it back, through the key kept beside the store.
    server.start_again().await;
    let stored = kim.ok(Method::GET, "/_limbic/plugins/calendar/caldav", None).await;
    assert_eq!((stored["url"].as_str(), stored["username"].as_str()), (Some("http://127.0.0.1:9/kim/"), Some("kim-at-dav")), "{stored}");
}
