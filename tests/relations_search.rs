//! End-to-end tests: relations (edits, reactions, threads, bundled aggregations) and search.

mod common;

use std::time::Duration;

use common::{Client, TestServer, enc, errcode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn send(client: &Client, room: &str, kind: &str, txn: &str, content: Value) -> String {
    let path = format!("/_matrix/client/v3/rooms/{}/send/{kind}/{txn}", enc(room));
    client.ok(Method::PUT, &path, Some(content)).await["event_id"].as_str().unwrap().to_owned()
}

/// Sends an edit; waits a little first so that edits have distinct `origin_server_ts`.
async fn edit(client: &Client, room: &str, txn: &str, target: &str, text: &str) -> String {
    tokio::time::sleep(Duration::from_millis(5)).await;
    let content = json!({
        "msgtype": "m.text",
        "body": format!("* {text}"),
        "m.new_content": { "msgtype": "m.text", "body": text },
        "m.relates_to": { "rel_type": "m.replace", "event_id": target },
    });
    send(client, room, "m.room.message", txn, content).await
}

async fn react(client: &Client, room: &str, txn: &str, target: &str, key: &str) -> String {
    let content = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": target, "key": key } });
    send(client, room, "m.reaction", txn, content).await
}

async fn thread_reply(client: &Client, room: &str, txn: &str, root: &str, text: &str) -> String {
    let content = json!({
        "msgtype": "m.text",
        "body": text,
        "m.relates_to": { "rel_type": "m.thread", "event_id": root, "is_falling_back": true, "m.in_reply_to": { "event_id": root } },
    });
    send(client, room, "m.room.message", txn, content).await
}

async fn redact(client: &Client, room: &str, txn: &str, target: &str) {
    let path = format!("/_matrix/client/v3/rooms/{}/redact/{}/{txn}", enc(room), enc(target));
    client.ok(Method::PUT, &path, Some(json!({}))).await;
}

async fn event(client: &Client, room: &str, event_id: &str) -> Value {
    client.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room), enc(event_id)), None).await
}

async fn relations(client: &Client, room: &str, parent: &str, rest: &str) -> (StatusCode, Value) {
    client.get(&format!("/_matrix/client/v1/rooms/{}/relations/{}{rest}", enc(room), enc(parent))).await
}

fn ids(events: &Value) -> Vec<&str> {
    events.as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap()).collect()
}

fn find<'a>(events: &'a Value, event_id: &str) -> &'a Value {
    events.as_array().unwrap().iter().find(|e| e["event_id"] == event_id).unwrap_or_else(|| panic!("{event_id} not in {events}"))
}

/// The room's timeline events in an initial sync with a large timeline limit.
async fn sync_timeline(client: &Client, room: &str) -> Value {
    let filter = enc(&json!({ "room": { "timeline": { "limit": 100 } } }).to_string());
    let body = client.ok(Method::GET, &format!("/_matrix/client/v3/sync?filter={filter}"), None).await;
    body["rooms"]["join"][room]["timeline"]["events"].clone()
}

async fn public_room(alice: &Client, bob: &Client) -> String {
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    room
}

#[tokio::test(flavor = "multi_thread")]
async fn edits_are_bundled_and_reactions_listed() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let charlie = server.register("charlie").await;
    let room = public_room(&alice, &bob).await;

    let original = alice.send_text(&room, "t0", "see you at 10").await;
    let first = edit(&alice, &room, "e1", &original, "see you at 11").await;
    let second = edit(&alice, &room, "e2", &original, "see you at 12").await;
    // Newest of all, but by someone else: never the replacement.
    let foreign = edit(&bob, &room, "e3", &original, "hijacked").await;
    let thumbs = react(&bob, &room, "r1", &original, "👍").await;

    let bundled = event(&alice, &room, &original).await;
    let relations_of = |e: &Value| e["unsigned"]["m.relations"].clone();
    assert_eq!(relations_of(&bundled)["m.replace"]["event_id"], second, "{bundled}");
    assert_eq!(relations_of(&bundled)["m.replace"]["sender"], alice.user_id);
    assert!(relations_of(&bundled)["m.replace"]["origin_server_ts"].is_u64());
    assert!(relations_of(&bundled).get("m.annotation").is_none(), "reactions are not bundled");

    let messages = alice.messages(&room, "dir=b&limit=50").await;
    assert_eq!(relations_of(find(&messages["chunk"], &original))["m.replace"]["event_id"], second);
    let timeline = sync_timeline(&bob, &room).await;
    assert_eq!(relations_of(find(&timeline, &original))["m.replace"]["event_id"], second);

    // /relations: everything, newest first; then by rel_type and by event type.
    let (status, all) = relations(&alice, &room, &original, "").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(ids(&all["chunk"]), [thumbs.as_str(), &foreign, &second, &first]);
    assert!(all.get("next_batch").is_none());
    let (_, reactions) = relations(&alice, &room, &original, "/m.annotation").await;
    assert_eq!(ids(&reactions["chunk"]), [thumbs.as_str()]);
    assert_eq!(reactions["chunk"][0]["content"]["m.relates_to"]["key"], "👍");
    let (_, edits) = relations(&alice, &room, &original, "/m.replace/m.room.message").await;
    assert_eq!(ids(&edits["chunk"]), [foreign.as_str(), &second, &first]);
    let (_, none) = relations(&alice, &room, &original, "/m.annotation/m.room.message").await;
    assert_eq!(ids(&none["chunk"]), Vec::<&str>::new());

    // Pagination both ways.
    let (_, page) = relations(&alice, &room, &original, "?limit=3").await;
    assert_eq!(ids(&page["chunk"]), [thumbs.as_str(), &foreign, &second]);
    let next = page["next_batch"].as_str().expect("a next page").to_owned();
    let (_, page) = relations(&alice, &room, &original, &format!("?limit=3&from={}", enc(&next))).await;
    assert_eq!(ids(&page["chunk"]), [first.as_str()]);
    assert!(page.get("next_batch").is_none());
    let (_, forward) = relations(&alice, &room, &original, "/m.replace?dir=f&limit=2").await;
    assert_eq!(ids(&forward["chunk"]), [first.as_str(), &second]);
    let next = forward["next_batch"].as_str().unwrap().to_owned();
    let (_, forward) = relations(&alice, &room, &original, &format!("/m.replace?dir=f&limit=2&from={}", enc(&next))).await;
    assert_eq!(ids(&forward["chunk"]), [foreign.as_str()]);

    // Errors: garbage tokens, unknown parents, non-members.
    let (status, body) = relations(&alice, &room, &original, "?from=nonsense").await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
    let (status, body) = relations(&alice, &room, "$missing:test.local", "").await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let (status, body) = relations(&charlie, &room, &original, "").await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));

    // A redacted edit drops out: the previous edit is bundled again.
    redact(&alice, &room, "x1", &second).await;
    let bundled = event(&alice, &room, &original).await;
    assert_eq!(relations_of(&bundled)["m.replace"]["event_id"], first);
    let (_, edits) = relations(&alice, &room, &original, "/m.replace").await;
    assert_eq!(ids(&edits["chunk"]), [foreign.as_str(), &first]);
    redact(&bob, &room, "x2", &thumbs).await;
    let (_, reactions) = relations(&alice, &room, &original, "/m.annotation").await;
    assert_eq!(ids(&reactions["chunk"]), Vec::<&str>::new());

    // A redacted original loses its aggregations.
    redact(&alice, &room, "x3", &original).await;
    assert!(relations_of(&event(&alice, &room, &original).await).is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn threads_are_bundled_listed_and_paginated() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let charlie = server.register("charlie").await;
    let room = public_room(&alice, &bob).await;
    assert_eq!(charlie.join(&room).await.0, StatusCode::OK);

    let one = alice.send_text(&room, "t1", "thread one").await;
    let two = alice.send_text(&room, "t2", "thread two").await;
    let one_a = thread_reply(&bob, &room, "r1", &one, "first reply").await;
    let two_a = thread_reply(&alice, &room, "r2", &two, "reply in two").await;
    let one_b = thread_reply(&bob, &room, "r3", &one, "second reply").await;
    let fixed = edit(&bob, &room, "e1", &one_b, "second reply, edited").await;
    let reference = send(&charlie, &room, "m.room.message", "ref", json!({
        "msgtype": "m.text", "body": "see above", "m.relates_to": { "rel_type": "m.reference", "event_id": one },
    }))
    .await;

    let thread = |e: &Value| e["unsigned"]["m.relations"]["m.thread"].clone();
    let root = event(&alice, &room, &one).await;
    assert_eq!(thread(&root)["count"], 2, "{root}");
    assert_eq!(thread(&root)["latest_event"]["event_id"], one_b);
    assert_eq!(thread(&root)["latest_event"]["unsigned"]["m.relations"]["m.replace"]["event_id"], fixed);
    assert_eq!(thread(&root)["current_user_participated"], true, "alice sent the root");
    assert_eq!(root["unsigned"]["m.relations"]["m.reference"]["chunk"], json!([{ "event_id": reference }]));
    assert_eq!(thread(&event(&bob, &room, &one).await)["current_user_participated"], true);
    assert_eq!(thread(&event(&charlie, &room, &one).await)["current_user_participated"], false);
    assert_eq!(thread(&event(&charlie, &room, &two).await)["count"], 1);

    let messages = bob.messages(&room, "dir=b&limit=50").await;
    assert_eq!(thread(find(&messages["chunk"], &one))["latest_event"]["event_id"], one_b);
    let timeline = sync_timeline(&charlie, &room).await;
    assert_eq!(thread(find(&timeline, &one))["count"], 2);
    assert_eq!(thread(find(&timeline, &two))["latest_event"]["event_id"], two_a);

    // /threads: the most recently active thread first, one page at a time.
    let threads = |client: &Client, query: &str| {
        let path = format!("/_matrix/client/v1/rooms/{}/threads?{query}", enc(&room));
        let client = client.clone();
        async move { client.ok(Method::GET, &path, None).await }
    };
    let all = threads(&alice, "").await;
    assert_eq!(ids(&all["chunk"]), [one.as_str(), &two]);
    assert_eq!(thread(&all["chunk"][0])["count"], 2);
    let page = threads(&alice, "limit=1").await;
    assert_eq!(ids(&page["chunk"]), [one.as_str()]);
    let next = page["next_batch"].as_str().expect("a second page").to_owned();
    let page = threads(&alice, &format!("limit=1&from={}", enc(&next))).await;
    assert_eq!(ids(&page["chunk"]), [two.as_str()]);
    assert!(page.get("next_batch").is_none(), "{page}");
    assert_eq!(ids(&threads(&bob, "include=participated").await["chunk"]), [one.as_str()]);
    assert_eq!(ids(&threads(&charlie, "include=participated").await["chunk"]), Vec::<&str>::new());

    // Thread replies through /relations, and recursion down to the edit of a reply.
    let (_, replies) = relations(&alice, &room, &one, "/m.thread").await;
    assert_eq!(ids(&replies["chunk"]), [one_b.as_str(), &one_a]);
    let (_, direct) = relations(&alice, &room, &one, "").await;
    assert!(!ids(&direct["chunk"]).contains(&fixed.as_str()));
    assert!(direct.get("recursion_depth").is_none());
    let (_, deep) = relations(&alice, &room, &one, "?recurse=true").await;
    assert_eq!(ids(&deep["chunk"]), [reference.as_str(), &fixed, &one_b, &one_a]);
    assert_eq!(deep["recursion_depth"], 3);

    // Redacting the latest reply moves the thread back in the listing and its summary.
    redact(&bob, &room, "x1", &one_b).await;
    assert_eq!(ids(&threads(&alice, "").await["chunk"]), [two.as_str(), &one]);
    let root = event(&alice, &room, &one).await;
    assert_eq!(thread(&root)["count"], 1);
    assert_eq!(thread(&root)["latest_event"]["event_id"], one_a);

    let outsider = server.register("dave").await;
    let (status, body) = outsider.get(&format!("/_matrix/client/v1/rooms/{}/threads", enc(&room))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
}

async fn search(client: &Client, criteria: Value, next_batch: Option<&str>) -> (StatusCode, Value) {
    let path = match next_batch {
        Some(token) => format!("/_matrix/client/v3/search?next_batch={}", enc(token)),
        None => "/_matrix/client/v3/search".to_owned(),
    };
    client.post(&path, json!({ "search_categories": { "room_events": criteria } })).await
}

async fn search_ok(client: &Client, criteria: Value) -> Value {
    let (status, body) = search(client, criteria, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["search_categories"]["room_events"].clone()
}

fn result_ids(results: &Value) -> Vec<&str> {
    results["results"].as_array().unwrap().iter().map(|r| r["result"]["event_id"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn search_ranks_orders_paginates_and_filters_rooms() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let charlie = server.register("charlie").await;
    let room = alice.create_room(json!({ "preset": "private_chat", "name": "Apple orchard" })).await;

    let three = alice.send_text(&room, "s1", "Apple, banana & cherry").await;
    let two = alice.send_text(&room, "s2", "banana APPLE").await;
    let one = alice.send_text(&room, "s3", "apple").await;
    alice.send_text(&room, "s4", "nothing to see").await;
    let encrypted = send(&alice, &room, "m.room.encrypted", "s5", json!({
        "algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "apple", "session_id": "s", "sender_key": "k", "device_id": "D",
    }))
    .await;
    let name_event = {
        let state = alice.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)), None).await;
        state.as_array().unwrap().iter().find(|e| e["type"] == "m.room.name").unwrap()["event_id"].as_str().unwrap().to_owned()
    };

    // Rank: most matched terms first; equal ranks newest first. Case does not matter.
    let ranked = search_ok(&alice, json!({ "search_term": "CHERRY apple banana" })).await;
    assert_eq!(result_ids(&ranked), [three.as_str(), &two, &one, &name_event]);
    assert_eq!(ranked["count"], 4);
    assert_eq!(ranked["results"][0]["rank"], 3);
    assert_eq!(ranked["results"][3]["rank"], 1);
    assert_eq!(ranked["highlights"], json!(["apple", "banana", "cherry"]));
    assert!(!result_ids(&ranked).contains(&encrypted.as_str()));
    assert!(ranked.get("next_batch").is_none());

    let recent = search_ok(&alice, json!({ "search_term": "apple cherry", "order_by": "recent" })).await;
    assert_eq!(result_ids(&recent), [one.as_str(), &two, &three, &name_event]);

    // `keys` narrows the fields that match.
    let bodies = search_ok(&alice, json!({ "search_term": "apple", "keys": ["content.body"] })).await;
    assert_eq!(result_ids(&bodies), [one.as_str(), &two, &three]);
    let names = search_ok(&alice, json!({ "search_term": "orchard apple", "keys": ["content.name"] })).await;
    assert_eq!(result_ids(&names), [name_event.as_str()]);
    assert_eq!(names["results"][0]["rank"], 2);

    // Pagination with the filter's limit.
    let criteria = json!({ "search_term": "apple banana cherry", "filter": { "limit": 3 } });
    let (_, page) = search(&alice, criteria.clone(), None).await;
    let page = &page["search_categories"]["room_events"];
    assert_eq!(result_ids(page), [three.as_str(), &two, &one]);
    assert_eq!(page["count"], 4);
    let next = page["next_batch"].as_str().expect("a second page").to_owned();
    let (status, page) = search(&alice, criteria.clone(), Some(&next)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let page = &page["search_categories"]["room_events"];
    assert_eq!(result_ids(page), [name_event.as_str()]);
    assert!(page.get("next_batch").is_none());
    let (status, body) = search(&alice, criteria, Some("garbage")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
    let (status, body) = search(&alice, json!({ "search_term": "apple", "keys": ["content.nope"] }), None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));

    // Only rooms the user is joined to, narrowed by the filter's rooms.
    // World-readable, so that only the joined-rooms rule keeps non-members' searches out.
    let other = bob.create_room(json!({
        "preset": "public_chat",
        "initial_state": [{ "type": "m.room.history_visibility", "state_key": "", "content": { "history_visibility": "world_readable" } }],
    }))
    .await;
    let pie = bob.send_text(&other, "b1", "apple pie").await;
    assert_eq!(result_ids(&search_ok(&bob, json!({ "search_term": "apple" })).await), [pie.as_str()]);
    assert_eq!(search_ok(&charlie, json!({ "search_term": "apple" })).await["count"], 0);
    assert_eq!(alice.join(&other).await.0, StatusCode::OK);
    let everywhere = search_ok(&alice, json!({ "search_term": "apple", "order_by": "recent" })).await;
    assert_eq!(result_ids(&everywhere)[0], pie);
    assert_eq!(everywhere["count"], 5);
    let only_first = search_ok(&alice, json!({ "search_term": "apple", "filter": { "rooms": [room] } })).await;
    assert!(!result_ids(&only_first).contains(&pie.as_str()));
    assert_eq!(only_first["count"], 4);
    let not_first = search_ok(&alice, json!({ "search_term": "apple", "filter": { "not_rooms": [room] } })).await;
    assert_eq!(result_ids(&not_first), [pie.as_str()]);
    // Invited is not joined; leaving ends it too.
    assert_eq!(bob.invite(&other, &charlie.user_id).await.0, StatusCode::OK);
    assert_eq!(search_ok(&charlie, json!({ "search_term": "apple" })).await["count"], 0);
    assert_eq!(alice.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&other)), json!({})).await.0, StatusCode::OK);
    assert!(!result_ids(&search_ok(&alice, json!({ "search_term": "pie" })).await).contains(&pie.as_str()));

    // Context around a result, with the senders' profiles.
    let with_context = search_ok(&alice, json!({
        "search_term": "banana",
        "order_by": "recent",
        "event_context": { "before_limit": 1, "after_limit": 1, "include_profile": true },
    }))
    .await;
    let context = &with_context["results"][0]["context"];
    assert_eq!(with_context["results"][0]["result"]["event_id"], two);
    assert_eq!(ids(&context["events_before"]), [three.as_str()]);
    assert_eq!(ids(&context["events_after"]), [one.as_str()]);
    assert!(context["start"].is_string() && context["end"].is_string());
    assert_eq!(context["profile_info"][&alice.user_id]["displayname"], "alice");
    assert!(search_ok(&alice, json!({ "search_term": "banana" })).await["results"][0].get("context").is_none());

    // Redacted events stop matching.
    redact(&alice, &room, "x1", &three).await;
    assert_eq!(search_ok(&alice, json!({ "search_term": "cherry" })).await["count"], 0);
    assert_eq!(result_ids(&search_ok(&alice, json!({ "search_term": "banana" })).await), [two.as_str()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn search_respects_history_visibility() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = alice.create_room(json!({
        "preset": "public_chat",
        "initial_state": [{ "type": "m.room.history_visibility", "state_key": "", "content": { "history_visibility": "joined" } }],
    }))
    .await;
    let before = alice.send_text(&room, "a1", "secret plans").await;
    assert_eq!(bob.join(&room).await.0, StatusCode::OK);
    let after = alice.send_text(&room, "a2", "public plans").await;
    let found = search_ok(&bob, json!({ "search_term": "plans" })).await;
    assert_eq!(result_ids(&found), [after.as_str()]);
    let found = search_ok(&alice, json!({ "search_term": "plans", "order_by": "recent" })).await;
    assert_eq!(result_ids(&found), [after.as_str(), &before]);

    // Relations of an event bob cannot see are not his to read.
    let reply = thread_reply(&alice, &room, "a3", &before, "more plans").await;
    let (status, _) = relations(&bob, &room, &before, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, visible) = relations(&alice, &room, &before, "/m.thread").await;
    assert_eq!(ids(&visible["chunk"]), [reply.as_str()]);
}
