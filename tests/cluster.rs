//! Several `limbic` nodes on one PostgreSQL database (issue 18, docs/SCALING.md): any request may
//! land on any node, and every node serves the same rooms in the same order.

mod common;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Client, TestServer, calls, enc, errcode, signalling::Signalling};
use livekit_protocol as lk;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Ana, signed in through node `a`, and Ben, signed in through node `b`, joined to a room Ana made.
async fn two_members(a: &TestServer, b: &TestServer) -> (Client, Client, String) {
    let ana = a.register("ana").await;
    let ben = a.register("ben").await.through(b);
    let room = ana.create_room(json!({ "preset": "private_chat", "invite": [ben.user_id] })).await;
    let (status, body) = ben.join(&room).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (ana, ben, room)
}

/// The messages of the room in a sync response, in order.
fn messages_in(sync: &Value, room: &str) -> Vec<String> {
    let events = sync["rooms"]["join"][room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    events.iter().filter(|event| event["type"] == "m.room.message").map(|event| event["event_id"].as_str().unwrap().to_owned()).collect()
}

/// A sync that returns every new event (no gap), waiting up to `timeout_ms`.
async fn sync_all(client: &Client, since: &str, timeout_ms: u64) -> Value {
    let filter = enc(&json!({ "room": { "timeline": { "limit": 1000 } } }).to_string());
    client.ok(Method::GET, &format!("/_matrix/client/v3/sync?timeout={timeout_ms}&since={}&filter={filter}", enc(since)), None).await
}

/// The room's messages as a node serves them (`/messages`, oldest first).
async fn history(client: &Client, room: &str) -> Vec<String> {
    let page = client.messages(room, "dir=b&limit=1000").await;
    let mut ids: Vec<String> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["type"] == "m.room.message")
        .map(|event| event["event_id"].as_str().unwrap().to_owned())
        .collect();
    ids.reverse();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_sent_through_one_node_wakes_a_long_poll_on_another() {
    let a = TestServer::start_cluster(&[]).await;
    let c = a.start_node("c").await;
    let (ana, ben, room) = two_members(&a, &c).await;
    let mut since = ben.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let mut delays = Vec::new();
    for i in 0..3 {
        let poll = tokio::spawn({
            let (ben, since) = (ben.clone(), since.clone());
            async move { (sync_all(&ben, &since, 30_000).await, Instant::now()) }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!poll.is_finished(), "the long-poll waits for news");
        let sent_id = ana.send_text(&room, &format!("t{i}"), "hello").await;
        let sent = Instant::now();
        let (sync, woken) = poll.await.unwrap();
        assert_eq!(messages_in(&sync, &room), [sent_id]);
        delays.push(woken.saturating_duration_since(sent));
        since = sync["next_batch"].as_str().unwrap().to_owned();
    }
    // Woken by node a's notification, not by node c's poll of the database every second.
    delays.sort();
    assert!(delays[1] <= Duration::from_millis(100), "{delays:?}");
}

/// Time enough for a change announced through one node to reach the others on a busy machine
/// (it takes milliseconds).
const NOTIFIED: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread")]
async fn push_rules_changed_through_one_node_apply_to_what_another_sends() {
    let a = TestServer::start_cluster(&[]).await;
    let b = a.start_node("b").await;
    let (ana, ben, room) = two_members(&a, &b).await;
    let notified = |ben: Client| async move {
        let list = ben.ok(Method::GET, "/_matrix/client/v3/notifications", None).await;
        list["notifications"].as_array().unwrap().iter().filter_map(|n| Some(n["event"]["content"]["body"].as_str()?.to_owned())).collect::<Vec<_>>()
    };
    // Node a evaluates (and keeps) Ben's rules for the first message.
    ana.send_text(&room, "t1", "before").await;
    let rule = format!("/_matrix/client/v3/pushrules/global/room/{}", enc(&room));
    ben.ok(Method::PUT, &rule, Some(json!({ "actions": [] }))).await;
    // The change reaches node a a moment after its write commits (a notification).
    tokio::time::sleep(NOTIFIED).await;
    ana.send_text(&room, "t2", "muted").await;
    let (status, body) = ben.request(Method::DELETE, &rule, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    tokio::time::sleep(NOTIFIED).await;
    ana.send_text(&room, "t3", "after").await;
    assert_eq!(notified(ben.clone()).await, ["after", "before"], "the muted message is not notified (messages only, newest first)");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_sends_through_two_nodes_make_one_history_on_every_node() {
    let a = TestServer::start_cluster(&[]).await;
    let b = a.start_node("b").await;
    let (ana, ben, room) = two_members(&a, &b).await;
    let senders = [ana.clone(), ana.through(&b), ben.clone(), ben.through(&a)];
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(sender, client)| {
            let room = room.clone();
            tokio::spawn(async move {
                let mut sent = Vec::new();
                for i in 0..15 {
                    sent.push(client.send_text(&room, &format!("s{sender}-{i}"), &format!("{sender}.{i}")).await);
                }
                sent
            })
        })
        .collect();
    let mut by_sender = Vec::new();
    for task in tasks {
        by_sender.push(task.await.unwrap());
    }
    let on_a = history(&ana, &room).await;
    assert_eq!(on_a, history(&ana.through(&b), &room).await, "the same order through either node");
    let acknowledged: HashSet<&String> = by_sender.iter().flatten().collect();
    assert_eq!((on_a.len(), on_a.iter().collect::<HashSet<_>>()), (60, acknowledged), "every acknowledged message, once");
    // Each sender's messages, sent one after the other, stay in their order.
    for sent in &by_sender {
        let positions: Vec<usize> = sent.iter().map(|id| on_a.iter().position(|h| h == id).unwrap()).collect();
        assert!(positions.is_sorted(), "{positions:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_mid_commit_loses_nothing_acknowledged_and_no_event_appears_behind_a_sync() {
    let mut a = TestServer::start_cluster(&[]).await;
    let b = a.start_node("b").await;
    let (ana, ben, room) = two_members(&a, &b).await;
    // Ben follows the room through node b the whole time, from before the first message.
    let since = ben.sync(None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let follower = tokio::spawn({
        let (ben, room, stop) = (ben.clone(), room.clone(), stop.clone());
        async move {
            let (mut since, mut seen) = (since, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let sync = sync_all(&ben, &since, 500).await;
                seen.extend(messages_in(&sync, &room));
                since = sync["next_batch"].as_str().unwrap().to_owned();
            }
            seen
        }
    });
    // Ana sends through node a from four tasks at once until it dies under them.
    let senders: Vec<_> = (0..4)
        .map(|sender| {
            let (ana, room) = (ana.clone(), room.clone());
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for i in 0.. {
                    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/k{sender}-{i}", enc(&room));
                    let mut request = ana.http.put(format!("{}{path}", ana.base)).bearer_auth(ana.token.as_deref().unwrap());
                    request = request.json(&json!({ "msgtype": "m.text", "body": format!("{sender}.{i}") }));
                    match request.send().await {
                        Ok(response) if response.status() == StatusCode::OK => {
                            acknowledged.push(response.json::<Value>().await.unwrap()["event_id"].as_str().unwrap().to_owned());
                        }
                        _ => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill9();
    let mut acknowledged = Vec::new();
    for sender in senders {
        acknowledged.extend(sender.await.unwrap());
    }
    assert!(acknowledged.len() >= 10, "node a served sends before it died: {}", acknowledged.len());
    // Node b goes on serving, writes included.
    let after = ana.through(&b).send_text(&room, "after", "after the crash").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let on_b = history(&ben, &room).await;
        if on_b.contains(&after) {
            break;
        }
        assert!(Instant::now() < deadline, "node b serves the message sent through it");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = follower.await.unwrap();
    let on_b = history(&ben, &room).await;
    let stored: HashSet<&String> = on_b.iter().collect();
    assert!(acknowledged.iter().all(|id| stored.contains(id)), "every acknowledged message is kept");
    // Incremental syncs saw exactly the history, in its order: no event was committed below a
    // position Ben had already synced past (it would never have reached his syncs).
    assert_eq!(seen, on_b);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_appointment_booked_and_its_link_redeemed_through_two_nodes_at_once_happen_once() {
    let secret = "booking-service-secret";
    let a = TestServer::start_cluster(&[("LIMBIC_APPOINTMENTS__SHARED_SECRET", secret), ("LIMBIC_APPOINTMENTS__JWT_SECRET", "link-secret")]).await;
    let b = a.start_node("b").await;
    let admin = a.register_admin("admin").await;
    let therapist = a.register("therapist").await;
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
    let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 + 3_600_000;
    let appointment = json!({
        "appointment_id": "appt-1", "therapist": therapist.user_id, "client": "@alice:test.local", "title": "Intake",
        "starts_at": start, "ends_at": start + 3_600_000, "timezone": "Europe/Berlin",
    });
    let book = |node: &TestServer| {
        let mut service = node.client();
        service.token = Some(secret.to_owned());
        let appointment = appointment.clone();
        async move { service.post("/_limbic/service/v1/appointments", appointment).await }
    };
    // The booking service retries through another node: one appointment, one room.
    let ((status_a, booked_a), (status_b, booked_b)) = tokio::join!(book(&a), book(&b));
    assert_eq!((status_a, status_b), (StatusCode::OK, StatusCode::OK), "{booked_a} {booked_b}");
    assert_eq!(booked_a["room_id"], booked_b["room_id"], "one room for the appointment");
    // Alice's link, opened twice at once through both nodes, signs her in once.
    let link = booked_a["links"]["@alice:test.local"].as_str().unwrap();
    let token = link.rsplit_once("?token=").unwrap().1.to_owned();
    let login = |node: &TestServer| {
        let (client, token) = (node.client(), token.clone());
        async move { client.post("/_matrix/client/v3/login", json!({ "type": "org.matrix.login.jwt", "token": token })).await }
    };
    let ((status_a, _), (status_b, _)) = tokio::join!(login(&a), login(&b));
    let mut statuses = [status_a, status_b];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::FORBIDDEN], "one sign-in, whichever node answered first");
}

/// Waits until `client` reads a message with `body` in `room`.
async fn eventually_reads(client: &Client, room: &str, body: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = client.messages(room, "dir=b&limit=50").await;
        if page["chunk"].as_array().is_some_and(|chunk| chunk.iter().any(|event| event["content"]["body"] == body)) {
            return;
        }
        assert!(Instant::now() < deadline, "{} never read {body:?}: {page}", client.user_id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_node_sending_to_other_servers_dies_another_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::federation::test_ca(dir.path());
    let remote = common::federation::federated(&ca, "").await;
    // The clinic's server name points at node a's federation port; node b has its own.
    let mut a = common::federation::federated_cluster(&ca).await;
    let b_port = common::free_port().to_string();
    let b = a.server.start_node_with("b", &[("LIMBIC_FEDERATION__PORT", &b_port)]).await;
    let alice = a.server.register("alice").await;
    let rita = remote.server.register("rita").await;
    let room = alice.create_room(json!({ "preset": "public_chat" })).await;
    rita.ok(Method::POST, &format!("/_matrix/client/v3/join/{}?via={}", enc(&room), enc(&a.name)), Some(json!({}))).await;
    // Node a, started first, sends for the cluster; what is queued through node b wakes it.
    alice.through(&b).send_text(&room, "b1", "queued through b").await;
    eventually_reads(&rita, &room, "queued through b").await;
    a.server.kill9();
    // Node b takes the sender over within seconds, and sends what is queued through it.
    alice.through(&b).send_text(&room, "b2", "after a died").await;
    eventually_reads(&rita, &room, "after a died").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registration_nonce_issued_by_one_node_registers_once_through_another() {
    let a = TestServer::start_cluster(&[]).await;
    let b = a.start_node("b").await;
    let nonce = a.client().ok(Method::GET, "/_synapse/admin/v1/register", None).await["nonce"].as_str().unwrap().to_owned();
    let register = |username: &str| json!({
        "nonce": nonce, "username": username, "password": "pw", "admin": false, "mac": common::admin_mac(&nonce, username, "pw", false),
    });
    b.client().ok(Method::POST, "/_synapse/admin/v1/register", Some(register("henry"))).await;
    let (status, body) = a.client().post("/_synapse/admin/v1/register", register("henry2")).await;
    assert!(matches!(status, StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN), "a nonce is used once, on any node: {status} {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_therapist_booked_through_two_nodes_at_once_is_never_double_booked() {
    let a = TestServer::start_cluster(&[]).await;
    let b = a.start_node("b").await;
    let admin = a.register_admin("admin").await;
    let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 + 3_600_000;
    let session = |offset: u64| json!({ "kind": "group", "title": "Group", "starts_at": start + offset, "ends_at": start + offset + 3_600_000, "timezone": "Europe/Berlin", "participants": [] });
    let mut pairs = Vec::new();
    for i in 0..6 {
        let therapist = a.register(&format!("therapist{i}")).await;
        admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(json!({ "verified": true }))).await;
        // Two overlapping sessions of the therapist, asked for at the same moment through both nodes.
        let (through_a, through_b) = (therapist.clone(), therapist.through(&b));
        let (first, second) = (session(0), session(1_800_000));
        pairs.push(tokio::spawn(async move {
            let ((status_a, body_a), (status_b, body_b)) =
                tokio::join!(through_a.post("/_limbic/client/v1/sessions", first), through_b.post("/_limbic/client/v1/sessions", second));
            (status_a, body_a, status_b, body_b)
        }));
    }
    for pair in pairs {
        let (status_a, body_a, status_b, body_b) = pair.await.unwrap();
        let created = [status_a, status_b].iter().filter(|status| **status == StatusCode::OK).count();
        assert_eq!(created, 1, "one of two overlapping sessions: {status_a} {body_a} / {status_b} {body_b}");
        for (status, body) in [(status_a, &body_a), (status_b, &body_b)] {
            assert!(
                matches!(status, StatusCode::OK | StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE),
                "refused as double-booked, or to be tried again: {status} {body}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_cut_off_from_the_database_stops_and_starts_again_as_a_node() {
    let mut a = TestServer::start_cluster(&[]).await;
    let b = a.start_node("b").await;
    let (ana, _ben, room) = two_members(&a, &b).await;
    // Node a's own session ends (a network cut, a restarted database): the others fence it, and
    // it stops rather than answer every write with an error.
    a.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'limbic test (node)' AND datname = current_database()");
    let status = a.exited_within(Duration::from_secs(20)).await.expect("a fenced node stops");
    assert!(!status.success(), "it says so in its exit status: {status}");
    ana.through(&b).send_text(&room, "b1", "node b serves on").await;
    // Started again, it is a node again, and serves what was written meanwhile.
    a.start_again().await;
    let sent = ana.send_text(&room, "a1", "node a is back").await;
    let on_a = history(&ana, &room).await;
    assert_eq!(on_a.len(), 2, "{on_a:?}");
    assert_eq!(on_a.last(), Some(&sent));
}

/// A call token for `client` in `room`, asked of node `through`: the signalling URL it names,
/// and the token.
async fn call_token(through: &TestServer, client: &Client, room: &str) -> (String, String) {
    let (status, answer) = calls::token(through, client, room).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    (answer["url"].as_str().unwrap().to_owned(), answer["jwt"].as_str().unwrap().to_owned())
}

/// Which of `nodes` a signalling URL names.
fn node_at(url: &str, nodes: &[&TestServer]) -> usize {
    nodes.iter().position(|node| url == format!("ws://127.0.0.1:{}", node.port)).unwrap_or_else(|| panic!("{url} is none of the nodes"))
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_are_placed_on_the_nodes_and_a_dead_nodes_calls_move_on_the_next_join() {
    let a = TestServer::start_cluster(&[]).await;
    let b = a.start_node("b").await;
    let (ana, ben, first) = two_members(&a, &b).await;
    let second = ana.create_room(json!({ "preset": "private_chat", "invite": [ben.user_id] })).await;
    ben.join(&second).await;
    let eve = a.register("eve").await;

    // Two calls land on the two nodes, each token naming its node; whoever asks, and through
    // whichever node, is sent to the call's node.
    let (first_url, ana_jwt) = call_token(&a, &ana, &first).await;
    let (second_url, _) = call_token(&b, &ana, &second).await;
    let mut nodes = [a, b];
    let serving = node_at(&first_url, &[&nodes[0], &nodes[1]]);
    let other = 1 - serving;
    assert_eq!(node_at(&second_url, &[&nodes[0], &nodes[1]]), other, "the second call goes to the node without one");
    let (ben_url, ben_jwt) = call_token(&nodes[other], &ben, &first).await;
    assert_eq!(ben_url, first_url);
    let names = ["test", "b"];
    assert_eq!(calls::claims(&ana_jwt)["org.limbic.node"], names[serving]);
    // A stranger gets no token from either node.
    for node in &nodes {
        assert_eq!(calls::token(node, &eve, &first).await.0, StatusCode::FORBIDDEN);
    }

    // The other node refuses the call's tokens: they name the call's node.
    let (status, body) = Signalling::connect(&nodes[other], &ana_jwt).await.err().expect("refused on the other node");
    assert!(status == 403 && body.contains("served by node"), "{status} {body}");
    let _ana_call = Signalling::join(&nodes[serving], &ana_jwt).await;
    let mut ben_call = Signalling::join(&nodes[serving], &ben_jwt).await;

    // Moderation asked of the other node is answered by the call's node, which has the call.
    let sfu_room = calls::claims(&ana_jwt)["video"]["room"].as_str().unwrap().to_owned();
    let (status, listed) = moderate(&nodes[other], &ana_jwt, "ListParticipants", json!({ "room": sfu_room })).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let identities: HashSet<&str> = listed["participants"].as_array().unwrap().iter().map(|p| p["identity"].as_str().unwrap()).collect();
    assert_eq!(identities, HashSet::from([calls::claims(&ana_jwt)["sub"].as_str().unwrap(), calls::claims(&ben_jwt)["sub"].as_str().unwrap()]));
    let (status, _) = moderate(&nodes[other], &ana_jwt, "RemoveParticipant", json!({ "room": sfu_room, "identity": calls::claims(&ben_jwt)["sub"] })).await;
    assert_eq!(status, StatusCode::OK);
    assert!(ben_call.left_because(Duration::from_secs(2)).await.is_some(), "ben is removed from the call on its node");
    // Ben's token is Ben's: it does not moderate, through either node.
    for node in &nodes {
        assert_eq!(moderate(node, &ben_jwt, "ListParticipants", json!({ "room": sfu_room })).await.0, StatusCode::FORBIDDEN);
    }

    // The call's node dies: the next token for the call names the other node, which admits it.
    nodes[serving].kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (moved_url, moved_jwt) = loop {
        let (url, jwt) = call_token(&nodes[other], &ana, &first).await;
        if node_at(&url, &[&nodes[0], &nodes[1]]) == other {
            break (url, jwt);
        }
        assert!(Instant::now() < deadline, "the call did not move from the dead node");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(calls::claims(&moved_jwt)["org.limbic.node"], names[other], "{moved_url}");
    let _moved = Signalling::join(&nodes[other], &moved_jwt).await;
}

/// A LiveKit RoomService request with call token `jwt`, through `node`.
async fn moderate(node: &TestServer, jwt: &str, method: &str, body: Value) -> (StatusCode, Value) {
    let answer = reqwest::Client::new().post(format!("{}/twirp/livekit.RoomService/{method}", node.base)).bearer_auth(jwt).json(&body).send().await.unwrap();
    (answer.status(), answer.json().await.unwrap())
}

/// Two nodes, and an open group session that allows recording: its therapist, client and room.
async fn recordable_session() -> (TestServer, TestServer, Client, Client, String) {
    let a = TestServer::start_cluster(&[]).await;
    let b = a.start_node("b").await;
    let (therapist, client, _observer, room) = calls::group_session_with(&a, json!({ "recording_policy": "with_consent" })).await;
    calls::set_status(&therapist, &room, "open").await;
    (a, b, therapist, client, room)
}

/// What ends or stops a session's call, committed through another node than the call's, reaches
/// the call's node: a recording started there, a withdrawn consent, the session's end.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_call_follows_what_is_done_through_another_node() {
    let (a, b, therapist, client, room) = recordable_session().await;
    let consent_path = |who: &Client| format!("/_matrix/client/v3/rooms/{}/state/org.limbic.recording.consent/{}", enc(&room), enc(&who.user_id));
    for who in [&therapist, &client] {
        who.ok(Method::PUT, &consent_path(who), Some(json!({ "consent": true }))).await;
    }
    let (url, therapist_jwt) = call_token(&a, &therapist, &room).await;
    let (_, client_jwt) = call_token(&a, &client, &room).await;
    let nodes = [&a, &b];
    let (serving, other) = (nodes[node_at(&url, &nodes)], nodes[1 - node_at(&url, &nodes)]);
    let mut therapist_call = Signalling::join(serving, &therapist_jwt).await;
    let mut client_call = Signalling::join(serving, &client_jwt).await;
    let (therapist_there, client_there) = (therapist.through(other), client.through(other));

    // A recording started and stopped through the other node is made on the call's node.
    let recording = format!("/_limbic/client/v1/sessions/{}/recording", enc(&room));
    assert_eq!(therapist_there.ok(Method::PUT, &recording, Some(json!({ "recording": true }))).await["recording"], true);
    let (status, body) = therapist_there.put(&recording, json!({ "recording": true })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_STATE"), "the call's node knows it records: {body}");
    let stopped = therapist_there.ok(Method::PUT, &recording, Some(json!({ "recording": false }))).await;
    assert_eq!(stopped["recording"], false, "{stopped}");
    // The client may not start one, through either node.
    for who in [&client, &client_there] {
        assert_eq!(who.put(&recording, json!({ "recording": true })).await.0, StatusCode::FORBIDDEN);
    }

    // Recording again, the client withdraws consent through the other node: the call's node
    // stops the recording, before the withdrawal is answered.
    therapist.ok(Method::PUT, &recording, Some(json!({ "recording": true }))).await;
    client_there.ok(Method::PUT, &consent_path(&client), Some(json!({ "consent": false }))).await;
    let state = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/org.limbic.recording/", enc(&room)), None).await;
    assert_eq!(state["recording"], false, "still recording after the withdrawal through the other node: {state}");
    assert!(state["stopped_because"].as_str().is_some_and(|why| why.contains("withdrew")), "{state}");

    // Recording once more, the session ends through the other node: the recording stops, with
    // the reason, before the status change is answered, and the call ends on its node.
    client.ok(Method::PUT, &consent_path(&client), Some(json!({ "consent": true }))).await;
    therapist.ok(Method::PUT, &recording, Some(json!({ "recording": true }))).await;
    calls::set_status(&therapist_there, &room, "in_progress").await;
    calls::set_status(&therapist_there, &room, "completed").await;
    let state = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/org.limbic.recording/", enc(&room)), None).await;
    assert_eq!((state["recording"].clone(), state["stopped_because"].clone()), (json!(false), json!("the session ended")), "{state}");
    assert_eq!(therapist_call.left_because(Duration::from_secs(2)).await, Some(lk::DisconnectReason::RoomClosed));
    assert_eq!(client_call.left_because(Duration::from_secs(2)).await, Some(lk::DisconnectReason::RoomClosed));
}

/// A session's call recording on one of two nodes, its therapist's consent given, the
/// therapist in the call and acting through the other node.
struct Recording {
    nodes: [TestServer; 2],
    /// Which of `nodes` serves the call, and the other.
    serving: usize,
    other: usize,
    therapist: Client,
    client: Client,
    room: String,
    /// Where the serving node writes the recording as it is made.
    spooled: std::path::PathBuf,
    _call: Signalling,
}

async fn recording_on_one_of_two_nodes() -> Recording {
    let (a, b, therapist, client, room) = recordable_session().await;
    therapist.ok(Method::PUT, &format!("/_matrix/client/v3/rooms/{}/state/org.limbic.recording.consent/{}", enc(&room), enc(&therapist.user_id)), Some(json!({ "consent": true }))).await;
    let (url, jwt) = call_token(&a, &therapist, &room).await;
    let nodes = [a, b];
    let serving = node_at(&url, &[&nodes[0], &nodes[1]]);
    let other = 1 - serving;
    let call = Signalling::join(&nodes[serving], &jwt).await;
    let therapist = therapist.through(&nodes[other]);
    therapist.ok(Method::PUT, &format!("/_limbic/client/v1/sessions/{}/recording", enc(&room)), Some(json!({ "recording": true }))).await;
    let names = ["test", "b"];
    let spooled = nodes[0].media_dir().join("recordings").join(names[serving]).join(hex::encode(room.as_bytes()));
    assert!(spooled.is_dir(), "the recording is made in its node's directory: {}", spooled.display());
    Recording { nodes, serving, other, therapist, client, room, spooled, _call: call }
}

/// Waits until the room's recording is on record as one the server stopped for, and what the
/// dead node recorded (`spooled`) is gone: the storing node removes it only once its record is
/// committed, so that a crash in between loses nothing.
async fn stored_as_stopped_by_the_server(therapist: &Client, room: &str, spooled: &std::path::Path, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let state = therapist.ok(Method::GET, &format!("/_matrix/client/v3/rooms/{}/state/org.limbic.recording/", enc(room)), None).await;
        if state["recording"] == false {
            assert_eq!(state["stopped_because"], "the server stopped during the recording", "{state}");
            break;
        }
        assert!(Instant::now() < deadline, "the dead node's recording was not stored: {state}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while spooled.exists() {
        assert!(Instant::now() < deadline, "what the dead node recorded was stored but not removed: {}", spooled.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node dies while it records a session's call: the node the call moves to stores what the
/// dead node recorded (its directory of recordings is in the media directory the nodes share)
/// and says why the recording stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_recording_whose_node_dies_is_stored_by_the_node_its_call_moves_to() {
    let Recording { mut nodes, serving, other, therapist, client, room, spooled, _call } = recording_on_one_of_two_nodes().await;
    nodes[serving].kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    while node_at(&call_token(&nodes[other], &client, &room).await.0, &[&nodes[0], &nodes[1]]) != other {
        assert!(Instant::now() < deadline, "the call did not move from the dead node");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Moved by this token, or released by the sweep a moment before (which may still be storing).
    stored_as_stopped_by_the_server(&therapist, &room, &spooled, Duration::from_secs(10)).await;
}

/// A node dies while it records a call, and nobody joins that call again: a sweep of the node
/// that leads them stores the recording all the same, within seconds of the death.
#[tokio::test(flavor = "multi_thread")]
async fn a_recording_whose_node_dies_is_stored_without_another_join() {
    let Recording { mut nodes, serving, other, therapist, room, spooled, _call, .. } = recording_on_one_of_two_nodes().await;
    nodes[serving].kill9();
    stored_as_stopped_by_the_server(&therapist, &room, &spooled, Duration::from_secs(30)).await;
    // The call was released: the next token places it on the live node.
    assert_eq!(node_at(&call_token(&nodes[other], &therapist, &room).await.0, &[&nodes[0], &nodes[1]]), other);
}

/// An access token signed out through one node is refused by the other at once, though that
/// node had kept it (each node keeps the tokens it has read valid until a removal is announced);
/// and one the other node never saw is refused as well.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_signed_out_through_one_node_is_refused_by_the_other() {
    let a = TestServer::start_cluster(&[]).await;
    let b = a.start_node("b").await;
    let (ana, ben, _room) = two_members(&a, &b).await;
    const WHOAMI: &str = "/_matrix/client/v3/account/whoami";
    let ana_on_b = ana.through(&b);
    assert_eq!(ana_on_b.ok(Method::GET, WHOAMI, None).await["user_id"], ana.user_id.as_str(), "b keeps her token from now on");
    ana.ok(Method::POST, "/_matrix/client/v3/logout", Some(json!({}))).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (status, body) = ana_on_b.get(WHOAMI).await;
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(errcode(&body), "M_UNKNOWN_TOKEN", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "node b still accepts the signed-out token: {status} {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Ben (joined through b) signs out through b: a, which never read his token, refuses it too.
    let ben_on_a = ben.through(&a);
    ben.ok(Method::POST, "/_matrix/client/v3/logout", Some(json!({}))).await;
    assert_eq!(ben_on_a.get(WHOAMI).await.0, StatusCode::UNAUTHORIZED);
}

/// A sliding sync connection started through one node goes on through another, which passes
/// each request to the node holding the connection; once that node is gone, the client is told
/// to start a new connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_sliding_sync_connection_goes_on_through_another_node() {
    let mut a = TestServer::start_cluster(&[]).await;
    let b = a.start_node("b").await;
    let (ana, ben, room) = two_members(&a, &b).await;
    const SLIDING: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
    let request = json!({ "conn_id": "main", "lists": { "all": { "ranges": [[0, 9]], "timeline_limit": 5 } } });
    let first = ana.ok(Method::POST, SLIDING, Some(request.clone())).await;
    let pos = first["pos"].as_str().unwrap().to_owned();

    // Through node b, long-polling: Ben's message wakes it, and it carries the message.
    let ana_there = ana.through(&b);
    let (path, body) = (format!("{SLIDING}?pos={}&timeout=10000", enc(&pos)), request.clone());
    let waiting = tokio::spawn(async move { ana_there.ok(Method::POST, &path, Some(body)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = ben.send_text(&room, "s1", "through b").await;
    let next = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("woken").unwrap();
    let timeline: Vec<&str> = next["rooms"][&room]["timeline"].as_array().unwrap().iter().filter_map(|event| event["event_id"].as_str()).collect();
    assert!(timeline.contains(&sent.as_str()), "{next}");
    let pos = next["pos"].as_str().unwrap().to_owned();

    // Node a, which held the connection, dies: node b says to start a new one.
    a.kill9();
    let path = format!("{SLIDING}?pos={}&timeout=0", enc(&pos));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = ana.through(&b).post(&path, request.clone()).await;
        if status == StatusCode::BAD_REQUEST {
            assert_eq!(errcode(&body), "M_UNKNOWN_POS", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ana.through(&b).ok(Method::POST, SLIDING, Some(request)).await["lists"]["all"]["count"], 1, "a new connection");
}

/// An event a node keeps once read is forgotten when another node redacts it: the redaction's
/// write announces the change to every node.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_redacted_through_one_node_is_read_redacted_through_the_other() {
    let a = TestServer::start_cluster(&[]).await;
    let b = a.start_node("b").await;
    let (ana, ben, room) = two_members(&a, &b).await; // Ben's requests go through b.
    let event_id = ana.send_text(&room, "t1", "said in haste").await;
    let event_path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&event_id));
    // Ben reads it through b, which keeps it from now on.
    assert_eq!(ben.ok(Method::GET, &event_path, None).await["content"]["body"], "said in haste");
    ana.ok(Method::PUT, &format!("/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room), enc(&event_id)), Some(json!({}))).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let event = ben.ok(Method::GET, &event_path, None).await;
        if event["content"] == json!({}) {
            assert!(event["unsigned"]["redacted_because"].is_object(), "{event}");
            break;
        }
        assert!(Instant::now() < deadline, "node b still serves the event as it was: {event}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
