//! End-to-end tests: the Synapse-compatible admin API and the `limbic user` subcommands.

mod common;

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const V1: &str = "/_synapse/admin/v1";
const V2: &str = "/_synapse/admin/v2";
const CS: &str = "/_matrix/client/v3";

async fn login(server: &TestServer, user: &str, password: &str) -> (StatusCode, Value) {
    server
        .client()
        .post(&format!("{CS}/login"), json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": user },
            "password": password,
        }))
        .await
}

/// A client for `user` with a fresh access token.
async fn logged_in(server: &TestServer, user: &str, password: &str) -> Client {
    let (status, body) = login(server, user, password).await;
    assert_eq!(status, StatusCode::OK, "login {user}: {body}");
    let mut client = server.client();
    client.token = Some(body["access_token"].as_str().unwrap().to_owned());
    client.user_id = body["user_id"].as_str().unwrap().to_owned();
    client.device_id = body["device_id"].as_str().unwrap().to_owned();
    client
}

async fn whoami(client: &Client) -> StatusCode {
    client.get(&format!("{CS}/account/whoami")).await.0
}

fn user_path(user_id: &str) -> String {
    format!("{V2}/users/{}", enc(user_id))
}

fn names(list: &Value, key: &str) -> Vec<String> {
    list.as_array().unwrap().iter().map(|v| v[key].as_str().unwrap_or("<none>").to_owned()).collect()
}

#[tokio::test]
async fn every_endpoint_refuses_non_admins_and_missing_tokens() {
    let server = TestServer::start().await;
    let admin = server.register_admin("root").await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({ "preset": "public_chat", "room_alias_name": "lobby" })).await;
    let mxc = alice.upload(b"private notes", "text/plain").await;
    let media = mxc.trim_start_matches("mxc://");
    let (user, r) = (enc(&alice.user_id), enc(&room));
    let device = alice.device_id.clone();
    let endpoints: Vec<(Method, String, Value)> = vec![
        (Method::GET, format!("{V1}/server_version"), json!(null)),
        (Method::GET, format!("{V2}/users"), json!(null)),
        (Method::GET, format!("{V2}/users/{user}"), json!(null)),
        (Method::PUT, format!("{V2}/users/{user}"), json!({ "admin": true })),
        (Method::POST, format!("{V1}/deactivate/{user}"), json!({})),
        (Method::GET, format!("{V1}/users/{user}/admin"), json!(null)),
        (Method::PUT, format!("{V1}/users/{user}/admin"), json!({ "admin": true })),
        (Method::POST, format!("{V1}/reset_password/{user}"), json!({ "new_password": "x" })),
        (Method::GET, format!("{V2}/users/{user}/devices"), json!(null)),
        (Method::GET, format!("{V2}/users/{user}/devices/{device}"), json!(null)),
        (Method::DELETE, format!("{V2}/users/{user}/devices/{device}"), json!(null)),
        (Method::GET, format!("{V1}/whois/{user}"), json!(null)),
        (Method::GET, format!("{V1}/rooms"), json!(null)),
        (Method::GET, format!("{V1}/rooms/{r}"), json!(null)),
        (Method::GET, format!("{V1}/rooms/{r}/members"), json!(null)),
        (Method::GET, format!("{V1}/rooms/{r}/state"), json!(null)),
        (Method::GET, format!("{V1}/rooms/{r}/block"), json!(null)),
        (Method::PUT, format!("{V1}/rooms/{r}/block"), json!({ "block": true })),
        (Method::DELETE, format!("{V1}/rooms/{r}"), json!({})),
        (Method::DELETE, format!("{V2}/rooms/{r}"), json!({})),
        (Method::GET, format!("{V2}/rooms/{r}/delete_status"), json!(null)),
        (Method::GET, format!("{V2}/rooms/delete_status/some-id"), json!(null)),
        (Method::DELETE, format!("{V1}/media/{media}"), json!(null)),
    ];
    let anonymous = server.client();
    let mut forged = server.client();
    forged.token = Some("not-a-token".to_owned());
    for (method, path, body) in &endpoints {
        let body = (!body.is_null()).then(|| body.clone());
        let (status, response) = alice.request(method.clone(), path, body.clone()).await;
        assert_eq!((status, errcode(&response)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{method} {path} as a non-admin");
        let (status, response) = anonymous.request(method.clone(), path, body.clone()).await;
        assert_eq!((status, errcode(&response)), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"), "{method} {path} without a token");
        let (status, response) = forged.request(method.clone(), path, body).await;
        assert_eq!((status, errcode(&response)), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"), "{method} {path} with a bad token");
    }
    // Nothing the refused requests asked for happened.
    assert_eq!(whoami(&alice).await, StatusCode::OK);
    let alice_info = admin.ok(Method::GET, &format!("{V2}/users/{user}"), None).await;
    assert_eq!((alice_info["admin"].clone(), alice_info["deactivated"].clone()), (json!(false), json!(false)));
    let details = admin.ok(Method::GET, &format!("{V1}/rooms/{r}"), None).await;
    assert_eq!(details["joined_members"], 1);
    assert_eq!(admin.ok(Method::GET, &format!("{V1}/rooms/{r}/block"), None).await["block"], false);
    let download = alice.get(&format!("/_matrix/client/v1/media/download/{media}")).await;
    assert_eq!(download.0, StatusCode::OK);

    // The admin is allowed.
    let version = admin.ok(Method::GET, &format!("{V1}/server_version"), None).await;
    assert!(version["server_version"].as_str().unwrap().starts_with("limbic "), "{version}");
}

#[tokio::test]
async fn users_are_listed_filtered_paged_and_queried() {
    let server = TestServer::start().await;
    let admin = server.register_admin("root").await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    bob.put(&format!("{CS}/profile/{}/displayname", enc(&bob.user_id)), json!({ "displayname": "Dr Robert" })).await;
    admin.ok(Method::POST, &format!("{V1}/deactivate/{}", enc(&carol.user_id)), Some(json!({}))).await;

    let list = admin.ok(Method::GET, &format!("{V2}/users"), None).await;
    assert_eq!(names(&list["users"], "name"), ["@alice:test.local", "@bob:test.local", "@root:test.local"], "deactivated users are left out by default");
    assert_eq!(list["total"], 3);
    assert!(list.get("next_token").is_none());
    let first = &list["users"][0];
    assert_eq!((first["admin"].clone(), first["deactivated"].clone(), first["is_guest"].clone()), (json!(false), json!(false), json!(false)));
    assert_eq!(first["displayname"], "alice");
    assert!(first["creation_ts"].as_u64().unwrap() > 1_600_000_000_000, "creation_ts is in ms: {first}");
    assert!(first["last_seen_ts"].is_u64());

    let all = admin.ok(Method::GET, &format!("{V2}/users?deactivated=true"), None).await;
    assert_eq!(all["total"], 4);
    assert_eq!(all["users"][2]["deactivated"], true);
    let page = admin.ok(Method::GET, &format!("{V2}/users?deactivated=true&limit=3"), None).await;
    assert_eq!((page["users"].as_array().unwrap().len(), page["total"].clone(), page["next_token"].clone()), (3, json!(4), json!("3")));
    let rest = admin.ok(Method::GET, &format!("{V2}/users?deactivated=true&limit=3&from=3"), None).await;
    assert_eq!(names(&rest["users"], "name"), ["@root:test.local"]);
    assert!(rest.get("next_token").is_none());

    // `name` matches the user id or the display name, in any case; `user_id` only the id.
    let by_name = admin.ok(Method::GET, &format!("{V2}/users?name=robert"), None).await;
    assert_eq!(names(&by_name["users"], "name"), ["@bob:test.local"]);
    let by_id = admin.ok(Method::GET, &format!("{V2}/users?user_id=ALI"), None).await;
    assert_eq!(names(&by_id["users"], "name"), ["@alice:test.local"]);
    let by_id = admin.ok(Method::GET, &format!("{V2}/users?user_id=robert"), None).await;
    assert_eq!(by_id["total"], 0);
    let admins = admin.ok(Method::GET, &format!("{V2}/users?admins=true&guests=false"), None).await;
    assert_eq!(names(&admins["users"], "name"), ["@root:test.local"]);

    let (status, body) = admin.get(&format!("{V2}/users?limit=-1")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
    let (status, body) = admin.get(&format!("{V2}/users?deactivated=maybe")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));

    let info = admin.ok(Method::GET, &user_path(&bob.user_id), None).await;
    assert_eq!((info["name"].clone(), info["displayname"].clone(), info["admin"].clone()), (json!(bob.user_id), json!("Dr Robert"), json!(false)));
    let (status, body) = admin.get(&user_path("@nobody:test.local")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let (status, body) = admin.get(&user_path("@someone:elsewhere.example")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
    drop(alice);
}

#[tokio::test]
async fn put_user_creates_and_modifies_accounts() {
    let server = TestServer::start().await;
    let admin = server.register_admin("root").await;

    // Create: 201 with the new account.
    let (status, created) = admin
        .put(&user_path("@dana:test.local"), json!({ "password": "dana-pw", "displayname": "Dana", "admin": true }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!((created["name"].clone(), created["displayname"].clone(), created["admin"].clone()), (json!("@dana:test.local"), json!("Dana"), json!(true)));
    let dana = logged_in(&server, "dana", "dana-pw").await;
    assert_eq!(dana.ok(Method::GET, &format!("{V1}/server_version"), None).await["server_version"].as_str().map(|v| v.starts_with("limbic")), Some(true));

    // Modify: 200; a new display name reaches the rooms the user is in.
    let room = dana.create_room(json!({ "preset": "private_chat" })).await;
    let (status, modified) = admin.put(&user_path("@dana:test.local"), json!({ "displayname": "Dr Dana" })).await;
    assert_eq!((status, modified["displayname"].clone()), (StatusCode::OK, json!("Dr Dana")));
    let member = dana.ok(Method::GET, &format!("{CS}/rooms/{}/state/m.room.member/{}", enc(&room), enc(&dana.user_id)), None).await;
    assert_eq!(member["displayname"], "Dr Dana");

    // A new password logs out every device unless `logout_devices` is false.
    admin.ok(Method::PUT, &user_path("@dana:test.local"), Some(json!({ "password": "pw-2", "logout_devices": false }))).await;
    assert_eq!(whoami(&dana).await, StatusCode::OK);
    admin.ok(Method::PUT, &user_path("@dana:test.local"), Some(json!({ "password": "pw-3" }))).await;
    assert_eq!(whoami(&dana).await, StatusCode::UNAUTHORIZED);
    assert_eq!(login(&server, "dana", "pw-2").await.0, StatusCode::FORBIDDEN);
    let dana = logged_in(&server, "dana", "pw-3").await;

    // Admin rights: granted and taken by others, never dropped by oneself.
    admin.ok(Method::PUT, &user_path("@dana:test.local"), Some(json!({ "admin": false }))).await;
    assert_eq!(dana.get(&format!("{V2}/users")).await.0, StatusCode::FORBIDDEN);
    let (status, _) = admin.put(&user_path(&admin.user_id), json!({ "admin": false })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Deactivation leaves rooms and revokes tokens; reactivation needs a password.
    let (_, deactivated) = admin.put(&user_path("@dana:test.local"), json!({ "deactivated": true })).await;
    assert_eq!(deactivated["deactivated"], true);
    assert_eq!(whoami(&dana).await, StatusCode::UNAUTHORIZED);
    let members = admin.ok(Method::GET, &format!("{V1}/rooms/{}/members", enc(&room)), None).await;
    assert_eq!(members["total"], 0);
    let (status, body) = login(&server, "dana", "pw-3").await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_USER_DEACTIVATED"));
    let (status, body) = admin.put(&user_path("@dana:test.local"), json!({ "deactivated": false })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_MISSING_PARAM"));
    let (status, body) = admin.put(&user_path("@dana:test.local"), json!({ "deactivated": false, "password": "back" })).await;
    assert_eq!((status, body["deactivated"].clone()), (StatusCode::OK, json!(false)));
    logged_in(&server, "dana", "back").await;

    // Bad input.
    let (status, body) = admin.put(&user_path("@erin:test.local"), json!({ "password": "" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_WEAK_PASSWORD"));
    let (status, body) = admin.put(&user_path("@erin:elsewhere.example"), json!({ "password": "x" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
    let (status, body) = admin.put(&user_path("@Erin Bad:test.local"), json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = admin.put(&user_path("@erin:test.local"), json!({ "admin": "yes" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"));
    assert_eq!(admin.get(&user_path("@erin:test.local")).await.0, StatusCode::NOT_FOUND, "failed creations leave nothing behind");
}

#[tokio::test]
async fn deactivate_admin_flag_and_password_reset() {
    let server = TestServer::start().await;
    let admin = server.register_admin("root").await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    bob.join(&room).await;

    // Deactivate: bob leaves the room, loses his tokens and can no longer log in.
    let body = admin.ok(Method::POST, &format!("{V1}/deactivate/{}", enc(&bob.user_id)), Some(json!({ "erase": false }))).await;
    assert_eq!(body["id_server_unbind_result"], "success");
    assert_eq!(whoami(&bob).await, StatusCode::UNAUTHORIZED);
    let members = admin.ok(Method::GET, &format!("{V1}/rooms/{}/members", enc(&room)), None).await;
    assert_eq!(members["members"], json!([alice.user_id]));
    assert_eq!(login(&server, "bob", "bob-password").await.0, StatusCode::FORBIDDEN);
    assert_eq!(admin.ok(Method::GET, &user_path(&bob.user_id), None).await["deactivated"], true);
    let (status, body) = admin.post(&format!("{V1}/deactivate/{}", enc("@nobody:test.local")), json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));

    // The admin flag.
    let flag = format!("{V1}/users/{}/admin", enc(&alice.user_id));
    assert_eq!(admin.ok(Method::GET, &flag, None).await, json!({ "admin": false }));
    admin.ok(Method::PUT, &flag, Some(json!({ "admin": true }))).await;
    assert_eq!(admin.ok(Method::GET, &flag, None).await, json!({ "admin": true }));
    assert_eq!(alice.ok(Method::GET, &format!("{V2}/users"), None).await["total"], 2, "alice is an admin now");
    let (status, body) = admin.put(&flag, json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_MISSING_PARAM"));
    let (status, _) = alice.put(&flag, json!({ "admin": false })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "admins may not demote themselves");
    admin.ok(Method::PUT, &flag, Some(json!({ "admin": false }))).await;
    assert_eq!(alice.get(&format!("{V2}/users")).await.0, StatusCode::FORBIDDEN);
    let (status, body) = admin.get(&format!("{V1}/users/{}/admin", enc("@nobody:test.local"))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let (status, body) = admin.get(&format!("{V1}/users/{}/admin", enc("@x:elsewhere.example"))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));

    // Password reset: devices stay logged in only when asked.
    let reset = format!("{V1}/reset_password/{}", enc(&alice.user_id));
    admin.ok(Method::POST, &reset, Some(json!({ "new_password": "second", "logout_devices": false }))).await;
    assert_eq!(whoami(&alice).await, StatusCode::OK);
    assert_eq!(login(&server, "alice", "alice-password").await.0, StatusCode::FORBIDDEN);
    admin.ok(Method::POST, &reset, Some(json!({ "new_password": "third" }))).await;
    assert_eq!(whoami(&alice).await, StatusCode::UNAUTHORIZED);
    logged_in(&server, "alice", "third").await;
    let (status, body) = admin.post(&reset, json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_MISSING_PARAM"));
    let (status, body) = admin.post(&reset, json!({ "new_password": "" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_WEAK_PASSWORD"));
    let (status, body) = admin.post(&format!("{V1}/reset_password/{}", enc("@nobody:test.local")), json!({ "new_password": "x" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let (status, body) = admin.request(Method::POST, &reset, None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_MISSING_PARAM"), "an empty body reads as {{}}");
}

#[tokio::test]
async fn devices_and_whois() {
    let server = TestServer::start().await;
    let admin = server.register_admin("root").await;
    let alice = server.register("alice").await;
    let phone = logged_in(&server, "alice", "alice-password").await;
    let devices_path = format!("{V2}/users/{}/devices", enc(&alice.user_id));

    let devices = admin.ok(Method::GET, &devices_path, None).await;
    assert_eq!(devices["total"], 2);
    let mut ids = names(&devices["devices"], "device_id");
    ids.sort();
    let mut expected = vec![alice.device_id.clone(), phone.device_id.clone()];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(devices["devices"][0]["user_id"], json!(alice.user_id));

    let one = admin.ok(Method::GET, &format!("{devices_path}/{}", phone.device_id), None).await;
    assert_eq!((one["device_id"].clone(), one["last_seen_ip"].clone()), (json!(phone.device_id), json!("127.0.0.1")));
    assert!(one["last_seen_ts"].is_u64());
    let (status, body) = admin.get(&format!("{devices_path}/NOSUCHDEVICE")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));

    let whois = admin.ok(Method::GET, &format!("{V1}/whois/{}", enc(&alice.user_id)), None).await;
    assert_eq!(whois["user_id"], json!(alice.user_id));
    let connection = &whois["devices"][&phone.device_id]["sessions"][0]["connections"][0];
    assert_eq!(connection["ip"], "127.0.0.1", "{whois}");
    assert!(connection["last_seen"].is_u64());
    assert!(whois["devices"][&alice.device_id].is_object());

    // Deleting a device revokes its token; deleting it again still succeeds.
    admin.ok(Method::DELETE, &format!("{devices_path}/{}", phone.device_id), None).await;
    assert_eq!(whoami(&phone).await, StatusCode::UNAUTHORIZED);
    assert_eq!(whoami(&alice).await, StatusCode::OK);
    admin.ok(Method::DELETE, &format!("{devices_path}/{}", phone.device_id), None).await;
    assert_eq!(admin.ok(Method::GET, &devices_path, None).await["total"], 1);

    for path in [format!("{V2}/users/{}/devices", enc("@nobody:test.local")), format!("{V1}/whois/{}", enc("@nobody:test.local"))] {
        let (status, body) = admin.get(&path).await;
        assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{path}");
    }
    let (status, body) = admin.get(&format!("{V1}/whois/{}", enc("@x:elsewhere.example"))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
}

#[tokio::test]
async fn rooms_are_listed_sorted_searched_and_described() {
    let server = TestServer::start().await;
    let admin = server.register_admin("root").await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let zulu = alice.create_room(json!({ "name": "Zulu group", "preset": "public_chat", "visibility": "public", "room_alias_name": "zulu" })).await;
    bob.join(&zulu).await;
    let alpha = alice
        .create_room(json!({
            "name": "alpha notes", "preset": "private_chat",
            "initial_state": [{ "type": "m.room.encryption", "state_key": "", "content": { "algorithm": "m.megolm.v1.aes-sha2" } }],
        }))
        .await;
    let unnamed = bob.create_room(json!({ "preset": "private_chat" })).await;

    let list = admin.ok(Method::GET, &format!("{V1}/rooms"), None).await;
    assert_eq!(names(&list["rooms"], "room_id"), [alpha.clone(), zulu.clone(), unnamed.clone()], "by name; unnamed rooms last");
    assert_eq!((list["offset"].clone(), list["total_rooms"].clone()), (json!(0), json!(3)));
    assert!(list.get("next_batch").is_none() && list.get("prev_batch").is_none());
    let entry = &list["rooms"][1];
    assert_eq!(entry["name"], "Zulu group");
    assert_eq!(entry["canonical_alias"], "#zulu:test.local");
    assert_eq!((entry["joined_members"].clone(), entry["joined_local_members"].clone()), (json!(2), json!(2)));
    assert_eq!((entry["public"].clone(), entry["join_rules"].clone(), entry["creator"].clone()), (json!(true), json!("public"), json!(alice.user_id)));
    assert_eq!((entry["federatable"].clone(), entry["encryption"].clone(), entry["version"].clone()), (json!(true), json!(null), json!("11")));
    assert!(entry["state_events"].as_u64().unwrap() >= 7);

    let by_size = admin.ok(Method::GET, &format!("{V1}/rooms?order_by=joined_members"), None).await;
    assert_eq!(names(&by_size["rooms"], "room_id")[0], zulu, "largest first");
    let reversed = admin.ok(Method::GET, &format!("{V1}/rooms?order_by=name&dir=b"), None).await;
    assert_eq!(names(&reversed["rooms"], "room_id"), [zulu.clone(), alpha.clone(), unnamed.clone()], "rooms without a name stay last");
    let first = admin.ok(Method::GET, &format!("{V1}/rooms?limit=2"), None).await;
    assert_eq!((first["rooms"].as_array().unwrap().len(), first["next_batch"].clone()), (2, json!(2)));
    let second = admin.ok(Method::GET, &format!("{V1}/rooms?limit=2&from=2"), None).await;
    assert_eq!(names(&second["rooms"], "room_id"), [unnamed.clone()]);
    assert_eq!((second["offset"].clone(), second["prev_batch"].clone()), (json!(2), json!(0)));
    assert!(second.get("next_batch").is_none());

    for (term, expected) in [("ZULU", &zulu), ("notes", &alpha), (&unnamed[1..8], &unnamed)] {
        let found = admin.ok(Method::GET, &format!("{V1}/rooms?search_term={}", enc(term)), None).await;
        assert_eq!(names(&found["rooms"], "room_id"), [expected.clone()], "search {term}");
    }
    let (status, body) = admin.get(&format!("{V1}/rooms?order_by=colour")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
    let (status, body) = admin.get(&format!("{V1}/rooms?dir=sideways")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));

    let details = admin.ok(Method::GET, &format!("{V1}/rooms/{}", enc(&alpha)), None).await;
    assert_eq!((details["room_id"].clone(), details["encryption"].clone()), (json!(alpha), json!("m.megolm.v1.aes-sha2")));
    assert_eq!((details["public"].clone(), details["join_rules"].clone(), details["history_visibility"].clone()), (json!(false), json!("invite"), json!("shared")));
    assert_eq!(details["joined_local_devices"], 1);

    let members = admin.ok(Method::GET, &format!("{V1}/rooms/{}/members", enc(&zulu)), None).await;
    let mut joined: Vec<String> = serde_json::from_value(members["members"].clone()).unwrap();
    joined.sort();
    assert_eq!((joined, members["total"].clone()), (vec![alice.user_id.clone(), bob.user_id.clone()], json!(2)));

    let state = admin.ok(Method::GET, &format!("{V1}/rooms/{}/state", enc(&zulu)), None).await;
    let types: Vec<&str> = state["state"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(types.contains(&"m.room.create") && types.contains(&"m.room.name"), "{types:?}");
    assert_eq!(state["state"][0]["room_id"], json!(zulu));

    for suffix in ["", "/members", "/state"] {
        let (status, body) = admin.get(&format!("{V1}/rooms/{}{suffix}", enc("!missing:test.local"))).await;
        assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "unknown room{suffix}");
        let (status, body) = admin.get(&format!("{V1}/rooms/not-a-room{suffix}")).await;
        assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"), "invalid room id{suffix}");
    }
}

#[tokio::test]
async fn deleting_a_room_purges_it() {
    let mut server = TestServer::start().await;
    let admin = server.register_admin("root").await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = alice.create_room(json!({ "name": "Doomed", "preset": "public_chat", "visibility": "public", "room_alias_name": "doomed" })).await;
    bob.join(&room).await;
    alice.invite(&room, &carol.user_id).await;
    alice.send_text(&room, "t1", "a confidential remark").await;
    let keep = alice.create_room(json!({ "name": "Kept", "preset": "public_chat", "visibility": "public" })).await;
    alice.send_text(&keep, "t2", "another confidential remark").await;

    let deleted = admin.ok(Method::DELETE, &format!("{V2}/rooms/{}", enc(&room)), Some(json!({}))).await;
    let delete_id = deleted["delete_id"].as_str().unwrap().to_owned();

    let status = admin.ok(Method::GET, &format!("{V2}/rooms/{}/delete_status", enc(&room)), None).await;
    let result = &status["results"][0];
    assert_eq!((result["delete_id"].clone(), result["status"].clone()), (json!(delete_id), json!("complete")));
    let mut kicked: Vec<String> = serde_json::from_value(result["shutdown_room"]["kicked_users"].clone()).unwrap();
    kicked.sort();
    assert_eq!(kicked, [alice.user_id.clone(), bob.user_id.clone(), carol.user_id.clone()], "joined and invited members leave");
    assert_eq!(result["shutdown_room"]["local_aliases"], json!(["#doomed:test.local"]));
    assert_eq!(result["shutdown_room"]["failed_to_kick_users"], json!([]));
    let by_id = admin.ok(Method::GET, &format!("{V2}/rooms/delete_status/{delete_id}"), None).await;
    assert_eq!((by_id["status"].clone(), by_id["shutdown_room"].clone()), (json!("complete"), result["shutdown_room"].clone()));

    // Nothing of the room is left, and the other room is untouched; a restart changes nothing.
    server.restart().await;
    assert_eq!(admin.get(&format!("{V1}/rooms/{}", enc(&room))).await.0, StatusCode::NOT_FOUND);
    let rooms = admin.ok(Method::GET, &format!("{V1}/rooms"), None).await;
    assert_eq!(names(&rooms["rooms"], "room_id"), [keep.clone()]);
    let joined = alice.ok(Method::GET, &format!("{CS}/joined_rooms"), None).await;
    assert_eq!(joined["joined_rooms"], json!([keep]));
    let (status, _) = alice.get(&format!("{CS}/directory/room/{}", enc("#doomed:test.local"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let directory = alice.ok(Method::GET, &format!("{CS}/publicRooms"), None).await;
    assert_eq!(names(&directory["chunk"], "room_id"), [keep.clone()]);
    let (status, _) = alice.get(&format!("{CS}/rooms/{}/messages?dir=b", enc(&room))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let found = alice.ok(Method::POST, &format!("{CS}/search"), Some(json!({ "search_categories": { "room_events": { "search_term": "confidential" } } }))).await;
    let results = &found["search_categories"]["room_events"]["results"];
    assert_eq!(results.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(results[0]["result"]["room_id"], json!(keep));
    let (status, _) = bob.put(&format!("{CS}/rooms/{}/send/m.room.message/t3", enc(&room)), json!({ "msgtype": "m.text", "body": "hello?" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let sync = carol.sync(None, 0).await;
    assert!(sync["rooms"]["invite"].get(&room).is_none(), "{sync}");

    // Deletion statuses live in memory, as in Synapse, and unknown ones are 404.
    for path in [format!("{V2}/rooms/{}/delete_status", enc(&room)), format!("{V2}/rooms/delete_status/{delete_id}")] {
        let (status, body) = admin.get(&path).await;
        assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{path}");
    }
    let (status, body) = admin.request(Method::DELETE, &format!("{V2}/rooms/{}", enc(&room)), Some(json!({}))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "the room is gone");
    let (status, body) = admin.request(Method::DELETE, &format!("{V2}/rooms/not-a-room"), Some(json!({}))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
}

#[tokio::test]
async fn deleting_without_purge_empties_and_blocks_the_room() {
    let server = TestServer::start().await;
    let admin = server.register_admin("root").await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({ "preset": "public_chat", "visibility": "public", "room_alias_name": "kept" })).await;
    bob.join(&room).await;
    let since = bob.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();

    let (status, body) = admin.request(Method::DELETE, &format!("{V1}/rooms/{}", enc(&room)), Some(json!({ "new_room_user_id": admin.user_id }))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"), "no replacement rooms");

    let report = admin
        .ok(Method::DELETE, &format!("{V1}/rooms/{}", enc(&room)), Some(json!({ "purge": false, "block": true, "message": "closed by the clinic" })))
        .await;
    assert_eq!(report["local_aliases"], json!(["#kept:test.local"]));
    assert_eq!(report["new_room_id"], json!(null));
    assert_eq!(report["kicked_users"].as_array().unwrap().len(), 2);

    // The room stays, empty, out of the directory; members saw themselves leave.
    let details = admin.ok(Method::GET, &format!("{V1}/rooms/{}", enc(&room)), None).await;
    assert_eq!((details["joined_members"].clone(), details["public"].clone()), (json!(0), json!(false)));
    let sync = bob.sync(Some(&since), 0).await;
    let timeline = &sync["rooms"]["leave"][&room]["timeline"]["events"];
    let leave = timeline.as_array().unwrap().iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == json!(bob.user_id)).unwrap();
    assert_eq!((leave["content"]["membership"].clone(), leave["content"]["reason"].clone()), (json!("leave"), json!("closed by the clinic")));
    assert_eq!(alice.get(&format!("{CS}/directory/room/{}", enc("#kept:test.local"))).await.0, StatusCode::NOT_FOUND);

    // Blocked: nobody gets back in, until the block is lifted.
    let block = format!("{V1}/rooms/{}/block", enc(&room));
    assert_eq!(admin.ok(Method::GET, &block, None).await, json!({ "block": true, "user_id": admin.user_id }));
    let (status, body) = bob.join(&room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let (status, _) = bob.put(&format!("{CS}/rooms/{}/state/m.room.member/{}", enc(&room), enc(&bob.user_id)), json!({ "membership": "join" })).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(admin.ok(Method::PUT, &block, Some(json!({ "block": false }))).await, json!({ "block": false }));
    assert_eq!(admin.ok(Method::GET, &block, None).await, json!({ "block": false }));
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    let (status, body) = admin.put(&block, json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_MISSING_PARAM"));
}

#[tokio::test]
async fn media_can_be_deleted() {
    let server = TestServer::start().await;
    let admin = server.register_admin("root").await;
    let alice = server.register("alice").await;
    let mxc = alice.upload(b"an intake form", "text/plain").await;
    let media = mxc.trim_start_matches("mxc://").to_owned();
    let media_id = media.rsplit('/').next().unwrap().to_owned();

    let deleted = admin.ok(Method::DELETE, &format!("{V1}/media/{media}"), None).await;
    assert_eq!(deleted, json!({ "deleted_media": [media_id], "total": 1 }));
    let (status, body) = alice.get(&format!("/_matrix/client/v1/media/download/{media}")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let (status, body) = admin.request(Method::DELETE, &format!("{V1}/media/{media}"), None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let (status, body) = admin.request(Method::DELETE, &format!("{V1}/media/elsewhere.example/{media_id}"), None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
}

fn cli(server: &TestServer, args: &[&str], stdin: &str) -> (bool, String, String) {
    let output = server.run_cli(args, stdin);
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    (output.status.success(), text(output.stdout), text(output.stderr))
}

#[tokio::test]
async fn cli_manages_accounts_on_a_stopped_server() {
    let mut server = TestServer::start().await;
    server.register("erin").await;

    // While the server runs, the store is locked: a clear error, and nothing changes.
    let (ok, _, stderr) = cli(&server, &["user", "create", "--username", "carol", "--password", "pw"], "");
    assert!(!ok);
    assert!(stderr.contains("stop the server") && stderr.contains("admin API"), "{stderr}");

    server.stop().await;
    let (ok, stdout, stderr) = cli(&server, &["user", "create", "--username", "carol", "--password-stdin", "--admin"], "carol-pw\n");
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "created @carol:test.local (server admin)");
    let (ok, _, stderr) = cli(&server, &["user", "create", "--username", "carol", "--password", "other"], "");
    assert!(!ok && stderr.contains("already taken"), "{stderr}");
    let (ok, _, stderr) = cli(&server, &["user", "create", "--username", "Not Valid!"], "");
    assert!(!ok && stderr.contains("user ids may only contain"), "{stderr}");
    let (ok, _, stderr) = cli(&server, &["user", "create", "--username", "x", "--password-stdin"], "\n");
    assert!(!ok && stderr.contains("no password"), "{stderr}");

    // Without a password, one is made up and printed.
    let (ok, stdout, stderr) = cli(&server, &["user", "create", "--username", "dave"], "");
    assert!(ok, "{stderr}");
    let generated = stdout.lines().find_map(|l| l.strip_prefix("password: ")).expect("generated password").to_owned();
    let (ok, stdout, _) = cli(&server, &["user", "make-admin", "@dave:test.local"], "");
    assert!(ok && stdout.contains("@dave:test.local is now a server admin"), "{stdout}");
    let (ok, stdout, _) = cli(&server, &["user", "make-admin", "dave", "--revoke"], "");
    assert!(ok && stdout.contains("no longer"), "{stdout}");
    let (ok, _, stderr) = cli(&server, &["user", "make-admin", "@nobody:test.local"], "");
    assert!(!ok && stderr.contains("unknown user"), "{stderr}");
    let (ok, _, stderr) = cli(&server, &["user", "make-admin", "@dave:elsewhere.example"], "");
    assert!(!ok && stderr.contains("only local users"), "{stderr}");
    let (ok, stdout, stderr) = cli(&server, &["user", "reset-password", "erin", "--password-stdin"], "erin-new\r\n");
    assert!(ok && stdout.contains("reset the password of @erin:test.local"), "{stdout}{stderr}");
    let (ok, _, stderr) = cli(&server, &["user", "reset-password", "@nobody:test.local"], "");
    assert!(!ok && stderr.contains("unknown user"), "{stderr}");

    server.start_again().await;
    let carol = logged_in(&server, "carol", "carol-pw").await;
    let dave = carol.ok(Method::GET, &user_path("@dave:test.local"), None).await;
    assert_eq!(dave["admin"], false, "carol is an admin; dave's rights were revoked");
    logged_in(&server, "dave", &generated).await;
    logged_in(&server, "erin", "erin-new").await;

    // Every account change made on the command line is in the audit log, by `cli`.
    let log = carol.ok(Method::GET, "/_limbic/admin/v1/audit?user=cli", None).await;
    let actions: Vec<(&str, &str)> = log["entries"].as_array().unwrap().iter().map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap())).collect();
    assert_eq!(actions, [
        ("user_created", "@carol:test.local"),
        ("user_created", "@dave:test.local"),
        ("admin_granted", "@dave:test.local"),
        ("admin_revoked", "@dave:test.local"),
        ("password_reset", "@erin:test.local"),
    ]);
    assert_eq!(login(&server, "erin", "erin-password").await.0, StatusCode::FORBIDDEN);
}

// --- the audit log ---------------------------------------------------------------------------

#[tokio::test]
async fn audit_log_records_logins_and_memberships_and_detects_tampering() {
    let mut server = TestServer::start().await;
    let admin = server.register_admin("auditor").await;
    let therapist = server.register("therapist").await;
    let client = server.register("client").await;
    let room = therapist.create_room(json!({
        "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }]
    })).await;
    therapist.ok(Method::POST, "/_matrix/client/v3/login", Some(json!({
        "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "therapist" }, "password": "therapist-password"
    }))).await;
    client.ok(Method::POST, &format!("/_matrix/client/v3/knock/{}", enc(&room)), Some(json!({ "reason": "appointment" }))).await;
    assert_eq!(therapist.invite(&room, &client.user_id).await.0, StatusCode::OK);
    assert_eq!(client.join(&room).await.0, StatusCode::OK);
    therapist.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)), Some(json!({ "user_id": client.user_id }))).await;

    let log = admin.ok(Method::GET, &format!("/_limbic/admin/v1/audit?room_id={}", enc(&room)), None).await;
    let actions: Vec<(&str, &str)> = log["entries"].as_array().unwrap().iter().map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap())).collect();
    assert_eq!(actions, [
        ("join", therapist.user_id.as_str()),
        ("knock", client.user_id.as_str()),
        ("admit", client.user_id.as_str()),
        ("join", client.user_id.as_str()),
        ("kick", client.user_id.as_str()),
    ]);
    let logins = admin.ok(Method::GET, &format!("/_limbic/admin/v1/audit?user={}", enc(&therapist.user_id)), None).await;
    assert!(logins["entries"].as_array().unwrap().iter().any(|e| e["action"] == "login" && e["details"]["device_id"].is_string()));
    let page = admin.ok(Method::GET, "/_limbic/admin/v1/audit?limit=2", None).await;
    let next = page["next_token"].as_u64().unwrap();
    let rest = admin.ok(Method::GET, &format!("/_limbic/admin/v1/audit?limit=2&from={next}"), None).await;
    assert_eq!(rest["entries"][0]["seq"].as_u64().unwrap(), next + 1);
    let (status, body) = client.get("/_limbic/admin/v1/audit").await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let verified = admin.ok(Method::GET, "/_limbic/admin/v1/audit/verify", None).await;
    assert_eq!(verified["valid"], true);

    // Offline: the chain verifies, then a single edited entry is caught by `limbic audit verify`.
    server.stop().await;
    let intact = server.run_cli(&["audit", "verify"], "");
    assert!(intact.status.success(), "{}", String::from_utf8_lossy(&intact.stderr));
    {
        let store = server.open_store();
        let key = 3u64.to_be_bytes();
        let mut entry: serde_json::Value = store.get_json(limbic_server::store::tables::AUDIT_LOG, &key).unwrap().unwrap();
        entry["target"] = json!("@someone-else:test.local");
        let mut batch = store.batch();
        batch.put_json(limbic_server::store::tables::AUDIT_LOG, &key, &entry).unwrap();
        store.write(batch).unwrap();
    }
    let broken = server.run_cli(&["audit", "verify"], "");
    assert!(!broken.status.success());
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(stderr.contains("broken at entry 3"), "{stderr}");
}

#[tokio::test]
async fn admin_actions_are_audited_with_their_route_and_subject() {
    let server = TestServer::start().await;
    let admin = server.register_admin("root").await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({})).await;

    admin.ok(Method::POST, &format!("{V1}/reset_password/{}", enc(&alice.user_id)), Some(json!({ "new_password": "pw-2" }))).await;
    admin.ok(Method::PUT, &format!("{V1}/rooms/{}/block", enc(&room)), Some(json!({ "block": true }))).await;
    admin.ok(Method::GET, &format!("{V1}/rooms/{}/state", enc(&room)), None).await;
    // Refused and failed requests change nothing and are not recorded as actions.
    let (status, _) = admin.request(Method::POST, &format!("{V1}/reset_password/{}", enc("@nobody:test.local")), Some(json!({ "new_password": "x" }))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let bob = server.register("bob").await;
    let (status, _) = bob.request(Method::GET, &format!("{V1}/rooms/{}/state", enc(&room)), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let log = admin.ok(Method::GET, &format!("/_limbic/admin/v1/audit?user={}", enc(&admin.user_id)), None).await;
    let actions: Vec<&Value> = log["entries"].as_array().unwrap().iter().filter(|e| e["action"] == "admin_action").collect();
    let summary: Vec<(&str, &str, &str, &str)> = actions
        .iter()
        .map(|e| (e["details"]["method"].as_str().unwrap(), e["details"]["route"].as_str().unwrap(), e["target"].as_str().unwrap_or(""), e["room_id"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(summary, [
        ("POST", "/_synapse/admin/v1/reset_password/{user_id}", alice.user_id.as_str(), ""),
        ("PUT", "/_synapse/admin/v1/rooms/{room_id}/block", "", room.as_str()),
        ("GET", "/_synapse/admin/v1/rooms/{room_id}/state", "", room.as_str()),
    ]);
    assert!(actions.iter().all(|e| e["actor"] == admin.user_id.as_str()));
    assert_eq!(admin.ok(Method::GET, "/_limbic/admin/v1/audit/verify", None).await["valid"], true);
}


#[tokio::test]
async fn admin_reads_of_a_notes_room_are_audited_as_note_reads() {
    let server = TestServer::start().await;
    let common::SessionWithNote { admin, therapist: _, room, notes_room } = server.session_with_a_note().await;
    let admin_note_reads = |audit: &Value| -> Vec<Value> {
        audit["entries"].as_array().unwrap().iter().filter(|e| e["action"] == "note_read" && e["actor"] == admin.user_id.as_str()).cloned().collect()
    };
    let audit_path = format!("/_limbic/admin/v1/audit?room_id={}", enc(&room));

    // Reading an ordinary room, or the session room itself, is no note read.
    admin.ok(Method::GET, &format!("/_synapse/admin/v1/rooms/{}/state", enc(&room)), None).await;
    assert!(admin_note_reads(&admin.ok(Method::GET, &audit_path, None).await).is_empty());

    // The notes room's state, members and details: each read recorded, against the session.
    let state = admin.ok(Method::GET, &format!("/_synapse/admin/v1/rooms/{}/state", enc(&notes_room)), None).await;
    assert!(state.to_string().contains("confidential"));
    admin.ok(Method::GET, &format!("/_synapse/admin/v1/rooms/{}/members", enc(&notes_room)), None).await;
    admin.ok(Method::GET, &format!("/_synapse/admin/v1/rooms/{}", enc(&notes_room)), None).await;
    let reads = admin_note_reads(&admin.ok(Method::GET, &audit_path, None).await);
    let what: Vec<&str> = reads.iter().map(|e| e["details"]["read"].as_str().unwrap()).collect();
    assert_eq!(what, ["state", "members", "details"], "{reads:?}");
    assert!(reads.iter().all(|e| e["room_id"] == room.as_str() && e["details"]["notes_room"] == notes_room.as_str() && e["details"]["via"] == "admin_api"), "{reads:?}");
    assert_eq!(admin.ok(Method::GET, "/_limbic/admin/v1/audit/verify", None).await["valid"], true);
}
