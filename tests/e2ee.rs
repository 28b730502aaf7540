//! End-to-end tests: keys, cross-signing, to-device messages, device lists and key backup.

mod common;

use common::{TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn device_keys(user: &str, device: &str) -> Value {
    json!({
        "user_id": user,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": { format!("curve25519:{device}"): "curvekey", format!("ed25519:{device}"): "edkey" },
        "signatures": { user: { format!("ed25519:{device}"): "sig" } },
    })
}

#[tokio::test]
async fn keys_upload_query_claim_with_fallback() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);

    // Keys for someone else's device are refused.
    let (status, body) = alice.post("/_matrix/client/v3/keys/upload", json!({ "device_keys": device_keys(&bob.user_id, &bob.device_id) })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));

    let uploaded = alice.ok(Method::POST, "/_matrix/client/v3/keys/upload", Some(json!({
        "device_keys": device_keys(&alice.user_id, &alice.device_id),
        "one_time_keys": {
            "signed_curve25519:AAAA": { "key": "otk1", "signatures": {} },
            "signed_curve25519:AAAB": { "key": "otk2", "signatures": {} },
        },
        "fallback_keys": { "signed_curve25519:FFFF": { "key": "fallback", "fallback": true, "signatures": {} } },
    }))).await;
    assert_eq!(uploaded["one_time_key_counts"]["signed_curve25519"], 2);

    let query = bob.ok(Method::POST, "/_matrix/client/v3/keys/query", Some(json!({ "device_keys": { alice.user_id.clone(): [] } }))).await;
    let keys = &query["device_keys"][&alice.user_id][&alice.device_id];
    assert_eq!(keys["keys"][format!("ed25519:{}", alice.device_id)], "edkey");
    assert_eq!(keys["signatures"][&alice.user_id][format!("ed25519:{}", alice.device_id)], "sig");

    let claim = json!({ "one_time_keys": { alice.user_id.clone(): { alice.device_id.clone(): "signed_curve25519" } } });
    let mut claimed = Vec::new();
    for _ in 0..4 {
        let response = bob.ok(Method::POST, "/_matrix/client/v3/keys/claim", Some(claim.clone())).await;
        let keys = response["one_time_keys"][&alice.user_id][&alice.device_id].as_object().unwrap().clone();
        claimed.push(keys.values().next().unwrap()["key"].as_str().unwrap().to_owned());
    }
    // Two one-time keys, each once, then the fallback key, reused.
    assert_eq!(claimed, ["otk1", "otk2", "fallback", "fallback"]);

    // Sync reports the counts and that the fallback key has been used.
    let sync = alice.sync(None, 0).await;
    assert_eq!(sync["device_one_time_keys_count"], json!({ "signed_curve25519": 0 }));
    assert_eq!(sync["device_unused_fallback_key_types"], json!([]));
}

#[tokio::test]
async fn to_device_messages_are_delivered_once_in_order() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let since = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    for (i, txn) in ["t1", "t2", "t2"].iter().enumerate() {
        alice.ok(Method::PUT, &format!("/_matrix/client/v3/sendToDevice/m.room_key_request/{txn}"), Some(json!({
            "messages": { bob.user_id.clone(): { "*": { "n": i } } }
        }))).await;
    }
    let sync = bob.sync(Some(&since), 5000).await;
    let events = sync["to_device"]["events"].as_array().unwrap();
    // The repeated transaction id was not delivered twice.
    assert_eq!(events.len(), 2, "{sync}");
    assert_eq!(events[0]["content"]["n"], 0);
    assert_eq!(events[1]["content"]["n"], 1);
    assert_eq!(events[0]["sender"], alice.user_id.as_str());
    assert_eq!(events[0]["type"], "m.room_key_request");
    let next = sync["next_batch"].as_str().unwrap();
    // Syncing from the next token acknowledges them: they are gone.
    let again = bob.sync(Some(next), 0).await;
    assert!(again["to_device"]["events"].as_array().unwrap().is_empty());
    // Retrying with the old token still delivers (not yet acknowledged)? No: acknowledged
    // messages were removed when the newer token was used.
    let replay = bob.sync(Some(&since), 0).await;
    assert!(replay["to_device"]["events"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn device_lists_track_key_changes_and_leaves() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    let since = alice.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();

    bob.ok(Method::POST, "/_matrix/client/v3/keys/upload", Some(json!({ "device_keys": device_keys(&bob.user_id, &bob.device_id) }))).await;
    // Carol shares no room with alice: her changes are not alice's business.
    carol.ok(Method::POST, "/_matrix/client/v3/keys/upload", Some(json!({ "device_keys": device_keys(&carol.user_id, &carol.device_id) }))).await;
    let sync = alice.sync(Some(&since), 5000).await;
    assert_eq!(sync["device_lists"]["changed"], json!([bob.user_id]));
    let next = sync["next_batch"].as_str().unwrap().to_owned();

    let changes = alice.ok(Method::GET, &format!("/_matrix/client/v3/keys/changes?from={}&to={}", enc(&since), enc(&next)), None).await;
    assert_eq!(changes["changed"], json!([bob.user_id]));

    // Carol joins: she now shares a room, so she is "changed"; bob leaves: "left".
    assert_eq!(carol.join(&room).await.0, StatusCode::OK);
    bob.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(json!({}))).await;
    let sync = alice.sync(Some(&next), 5000).await;
    assert_eq!(sync["device_lists"]["changed"], json!([carol.user_id]));
    assert_eq!(sync["device_lists"]["left"], json!([bob.user_id]));

    // Deleting a device drops its keys and reports the change.
    let next = sync["next_batch"].as_str().unwrap().to_owned();
    carol.ok(Method::POST, "/_matrix/client/v3/delete_devices", Some(json!({
        "devices": [carol.device_id],
        "auth": { "type": "m.login.password", "identifier": { "type": "m.id.user", "user": carol.user_id }, "password": "carol-password" },
    }))).await;
    let sync = alice.sync(Some(&next), 5000).await;
    assert_eq!(sync["device_lists"]["changed"], json!([carol.user_id]));
    let query = alice.ok(Method::POST, "/_matrix/client/v3/keys/query", Some(json!({ "device_keys": { carol.user_id.clone(): [] } }))).await;
    assert_eq!(query["device_keys"][&carol.user_id], json!({}));
}

#[tokio::test]
async fn cross_signing_upload_and_signatures() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    alice.ok(Method::POST, "/_matrix/client/v3/keys/upload", Some(json!({ "device_keys": device_keys(&alice.user_id, &alice.device_id) }))).await;
    let key = |usage: &str, public: &str| json!({ "user_id": alice.user_id, "usage": [usage], "keys": { format!("ed25519:{public}"): public } });
    let upload = json!({
        "master_key": key("master", "MASTER"),
        "self_signing_key": key("self_signing", "SELF"),
        "user_signing_key": key("user_signing", "USER"),
    });
    // The first upload needs no password.
    alice.ok(Method::POST, "/_matrix/client/v3/keys/device_signing/upload", Some(upload.clone())).await;
    // Replacing the keys does.
    let (status, body) = alice.post("/_matrix/client/v3/keys/device_signing/upload", upload.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["flows"][0]["stages"][0], "m.login.password");
    let (status, body) = alice.post("/_matrix/client/v3/keys/device_signing/upload", json!({ "master_key": key("self_signing", "BAD") , "auth": {
        "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "alice" }, "password": "alice-password" } })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));

    // Sign the device with the self-signing key.
    let mut signed_device = device_keys(&alice.user_id, &alice.device_id);
    signed_device["signatures"] = json!({ alice.user_id.clone(): { "ed25519:SELF": "selfsig" } });
    let response = alice.ok(Method::POST, "/_matrix/client/v3/keys/signatures/upload", Some(json!({
        alice.user_id.clone(): { alice.device_id.clone(): signed_device, "NOSUCHKEY": { "signatures": { alice.user_id.clone(): { "ed25519:SELF": "x" } } } }
    }))).await;
    assert!(response["failures"][&alice.user_id]["NOSUCHKEY"].is_object());
    let query = alice.ok(Method::POST, "/_matrix/client/v3/keys/query", Some(json!({ "device_keys": { alice.user_id.clone(): [] } }))).await;
    let signatures = &query["device_keys"][&alice.user_id][&alice.device_id]["signatures"][&alice.user_id];
    assert_eq!(signatures["ed25519:SELF"], "selfsig");
    assert_eq!(signatures[format!("ed25519:{}", alice.device_id)], "sig", "the device's own signature is kept");
    assert_eq!(query["master_keys"][&alice.user_id]["keys"]["ed25519:MASTER"], "MASTER");
    assert_eq!(query["user_signing_keys"][&alice.user_id]["keys"]["ed25519:USER"], "USER");

    // Others see the master and self-signing keys, never the user-signing key.
    let bob = server.register("bob").await;
    let query = bob.ok(Method::POST, "/_matrix/client/v3/keys/query", Some(json!({ "device_keys": { alice.user_id.clone(): [] } }))).await;
    assert!(query["self_signing_keys"][&alice.user_id].is_object());
    assert!(query["user_signing_keys"].get(&alice.user_id).is_none());
}

#[tokio::test]
async fn key_backup_round_trip() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let (status, body) = alice.get("/_matrix/client/v3/room_keys/version").await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let algorithm = json!({ "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": { "public_key": "pk", "signatures": {} } });
    let version = alice.ok(Method::POST, "/_matrix/client/v3/room_keys/version", Some(algorithm.clone())).await["version"].as_str().unwrap().to_owned();
    let session = |index: u64| json!({ "first_message_index": index, "forwarded_count": 0, "is_verified": false, "session_data": { "ciphertext": format!("c{index}") } });
    let put = alice.ok(Method::PUT, &format!("/_matrix/client/v3/room_keys/keys?version={version}"), Some(json!({
        "rooms": { "!r:test.local": { "sessions": { "s1": session(5), "s2": session(0) } } }
    }))).await;
    assert_eq!(put["count"], 2);
    // A worse key (higher first index) does not replace a better one; a better one does.
    let path = format!("/_matrix/client/v3/room_keys/keys/{}/s1?version={version}", enc("!r:test.local"));
    alice.ok(Method::PUT, &path, Some(session(9))).await;
    assert_eq!(alice.ok(Method::GET, &path, None).await["first_message_index"], 5);
    alice.ok(Method::PUT, &path, Some(session(1))).await;
    assert_eq!(alice.ok(Method::GET, &path, None).await["session_data"]["ciphertext"], "c1");
    let all = alice.ok(Method::GET, &format!("/_matrix/client/v3/room_keys/keys?version={version}"), None).await;
    assert_eq!(all["rooms"]["!r:test.local"]["sessions"].as_object().unwrap().len(), 2);
    let info = alice.ok(Method::GET, "/_matrix/client/v3/room_keys/version", None).await;
    assert_eq!((info["version"].as_str(), info["count"].as_u64()), (Some(version.as_str()), Some(2)));

    // A newer version makes the old one read-only for uploads.
    let newer = alice.ok(Method::POST, "/_matrix/client/v3/room_keys/version", Some(algorithm)).await["version"].as_str().unwrap().to_owned();
    let (status, body) = alice.put(&path, session(0)).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION"));
    assert_eq!(body["current_version"], newer.as_str());

    alice.ok(Method::DELETE, &format!("/_matrix/client/v3/room_keys/keys/{}?version={version}", enc("!r:test.local")), None).await;
    let all = alice.ok(Method::GET, &format!("/_matrix/client/v3/room_keys/keys?version={version}"), None).await;
    assert_eq!(all["rooms"], json!({}));
    alice.ok(Method::DELETE, &format!("/_matrix/client/v3/room_keys/version/{newer}"), None).await;
    let (status, _) = alice.get(&format!("/_matrix/client/v3/room_keys/version/{newer}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Other users cannot see alice's backup.
    let bob = server.register("bob").await;
    let (status, _) = bob.get(&format!("/_matrix/client/v3/room_keys/version/{version}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
