//! `limbic migrate`: a clinic's RocksDB store moved into PostgreSQL and back, and the server
//! carrying on each time with the same accounts, tokens, history, stream positions, media and
//! audit log.

mod common;

use common::{TestServer, calls};
use reqwest::{Method, StatusCode};
use serde_json::json;

fn bodies(page: &serde_json::Value) -> Vec<String> {
    page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_populated_store_moves_into_postgres_and_back_and_the_server_carries_on_each_time() {
    let mut server = TestServer::start_on_rocksdb().await;
    let admin = server.register_admin("admin").await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "private_chat", "invite": [bob.user_id] })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    let sent: Vec<String> = (0..150).map(|n| format!("message {n}")).collect();
    for (n, text) in sent.iter().enumerate() {
        alice.send_text(&room, &format!("t{n}"), text).await;
    }
    let mxc = alice.upload(b"a document", "text/plain").await;
    let since = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    server.stop().await;

    let refused = server.run_cli(&["migrate"], "");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("backend = \"postgres\""), "{refused:?}");

    server.switch_to_postgres();
    let migrated = server.run_cli(&["migrate"], "");
    let stdout = String::from_utf8_lossy(&migrated.stdout);
    assert!(migrated.status.success(), "{}", String::from_utf8_lossy(&migrated.stderr));
    assert!(stdout.contains("copied and verified") && stdout.lines().any(|l| l.starts_with("pdus ")), "{stdout}");
    let again = server.run_cli(&["migrate"], "");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds data"), "{again:?}");

    server.start_again().await;
    // The same access tokens, the whole history in order.
    let page = alice.messages(&room, "dir=b&limit=200").await;
    let mut history = bodies(&page);
    history.reverse();
    assert_eq!(history, sent);
    // Stream positions go on from where they were: bob's old token sees exactly the new message.
    alice.send_text(&room, "after", "after the move").await;
    let next = bob.sync(Some(&since), 5_000).await;
    let timeline = &next["rooms"]["join"][&room]["timeline"];
    assert_eq!(bodies(&json!({ "chunk": timeline["events"] })), vec!["after the move".to_owned()], "{next}");
    // Passwords, media and the audit log came along, the move recorded in it and the chain whole.
    let (status, _) = server
        .client()
        .post("/_matrix/client/v3/login", json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "bob" }, "password": "bob-password" }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = alice.get(&format!("/_matrix/client/v1/media/download/{}", mxc.trim_start_matches("mxc://"))).await;
    assert_eq!(status, StatusCode::OK);
    let log = admin.ok(Method::GET, "/_limbic/admin/v1/audit?limit=100", None).await;
    let actions: Vec<&str> = log["entries"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    let moved = actions.iter().position(|a| *a == "store_migrated").unwrap_or_else(|| panic!("{log}"));
    assert_eq!(actions[moved + 1..], ["login"], "only bob's login came after the move: {log}");
    assert_eq!(log["entries"][moved]["details"], json!({ "from": "rocksdb", "to": "postgres", "entries": log["entries"][moved]["details"]["entries"] }));
    assert_eq!(admin.ok(Method::GET, "/_limbic/admin/v1/audit/verify", None).await["valid"], true);

    // On PostgreSQL the call is placed on the node, which only nodes sharing a database keep.
    assert_eq!(calls::token(&server, &alice, &room).await.0, StatusCode::OK);
    let since = bob.sync(Some(&since), 0).await["next_batch"].as_str().unwrap().to_owned();
    server.stop().await;

    // And back, into a new RocksDB store where the old one was.
    server.switch_to_rocksdb();
    let refused = server.run_cli(&["migrate"], "");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already holds data"), "{refused:?}");
    std::fs::rename(server.db_dir(), server.db_dir().with_extension("old")).unwrap();
    let back = migrate_once_the_node_is_gone(&server);
    let stdout = String::from_utf8_lossy(&back.stdout);
    assert!(stdout.contains("from postgres into rocksdb") && stdout.lines().any(|l| l.starts_with("pdus ")), "{stdout}");
    assert!(!stdout.contains("call_placements"), "what only nodes sharing a database keep came along: {stdout}");

    server.start_again().await;
    let page = alice.messages(&room, "dir=b&limit=200").await;
    let mut history = bodies(&page);
    history.reverse();
    assert_eq!(history.len(), sent.len() + 1);
    assert_eq!(history.last().map(String::as_str), Some("after the move"));
    // Positions go on after the last one PostgreSQL handed out.
    alice.send_text(&room, "back", "back on RocksDB").await;
    let next = bob.sync(Some(&since), 5_000).await;
    let timeline = &next["rooms"]["join"][&room]["timeline"];
    assert_eq!(bodies(&json!({ "chunk": timeline["events"] })), vec!["back on RocksDB".to_owned()], "{next}");
    let (status, _) = alice.get(&format!("/_matrix/client/v1/media/download/{}", mxc.trim_start_matches("mxc://"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(calls::token(&server, &alice, &room).await.0, StatusCode::OK);
    let log = admin.ok(Method::GET, "/_limbic/admin/v1/audit?limit=100", None).await;
    let moves: Vec<&serde_json::Value> = log["entries"].as_array().unwrap().iter().filter(|e| e["action"] == "store_migrated").collect();
    assert_eq!(moves.len(), 2, "{log}");
    assert_eq!((&moves[1]["details"]["from"], &moves[1]["details"]["to"]), (&json!("postgres"), &json!("rocksdb")), "{log}");
    assert_eq!(admin.ok(Method::GET, "/_limbic/admin/v1/audit/verify", None).await["valid"], true);
}

/// `limbic migrate` from the stopped server's database: its session, and the node's lock with
/// it, ends a moment after its process, and until then the node counts as running.
fn migrate_once_the_node_is_gone(server: &TestServer) -> std::process::Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let output = server.run_cli(&["migrate"], "");
        if output.status.success() || !String::from_utf8_lossy(&output.stderr).contains("is running") || std::time::Instant::now() > deadline {
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            return output;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
