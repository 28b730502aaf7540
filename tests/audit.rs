//! End-to-end tests: the audit log's key and exported head. Whoever can write the store (but not
//! read the audit key) rewrites or deletes the newest entries offline, as an attacker would, and
//! verification names the entry.

mod common;

use std::os::unix::fs::MetadataExt;

use common::{Client, TestServer, enc, errcode};
use limbic_server::store::{Store, tables};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const AUDIT: &str = "/_limbic/admin/v1/audit";

/// Audited actions: a room with a knock, an invite and a join, and admin API reads.
async fn audited_actions(server: &TestServer, admin: &Client) {
    let therapist = server.register("therapist").await;
    let client = server.register("client").await;
    let room = therapist.create_room(json!({
        "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }]
    })).await;
    client.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(json!({}))).await;
    assert_eq!(therapist.invite(&room, &client.user_id).await.0, StatusCode::OK);
    assert_eq!(client.join(&room).await.0, StatusCode::OK);
    admin.ok(Method::GET, "/_synapse/admin/v2/users", None).await;
}

async fn verify(admin: &Client, head: Option<&Value>) -> Value {
    let query = head.map(|h| format!("?head_seq={}&head_hash={}", h["seq"], h["hash"].as_str().unwrap())).unwrap_or_default();
    admin.ok(Method::GET, &format!("{AUDIT}/verify{query}"), None).await
}

fn open_store(server: &TestServer) -> Store {
    server.open_store()
}

fn entry(store: &Store, seq: u64) -> Value {
    store.get_json(tables::AUDIT_LOG, &seq.to_be_bytes()).unwrap().unwrap()
}

/// What an attacker without the key can do: the entry's sha256 over its JSON without hash and MAC.
fn rehash(entry: &mut Value) {
    let mut content = entry.clone();
    let object = content.as_object_mut().unwrap();
    object.remove("hash");
    object.remove("mac");
    entry["hash"] = json!(hex::encode(Sha256::digest(serde_json::to_vec(&content).unwrap())));
}

fn cli_fails_at(server: &TestServer, args: &[&str], seq: u64) {
    let output = server.run_cli(args, "");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} passed: {}", String::from_utf8_lossy(&output.stdout));
    assert!(stderr.contains(&format!("broken at entry {seq}:")), "{args:?}: {stderr}");
}

#[tokio::test]
async fn a_rewritten_newest_entry_with_a_recomputed_chain_fails_its_mac() {
    let mut server = TestServer::start().await;
    let admin = server.register_admin("auditor").await;
    audited_actions(&server, &admin).await;

    let head = admin.ok(Method::GET, &format!("{AUDIT}/head"), None).await;
    let seq = head["seq"].as_u64().unwrap();
    let log = admin.ok(Method::GET, &format!("{AUDIT}?from={}", seq - 1), None).await;
    let newest = &log["entries"][0];
    assert_eq!((&newest["seq"], &newest["hash"], &newest["mac"], &newest["ts"]), (&head["seq"], &head["hash"], &head["mac"], &head["ts"]));
    assert!(head["mac"].as_str().is_some_and(|m| m.len() == 64 && m.bytes().all(|b| b.is_ascii_hexdigit())), "{head}");
    assert_eq!(admin.ok(Method::GET, &format!("{AUDIT}/head"), None).await, head, "reading the head does not move it");
    let intact = verify(&admin, Some(&head)).await;
    assert_eq!((&intact["valid"], &intact["entries"], &intact["keyed_from"]), (&json!(true), &json!(seq), &json!(1)), "{intact}");
    let first = admin.ok(Method::GET, &format!("{AUDIT}?limit=1"), None).await;
    assert_eq!(first["entries"][0]["action"], "audit_keyed", "keying starts at the first entry of a new log");

    // The key is beside the store, not in it, and only the server's user may read it.
    let key_path = server.store_dir().join("db-audit.key");
    let key_file = std::fs::read_to_string(&key_path).unwrap();
    assert_eq!(std::fs::metadata(&key_path).unwrap().mode() & 0o777, 0o600);
    assert!(key_file.contains("unkeyed_entries = 0"), "{key_file}");
    let key_hex = key_file.lines().find_map(|l| l.strip_prefix("key = \"")).unwrap().trim_end_matches('"').to_owned();
    assert_eq!(key_hex.len(), 64);
    server.stop().await;
    for file in std::fs::read_dir(server.store_dir().join("db")).unwrap() {
        let path = file.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(path).unwrap();
        assert!(!bytes.windows(key_hex.len()).any(|w| w == key_hex.as_bytes()), "the audit key is in the store");
    }

    // Offline, the newest entry says someone else was let in; its hash is recomputed and still
    // links to the one before, and the stale MAC is kept (or dropped: see the unit tests).
    {
        let store = open_store(&server);
        let mut newest = entry(&store, seq);
        assert_eq!(newest["hash"], head["hash"]);
        newest["details"] = json!({ "method": "GET", "route": "/_synapse/admin/v1/server_version" });
        rehash(&mut newest);
        let mut batch = store.batch();
        batch.put_json(tables::AUDIT_LOG, &seq.to_be_bytes(), &newest).unwrap();
        store.write(batch).unwrap();
    }
    cli_fails_at(&server, &["audit", "verify"], seq);

    server.start_again().await;
    let check = verify(&admin, None).await;
    assert_eq!((&check["valid"], &check["first_invalid"]), (&json!(false), &json!(seq)), "{check}");
    assert!(check["reason"].as_str().unwrap().contains("MAC"), "{check}");
    assert_eq!(verify(&admin, Some(&head)).await["first_invalid"], json!(seq));

    // Without its key file, a keyed log does not open: a new key would cover the tracks.
    server.stop().await;
    std::fs::remove_file(&key_path).unwrap();
    let output = server.run_cli(&["audit", "verify"], "");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("audit key file") && stderr.contains("missing"), "{stderr}");
    assert!(!key_path.exists(), "no new key replaces a lost one");
}

#[tokio::test]
async fn deleting_the_newest_entries_is_found_with_the_exported_head() {
    let mut server = TestServer::start().await;
    let admin = server.register_admin("auditor").await;
    audited_actions(&server, &admin).await;
    let head = admin.ok(Method::GET, &format!("{AUDIT}/head"), None).await;
    let seq = head["seq"].as_u64().unwrap();
    assert!(seq > 4, "{head}");
    server.stop().await;

    // The head as `limbic audit head` exports it, kept "off the machine".
    let offsite = tempfile::tempdir().unwrap();
    let head_file = offsite.path().join("audit-head.json");
    let exported = server.run_cli(&["audit", "head"], "");
    assert!(exported.status.success(), "{}", String::from_utf8_lossy(&exported.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&exported.stdout).unwrap(), head);
    std::fs::write(&head_file, &exported.stdout).unwrap();
    let head_arg = head_file.to_str().unwrap();
    let intact = server.run_cli(&["audit", "verify", "--head", head_arg], "");
    assert!(intact.status.success(), "{}", String::from_utf8_lossy(&intact.stderr));

    // The newest two entries deleted offline: the chain that is left checks out by itself.
    {
        let store = open_store(&server);
        let mut batch = store.batch();
        for gone in [seq - 1, seq] {
            batch.delete(tables::AUDIT_LOG, &gone.to_be_bytes());
        }
        store.write(batch).unwrap();
    }
    assert!(server.run_cli(&["audit", "verify"], "").status.success(), "the chain alone cannot tell");
    cli_fails_at(&server, &["audit", "verify", "--head", head_arg], seq - 1);

    server.start_again().await;
    assert_eq!(verify(&admin, None).await["valid"], true);
    let check = verify(&admin, Some(&head)).await;
    assert_eq!((&check["valid"], &check["first_invalid"]), (&json!(false), &json!(seq - 1)), "{check}");
    assert!(check["reason"].as_str().unwrap().contains("exported head"), "{check}");

    // New entries reach the head's seq again: the head's hash no longer matches.
    admin.ok(Method::GET, "/_synapse/admin/v2/users", None).await;
    admin.ok(Method::GET, "/_synapse/admin/v2/users", None).await;
    let check = verify(&admin, Some(&head)).await;
    assert_eq!((&check["valid"], &check["first_invalid"]), (&json!(false), &json!(seq)), "{check}");

    // A deleted middle entry is a gap.
    server.stop().await;
    {
        let store = open_store(&server);
        let mut batch = store.batch();
        batch.delete(tables::AUDIT_LOG, &2u64.to_be_bytes());
        store.write(batch).unwrap();
    }
    cli_fails_at(&server, &["audit", "verify"], 3);
}

#[tokio::test]
async fn only_server_admins_export_or_check_the_head() {
    let server = TestServer::start().await;
    let admin = server.register_admin("auditor").await;
    let former = server.register_admin("former").await;
    let user = server.register("user").await;
    admin.ok(Method::PUT, &format!("/_synapse/admin/v1/users/{}/admin", enc(&former.user_id)), Some(json!({ "admin": false }))).await;

    let head_path = format!("{AUDIT}/head");
    let (status, body) = server.client().get(&head_path).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"));
    for (who, client) in [("a user", &user), ("a former admin", &former)] {
        let (status, body) = client.get(&head_path).await;
        assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{who}");
        let (status, body) = client.get(&format!("{AUDIT}/verify?head_seq=1&head_hash=00")).await;
        assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{who}");
    }
    let head = admin.ok(Method::GET, &head_path, None).await;
    assert!(head["seq"].as_u64().unwrap() >= 1 && head["hash"].is_string(), "{head}");
    let (status, body) = admin.get(&format!("{AUDIT}/verify?head_seq=1")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
    let forged = verify(&admin, Some(&json!({ "seq": head["seq"], "hash": "0".repeat(64) }))).await;
    assert_eq!((&forged["valid"], &forged["first_invalid"]), (&json!(false), &head["seq"]), "{forged}");
}
