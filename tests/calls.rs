//! End-to-end tests: MatrixRTC discovery and the call-token service (MSC4195 `/get_token` and
//! the earlier `/sfu/get`), with the clinic's rules on who may join a call with what rights;
//! LiveKit signalling (`/rtc`) checking those rights again when a token is used, and dropping
//! participants whose rights end during the call; the limits on what one participant uses.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::{
    Client, TestServer,
    calls::{SERVICE, claims, group_session, jwt, openid, set_status, token},
    enc, errcode,
    signalling::{Signalling, join_request},
};
use livekit_protocol as lk;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};


async fn legacy_token(server: &TestServer, client: &Client, room: &str) -> (StatusCode, Value) {
    let body = json!({ "room": room, "openid_token": openid(client).await, "device_id": client.device_id });
    server.client().post(&format!("{SERVICE}/sfu/get"), body).await
}


#[tokio::test]
async fn discovery_names_the_token_service() {
    let server = TestServer::start().await;
    let ana = server.register("ana").await;
    let (_, well_known) = server.client().get("/.well-known/matrix/client").await;
    let foci = well_known["org.matrix.msc4143.rtc_foci"].as_array().expect("rtc_foci");
    assert_eq!(foci[0]["type"], "livekit");
    assert!(foci[0]["livekit_service_url"].as_str().unwrap().ends_with(SERVICE), "{well_known}");
    for path in ["/_matrix/client/v1/rtc/transports", "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports"] {
        let transports = ana.ok(Method::GET, path, None).await;
        assert_eq!(transports["rtc_transports"], json!(foci), "{path}");
        let (status, _) = server.client().get(path).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} without a token");
    }
}

/// `GET /voip/turnServer` hands out coturn REST credentials (Synapse's answer), and LiveKit's
/// join response the same for the participant; without TURN URIs the answer is empty.
#[tokio::test]
async fn turn_credentials_for_users_and_participants() {
    const SECRET: &str = "a-secret-shared-with-coturn";
    let voip = format!("[voip]\nturn_uris = [\"turn:turn.test.local:3478?transport=udp\", \"turns:turn.test.local:5349?transport=tcp\"]\nturn_shared_secret = \"{SECRET}\"\nturn_user_lifetime = 600\n");
    let server = TestServer::start_with_toml(&voip, &[]).await;
    let ana = server.register("ana").await;
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let turn = ana.ok(Method::GET, "/_matrix/client/v3/voip/turnServer", None).await;
    assert_eq!(turn["uris"], json!(["turn:turn.test.local:3478?transport=udp", "turns:turn.test.local:5349?transport=tcp"]));
    assert_eq!(turn["ttl"], 600);
    let username = turn["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, ana.user_id);
    let expiry: u64 = expiry.parse().unwrap();
    assert!((before + 600..=before + 602).contains(&expiry), "{expiry} from {before}");
    assert_eq!(turn["password"], turn_password(SECRET, username));
    let (status, body) = server.client().get("/_matrix/client/v3/voip/turnServer").await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"));

    let room = ana.create_room(json!({ "preset": "private_chat" })).await;
    let (_call, join) = Signalling::join_with_response(&server, &jwt(&server, &ana, &room).await).await;
    let [ice] = join.ice_servers.as_slice() else { panic!("one ICE server entry: {:?}", join.ice_servers) };
    assert_eq!(ice.urls, ["turn:turn.test.local:3478?transport=udp", "turns:turn.test.local:5349?transport=tcp"]);
    assert!(ice.username.ends_with(&format!(":{}", ana.user_id)), "{}", ice.username);
    assert_eq!(ice.credential, turn_password(SECRET, &ice.username));

    let plain = TestServer::start().await;
    let ben = plain.register("ben").await;
    assert_eq!(ben.ok(Method::GET, "/_matrix/client/v3/voip/turnServer", None).await, json!({}));
    let room = ben.create_room(json!({ "preset": "private_chat" })).await;
    assert!(Signalling::join_with_response(&plain, &jwt(&plain, &ben, &room).await).await.1.ice_servers.is_empty());
}

/// coturn's check of a REST credential: base64(HMAC-SHA1(secret, username)).
fn turn_password(secret: &str, username: &str) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// LiveKit's resume: a participant whose signalling dropped comes back on a new connection with
/// `reconnect=1&sid=`, unseen by the others; another member's token cannot take their place,
/// and a sid nobody holds is told to join afresh.
#[tokio::test]
async fn a_dropped_participant_resumes_and_nobody_else_can() {
    let server = TestServer::start().await;
    let (ana, ben, cat) = (server.register("ana").await, server.register("ben").await, server.register("cat").await);
    let room = ana.create_room(json!({ "preset": "private_chat", "invite": [ben.user_id, cat.user_id] })).await;
    ben.join(&room).await;
    cat.join(&room).await;
    let (mut ana_call, ana_join) = Signalling::join_with_response(&server, &jwt(&server, &ana, &room).await).await;
    let ana_identity = ana_join.participant.unwrap().identity;
    let ben_jwt = jwt(&server, &ben, &room).await;
    let (ben_call, join) = Signalling::join_with_response(&server, &ben_jwt).await;
    let ben_sid = join.participant.unwrap().sid;
    drop(ben_call);

    let refused = |message: Option<lk::signal_response::Message>| matches!(message, Some(lk::signal_response::Message::Leave(leave)) if leave.action == lk::leave_request::Action::Reconnect as i32);
    let mut cat_call = Signalling::resume(&server, &jwt(&server, &cat, &room).await, &ben_sid).await.expect("the upgrade");
    assert!(refused(cat_call.next().await), "cat took ben's place");
    let mut unknown = Signalling::resume(&server, &ben_jwt, "PA_nobody").await.expect("the upgrade");
    assert!(refused(unknown.next().await), "an unknown sid resumed");

    let mut resumed = Signalling::resume(&server, &ben_jwt, &ben_sid).await.expect("the upgrade");
    let first = tokio::time::timeout(Duration::from_secs(5), resumed.next()).await.expect("an answer in time");
    assert!(matches!(first, Some(lk::signal_response::Message::Reconnect(_))), "{first:?}");
    let update = resumed.until(Duration::from_secs(2), |m| matches!(m, lk::signal_response::Message::Update(_))).await;
    assert!(matches!(update, Some(lk::signal_response::Message::Update(u)) if u.participants.iter().any(|p| p.identity == ana_identity)), "the resumed participant learns who is there");
    let left = ana_call.until(Duration::from_secs(2), |m| matches!(m, lk::signal_response::Message::Update(u) if u.participants.iter().any(|p| p.sid == ben_sid && p.state == lk::participant_info::State::Disconnected as i32))).await;
    assert!(left.is_none(), "ana saw ben leave: {left:?}");

    // A leave ends it for good: nothing to resume.
    resumed.send(lk::signal_request::Message::Leave(lk::LeaveRequest::default())).await;
    assert!(ana_call.until(Duration::from_secs(5), |m| matches!(m, lk::signal_response::Message::Update(u) if u.participants.iter().any(|p| p.sid == ben_sid && p.state == lk::participant_info::State::Disconnected as i32))).await.is_some(), "ben's leave was not seen");
    let mut again = Signalling::resume(&server, &ben_jwt, &ben_sid).await.expect("the upgrade");
    assert!(refused(again.next().await), "a participant who left resumed");
}

/// The next token the server refreshes the call's one with.
async fn refreshed(call: &mut Signalling) -> String {
    match call.until(Duration::from_secs(4), |m| matches!(m, lk::signal_response::Message::RefreshToken(_))).await {
        Some(lk::signal_response::Message::RefreshToken(token)) => token,
        other => panic!("no refresh_token: {other:?}"),
    }
}

#[tokio::test]
async fn participants_get_fresh_tokens_to_resume_with_while_their_rights_last() {
    // Tokens live 4 s: a participant gets a fresh one every 2 s.
    let server = TestServer::start_with(&[("LIMBIC_CALLS__TOKEN_LIFETIME_SECONDS", "4")]).await;
    let (ana, ben) = (server.register("ana").await, server.register("ben").await);
    let room = ana.create_room(json!({ "preset": "private_chat", "invite": [ben.user_id] })).await;
    ben.join(&room).await;
    let first = jwt(&server, &ben, &room).await;
    let (mut call, join) = Signalling::join_with_response(&server, &first).await;
    let sid = join.participant.unwrap().sid;
    let fresh = refreshed(&mut call).await;
    let (old_claims, new_claims) = (claims(&first), claims(&fresh));
    assert!(new_claims["exp"].as_u64() > old_claims["exp"].as_u64(), "{new_claims}");
    for same in ["sub", "iss", "video", "org.limbic.room_id", "org.limbic.user_id"] {
        assert_eq!(new_claims[same], old_claims[same], "{same}");
    }

    // Past the first token's lifetime, the network drops: the first token is refused, the
    // latest fresh one resumes the participant.
    let expired_at = Duration::from_secs(old_claims["exp"].as_u64().unwrap() + 1);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    tokio::time::sleep(expired_at.saturating_sub(now)).await;
    let fresh = refreshed(&mut call).await;
    drop(call);
    assert_eq!(Signalling::resume(&server, &first, &sid).await.err().map(|(status, _)| status), Some(401), "an expired token resumed");
    let mut resumed = Signalling::resume(&server, &fresh, &sid).await.expect("the upgrade");
    let answer = tokio::time::timeout(Duration::from_secs(5), resumed.next()).await.expect("an answer in time");
    assert!(matches!(answer, Some(lk::signal_response::Message::Reconnect(_))), "{answer:?}");
    let fresh = refreshed(&mut resumed).await;

    // A former member: dropped from the call, no more fresh tokens, and the last one refused.
    ben.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), json!({})).await;
    assert!(resumed.left_because(Duration::from_secs(5)).await.is_some(), "ben stayed in the call");
    let validate = reqwest::Client::new().get(format!("{}/rtc/validate", server.base)).bearer_auth(&fresh).send().await.unwrap();
    assert_eq!(validate.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn members_get_call_tokens_and_others_do_not() {
    let server = TestServer::start().await;
    let (ana, ben, eve) = (server.register("ana").await, server.register("ben").await, server.register("eve").await);
    let room = ana.create_room(json!({ "preset": "private_chat", "invite": [ben.user_id] })).await;
    ben.join(&room).await;

    let (status, answer) = token(&server, &ben, &room).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["url"].as_str().unwrap().starts_with("ws://"), "{answer}");
    let jwt = claims(answer["jwt"].as_str().unwrap());
    assert_eq!(jwt["iss"], "limbic");
    assert_eq!(jwt["video"]["roomJoin"], true);
    assert_eq!(jwt["video"]["canPublish"], true);
    assert_eq!(jwt["video"]["canSubscribe"], true);
    assert_eq!(jwt["video"]["roomAdmin"], false, "ben is no moderator");
    assert_eq!(jwt["org.limbic.room_id"], room.as_str());
    assert!(jwt["exp"].as_u64().unwrap() > jwt["nbf"].as_u64().unwrap());
    // The room and identity are hashed as MSC4195's service does: the same for the same member.
    let again = claims(token(&server, &ben, &room).await.1["jwt"].as_str().unwrap());
    assert_eq!((&again["sub"], &again["video"]["room"]), (&jwt["sub"], &jwt["video"]["room"]));
    assert_ne!(jwt["video"]["room"], room.as_str());
    let creator = claims(token(&server, &ana, &room).await.1["jwt"].as_str().unwrap());
    assert_eq!(creator["video"]["roomAdmin"], true, "the creator moderates");
    assert_eq!(creator["video"]["room"], jwt["video"]["room"], "one call per room");

    // The earlier /sfu/get names the device plainly, and means the room's call slot: its
    // clients meet those of /get_token in one call.
    let (status, answer) = legacy_token(&server, &ben, &room).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let legacy = claims(answer["jwt"].as_str().unwrap());
    assert_eq!(legacy["video"]["room"], jwt["video"]["room"]);
    assert_eq!(legacy["sub"], format!("{}:{}", ben.user_id, ben.device_id));

    // Not a member, a forged OpenID token, someone else's identity: refused.
    let (status, body) = token(&server, &eve, &room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    let mut fake = openid(&ben).await;
    fake["access_token"] = json!("not-a-token");
    let (status, body) = server.client().post(&format!("{SERVICE}/sfu/get"), json!({ "room": room, "openid_token": fake, "device_id": "X" })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"), "{body}");
    let body = json!({
        "room_id": room, "slot_id": "m.call#ROOM", "openid_token": openid(&eve).await,
        "member": { "id": "m", "claimed_user_id": ben.user_id, "claimed_device_id": ben.device_id },
    });
    let (status, body) = server.client().post(&format!("{SERVICE}/get_token"), body).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    let (status, body) = server.client().post(&format!("{SERVICE}/get_token"), json!({ "room_id": room })).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"), "{body}");
}

#[tokio::test]
async fn a_session_call_opens_with_the_session_and_rights_follow_the_roles() {
    let server = TestServer::start().await;
    let (therapist, client, observer, room) = group_session(&server).await;
    // Scheduled: no call yet, for anyone.
    let (status, body) = token(&server, &therapist, &room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    assert!(body["error"].as_str().unwrap().contains("scheduled"), "{body}");

    set_status(&therapist, &room, "open").await;
    let rights = |answer: Value| {
        let jwt = claims(answer["jwt"].as_str().unwrap());
        let video = &jwt["video"];
        (video["canPublish"].as_bool().unwrap(), video["canSubscribe"].as_bool().unwrap(), video["roomAdmin"].as_bool().unwrap(), video["roomRecord"].as_bool().unwrap())
    };
    assert_eq!(rights(token(&server, &therapist, &room).await.1), (true, true, true, true));
    assert_eq!(rights(token(&server, &client, &room).await.1), (true, true, false, false));
    assert_eq!(rights(token(&server, &observer, &room).await.1), (false, true, false, false));

    // Once the session is over, the call is closed again.
    set_status(&therapist, &room, "in_progress").await;
    assert_eq!(token(&server, &client, &room).await.0, StatusCode::OK);
    set_status(&therapist, &room, "completed").await;
    let (status, body) = token(&server, &client, &room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
}

/// Signalling takes a call token only while it is valid, from the header or the query.
#[tokio::test]
async fn signalling_refuses_expired_tokens() {
    let server = TestServer::start_with(&[("LIMBIC_CALLS__TOKEN_LIFETIME_SECONDS", "1")]).await;
    let ana = server.register("ana").await;
    let room = ana.create_room(json!({ "preset": "private_chat" })).await;
    let jwt = token(&server, &ana, &room).await.1["jwt"].as_str().unwrap().to_owned();
    let validate = |bearer: bool| {
        let request = reqwest::Client::new().get(format!("http://127.0.0.1:{}/rtc/validate", server.signalling_port(&jwt)));
        if bearer { request.bearer_auth(&jwt) } else { request.query(&[("access_token", &jwt)]) }
    };
    for bearer in [true, false] {
        let answer = validate(bearer).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.text().await.unwrap(), "success");
    }
    let (status, _) = server.client().get("/rtc/validate").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token");
    assert_eq!(server.client().get("/rtc/v1/validate").await.0, StatusCode::UNAUTHORIZED, "no token");

    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let answer = validate(true).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    assert!(answer.text().await.unwrap().contains("Expired"), "expired");
}

async fn kick(by: &Client, room: &str, user: &Client, action: &str) {
    by.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/{action}", enc(room)), Some(json!({ "user_id": user.user_id, "reason": "test" }))).await;
}

/// `/rtc/validate` (what LiveKit's SDKs ask when a connection fails): its status and text.
async fn validate(server: &TestServer, jwt: &str) -> (StatusCode, String) {
    // Where the token sends the SDK: the call's node, in cluster mode.
    let answer = reqwest::Client::new().get(format!("http://127.0.0.1:{}/rtc/validate", server.signalling_port(jwt))).bearer_auth(jwt).send().await.unwrap();
    (answer.status(), answer.text().await.unwrap())
}

/// The time a participant whose rights ended may stay in the call.
const DROPPED_WITHIN: Duration = Duration::from_millis(1000);

/// A token obtained before a kick admits nobody after it: `/rtc` refuses it with the reason.
#[tokio::test]
async fn a_member_kicked_after_getting_a_call_token_cannot_join_with_it() {
    let server = TestServer::start().await;
    let (ana, ben) = (server.register("ana").await, server.register("ben").await);
    let room = ana.create_room(json!({ "preset": "private_chat", "invite": [ben.user_id] })).await;
    ben.join(&room).await;
    let ben_jwt = jwt(&server, &ben, &room).await;
    assert_eq!(validate(&server, &ben_jwt).await.0, StatusCode::OK);

    kick(&ana, &room, &ben, "kick").await;
    let (status, body) = Signalling::connect(&server, &ben_jwt).await.err().expect("/rtc refuses the kicked member's token");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("M_FORBIDDEN") && body.contains("only members of the room"), "{body}");
    let (status, body) = validate(&server, &ben_jwt).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("only members of the room"), "{body}");
    // Back in the room, the same token admits again: the rights are what is checked.
    ana.invite(&room, &ben.user_id).await;
    ben.join(&room).await;
    drop(Signalling::join(&server, &ben_jwt).await);
}

/// A client's first offer on a single connection: data channels and a line to receive audio on
/// (what LiveKit's SDKs offer before they publish anything), as a browser writes it.
const SINGLE_CONNECTION_OFFER: &str = "v=0\r\no=- 4215775240449105457 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\na=msid-semantic: WMS\r\n\
    m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\na=ice-ufrag:Vx0k\r\na=ice-pwd:5LzQeRRhnzBsVD3Eo5bJ0eTa\r\na=ice-options:trickle\r\n\
    a=fingerprint:sha-256 1C:3A:5B:07:9D:E2:60:44:9A:21:73:8E:0F:B2:C6:19:5D:AA:03:4E:88:61:F9:D2:37:14:EE:5C:90:0B:7A:D3\r\na=setup:actpass\r\na=mid:0\r\na=recvonly\r\na=rtcp-mux\r\n\
    a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n\
    m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:Vx0k\r\na=ice-pwd:5LzQeRRhnzBsVD3Eo5bJ0eTa\r\na=ice-options:trickle\r\n\
    a=fingerprint:sha-256 1C:3A:5B:07:9D:E2:60:44:9A:21:73:8E:0F:B2:C6:19:5D:AA:03:4E:88:61:F9:D2:37:14:EE:5C:90:0B:7A:D3\r\na=setup:actpass\r\na=mid:1\r\na=sctp-port:5000\r\na=max-message-size:262144\r\n";

/// LiveKit's single peer connection (`/rtc/v1`, what its SDKs try first): the join request in
/// the URL (gzipped or not), its offer answered right after the join response, with the line
/// that carries nothing yet inactive; and refused as `/rtc` refuses: no token, a forged one, a
/// kicked member's (`signalling_refuses_expired_tokens`: none at all); an unreadable join
/// request is a 400.
#[tokio::test]
async fn the_single_connection_path_answers_the_offer_in_its_join_request_and_refuses_as_rtc_does() {
    let server = TestServer::start().await;
    let (ana, ben) = (server.register("ana").await, server.register("ben").await);
    let room = ana.create_room(json!({ "preset": "private_chat", "invite": [ben.user_id] })).await;
    ben.join(&room).await;
    let (ana_jwt, ben_jwt) = (jwt(&server, &ana, &room).await, jwt(&server, &ben, &room).await);
    let offer = lk::SessionDescription { r#type: "offer".into(), sdp: SINGLE_CONNECTION_OFFER.into(), id: 7, ..Default::default() };
    let request = lk::JoinRequest { publisher_offer: Some(offer), connection_settings: Some(lk::ConnectionSettings { auto_subscribe: true, ..Default::default() }), ..Default::default() };
    for gzip in [true, false] {
        let mut call = Signalling::connect_v1(&server, &ana_jwt, &request, gzip).await.expect("/rtc/v1 admits a member");
        let Some(lk::signal_response::Message::Join(join)) = call.next().await else { panic!("the join response comes first") };
        assert_eq!(join.participant.unwrap().identity, claims(&ana_jwt)["sub"].as_str().unwrap());
        let Some(lk::signal_response::Message::Answer(answer)) = call.until(Duration::from_secs(5), |m| matches!(m, lk::signal_response::Message::Answer(_))).await else {
            panic!("no answer to the join request's offer")
        };
        assert_eq!((answer.r#type.as_str(), answer.id), ("answer", 7));
        assert!(answer.sdp.contains("a=mid:0\r\na=inactive\r\n") && answer.sdp.contains("a=mid:1\r\n"), "{}", answer.sdp);
        assert!(answer.mid_to_track_id.is_empty());
        call.send(lk::signal_request::Message::Leave(lk::LeaveRequest::default())).await;
    }

    let validate = |jwt: &str, join: Option<&str>| {
        let mut query = vec![("access_token", jwt.to_owned())];
        query.extend(join.map(|join| ("join_request", join.to_owned())));
        reqwest::Client::new().get(format!("http://127.0.0.1:{}/rtc/v1/validate", server.signalling_port(jwt))).query(&query).send()
    };
    let readable = join_request(&request, true);
    assert_eq!(validate(&ana_jwt, Some(&readable)).await.unwrap().text().await.unwrap(), "success");
    assert_eq!(validate(&ana_jwt, None).await.unwrap().status(), StatusCode::BAD_REQUEST, "no join request");
    assert_eq!(validate(&ana_jwt, Some("bm90IGEgam9pbiByZXF1ZXN0")).await.unwrap().status(), StatusCode::BAD_REQUEST, "not a join request");
    let unreadable = Signalling::open(&server, &format!("/rtc/v1?access_token={ana_jwt}&join_request=%%%")).await.err().expect("an unreadable join request is refused");
    assert_eq!(unreadable.0, 400, "{}", unreadable.1);

    // Another server's token (signed with another key), and a kicked member's: refused.
    let mut parts: Vec<&str> = ben_jwt.split('.').collect();
    parts[2] = "c2lnbmVkIGVsc2V3aGVyZQ";
    let (status, _) = Signalling::connect_v1(&server, &parts.join("."), &request, true).await.err().expect("a token not signed here is refused");
    assert_eq!(status, 401);
    kick(&ana, &room, &ben, "kick").await;
    let (status, body) = Signalling::connect_v1(&server, &ben_jwt, &request, true).await.err().expect("/rtc/v1 refuses the kicked member's token");
    assert_eq!(status, 403, "{body}");
    assert_eq!(validate(&ben_jwt, Some(&readable)).await.unwrap().status(), StatusCode::FORBIDDEN);
}

/// A member kicked (or banned) while in the call is told to leave at once, and the others see
/// them go.
#[tokio::test]
async fn members_kicked_or_banned_during_a_call_are_dropped_and_the_others_see_them_go() {
    let server = TestServer::start().await;
    let (ana, ben, cat) = (server.register("ana").await, server.register("ben").await, server.register("cat").await);
    let room = ana.create_room(json!({ "preset": "private_chat", "invite": [ben.user_id, cat.user_id] })).await;
    ben.join(&room).await;
    cat.join(&room).await;
    let (ana_jwt, ben_jwt, cat_jwt) = (jwt(&server, &ana, &room).await, jwt(&server, &ben, &room).await, jwt(&server, &cat, &room).await);
    let identity = |jwt: &str| claims(jwt)["sub"].as_str().unwrap().to_owned();
    let mut ana_call = Signalling::join(&server, &ana_jwt).await;
    let mut ben_call = Signalling::join(&server, &ben_jwt).await;
    let mut cat_call = Signalling::join(&server, &cat_jwt).await;

    let kicked = Instant::now();
    kick(&ana, &room, &ben, "kick").await;
    assert_eq!(ben_call.left_because(DROPPED_WITHIN).await, Some(lk::DisconnectReason::ParticipantRemoved), "ben is dropped with the reason");
    assert!(ana_call.sees_leave(&identity(&ben_jwt), DROPPED_WITHIN).await, "ana sees ben leave");
    assert!(kicked.elapsed() < DROPPED_WITHIN + Duration::from_millis(500), "dropped after {:?}", kicked.elapsed());

    kick(&ana, &room, &cat, "ban").await;
    assert_eq!(cat_call.left_because(DROPPED_WITHIN).await, Some(lk::DisconnectReason::ParticipantRemoved), "cat is dropped");
    assert!(ana_call.sees_leave(&identity(&cat_jwt), DROPPED_WITHIN).await, "ana sees cat leave");
    // Ana, whose rights did not change, stays.
    assert!(ana_call.until(Duration::from_millis(300), |m| matches!(m, lk::signal_response::Message::Leave(_))).await.is_none());
}

/// In a session, the call follows the roles and the status: a lesser role, a removal and the
/// session's end each drop those they concern, and their old tokens admit them no more.
#[tokio::test]
async fn session_participants_are_dropped_when_their_role_or_the_session_ends() {
    let server = TestServer::start().await;
    let (therapist, client, observer, room) = group_session(&server).await;
    set_status(&therapist, &room, "open").await;
    set_status(&therapist, &room, "in_progress").await;
    let (therapist_jwt, client_jwt, observer_jwt) = (jwt(&server, &therapist, &room).await, jwt(&server, &client, &room).await, jwt(&server, &observer, &room).await);
    let mut therapist_call = Signalling::join(&server, &therapist_jwt).await;
    let mut client_call = Signalling::join(&server, &client_jwt).await;
    let mut observer_call = Signalling::join(&server, &observer_jwt).await;
    let participant = |user: &Client| format!("/_limbic/client/v1/sessions/{}/participants/{}", enc(&room), enc(&user.user_id));

    // The client becomes an observer: their token lets them publish, which the role no longer
    // does. A new token, with the observer's rights, admits them.
    therapist.ok(Method::PUT, &participant(&client), Some(json!({ "role": "observer" }))).await;
    assert_eq!(client_call.left_because(DROPPED_WITHIN).await, Some(lk::DisconnectReason::ParticipantRemoved));
    assert!(therapist_call.sees_leave(claims(&client_jwt)["sub"].as_str().unwrap(), DROPPED_WITHIN).await);
    let (status, body) = Signalling::connect(&server, &client_jwt).await.err().expect("the client's old token is refused");
    assert!(status == 403 && body.contains("no longer allows"), "{status} {body}");
    drop(Signalling::join(&server, &jwt(&server, &client, &room).await).await);

    // The observer is removed from the session.
    therapist.request(Method::DELETE, &participant(&observer), None).await;
    assert_eq!(observer_call.left_because(DROPPED_WITHIN).await, Some(lk::DisconnectReason::ParticipantRemoved));
    assert_eq!(Signalling::connect(&server, &observer_jwt).await.err().expect("the observer's token is refused").0, 403);

    // The session ends: the therapist's call ends too, and their token is refused.
    set_status(&therapist, &room, "completed").await;
    assert_eq!(therapist_call.left_because(DROPPED_WITHIN).await, Some(lk::DisconnectReason::RoomClosed), "the therapist's call ends with the session");
    let (status, body) = Signalling::connect(&server, &therapist_jwt).await.err().expect("the therapist's token is refused");
    assert!(status == 403 && body.contains("completed"), "{status} {body}");
}

/// Who never was in the room gets no call token and cannot forge one; who left it cannot
/// use the one they had.
#[tokio::test]
async fn strangers_and_former_participants_are_refused_by_signalling() {
    let server = TestServer::start().await;
    let (ana, ben, eve) = (server.register("ana").await, server.register("ben").await, server.register("eve").await);
    let room = ana.create_room(json!({ "preset": "public_chat" })).await;
    ben.join(&room).await;
    let ben_jwt = jwt(&server, &ben, &room).await;

    let (status, body) = token(&server, &eve, &room).await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    // Ben's token with eve's name in it: the signature no longer holds.
    let mut parts: Vec<String> = ben_jwt.split('.').map(str::to_owned).collect();
    let mut forged = claims(&ben_jwt);
    forged["org.limbic.user_id"] = json!(eve.user_id);
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged.to_string());
    let (status, body) = Signalling::connect(&server, &parts.join(".")).await.err().expect("a forged token is refused");
    assert_eq!(status, 401, "{body}");

    // Ben leaves the room: his token admits him no more (and he may join again, like anyone).
    ben.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), json!({})).await;
    let (status, body) = Signalling::connect(&server, &ben_jwt).await.err().expect("a former member's token is refused");
    assert!(status == 403 && body.contains("only members of the room"), "{status} {body}");
    // Eve joins the public room, and leaves while in its call: she is dropped.
    eve.join(&room).await;
    let mut eve_call = Signalling::join(&server, &jwt(&server, &eve, &room).await).await;
    eve.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), json!({})).await;
    assert_eq!(eve_call.left_because(DROPPED_WITHIN).await, Some(lk::DisconnectReason::ParticipantRemoved));
}

/// A breakout room's call follows its session: when the session ends, whoever is in the
/// breakout's call is dropped, though nothing was sent to the breakout room itself.
#[tokio::test]
async fn a_breakout_call_ends_with_its_session() {
    let server = TestServer::start().await;
    let (therapist, client, _observer, room) = group_session(&server).await;
    set_status(&therapist, &room, "open").await;
    set_status(&therapist, &room, "in_progress").await;
    let breakouts = format!("/_limbic/client/v1/sessions/{}/breakouts", enc(&room));
    let breakout = therapist.ok(Method::POST, &breakouts, Some(json!({ "name": "Pair", "participants": [client.user_id] }))).await["room_id"].as_str().unwrap().to_owned();
    assert_eq!(client.join(&breakout).await.0, StatusCode::OK);
    let mut client_call = Signalling::join(&server, &jwt(&server, &client, &breakout).await).await;
    // Something else happens first, so that the breakout's call has been looked at since.
    therapist.send_text(&room, "t1", "back in five minutes").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    set_status(&therapist, &room, "completed").await;
    assert_eq!(client_call.left_because(DROPPED_WITHIN).await, Some(lk::DisconnectReason::RoomClosed), "the breakout's call ends with the session");
}

/// A server whose calls have low limits: 8 KiB signalling messages, 20 messages at once and 2
/// a second after, two participants per call.
async fn limited_server() -> TestServer {
    TestServer::start_with(&[
        ("LIMBIC_CALLS__MAX_SIGNAL_MESSAGE_BYTES", "8192"),
        ("LIMBIC_CALLS__SIGNAL_RATE", "{ per_second = 2.0, burst = 20 }"),
        ("LIMBIC_CALLS__MAX_PARTICIPANTS_PER_CALL", "2"),
    ])
    .await
}

/// A signalling message over the limit is not read in: the sender is told to leave and the
/// WebSocket closes with 1009 (message too big).
#[tokio::test]
async fn a_signalling_message_over_the_limit_closes_the_connection() {
    let server = limited_server().await;
    let ana = server.register("ana").await;
    let room = ana.create_room(json!({ "preset": "private_chat" })).await;
    let mut call = Signalling::join(&server, &jwt(&server, &ana, &room).await).await;
    // Within the limit: answered.
    let ping = lk::Ping { timestamp: 1, rtt: 0 };
    call.send(lk::signal_request::Message::PingReq(ping)).await;
    assert!(call.until(Duration::from_secs(2), |m| matches!(m, lk::signal_response::Message::PongResp(_))).await.is_some());
    // A frame announcing 9000 bytes: refused on its header, whatever follows.
    call.send_frame(0x2, 9000, &[0; 100]).await;
    let (left, close) = call.closed(Duration::from_secs(3)).await;
    assert!(left, "no leave before the close");
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("too big"), "{reason}");
}

/// A flood of signalling messages closes the connection with 1008 (policy violation) once the
/// burst is spent.
#[tokio::test]
async fn a_flood_of_signalling_messages_closes_the_connection() {
    let server = limited_server().await;
    let ana = server.register("ana").await;
    let room = ana.create_room(json!({ "preset": "private_chat" })).await;
    let mut call = Signalling::join(&server, &jwt(&server, &ana, &room).await).await;
    for timestamp in 0..40 {
        call.send(lk::signal_request::Message::PingReq(lk::Ping { timestamp, rtt: 0 })).await;
    }
    // A client goes on sending for a while before it reads the close: the server must not reset
    // the connection under it (a write would fail, and the leave could be lost).
    for timestamp in 40..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        call.send(lk::signal_request::Message::PingReq(lk::Ping { timestamp, rtt: 0 })).await;
    }
    let (left, close) = call.closed(Duration::from_secs(3)).await;
    assert!(left, "no leave before the close");
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("too many"), "{reason}");
}

/// A call takes `max_participants_per_call`: the next one is refused before the upgrade (and
/// by `/rtc/validate`, which SDKs ask for the reason) until someone leaves.
#[tokio::test]
async fn a_full_call_refuses_the_next_participant_until_someone_leaves() {
    let server = limited_server().await;
    let (ana, ben, cat) = (server.register("ana").await, server.register("ben").await, server.register("cat").await);
    let room = ana.create_room(json!({ "preset": "private_chat", "invite": [ben.user_id, cat.user_id] })).await;
    ben.join(&room).await;
    cat.join(&room).await;
    let cat_jwt = jwt(&server, &cat, &room).await;
    let _ana_call = Signalling::join(&server, &jwt(&server, &ana, &room).await).await;
    let mut ben_call = Signalling::join(&server, &jwt(&server, &ben, &room).await).await;

    let (status, body) = Signalling::connect(&server, &cat_jwt).await.err().expect("a third participant is refused");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("M_RESOURCE_LIMIT_EXCEEDED") && body.contains("full"), "{body}");
    let (status, body) = validate(&server, &cat_jwt).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("full"), "{body}");
    // Another room's call has room of its own.
    let other = cat.create_room(json!({ "preset": "private_chat" })).await;
    drop(Signalling::join(&server, &jwt(&server, &cat, &other).await).await);

    // Dropped, Ben keeps his place for the resume window; leaving gives it up at once.
    ben_call.send(lk::signal_request::Message::Leave(lk::LeaveRequest::default())).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while validate(&server, &cat_jwt).await.0 != StatusCode::OK {
        assert!(Instant::now() < deadline, "the call stays full after ben left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(Signalling::join(&server, &cat_jwt).await);
}
