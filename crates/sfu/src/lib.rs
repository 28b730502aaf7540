//! The SFU core: every participant's peer connections, the tracks they publish, and the
//! forwarding of their media to the others, without transcoding. A participant has two
//! connections (LiveKit's `/rtc`: the client offers on its publisher connection, we offer on
//! its subscriber connection) or one (LiveKit's `/rtc/v1`: the client offers everything, and
//! is asked for media lines to receive on; [`single`]).
//!
//! Sans-IO, in str0m's style: fed signalling requests, UDP datagrams and timeouts, and polled
//! for datagrams to send, signalling responses and the next timeout. The driver (the server's
//! `calls::media`) owns the socket and the WebSockets.
//!
//! It knows nothing of Matrix: a participant comes with a [`Grant`] (what their call token
//! allows), and the application's room and user they were admitted for are opaque labels that
//! the application asks about again ([`Sfu::live`], [`Sfu::close`], recordings).

pub mod containers;
mod dynacast;
mod forwarding;
mod limits;
mod quality;
#[cfg(any(test, feature = "testing"))]
pub mod loopback;
mod recording;
mod rewrite;
mod signalling;
mod single;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use livekit_protocol as lk;
use prost::Message as _;
use str0m::{
    Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcError,
    channel::{ChannelConfig, ChannelData, ChannelId, Reliability},
    bwe::{Bitrate, BweKind},
    change::{SdpAnswer, SdpOffer, SdpPendingOffer},
    net::TcpType,
    media::{Direction, KeyframeRequest, KeyframeRequestKind, MediaKind, Mid, Pt, Rid},
    net::Receive,
    rtp::{ExtensionValues, RtpPacket, RtpWrite},
};
pub use str0m::net::Protocol;

use containers::{Ivf, OggOpus};
use dynacast::*;
use quality::*;
use forwarding::*;
pub use limits::{Bucket, Limits, Rate};
pub use recording::RecordedTrack;
use recording::*;
use rewrite::*;

/// A participant's handle inside the SFU.
pub type ParticipantId = u64;

/// Where peers send media: the host candidates every connection's SDP carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MediaAddresses {
    pub udp: SocketAddr,
    /// ICE over TCP (RFC 6544, a passive candidate), for peers whose UDP is blocked.
    pub tcp: Option<SocketAddr>,
}

/// A packet for a peer: a UDP datagram, or one RFC 4571 frame on its TCP connection.
#[derive(Debug)]
pub struct Outgoing {
    pub proto: Protocol,
    pub destination: SocketAddr,
    pub contents: Vec<u8>,
}

/// How a participant joins, besides what their token grants.
#[derive(Clone, Debug, Default)]
pub struct JoinOptions {
    /// Subscribe to every track in the room (LiveKit's `auto_subscribe`).
    pub auto_subscribe: bool,
    /// The TURN servers the client may relay through, with its credentials (the join
    /// response's `ice_servers`).
    pub ice_servers: Vec<lk::IceServer>,
    /// One peer connection for everything (LiveKit's `/rtc/v1`), not two.
    pub single_connection: bool,
    /// The client's first offer, sent with its join request (`/rtc/v1`).
    pub offer: Option<lk::SessionDescription>,
}

/// What LiveKit clients are told this server is (they need a version of at least 1.8.0).
const SERVER_VERSION: &str = "1.9.0";
const PING_INTERVAL_SECONDS: i32 = 5;
const PING_TIMEOUT_SECONDS: i32 = 15;
/// How often a publisher is asked for a keyframe at most, per track.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);
/// LiveKit's data channel labels.
const RELIABLE: &str = "_reliable";
const LOSSY: &str = "_lossy";
/// How often the active speakers are worked out.
/// What a subscriber's NACK can still get resent: a second of each down-track (Janus keeps
/// half of one), not str0m's three, which at 1 Mbit/s hold about 400 KB of video per
/// down-track. A NACK comes a round trip after the loss; a second covers the slowest links.
const RTX_HISTORY: Duration = Duration::from_secs(1);
/// The same second at 2.5 Mbit/s of full packets.
const RTX_MAX_PACKETS: usize = 300;
/// str0m's default: resends are dropped once they would be over 15 % of what a stream sends.
const RTX_RATIO_CAP: Option<f32> = Some(0.15);

/// Timeouts already due that one [`poll_output`] fires; a bound, so that a connection asking
/// for "now" again and again cannot hold its caller.
const MAX_TIMEOUTS_AT_ONCE: usize = 64;

const SPEAKER_INTERVAL: Duration = Duration::from_millis(300);
/// How long a participant whose signalling closed without a `leave`, or whose connection went
/// silent, stays in the call (unseen by the others) for their SDK to resume.
pub const RESUME_WINDOW: Duration = Duration::from_secs(15);
/// The smoothed audio level above which a participant is speaking (about -30 dBov).
const SPEAKING_LEVEL: f32 = 0.03;
/// The weight of each new audio-level sample in the smoothed level.
const LEVEL_SMOOTHING: f32 = 0.2;

/// What a participant may do in a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rights {
    pub publish: bool,
    pub subscribe: bool,
    /// Mute and remove other participants.
    pub moderate: bool,
    pub record: bool,
}

impl Rights {
    /// Whether these rights include everything `granted` allows.
    pub fn cover(self, granted: Rights) -> bool {
        (self.publish || !granted.publish) && (self.subscribe || !granted.subscribe) && (self.moderate || !granted.moderate) && (self.record || !granted.record)
    }
}

/// Who joins, where, and what their call token allows.
#[derive(Clone, Debug)]
pub struct Grant {
    /// The SFU room.
    pub room: String,
    /// The participant's identity in the call, and the name others see.
    pub identity: String,
    pub name: String,
    /// The application's room and user the participant was admitted for.
    pub app_room: String,
    pub app_user: String,
    pub rights: Rights,
    /// Whether they may send data packets.
    pub publish_data: bool,
}

/// One of the two peer connections of a participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pc {
    Publisher,
    Subscriber,
}

/// A track a participant publishes.
struct Published {
    info: lk::TrackInfo,
    /// The client's id for it, until its media line arrives.
    cid: String,
    /// The publisher connection's media line carrying it, once negotiated.
    mid: Option<Mid>,
    last_keyframe_request: Option<Instant>,
    /// Audio: the smoothed level (0 silent to 1 loudest) from the audio-level extension.
    level: f32,
    /// Simulcast: each layer as it arrives, and which the publisher was told to send.
    layers: HashMap<Rid, Layer>,
    dynacast: Dynacast,
}

/// The bandwidth a subscriber connection starts out with, before TWCC says more.
const INITIAL_ESTIMATE_KBPS: u64 = 2_500;

/// Another participant's track, forwarded to this participant.
struct DownTrack {
    publisher: ParticipantId,
    track_sid: String,
    kind: MediaKind,
    state: DownState,
    layers: Layering,
    rtp: Rewriter,
    /// The publisher's payload type last forwarded, and the subscriber's for the same codec.
    pt: Option<(Pt, Pt)>,
}

impl DownTrack {
    fn new(publisher: ParticipantId, track_sid: String, kind: MediaKind) -> Self {
        Self { publisher, track_sid, kind, state: DownState::ToOpen, layers: Layering::default(), rtp: Rewriter::default(), pt: None }
    }
}

/// Which simulcast layer a subscriber gets of a video track.
struct Layering {
    /// What the subscriber asked for (LiveKit's `VideoQuality`: low, medium, high, off).
    wanted: i32,
    /// The layer being forwarded; a switch happens on the new layer's keyframe.
    current: Option<Rid>,
    /// The quality of the best layer it could get by its wish and what arrives, as last worked
    /// out ([`Sfu::steer_bandwidth_estimates`]).
    best: Option<i32>,
    /// Paused: the subscriber's bandwidth does not carry even the lowest layer
    /// ([`Sfu::pause_what_bandwidth_does_not_carry`]); and since when it has fallen short.
    paused: bool,
    short_since: Option<Instant>,
}

impl Default for Layering {
    fn default() -> Self {
        Self { wanted: lk::VideoQuality::High as i32, current: None, best: None, paused: false, short_since: None }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DownState {
    /// Waiting for the next subscriber offer.
    ToOpen,
    /// In the offer we sent; forwarding starts with the answer.
    Negotiating(Mid),
    Open(Mid),
}

impl DownState {
    fn mid(self) -> Option<Mid> {
        match self {
            DownState::ToOpen => None,
            DownState::Negotiating(mid) | DownState::Open(mid) => Some(mid),
        }
    }
}

struct Participant {
    room: String,
    /// The application's room and user the participant was admitted for.
    app_room: String,
    app_user: String,
    info: lk::ParticipantInfo,
    rights: Rights,
    auto_subscribe: bool,
    publisher: Rtc,
    /// None with a single connection (`/rtc/v1`): `publisher` carries the down tracks too.
    subscriber: Option<Rtc>,
    subscriber_pending: Option<SdpPendingOffer>,
    /// The offer `subscriber_pending` belongs to, sent again to a resumed client.
    last_offer: Option<lk::SessionDescription>,
    /// The subscriber connection's next offer restarts ICE (the client resumed).
    ice_restart_due: bool,
    next_offer_id: u32,
    /// Since when the participant has been out of reach (signalling closed, or media silent),
    /// and whether their signalling is gone: [`RESUME_WINDOW`] later they are gone for good.
    unreachable_since: Option<Instant>,
    signalling_gone: bool,
    /// Media lines of the subscriber connection to remove with the next offer.
    to_stop: Vec<Mid>,
    /// The subscriber connection's first media line when its first offer had no data channels:
    /// the one that tags its BUNDLE group. It is made inactive rather than stopped: a client's
    /// WebRTC (browsers', libwebrtc) gives the group a new transport when its tag is stopped or
    /// it empties, which the SFU's one ICE and DTLS session never reaches.
    bundle_tag: Option<Mid>,
    /// The data channels LiveKit clients expect on their subscriber connection (`_reliable`,
    /// `_lossy`), once offered; and the labels of those they opened on their publisher one.
    subscriber_channels: Option<HashMap<&'static str, ChannelId>>,
    publisher_channels: HashMap<ChannelId, String>,
    /// What is left of the participant's data rate.
    data_budget: Bucket,
    tracks: Vec<Published>,
    down: Vec<DownTrack>,
    /// The subscriber connection's estimated available bitrate (TWCC), shared by its video, and
    /// when the connection next probes for the bitrate of the layers wanted.
    estimate: Estimate,
    retry: Retry,
    /// Loss and round trip, for their connection quality.
    link: Link,
    /// With a single connection: its media lines to receive on.
    lines: single::Lines,
}

impl Participant {
    fn rtc(&mut self, pc: Pc) -> &mut Rtc {
        match (pc, &mut self.subscriber) {
            (Pc::Subscriber, Some(subscriber)) => subscriber,
            _ => &mut self.publisher,
        }
    }

    /// Whether everything goes over one connection (`/rtc/v1`).
    fn single(&self) -> bool {
        self.subscriber.is_none()
    }

    /// The connection that `pc` is for this participant: with a single connection, both are
    /// the one.
    fn pc(&self, pc: Pc) -> Pc {
        if self.single() { Pc::Publisher } else { pc }
    }

    fn bump_version(&mut self) {
        self.info.version += 1;
    }

    /// What others are told of the participant: who they are and the tracks they publish.
    fn public_info(&self) -> lk::ParticipantInfo {
        let mut info = self.info.clone();
        info.tracks = self.tracks.iter().filter(|t| t.mid.is_some()).map(|t| t.info.clone()).collect();
        info
    }
}

/// A participant in a call, as the application knows them.
pub struct Live {
    pub id: ParticipantId,
    pub app_room: String,
    pub app_user: String,
    pub rights: Rights,
}

/// Something a peer connection reported that may concern other participants.
enum Happened {
    MediaAdded { mid: Mid, kind: MediaKind, direction: Direction },
    MediaChanged { mid: Mid, direction: Direction },
    /// An RTP packet of the publisher connection's media line `mid` (of its layer `rid`).
    Rtp { mid: Mid, rid: Option<Rid>, packet: RtpPacket },
    KeyframeWanted(KeyframeRequest),
    Data(ChannelData),
    Disconnected,
}

pub struct Sfu {
    /// Where peers send media (the host candidates): the sockets', or the announced address.
    addresses: MediaAddresses,
    limits: Limits,
    participants: HashMap<ParticipantId, Participant>,
    next_id: ParticipantId,
    transmits: VecDeque<Outgoing>,
    signals: VecDeque<(ParticipantId, lk::SignalResponse)>,
    /// Participants whose connections failed, for the driver to close.
    gone: VecDeque<ParticipantId>,
    /// Per room, who was last announced as speaking, and when speakers were last worked out.
    speaking: HashMap<String, HashMap<String, f32>>,
    speakers_checked: Option<Instant>,
    /// When everyone was last told everyone's connection quality.
    quality_announced: Option<Instant>,
    /// The SFU rooms being recorded.
    recordings: HashMap<String, Recording>,
    /// Connections with input since their output was last drained: only they are polled.
    dirty: HashSet<(ParticipantId, Pc)>,
    /// Participants with down tracks waiting for a subscriber offer.
    to_negotiate: HashSet<ParticipantId>,
    /// When each connection's timers next fire.
    timers: HashMap<(ParticipantId, Pc), Instant>,
    /// Which connection a peer's address belongs to (learnt from the first packet it sent).
    routes: HashMap<(Protocol, SocketAddr), (ParticipantId, Pc)>,
    /// SFU rooms where someone sent a data packet: only their subscriber connections get data
    /// channels, whose SCTP costs every connection time even when idle.
    data_rooms: HashSet<String>,
    /// When each SFU room with someone in it was opened (by its first participant; Unix ms).
    opened: HashMap<String, i64>,
}

fn random_sid(prefix: &str) -> String {
    use rand::{RngExt, distr::Alphanumeric};
    let suffix: String = rand::rng().sample_iter(Alphanumeric).take(12).map(char::from).collect();
    format!("{prefix}{suffix}")
}

fn response(message: lk::signal_response::Message) -> lk::SignalResponse {
    lk::SignalResponse { message: Some(message) }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The next output of `rtc`, firing at once the timeouts already due at `now`. str0m's pacer
/// lets one packet out per timeout and asks for the next straight away: fired here, a frame's
/// packets leave together rather than one per turn of the caller's timer (a millisecond each
/// with tokio's).
pub fn poll_output(rtc: &mut Rtc, now: Instant) -> Result<Output, RtcError> {
    for _ in 0..MAX_TIMEOUTS_AT_ONCE {
        match rtc.poll_output()? {
            Output::Timeout(at) if at <= now => rtc.handle_input(Input::Timeout(now))?,
            output => return Ok(output),
        }
    }
    rtc.poll_output()
}

impl Sfu {
    pub fn new(addresses: MediaAddresses, limits: Limits) -> Self {
        Self {
            addresses,
            limits,
            participants: HashMap::new(),
            next_id: 1,
            transmits: VecDeque::new(),
            signals: VecDeque::new(),
            gone: VecDeque::new(),
            speaking: HashMap::new(),
            speakers_checked: None,
            quality_announced: None,
            recordings: HashMap::new(),
            dirty: HashSet::new(),
            to_negotiate: HashSet::new(),
            timers: HashMap::new(),
            routes: HashMap::new(),
            data_rooms: HashSet::new(),
            opened: HashMap::new(),
        }
    }

    fn new_rtc(&self, now: Instant, estimate_bandwidth: bool) -> Rtc {
        // RTP mode: packets are forwarded as they came, not put together into frames and cut up
        // again for each subscriber. VP8 and Opus only: what LiveKit's SDKs send by default,
        // and what forwarding, recording and `mime_type` know of.
        let mut config = Rtc::builder().set_ice_lite(true).set_stats_interval(Some(STATS_INTERVAL)).set_rtp_mode(true).clear_codecs().enable_opus(true, false).enable_vp8(true);
        if estimate_bandwidth {
            config = config.enable_bwe(Some(Bitrate::kbps(INITIAL_ESTIMATE_KBPS)));
        }
        let mut rtc = config.build(now);
        if let Ok(candidate) = Candidate::host(self.addresses.udp, Protocol::Udp) {
            rtc.add_local_candidate(candidate);
        }
        // Peers connect to it (passive); clients whose UDP gets through prefer UDP.
        if let Some(tcp) = self.addresses.tcp
            && let Ok(candidate) = Candidate::builder().tcp().host(tcp).tcptype(TcpType::Passive).build()
        {
            rtc.add_local_candidate(candidate);
        }
        rtc
    }

    /// Admits the holder of `grant`: they get the room and who is in it, and the others learn
    /// of them. In a full call they get `leave` (`JOIN_FAILURE`, as LiveKit answers a join
    /// beyond a room's `max_participants`) instead, and are gone.
    pub fn join(&mut self, now: Instant, grant: &Grant, options: &JoinOptions) -> ParticipantId {
        let auto_subscribe = options.auto_subscribe;
        let id = self.next_id;
        self.next_id += 1;
        let room = grant.room.clone();
        if self.is_full(&room) {
            tracing::info!(participant = id, %room, limit = self.limits.participants_per_call, "refused a participant: the call is full");
            let leave = lk::LeaveRequest { reason: lk::DisconnectReason::JoinFailure as i32, action: lk::leave_request::Action::Disconnect as i32, ..Default::default() };
            self.signals.push_back((id, response(lk::signal_response::Message::Leave(leave))));
            self.gone.push_back(id);
            return id;
        }
        let info = lk::ParticipantInfo {
            sid: random_sid("PA_"),
            identity: grant.identity.clone(),
            name: grant.name.clone(),
            state: lk::participant_info::State::Joined as i32,
            joined_at: now_ms() / 1000,
            joined_at_ms: now_ms(),
            version: 1,
            permission: Some(lk::ParticipantPermission {
                can_subscribe: grant.rights.subscribe,
                can_publish: grant.rights.publish,
                can_publish_data: grant.publish_data,
                ..Default::default()
            }),
            is_publisher: grant.rights.publish,
            ..Default::default()
        };
        let others: Vec<lk::ParticipantInfo> = self.participants.values().filter(|p| p.room == room).map(Participant::public_info).collect();
        self.opened.entry(room.clone()).or_insert_with(now_ms);
        let join = lk::JoinResponse {
            room: Some(lk::Room { num_participants: others.len() as u32 + 1, ..self.room_info(&room) }),
            participant: Some(info.clone()),
            other_participants: others,
            server_version: SERVER_VERSION.to_owned(),
            subscriber_primary: false,
            ping_interval: PING_INTERVAL_SECONDS,
            ping_timeout: PING_TIMEOUT_SECONDS,
            ice_servers: options.ice_servers.clone(),
            server_info: Some(lk::ServerInfo {
                edition: lk::server_info::Edition::Standard as i32,
                version: SERVER_VERSION.to_owned(),
                protocol: 16,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.signals.push_back((id, response(lk::signal_response::Message::Join(join))));
        let participant = Participant {
            room: room.clone(),
            app_room: grant.app_room.clone(),
            app_user: grant.app_user.clone(),
            info: info.clone(),
            rights: grant.rights,
            auto_subscribe,
            // A single connection carries the down tracks, whose bandwidth is estimated.
            publisher: self.new_rtc(now, options.single_connection),
            subscriber: (!options.single_connection).then(|| self.new_rtc(now, true)),
            subscriber_pending: None,
            last_offer: None,
            ice_restart_due: false,
            next_offer_id: 1,
            unreachable_since: None,
            signalling_gone: false,
            to_stop: Vec::new(),
            bundle_tag: None,
            subscriber_channels: None,
            publisher_channels: HashMap::new(),
            data_budget: Bucket::new(self.limits.data_rate, now),
            tracks: Vec::new(),
            down: Vec::new(),
            estimate: Estimate::default(),
            retry: Retry::default(),
            link: Link::default(),
            lines: single::Lines::default(),
        };
        self.participants.insert(id, participant);
        self.dirty.extend([(id, Pc::Publisher), (id, Pc::Subscriber)]);
        if self.data_rooms.contains(&room) {
            self.to_negotiate.insert(id);
        }
        self.broadcast_update(id);
        if auto_subscribe && grant.rights.subscribe {
            let published: Vec<(ParticipantId, String, MediaKind)> = self
                .participants
                .iter()
                .filter(|(other, p)| **other != id && p.room == room)
                .flat_map(|(other, p)| p.tracks.iter().filter(|t| t.mid.is_some()).map(move |t| (*other, t.info.sid.clone(), kind_of(&t.info))))
                .collect();
            if let Some(me) = self.participants.get_mut(&id) {
                for (publisher, track_sid, kind) in published {
                    me.down.push(DownTrack::new(publisher, track_sid, kind));
                    self.to_negotiate.insert(id);
                }
            }
        }
        // Answered with the tracks subscribed to bound to its lines, where it has them.
        if let Some(offer) = options.offer.clone() {
            self.publisher_offer(id, offer);
        }
        self.process(now);
        id
    }

    /// The participant left (or their signalling connection closed): the others see them go.
    pub fn leave(&mut self, now: Instant, id: ParticipantId) {
        let Some(mut gone) = self.participants.remove(&id) else { return };
        self.routes.retain(|_, (owner, _)| *owner != id);
        self.timers.retain(|(owner, _), _| *owner != id);
        self.dirty.retain(|(owner, _)| *owner != id);
        self.to_negotiate.remove(&id);
        gone.publisher.disconnect();
        if let Some(subscriber) = &mut gone.subscriber {
            subscriber.disconnect();
        }
        gone.info.state = lk::participant_info::State::Disconnected as i32;
        gone.bump_version();
        let update = response(lk::signal_response::Message::Update(lk::ParticipantUpdate { participants: vec![gone.public_info()] }));
        let mut renegotiate = Vec::new();
        for (other, participant) in &mut self.participants {
            if participant.room != gone.room {
                continue;
            }
            self.signals.push_back((*other, update.clone()));
            let before = participant.down.len();
            let stopped: Vec<Mid> = participant.down.iter().filter(|d| d.publisher == id).filter_map(|d| d.state.mid()).collect();
            participant.down.retain(|d| d.publisher != id);
            if participant.down.len() != before {
                renegotiate.push((*other, stopped));
            }
        }
        for (other, mids) in renegotiate {
            self.stop_media(now, other, &mids);
        }
        if !self.participants.values().any(|p| p.room == gone.room) {
            self.data_rooms.remove(&gone.room);
            self.opened.remove(&gone.room);
        }
        self.process(now);
    }

    /// The participant's signalling closed without a `leave` (their network changed or
    /// dropped): they stay, and the others see nothing, for [`RESUME_WINDOW`], for their SDK to
    /// resume ([`Self::resume`]).
    pub fn detach(&mut self, now: Instant, id: ParticipantId) {
        if let Some(participant) = self.participants.get_mut(&id) {
            participant.signalling_gone = true;
            participant.unreachable_since.get_or_insert(now);
        }
    }

    /// A resumed signalling connection (LiveKit's `/rtc?reconnect=1&sid=`): the participant
    /// `sid` in `room` with `identity` goes on with their tracks and subscriptions. They get
    /// `reconnect`, the subscriber offer they may have missed, and an offer restarting ICE on
    /// their subscriber connection (they restart their publisher's themselves). With a single
    /// connection (`/rtc/v1`, which the participant must resume on as they joined) there is no
    /// offer of ours: they restart its ICE, and get what they should receive on lines they are
    /// asked for again. `None` if there is no such participant (any more): the SDK must join
    /// afresh.
    pub fn resume(&mut self, now: Instant, room: &str, identity: &str, sid: &str, single_connection: bool, ice_servers: Vec<lk::IceServer>) -> Option<ParticipantId> {
        let id = self.find(room, identity).filter(|id| self.participants.get(id).is_some_and(|p| p.info.sid == sid && p.single() == single_connection) && !self.gone.contains(id))?;
        // What they missed meanwhile: who is in the call now, with their tracks.
        let others: Vec<lk::ParticipantInfo> = self.participants.iter().filter(|(other, p)| **other != id && p.room == room).map(|(_, p)| p.public_info()).collect();
        let participant = self.participants.get_mut(&id)?;
        participant.signalling_gone = false;
        participant.unreachable_since = None;
        // A subscriber connection never offered has no ICE to restart.
        participant.ice_restart_due = participant.last_offer.is_some();
        // A requirement they may have missed is sent again.
        participant.lines.asked = false;
        let reconnect = lk::ReconnectResponse { ice_servers, ..Default::default() };
        self.signals.push_back((id, response(lk::signal_response::Message::Reconnect(reconnect))));
        if !others.is_empty() {
            self.signals.push_back((id, response(lk::signal_response::Message::Update(lk::ParticipantUpdate { participants: others }))));
        }
        if participant.subscriber_pending.is_some()
            && let Some(offer) = participant.last_offer.clone()
        {
            self.signals.push_back((id, response(lk::signal_response::Message::Offer(offer))));
        }
        self.to_negotiate.insert(id);
        self.dirty.extend([(id, Pc::Publisher), (id, Pc::Subscriber)]);
        self.process(now);
        Some(id)
    }

    /// One signalling request of a participant.
    pub fn signal(&mut self, now: Instant, id: ParticipantId, request: lk::SignalRequest) {
        use lk::signal_request::Message;
        let Some(message) = request.message else { return };
        if self.participants.contains_key(&id) {
            self.dirty.extend([(id, Pc::Publisher), (id, Pc::Subscriber)]);
        }
        match message {
            Message::Offer(offer) => self.publisher_offer(id, offer),
            Message::Answer(answer) => self.subscriber_answer(id, &answer),
            Message::Trickle(trickle) => self.trickle(id, &trickle),
            Message::AddTrack(add) => self.add_track(id, add),
            Message::Mute(mute) => self.mute(id, &mute),
            Message::Subscription(update) => self.subscription(now, id, &update),
            Message::TrackSetting(settings) => self.track_settings(id, &settings),
            Message::Leave(_) => {
                self.leave(now, id);
                return;
            }
            Message::Ping(timestamp) => self.signals.push_back((id, response(lk::signal_response::Message::Pong(timestamp)))),
            Message::PingReq(ping) => {
                let pong = lk::Pong { last_ping_timestamp: ping.timestamp, timestamp: now_ms() };
                self.signals.push_back((id, response(lk::signal_response::Message::PongResp(pong))));
            }
            other => tracing::debug!(participant = id, message = ?std::mem::discriminant(&other), "signalling request not handled"),
        }
        self.process(now);
    }

    /// A UDP datagram (or a TCP connection's frame) for whichever peer connection it belongs to.
    pub fn receive(&mut self, now: Instant, proto: Protocol, source: SocketAddr, destination: SocketAddr, datagram: &[u8]) {
        let Ok(contents) = datagram.try_into() else { return };
        let input = Input::Receive(now, Receive { proto, source, destination, contents });
        let known = self.routes.get(&(proto, source)).copied().filter(|(id, pc)| self.participants.get_mut(id).is_some_and(|p| p.rtc(*pc).accepts(&input)));
        let target = known.or_else(|| {
            self.participants.iter_mut().find_map(|(id, p)| {
                if p.publisher.accepts(&input) {
                    Some((*id, Pc::Publisher))
                } else if p.subscriber.as_ref().is_some_and(|subscriber| subscriber.accepts(&input)) {
                    Some((*id, Pc::Subscriber))
                } else {
                    None
                }
            })
        });
        let Some((id, pc)) = target else { return };
        self.routes.insert((proto, source), (id, pc));
        if let Some(participant) = self.participants.get_mut(&id)
            && let Err(error) = participant.rtc(pc).handle_input(input)
        {
            tracing::debug!(participant = id, %error, "a datagram was not accepted");
        }
        self.dirty.insert((id, pc));
        self.process(now);
    }

    /// Time passed: every connection's timers, and (every [`SPEAKER_INTERVAL`]) the active
    /// speakers, bandwidth probes and publishers' layers; every [`QUALITY_INTERVAL`], the
    /// connection quality.
    pub fn timeout(&mut self, now: Instant) {
        let due: Vec<(ParticipantId, Pc)> = self.timers.iter().filter(|(_, at)| **at <= now).map(|(key, _)| *key).collect();
        for (id, pc) in due {
            if let Some(participant) = self.participants.get_mut(&id) {
                let _ = participant.rtc(pc).handle_input(Input::Timeout(now));
                self.dirty.insert((id, pc));
            }
        }
        for (id, participant) in &self.participants {
            if participant.unreachable_since.is_some_and(|since| now.duration_since(since) >= RESUME_WINDOW) && !self.gone.contains(id) {
                tracing::info!(participant = id, "gone: not back within the resume window");
                self.gone.push_back(*id);
            }
        }
        if self.speakers_checked.is_none_or(|at| now.duration_since(at) >= SPEAKER_INTERVAL) {
            self.speakers_checked = Some(now);
            self.announce_speakers();
            self.pause_what_bandwidth_does_not_carry(now);
            self.steer_bandwidth_estimates(now);
            self.steer_publishers(now);
        }
        if self.quality_announced.is_none_or(|at| now.duration_since(at) >= QUALITY_INTERVAL) {
            self.quality_announced = Some(now);
            self.announce_quality();
        }
        self.process(now);
    }

    /// Whether an SFU room's call has as many participants as a call may have.
    pub fn is_full(&self, room: &str) -> bool {
        self.participants.values().filter(|p| p.room == room).count() >= self.limits.participants_per_call
    }

    /// Who is in an SFU room, as its participants see each other.
    pub fn participants_in(&self, room: &str) -> Vec<lk::ParticipantInfo> {
        self.participants.values().filter(|p| p.room == room).map(Participant::public_info).collect()
    }

    /// A moderator muted a participant's track: the publisher is told to mute it, and everyone
    /// sees it muted. `None` if there is no such participant or track.
    pub fn mute_for(&mut self, now: Instant, room: &str, identity: &str, track_sid: &str) -> Option<lk::TrackInfo> {
        let id = self.find(room, identity)?;
        let participant = self.participants.get_mut(&id)?;
        let track = participant.tracks.iter_mut().find(|t| t.info.sid == track_sid)?;
        let changed = !track.info.muted;
        track.info.muted = true;
        let info = track.info.clone();
        let mute = lk::MuteTrackRequest { sid: track_sid.to_owned(), muted: true };
        self.signals.push_back((id, response(lk::signal_response::Message::Mute(mute))));
        if changed {
            if let Some(participant) = self.participants.get_mut(&id) {
                participant.bump_version();
            }
            self.broadcast_update(id);
        }
        self.process(now);
        Some(info)
    }

    /// A moderator removed a participant: they are told, and disconnected.
    pub fn remove(&mut self, room: &str, identity: &str) -> bool {
        let Some(id) = self.find(room, identity) else { return false };
        self.disconnect(id, lk::DisconnectReason::ParticipantRemoved);
        true
    }

    /// The Matrix room's calls end (its session is over): everyone in them is told, and
    /// disconnected. How many were.
    pub fn close(&mut self, app_room: &str) -> usize {
        let ids: Vec<ParticipantId> = self.participants.iter().filter(|(_, p)| p.app_room == app_room).map(|(id, _)| *id).collect();
        for id in &ids {
            self.disconnect(*id, lk::DisconnectReason::RoomClosed);
        }
        ids.len()
    }

    /// Tells a participant why they are leaving, and disconnects them: the others see them go.
    pub fn disconnect(&mut self, id: ParticipantId, reason: lk::DisconnectReason) {
        if !self.participants.contains_key(&id) || self.gone.contains(&id) {
            return;
        }
        let leave = lk::LeaveRequest { reason: reason as i32, action: lk::leave_request::Action::Disconnect as i32, ..Default::default() };
        self.signals.push_back((id, response(lk::signal_response::Message::Leave(leave))));
        self.gone.push_back(id);
    }

    /// The SFU rooms holding calls of a Matrix room.
    pub fn rooms_of(&self, app_room: &str) -> Vec<String> {
        let mut rooms: Vec<String> = self.participants.values().filter(|p| p.app_room == app_room).map(|p| p.room.clone()).collect();
        rooms.sort();
        rooms.dedup();
        rooms
    }

    /// Everyone in a call, with the Matrix room and user and the rights of their call token.
    pub fn live(&self) -> Vec<Live> {
        self.participants.iter().map(|(id, p)| Live { id: *id, app_room: p.app_room.clone(), app_user: p.app_user.clone(), rights: p.rights }).collect()
    }

    /// The Matrix users in an SFU room's call.
    pub fn callers(&self, room: &str) -> Vec<String> {
        self.participants.values().filter(|p| p.room == room).map(|p| p.app_user.clone()).collect()
    }

    fn find(&self, room: &str, identity: &str) -> Option<ParticipantId> {
        self.participants.iter().find(|(_, p)| p.room == room && p.info.identity == identity).map(|(id, _)| *id)
    }

    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.transmits.pop_front()
    }

    pub fn poll_signal(&mut self) -> Option<(ParticipantId, lk::SignalResponse)> {
        self.signals.pop_front()
    }

    /// A participant whose connections failed; the driver closes their signalling.
    pub fn poll_gone(&mut self) -> Option<ParticipantId> {
        self.gone.pop_front()
    }

    /// When [`Self::timeout`] is next due.
    pub fn next_timeout(&self, now: Instant) -> Instant {
        let expiring = self.participants.values().filter_map(|p| p.unreachable_since).map(|since| since + RESUME_WINDOW);
        let next = self.timers.values().copied().chain(expiring).min().unwrap_or(now + SPEAKER_INTERVAL);
        next.min(self.speakers_checked.map_or(now, |at| at + SPEAKER_INTERVAL))
    }

    /// Negotiates what is waiting, drains every connection's output (datagrams to send, events),
    /// and acts on the events, until nothing more happens.
    fn process(&mut self, now: Instant) {
        loop {
            for id in std::mem::take(&mut self.to_negotiate) {
                self.negotiate(id);
            }
            if self.dirty.is_empty() {
                return;
            }
            let mut happened = Vec::new();
            for (id, pc) in std::mem::take(&mut self.dirty) {
                let Some(participant) = self.participants.get_mut(&id) else { continue };
                let pc = participant.pc(pc);
                let carries_down = pc == participant.pc(Pc::Subscriber);
                loop {
                    match poll_output(participant.rtc(pc), now) {
                        Ok(Output::Transmit(transmit)) => self.transmits.push_back(Outgoing { proto: transmit.proto, destination: transmit.destination, contents: transmit.contents.into() }),
                        Ok(Output::Timeout(at)) => {
                            self.timers.insert((id, pc), at);
                            break;
                        }
                        Ok(Output::Event(event)) => match event {
                            Event::MediaAdded(added) => happened.push((id, pc, Happened::MediaAdded { mid: added.mid, kind: added.kind, direction: added.direction })),
                            Event::RtpPacket(packet) => {
                                if let Some(stream) = participant.rtc(pc).direct_api().stream_rx(&packet.header.ssrc) {
                                    happened.push((id, pc, Happened::Rtp { mid: stream.mid(), rid: stream.rid(), packet }));
                                }
                            }
                            Event::MediaChanged(changed) => happened.push((id, pc, Happened::MediaChanged { mid: changed.mid, direction: changed.direction })),
                            Event::KeyframeRequest(request) => happened.push((id, pc, Happened::KeyframeWanted(request))),
                            Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) if carries_down => participant.estimate.update(now, estimate),
                            Event::PeerStats(stats) => participant.link.update(pc == Pc::Publisher, carries_down, &stats),
                            Event::MediaEgressStats(stats) if carries_down => participant.link.reported_by_subscriber(stats.loss),
                            Event::ChannelOpen(channel, label) if pc == Pc::Publisher => {
                                if participant.publisher_channels.len() < self.limits.data_channels {
                                    participant.publisher_channels.insert(channel, label);
                                } else {
                                    tracing::info!(participant = id, %label, "closed a data channel beyond the limit");
                                    participant.publisher.direct_api().close_data_channel(channel);
                                }
                            }
                            Event::ChannelData(data) if pc == Pc::Publisher => happened.push((id, pc, Happened::Data(data))),
                            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => happened.push((id, pc, Happened::Disconnected)),
                            Event::IceConnectionStateChange(IceConnectionState::Connected | IceConnectionState::Completed) if !participant.signalling_gone => participant.unreachable_since = None,
                            _ => {}
                        },
                        Err(error) => {
                            tracing::info!(participant = id, ?pc, %error, "a peer connection failed");
                            happened.push((id, pc, Happened::Disconnected));
                            break;
                        }
                    }
                }
            }
            for (id, pc, what) in happened {
                self.handle(now, id, pc, what);
            }
        }
    }

    fn handle(&mut self, now: Instant, id: ParticipantId, pc: Pc, what: Happened) {
        match (pc, what) {
            (Pc::Publisher, Happened::MediaAdded { mid, kind, direction }) if matches!(direction, Direction::RecvOnly | Direction::SendRecv) => self.track_arrived(id, mid, kind),
            (Pc::Publisher, Happened::Rtp { mid, rid, packet }) => self.forward(now, id, mid, rid, &packet),
            // The client stopped sending on the line (LiveKit's unpublish removes its sender).
            (Pc::Publisher, Happened::MediaChanged { mid, direction }) if matches!(direction, Direction::Inactive | Direction::SendOnly) => self.track_unpublished(now, id, mid),
            // Only down tracks are asked for keyframes (a connection that sends nothing else).
            (_, Happened::KeyframeWanted(request)) => self.relay_keyframe_request(now, id, &request),
            (Pc::Publisher, Happened::Data(data)) => self.relay_data(now, id, &data),
            // Out of reach: back if the SDK resumes in time, else gone ([`Self::timeout`]).
            (_, Happened::Disconnected) => {
                if let Some(participant) = self.participants.get_mut(&id) {
                    participant.unreachable_since.get_or_insert(now);
                }
            }
            _ => {}
        }
    }

}

fn kind_of(info: &lk::TrackInfo) -> MediaKind {
    if info.r#type == lk::TrackType::Video as i32 { MediaKind::Video } else { MediaKind::Audio }
}

/// A stable room sid for a room name.
fn room_sid(room: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(room.as_bytes())[..6])
}

#[cfg(test)]
mod tests;
