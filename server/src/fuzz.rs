//! Fuzzing harnesses (docs/FUZZING.md): one function per boundary where another party's bytes
//! enter the server, each driving the code the server runs on them, with fixed keys and
//! without disk or network. The libFuzzer targets in `fuzz/` call them (`scripts/fuzz`); the
//! tests below run each over its seeds and a few thousand mutations of them in `cargo test`.

use std::{
    cell::RefCell,
    sync::LazyLock,
    time::{Duration, Instant},
};

use jsonwebtoken::DecodingKey;
use livekit_protocol as lk;
use prost::Message as _;
use ruma::{
    OwnedRoomId, OwnedServerName, OwnedUserId, RoomVersionId,
    api::federation::transactions::send_transaction_message,
    signatures::{Ed25519KeyPair, PublicKeyMap, PublicKeySet},
};
use serde_json::value::RawValue;

use crate::{
    calls::{
        self,
        sfu::{JoinOptions, ParticipantId, Sfu, loopback},
    },
    clinic::appointments,
    events::{PduBuilder, PduPlacement, SUPPORTED_ROOM_VERSIONS, ServerSigningKey, build_pdu, redact_stored, rules_for},
    federation::{pdu::{UncheckedPdu, room_id_of}, resolve},
    federation_api as routes,
    plugins::{
        bindings::limbic::plugin::types::{HttpResponse, OutboundRequest, RoomSpec, StateEntry},
        host,
    },
};

/// The server whose requests and events the harnesses check, and this server.
const ORIGIN: &str = "origin.test";
const DESTINATION: &str = "limbic.test";
/// The path of the federation request the X-Matrix harness authenticates.
const TRANSACTION_PATH: &str = "/_matrix/federation/v1/send/fuzz";
/// The secret and issuer of call tokens, the secret of appointment links.
const CALL_SECRET: &[u8] = b"fuzzing call secret";
const CALL_ISSUER: &str = "limbic";
const LINK_SECRET: &[u8] = b"fuzzing link secret";
/// The hosts the plugin harness's plugin may fetch from.
const PLUGIN_HOSTS: [&str; 2] = ["calendar.example", "127.0.0.1:8080"];

/// The origin's signing key and ours: fixed, so that seeds stay valid from one run to the next.
static ORIGIN_KEY: LazyLock<ServerSigningKey> = LazyLock::new(|| fixed_key(ORIGIN, 7));
static OUR_KEY: LazyLock<ServerSigningKey> = LazyLock::new(|| fixed_key(DESTINATION, 9));

fn fixed_key(name: &str, seed: u8) -> ServerSigningKey {
    // PKCS#8 v1 of an ed25519 seed.
    let mut der = hex::decode("302e020100300506032b657004220420").expect("hex");
    der.extend_from_slice(&[seed; 32]);
    ServerSigningKey::from_pair(server(name), Ed25519KeyPair::from_der(&der, "fuzz".into()).expect("a valid key"))
}

fn server(name: &str) -> OwnedServerName {
    OwnedServerName::try_from(name).expect("a valid server name")
}

/// The keys a signer has as far as this server knows: the origin's, nobody else's.
fn keys_of(server: &str) -> PublicKeySet {
    if server == ORIGIN { ORIGIN_KEY.public_key_set() } else { PublicKeySet::new() }
}

/// A PDU of another server as `verify_pdu` checks it, under `version`'s rules; one that
/// verifies goes on as the server uses it (clients see it, it may be redacted).
fn check_pdu(raw: &RawValue, version: &RoomVersionId) {
    let rules = rules_for(version).expect("a supported version");
    let Ok(unchecked) = UncheckedPdu::parse(raw, &rules) else { return };
    let keys: PublicKeyMap = unchecked.signers().into_iter().map(|(server, _)| (server.to_string(), keys_of(server.as_str()))).collect();
    let Ok(signed) = unchecked.verify(&keys, &rules) else { return };
    let _ = signed.pdu.to_client_event(None, true);
    let _ = signed.pdu.to_stripped_state();
    redact_stored(&signed.to_bytes(), &rules, &signed.pdu).expect("a verified event can be redacted");
}

/// Canonical JSON and PDUs: one PDU (as in a transaction, `/send_join` or `/event` answer)
/// converted to canonical JSON, format-checked, reference-hashed and signature-checked under
/// every supported room version.
pub fn pdu(data: &[u8]) {
    let Ok(raw) = serde_json::from_slice::<Box<RawValue>>(data) else { return };
    let _ = room_id_of(&raw);
    for version in SUPPORTED_ROOM_VERSIONS {
        check_pdu(&raw, version);
    }
}

/// A federation transaction: the `/send` request body parsed as the server's extractor does,
/// its limits, and each PDU as for a room this server is not in (version 11).
pub fn federation_transaction(data: &[u8]) {
    let Ok(request) = http::Request::put(TRANSACTION_PATH).header(http::header::CONTENT_TYPE, "application/json").body(data.to_vec()) else { return };
    let Ok(transaction) = routes::parse_request::<send_transaction_message::v1::Request>(request, &["fuzz"]) else { return };
    if routes::check_transaction(&server(ORIGIN), &transaction).is_err() {
        return;
    }
    for raw in &transaction.pdus {
        if room_id_of(raw).is_some() {
            check_pdu(raw, &RoomVersionId::V11);
        }
    }
}

/// The request the X-Matrix harness authenticates, as the origin signs it (method, path,
/// body, and its `Authorization` header).
struct SignedRequest {
    method: http::Method,
    body: Vec<u8>,
    authorization: http::HeaderValue,
}

static SIGNED_REQUEST: LazyLock<SignedRequest> = LazyLock::new(|| {
    use ruma::api::{OutgoingRequestExt, federation::authentication::XMatrixSigningInput};
    let mut request = send_transaction_message::v1::Request::new("fuzz".into(), server(ORIGIN), ruma::MilliSecondsSinceUnixEpoch(1_700_000_000_000u64.try_into().expect("a timestamp")));
    request.pdus = Vec::new();
    let signing = XMatrixSigningInput::new(server(ORIGIN), server(DESTINATION), ORIGIN_KEY.key_pair());
    let signed = request.try_into_http_request::<Vec<u8>>(&format!("https://{DESTINATION}"), signing, ()).expect("a signed request");
    assert_eq!(signed.uri().path(), TRANSACTION_PATH);
    SignedRequest { method: signed.method().clone(), authorization: signed.headers()[http::header::AUTHORIZATION].clone(), body: signed.into_body() }
});

/// The X-Matrix `Authorization` header of a federation request: parsed, its origin read as
/// a server name, and its signature checked against the origin's key.
pub fn x_matrix(data: &[u8]) {
    let Ok(authorization) = http::HeaderValue::from_bytes(data) else { return };
    let signed = &*SIGNED_REQUEST;
    let Ok(mut request) = http::Request::builder().method(signed.method.clone()).uri(TRANSACTION_PATH).body(signed.body.clone()) else { return };
    request.headers_mut().insert(http::header::AUTHORIZATION, authorization);
    let Ok(xmatrix) = routes::x_matrix(request.headers()) else { return };
    let _ = resolve::Name::parse(xmatrix.origin.as_str());
    let _ = routes::verify_x_matrix(&xmatrix, &request, &server(DESTINATION), keys_of(xmatrix.origin.as_str()));
}

/// An SFU with two participants in one call, and the inputs it has served.
struct Call {
    sfu: Sfu,
    ids: [ParticipantId; 2],
    now: Instant,
    inputs: u32,
}

/// How many inputs one SFU serves before it is set up afresh (its state grows with them).
const INPUTS_PER_SFU: u32 = 1000;

thread_local! {
    /// Participants' peer connections are costly to set up (DTLS certificates): one SFU serves
    /// many inputs, and is set up afresh when someone left, or after `INPUTS_PER_SFU`.
    static CALL: RefCell<Option<Call>> = const { RefCell::new(None) };
}

/// LiveKit signalling: frames of `[participant and delay, length (2 bytes, little-endian),
/// SignalRequest]` decoded as the
/// WebSocket handler does and fed to the sans-IO SFU, as two participants of one call (one
/// who may publish, one who may not), with the clock moving on and its output drained.
pub fn livekit_signal(data: &[u8]) {
    CALL.with_borrow_mut(|state| {
        let Call { sfu, ids, now, inputs } = state.get_or_insert_with(|| {
            let now = Instant::now();
            let mut sfu = Sfu::new(loopback::sfu_addresses(), calls::sfu_limits(&Default::default()));
            let ids = [sfu.join(now, &loopback::grant("ana", "call", true), &loopback::auto_subscribed()), sfu.join(now, &loopback::grant("ben", "call", false), &loopback::auto_subscribed())];
            Call { sfu, ids, now, inputs: 0 }
        });
        *inputs += 1;
        let mut rest = data;
        while let [who, low, high, tail @ ..] = rest {
            let (frame, after) = tail.split_at(usize::from(u16::from_le_bytes([*low, *high])).min(tail.len()));
            rest = after;
            if let Ok(request) = lk::SignalRequest::decode(frame) {
                sfu.signal(*now, ids[usize::from(who & 1)], request);
            }
            *now += Duration::from_millis(u64::from(who >> 1));
            sfu.timeout(*now);
            while sfu.poll_signal().is_some() || sfu.poll_transmit().is_some() {}
        }
        if *inputs >= INPUTS_PER_SFU || sfu.poll_gone().is_some() || sfu.participants_in("call").len() < 2 {
            *state = None;
        }
    });
}

thread_local! {
    /// A call where a publisher's audio and video are published, for each join request's
    /// participant to be bound to; kept as `CALL` is.
    static PUBLISHED: RefCell<Option<(Sfu, Instant, u32)>> = const { RefCell::new(None) };
}

/// `/rtc/v1`'s `join_request` (the query value), decoded as the handler does, and its join
/// (or resume) on a single connection in a call where a publisher's tracks wait: the SFU
/// answers the offer in it, binding the tracks to its lines; then the participant leaves.
pub fn join_request(data: &[u8]) {
    let Ok(encoded) = std::str::from_utf8(data) else { return };
    let Ok(request) = crate::livekit::signal::decode_join_request(encoded, crate::config::CallsConfig::default().max_signal_message_bytes) else { return };
    PUBLISHED.with_borrow_mut(|state| {
        let (sfu, now, inputs) = state.get_or_insert_with(|| {
            let (sfu, now) = published_call();
            (sfu, now, 0)
        });
        *inputs += 1;
        let grant = loopback::grant("ana", "call", true);
        let id = if request.reconnect {
            sfu.resume(*now, "call", "ana", &request.participant_sid, true, Vec::new())
        } else {
            let options = JoinOptions { auto_subscribe: request.connection_settings.is_some_and(|s| s.auto_subscribe), single_connection: true, offer: request.publisher_offer, ..JoinOptions::default() };
            Some(sfu.join(*now, &grant, &options))
        };
        *now += Duration::from_millis(5);
        sfu.timeout(*now);
        while sfu.poll_signal().is_some() || sfu.poll_transmit().is_some() || sfu.poll_gone().is_some() {}
        if let Some(id) = id {
            sfu.leave(*now, id);
        }
        if *inputs >= INPUTS_PER_SFU {
            *state = None;
        }
    });
}

/// An SFU where Ben published audio and video, connected over the in-memory network (a
/// track is published once its connection is up).
fn published_call() -> (Sfu, Instant) {
    use str0m::media::MediaKind;
    let mut net = loopback::Network::new();
    let ben = net.join("ben", true);
    for (kind, name) in [(MediaKind::Audio, "mic"), (MediaKind::Video, "cam")] {
        net.publish(ben, kind, name);
        for _ in 0..40 {
            net.step(Duration::from_millis(5));
        }
    }
    (net.sfu, net.now)
}

/// A call token (`/rtc` and `/rtc/validate`), verified as `Calls::verify` does.
pub fn call_token(data: &[u8]) {
    static KEY: LazyLock<DecodingKey> = LazyLock::new(|| DecodingKey::from_secret(CALL_SECRET));
    let Ok(token) = std::str::from_utf8(data) else { return };
    if let Ok(claims) = calls::verify_token(token, &KEY, CALL_ISSUER) {
        let _ = claims.rights();
    }
}

/// An appointment link's token (the `org.matrix.login.jwt` login), verified as
/// `Appointments::verify` does.
pub fn appointment_link(data: &[u8]) {
    static KEY: LazyLock<DecodingKey> = LazyLock::new(|| DecodingKey::from_secret(LINK_SECRET));
    let Ok(token) = std::str::from_utf8(data) else { return };
    let _ = appointments::verify_link(token, &KEY, &server(DESTINATION));
}

/// What a plugin hands the host, as its host functions and its `handle-http` answer take it:
/// the first byte picks the call, the rest are its arguments separated by NUL bytes (strings
/// cross the component boundary as UTF-8, so invalid bytes become U+FFFD as they could not
/// arrive otherwise). Events a plugin sends or creates a room with are built and signed as
/// the room would.
pub fn plugin_boundary(data: &[u8]) {
    let Some((&call, rest)) = data.split_first() else { return };
    let mut args = rest.split(|b| *b == 0).map(|arg| String::from_utf8_lossy(arg).into_owned());
    let mut arg = || args.next().unwrap_or_default();
    let plugin_user = OwnedUserId::try_from(format!("@plugin:{DESTINATION}")).expect("a valid user id");
    match call % 5 {
        0 => {
            let (room, event_type, state_key, content) = (arg(), arg(), arg(), arg());
            let state_key = (!state_key.is_empty()).then(|| state_key.trim_start_matches('\u{1}').to_owned());
            if let Ok((room_id, builder)) = host::event_request(&room, &event_type, state_key, &content) {
                sign(&room_id, &plugin_user, builder);
            }
        }
        1 => {
            let (name, topic) = (arg(), arg());
            let mut spec = RoomSpec { name: (!name.is_empty()).then_some(name), topic: (!topic.is_empty()).then_some(topic), invite: Vec::new(), power_levels: Vec::new(), initial_state: Vec::new() };
            loop {
                match arg().as_str() {
                    "" => break,
                    "invite" => spec.invite.push(arg()),
                    "power" => spec.power_levels.push((arg(), arg().parse().unwrap_or(i64::MAX))),
                    _ => spec.initial_state.push(StateEntry { event_type: arg(), state_key: arg(), content: arg() }),
                }
            }
            let room_id = OwnedRoomId::try_from(format!("!room:{DESTINATION}")).expect("a valid room id");
            if let Ok(events) = host::room_events(&plugin_user, spec) {
                for builder in events {
                    sign(&room_id, &plugin_user, builder);
                }
            }
        }
        2 => {
            let (method, url) = (arg(), arg());
            let granted: Vec<String> = PLUGIN_HOSTS.iter().map(|h| (*h).to_owned()).collect();
            let _ = host::outbound_target(&OutboundRequest { method, url, headers: Vec::new(), body: Vec::new() }, &granted);
        }
        3 => {
            let status = u16::from(*rest.first().unwrap_or(&0)) * 4;
            let mut headers = Vec::new();
            loop {
                let name = arg();
                if name.is_empty() {
                    break;
                }
                headers.push((name, arg()));
            }
            let _ = crate::plugins::http_response("fuzz", HttpResponse { status, headers, body: arg().into_bytes() });
        }
        _ => {
            let (key, value) = (arg(), arg());
            let _ = host::kv_key("fuzz", &key);
            let _ = host::check_kv_value(value.as_bytes());
        }
    }
}

/// Builds and signs an event in a version 11 room, as `RoomWriter::append` does.
fn sign(room_id: &ruma::RoomId, sender: &ruma::UserId, builder: PduBuilder) {
    let rules = rules_for(&RoomVersionId::V11).expect("a supported version");
    let placement = PduPlacement { room_id, sender, prev_events: Vec::new(), auth_events: Vec::new(), depth: 2, rules: &rules };
    let _ = build_pdu(builder, placement, &OUR_KEY);
}

/// The harnesses by name, as the libFuzzer targets in `fuzz/` are named.
pub const HARNESSES: [(&str, fn(&[u8])); 8] = [
    ("pdu", pdu),
    ("federation_transaction", federation_transaction),
    ("x_matrix", x_matrix),
    ("livekit_signal", livekit_signal),
    ("join_request", join_request),
    ("call_token", call_token),
    ("appointment_link", appointment_link),
    ("plugin_boundary", plugin_boundary),
];

/// Valid inputs of a harness to start from: real signed PDUs, transactions, X-Matrix
/// headers, LiveKit requests (with a real SDP offer), tokens and plugin calls.
pub fn seeds(harness: &str) -> Vec<Vec<u8>> {
    match harness {
        "pdu" => seed_pdus().into_iter().map(|pdu| pdu.into_bytes()).collect(),
        "federation_transaction" => {
            let pdus = seed_pdus().iter().map(|pdu| serde_json::from_str::<serde_json::Value>(pdu).expect("JSON")).collect::<Vec<_>>();
            let typing = serde_json::json!({ "edu_type": "m.typing", "content": { "room_id": format!("!room:{ORIGIN}"), "user_id": format!("@ana:{ORIGIN}"), "typing": true } });
            [serde_json::json!([]), serde_json::json!(pdus)]
                .into_iter()
                .map(|pdus| serde_json::to_vec(&serde_json::json!({ "origin": ORIGIN, "origin_server_ts": 1_700_000_000_000u64, "pdus": pdus, "edus": [typing] })).expect("JSON"))
                .collect()
        }
        "x_matrix" => {
            let header = SIGNED_REQUEST.authorization.as_bytes().to_vec();
            let other_key = String::from_utf8_lossy(&header).replace("ed25519:fuzz", "ed25519:other").into_bytes();
            vec![header, other_key, format!("X-Matrix origin=\"{ORIGIN}\",key=\"ed25519:fuzz\",sig=\"AAAA\"").into_bytes()]
        }
        "livekit_signal" => seed_signals(),
        "join_request" => seed_join_requests(),
        "call_token" => {
            let key = jsonwebtoken::EncodingKey::from_secret(CALL_SECRET);
            let video = calls::VideoGrant { room_join: true, room: "call".into(), can_publish: true, can_subscribe: true, can_publish_data: true, room_admin: false, room_record: false };
            let room = "!call:test.local".try_into().expect("a valid room id");
            let mut claims = calls::Claims { iss: CALL_ISSUER.into(), sub: "ana".into(), nbf: 0, exp: 4_102_444_800, name: "ana".into(), video, matrix_room: room, matrix_user: "@ana:test.local".into(), node: None };
            let valid = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("a token");
            claims.exp = 1;
            let expired = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("a token");
            vec![valid.into_bytes(), expired.into_bytes()]
        }
        "appointment_link" => {
            let key = jsonwebtoken::EncodingKey::from_secret(LINK_SECRET);
            let claims = serde_json::json!({ "sub": format!("@pat:{DESTINATION}"), "aud": format!("limbic-join:!room:{DESTINATION}"), "iss": DESTINATION, "exp": 4_102_444_800u64, "iat": 0, "jti": "seed" });
            vec![jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("a token").into_bytes()]
        }
        "plugin_boundary" => {
            let call = |number: u8, args: &[&str]| [vec![number], args.join("\0").into_bytes()].concat();
            vec![
                call(0, &[&format!("!room:{DESTINATION}"), "m.room.message", "", r#"{"msgtype":"m.text","body":"hi"}"#]),
                call(0, &[&format!("!room:{DESTINATION}"), "m.room.topic", "\u{1}", r#"{"topic":"x","n":9007199254740991}"#]),
                call(1, &["Session", "Topic", "invite", &format!("@ana:{DESTINATION}"), "power", &format!("@ana:{DESTINATION}"), "50", "state", "m.room.encryption", "", r#"{"algorithm":"m.megolm.v1.aes-sha2"}"#]),
                call(2, &["POST", "https://calendar.example/caldav/"]),
                call(2, &["GET", "http://127.0.0.1:8080/x"]),
                call(3, &["content-type", "application/json", "x-plugin", "1", "", r#"{"ok":true}"#]),
                call(4, &["calendar/token", "secret"]),
            ]
        }
        _ => Vec::new(),
    }
}

/// PDUs the origin signed, in their wire form (no `event_id`): a message, a membership, a
/// version 12 create event (no `room_id`), and one whose content no longer matches its hash.
fn seed_pdus() -> Vec<String> {
    let room_id = OwnedRoomId::try_from(format!("!room:{ORIGIN}")).expect("a valid room id");
    let sender = OwnedUserId::try_from(format!("@ana:{ORIGIN}")).expect("a valid user id");
    let prev = ruma::OwnedEventId::try_from("$prev").expect("an event id");
    let events = [
        (RoomVersionId::V11, PduBuilder::message("m.room.message", serde_json::json!({ "msgtype": "m.text", "body": "hello" }))),
        (RoomVersionId::V10, PduBuilder::state("m.room.member", sender.as_str(), serde_json::json!({ "membership": "join", "displayname": "Ana" }))),
        (RoomVersionId::V12, PduBuilder::state("m.room.create", "", serde_json::json!({ "room_version": "12" }))),
    ];
    let mut pdus = Vec::new();
    for (version, builder) in events {
        let rules = rules_for(&version).expect("a supported version");
        let placement = PduPlacement { room_id: &room_id, sender: &sender, prev_events: vec![prev.clone()], auth_events: vec![prev.clone()], depth: 5, rules: &rules };
        let mut signed = build_pdu(builder, placement, &ORIGIN_KEY).expect("a PDU").canonical;
        signed.remove("event_id");
        pdus.push(serde_json::to_string(&signed).expect("JSON"));
    }
    pdus.push(pdus[0].replace("hello", "HELLO"));
    pdus
}

/// `/rtc/v1` join requests, gzipped and not: a client's real first offer (data channels and a
/// line to receive on of each kind, from str0m), without settings, and a resume.
fn seed_join_requests() -> Vec<Vec<u8>> {
    use base64::Engine as _;
    use lk::wrapped_join_request::Compression;
    use std::io::Write as _;
    use str0m::media::{Direction, MediaKind};
    let mut rtc = str0m::Rtc::builder().build(Instant::now());
    let mut changes = rtc.sdp_api();
    changes.add_channel("_reliable".into());
    for kind in [MediaKind::Audio, MediaKind::Video] {
        changes.add_media(kind, Direction::RecvOnly, None, None, None);
    }
    let (offer, _) = changes.apply().expect("an offer");
    let offer = lk::SessionDescription { r#type: "offer".into(), sdp: offer.to_sdp_string(), id: 1, ..Default::default() };
    let settings = lk::ConnectionSettings { auto_subscribe: true, ..Default::default() };
    let encode = |request: lk::JoinRequest, compression: Compression| {
        let bytes = request.encode_to_vec();
        let join_request = if compression == Compression::Gzip {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(&bytes).expect("gzipped");
            encoder.finish().expect("gzipped")
        } else {
            bytes
        };
        base64::engine::general_purpose::URL_SAFE.encode(lk::WrappedJoinRequest { compression: compression as i32, join_request }.encode_to_vec()).into_bytes()
    };
    let joining = lk::JoinRequest { publisher_offer: Some(offer.clone()), connection_settings: Some(settings), ..Default::default() };
    vec![
        encode(joining.clone(), Compression::None),
        encode(joining, Compression::Gzip),
        encode(lk::JoinRequest { publisher_offer: Some(offer), ..Default::default() }, Compression::None),
        encode(lk::JoinRequest { reconnect: true, participant_sid: "PA_x".into(), ..Default::default() }, Compression::None),
    ]
}

/// LiveKit signalling frames: a publisher's real SDP offer with its tracks, ICE candidates,
/// mutes, subscriptions, settings and pings, from either participant.
fn seed_signals() -> Vec<Vec<u8>> {
    use lk::signal_request::Message;
    use str0m::media::{Direction, MediaKind};
    let mut rtc = str0m::Rtc::builder().build(Instant::now());
    let mut changes = rtc.sdp_api();
    changes.add_media(MediaKind::Audio, Direction::SendOnly, Some("stream".into()), Some("mic".into()), None);
    changes.add_media(MediaKind::Video, Direction::SendOnly, Some("stream".into()), Some("cam".into()), None);
    changes.add_channel("_reliable".into());
    let (offer, _) = changes.apply().expect("an offer");
    let candidate = r#"{"candidate":"candidate:1 1 udp 2130706431 10.0.0.2 5000 typ host","sdpMid":"0","sdpMLineIndex":0}"#;
    let frame = |who: u8, message: Message| {
        let bytes = lk::SignalRequest { message: Some(message) }.encode_to_vec();
        [vec![who], u16::try_from(bytes.len()).expect("a short request").to_le_bytes().to_vec(), bytes].concat()
    };
    let publish = [
        frame(0, Message::AddTrack(lk::AddTrackRequest { cid: "mic".into(), name: "mic".into(), r#type: lk::TrackType::Audio as i32, ..Default::default() })),
        frame(0, Message::AddTrack(lk::AddTrackRequest { cid: "cam".into(), name: "cam".into(), r#type: lk::TrackType::Video as i32, width: 640, height: 480, ..Default::default() })),
        frame(10, Message::Offer(lk::SessionDescription { r#type: "offer".into(), sdp: offer.to_sdp_string(), id: 1, ..Default::default() })),
        frame(0, Message::Trickle(lk::TrickleRequest { candidate_init: candidate.into(), target: lk::SignalTarget::Publisher as i32, ..Default::default() })),
    ]
    .concat();
    vec![
        publish.clone(),
        [publish.clone(), frame(0, Message::Mute(lk::MuteTrackRequest { sid: "TR_x".into(), muted: true }))].concat(),
        [publish, frame(1, Message::Subscription(lk::UpdateSubscription { track_sids: vec!["TR_x".into()], subscribe: true, ..Default::default() }))].concat(),
        frame(1, Message::AddTrack(lk::AddTrackRequest { cid: "mic".into(), name: "mic".into(), ..Default::default() })),
        frame(1, Message::TrackSetting(lk::UpdateTrackSettings { track_sids: vec!["TR_x".into()], disabled: false, quality: lk::VideoQuality::Low as i32, ..Default::default() })),
        frame(1, Message::Answer(lk::SessionDescription { r#type: "answer".into(), sdp: "v=0\r\n".into(), id: 1, ..Default::default() })),
        [frame(200, Message::Ping(5)), frame(1, Message::PingReq(lk::Ping { timestamp: 5, rtt: 1 }))].concat(),
        frame(0, Message::Leave(lk::LeaveRequest::default())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A xorshift generator: the mutations are the same on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            if n == 0 { 0 } else { (self.next() % n as u64) as usize }
        }
    }

    /// Bytes that steer parsers: JSON, base64, JWT, X-Matrix and SDP punctuation.
    const INTERESTING: &[u8] = b"{}[]\",:0-1e9.\\u0000\xff\x00=;\r\n$!@#ed25519XxMatrixsig";

    fn mutate(rng: &mut Rng, input: &mut Vec<u8>, others: &[Vec<u8>]) {
        for _ in 0..=rng.below(4) {
            let at = rng.below(input.len() + 1);
            let byte = at.min(input.len().saturating_sub(1));
            match rng.below(7) {
                0 if !input.is_empty() => input[byte] ^= 1 << rng.below(8),
                1 if !input.is_empty() => input[byte] = INTERESTING[rng.below(INTERESTING.len())],
                2 => input.truncate(at),
                3 => {
                    let end = (at + 1 + rng.below(16)).min(input.len());
                    input.drain(at.min(end)..end);
                }
                4 => input.insert(at, rng.next() as u8),
                5 => {
                    // A slice of the input (or of another seed) repeated or spliced in.
                    let source = &others[rng.below(others.len())];
                    let start = rng.below(source.len());
                    let piece = source[start..(start + 1 + rng.below(64)).min(source.len())].to_vec();
                    input.splice(at..at, piece);
                }
                _ => {
                    let digits = b"18446744073709551616";
                    input.splice(at..at, digits[..1 + rng.below(digits.len())].iter().copied());
                }
            }
        }
    }

    /// Each harness over its seeds, then mutations of them: no panic (a panic fails the test
    /// with the harness's message; the input that caused it is printed first).
    fn smoke(name: &str, harness: fn(&[u8]), iterations: usize) {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name} has seeds");
        for seed in &seeds {
            harness(seed);
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
        for _ in 0..iterations {
            let mut input = seeds[rng.below(seeds.len())].clone();
            mutate(&mut rng, &mut input, &seeds);
            let caught = std::panic::catch_unwind(|| harness(&input));
            if let Err(panic) = caught {
                eprintln!("{name} panicked on {:?}", String::from_utf8_lossy(&input));
                std::panic::resume_unwind(panic);
            }
        }
    }

    #[test]
    fn seeds_reach_the_checks_past_parsing() {
        // Seeds that failed early would leave the fuzzers outside the interesting code.
        let rules = rules_for(&RoomVersionId::V11).expect("rules");
        let raw: Box<RawValue> = serde_json::from_slice(&seeds("pdu")[0]).expect("JSON");
        let unchecked = UncheckedPdu::parse(&raw, &rules).expect("a well-formed PDU");
        let keys: PublicKeyMap = unchecked.signers().into_iter().map(|(server, _)| (server.to_string(), keys_of(server.as_str()))).collect();
        unchecked.verify(&keys, &rules).expect("the seed PDU verifies");

        let mut request = http::Request::builder().method(SIGNED_REQUEST.method.clone()).uri(TRANSACTION_PATH).body(SIGNED_REQUEST.body.clone()).expect("a request");
        request.headers_mut().insert(http::header::AUTHORIZATION, SIGNED_REQUEST.authorization.clone());
        let xmatrix = routes::x_matrix(request.headers()).expect("a valid header");
        routes::verify_x_matrix(&xmatrix, &request, &server(DESTINATION), keys_of(ORIGIN)).expect("the seed signature verifies");

        let token = String::from_utf8(seeds("call_token")[0].clone()).expect("UTF-8");
        calls::verify_token(&token, &DecodingKey::from_secret(CALL_SECRET), CALL_ISSUER).expect("the seed call token verifies");
        let link = String::from_utf8(seeds("appointment_link")[0].clone()).expect("UTF-8");
        appointments::verify_link(&link, &DecodingKey::from_secret(LINK_SECRET), &server(DESTINATION)).expect("the seed link verifies");

        let body = seeds("federation_transaction")[1].clone();
        let request = http::Request::put(TRANSACTION_PATH).header(http::header::CONTENT_TYPE, "application/json").body(body).expect("a request");
        let transaction = routes::parse_request::<send_transaction_message::v1::Request>(request, &["fuzz"]).expect("a transaction");
        routes::check_transaction(&server(ORIGIN), &transaction).expect("within the limits");
        assert_eq!(transaction.pdus.len(), 4);
    }

    #[test]
    fn the_sfu_answers_the_seed_offer() {
        let mut call = None;
        CALL.with_borrow_mut(|state| *state = None);
        livekit_signal(&seeds("livekit_signal")[0]);
        CALL.with_borrow_mut(|state| call = state.take());
        let mut call = call.expect("the SFU is kept for the next input");
        assert_eq!(call.inputs, 1);
        // The publisher got its answer and its tracks' sids (drained by the harness, so
        // ask again with the same offer).
        let offer = seed_signals()[0].clone();
        let frames = lk::SignalRequest::decode(&offer[3..3 + usize::from(u16::from_le_bytes([offer[1], offer[2]]))]).expect("a frame");
        call.sfu.signal(call.now, call.ids[0], frames);
        let mut published = false;
        while let Some((id, response)) = call.sfu.poll_signal() {
            published |= id == call.ids[0] && matches!(response.message, Some(lk::signal_response::Message::TrackPublished(_)));
        }
        assert!(published);
    }

    #[test]
    fn fuzz_smoke_pdu() {
        smoke("pdu", pdu, 5000);
    }

    #[test]
    fn fuzz_smoke_federation_transaction() {
        smoke("federation_transaction", federation_transaction, 3000);
    }

    #[test]
    fn fuzz_smoke_x_matrix() {
        smoke("x_matrix", x_matrix, 5000);
    }

    #[test]
    fn fuzz_smoke_livekit_signal() {
        smoke("livekit_signal", livekit_signal, 2000);
    }

    #[test]
    fn the_seed_join_request_gets_the_published_tracks_on_its_lines() {
        let (mut sfu, now) = published_call();
        let encoded = String::from_utf8(seeds("join_request")[0].clone()).expect("base64");
        let request = crate::livekit::signal::decode_join_request(&encoded, 1 << 20).expect("a readable join request");
        let options = JoinOptions { auto_subscribe: true, single_connection: true, offer: request.publisher_offer, ..JoinOptions::default() };
        let ana = sfu.join(now, &loopback::grant("ana", "call", true), &options);
        let mut bound = None;
        while let Some((id, response)) = sfu.poll_signal() {
            if let (true, Some(lk::signal_response::Message::Answer(answer))) = (id == ana, response.message) {
                bound = Some(answer.mid_to_track_id.len());
            }
        }
        assert_eq!(bound, Some(2), "Ben's audio and video on Ana's two lines");
    }

    #[test]
    fn fuzz_smoke_join_request() {
        smoke("join_request", join_request, 1000);
    }

    #[test]
    fn fuzz_smoke_call_token() {
        smoke("call_token", call_token, 5000);
    }

    #[test]
    fn fuzz_smoke_appointment_link() {
        smoke("appointment_link", appointment_link, 5000);
    }

    #[test]
    fn fuzz_smoke_plugin_boundary() {
        smoke("plugin_boundary", plugin_boundary, 5000);
    }

    /// Writes every harness's seeds to `$LIMBIC_FUZZ_SEEDS/<harness>/` (`scripts/fuzz` starts
    /// libFuzzer's corpora with them).
    #[test]
    #[ignore = "run by scripts/fuzz"]
    fn write_seeds() {
        let dir = std::path::PathBuf::from(std::env::var_os("LIMBIC_FUZZ_SEEDS").expect("LIMBIC_FUZZ_SEEDS names a directory"));
        for (name, _) in HARNESSES {
            std::fs::create_dir_all(dir.join(name)).expect("a seed directory");
            for (n, seed) in seeds(name).iter().enumerate() {
                std::fs::write(dir.join(name).join(format!("seed-{n}")), seed).expect("a seed file");
            }
        }
    }
}
