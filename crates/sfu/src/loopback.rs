//! An in-memory network around the SFU: str0m peers playing LiveKit clients (a publisher and a
//! subscriber connection each, or one: [`Network::join_single`]), signalling answered as
//! LiveKit's SDKs answer it, datagrams
//! handed over directly, on a virtual clock. For the SFU's tests and its forwarding benchmark,
//! which also measures the time spent inside the SFU.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use livekit_protocol as lk;
use str0m::{
    Candidate, Event, Input, Output, Rtc,
    channel::ChannelId,
    change::{SdpAnswer, SdpOffer, SdpPendingOffer},
    format::{Codec, PayloadParams},
    media::{Direction, MediaData, MediaKind, MediaTime, Mid, Rid, Simulcast, SimulcastLayer},
    net::{Protocol, Receive, TcpType},
    rtp::VideoOrientation,
};

use crate::{Grant, JoinOptions, Limits, MediaAddresses, Outgoing, ParticipantId, Rate, Rights, Sfu};

/// Where the SFU's socket is, on this network.
pub const SFU_ADDR: ([u8; 4], u16) = ([10, 0, 0, 1], 7882);

/// Where the SFU takes ICE over TCP, on a network that has it ([`Network::with_tcp`]).
pub const SFU_TCP_ADDR: ([u8; 4], u16) = ([10, 0, 0, 1], 7881);

/// The SFU's media addresses on this network: UDP only.
pub fn sfu_addresses() -> MediaAddresses {
    MediaAddresses { udp: SocketAddr::from(SFU_ADDR), tcp: None }
}

/// How the network's clients join: subscribed to everything.
pub fn auto_subscribed() -> JoinOptions {
    JoinOptions { auto_subscribe: true, ..JoinOptions::default() }
}

/// The limits of a test network: those a server has by default (`[calls]`), without a cap on
/// a call's participants.
pub const LIMITS: Limits = Limits {
    participants_per_call: usize::MAX,
    tracks_per_participant: 16,
    data_channels: 4,
    data_packet_bytes: 16 * 1024,
    data_rate: Rate { per_second: 256.0 * 1024.0, burst: 1024 * 1024 },
    data_packet_min_cost: 1024,
};

/// What a call token grants `identity` in the call `room`: to listen and watch, and to publish
/// if `publish`.
pub fn grant(identity: &str, room: &str, publish: bool) -> Grant {
    Grant {
        room: room.into(),
        identity: identity.into(),
        name: identity.into(),
        app_room: "!call:test.local".into(),
        app_user: format!("@{identity}:test.local"),
        rights: Rights { publish, subscribe: true, moderate: false, record: false },
        publish_data: publish,
    }
}

/// A LiveKit-like client: what it was told, and what media it got.
pub struct Client {
    pub id: ParticipantId,
    pub publisher: Rtc,
    /// Unused by a client of a single connection: `publisher` receives too.
    pub subscriber: Rtc,
    pub single: bool,
    addrs: [SocketAddr; 2],
    /// How it reaches the SFU: UDP, or only TCP (as when its UDP is blocked).
    proto: Protocol,
    pending: Option<SdpPendingOffer>,
    pub signals: Vec<lk::signal_response::Message>,
    /// Frames its subscriber connection received, and the last one.
    pub frames: usize,
    pub last_frame: Option<MediaData>,
    /// Frames that came after a gap in their stream's sequence numbers (the first frame aside).
    pub gaps: usize,
    /// How its camera is turned: sent with the frames it writes (RTP's video orientation).
    pub orientation: Option<VideoOrientation>,
    /// Data channel messages its subscriber connection received.
    pub data: Vec<Vec<u8>>,
    /// Every how many datagrams it sends one is lost on the way (none if unset).
    pub drop_every: Option<u64>,
    sent: u64,
}

impl Client {
    /// The address its publisher connection sends from.
    pub fn publisher_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    fn rtc(&mut self, addr: SocketAddr) -> Option<&mut Rtc> {
        if addr == self.addrs[0] {
            Some(&mut self.publisher)
        } else if addr == self.addrs[1] {
            Some(&mut self.subscriber)
        } else {
            None
        }
    }
}

pub struct Network {
    pub sfu: Sfu,
    pub clients: Vec<Client>,
    pub now: Instant,
    /// Time spent inside the SFU, and each datagram's handling by it (with its sender).
    pub sfu_time: Duration,
    pub receive_times: Vec<(SocketAddr, Duration)>,
    /// Whether to note each `receive`'s time (the benchmark does, once media flows).
    pub timing: bool,
}

impl Default for Network {
    fn default() -> Self {
        Self::new()
    }
}

impl Network {
    /// An SFU with the default limits, but calls of any size: the forwarding benchmark goes
    /// beyond `max_participants_per_call`.
    pub fn new() -> Self {
        Self { sfu: Sfu::new(sfu_addresses(), LIMITS), clients: Vec::new(), now: Instant::now(), sfu_time: Duration::ZERO, receive_times: Vec::new(), timing: false }
    }

    /// A client joins the call; its index.
    pub fn join(&mut self, identity: &str, publish: bool) -> usize {
        self.join_in("call", identity, publish)
    }

    /// An SFU that also takes ICE over TCP.
    pub fn with_tcp() -> Self {
        let mut net = Self::new();
        net.sfu = Sfu::new(MediaAddresses { tcp: Some(SocketAddr::from(SFU_TCP_ADDR)), ..sfu_addresses() }, LIMITS);
        net
    }

    /// A client joins the call of the SFU room `room`; its index.
    pub fn join_in(&mut self, room: &str, identity: &str, publish: bool) -> usize {
        self.join_with(room, identity, publish, Protocol::Udp)
    }

    /// A client that can only use TCP (its UDP is blocked) joins the call; its index.
    pub fn join_over_tcp(&mut self, identity: &str, publish: bool) -> usize {
        self.join_with("call", identity, publish, Protocol::Tcp)
    }

    /// A client of a single connection (LiveKit's `/rtc/v1`) joins the call, its first offer
    /// (LiveKit's data channels and one line to receive on of each kind) in its join request;
    /// its index.
    pub fn join_single(&mut self, identity: &str, publish: bool) -> usize {
        self.join_as("call", identity, publish, Protocol::Udp, true)
    }

    fn join_with(&mut self, room: &str, identity: &str, publish: bool, proto: Protocol) -> usize {
        self.join_as(room, identity, publish, proto, false)
    }

    fn join_as(&mut self, room: &str, identity: &str, publish: bool, proto: Protocol, single: bool) -> usize {
        let index = self.clients.len();
        let host = u8::try_from(index % 250).unwrap_or(0) + 2;
        let third = u8::try_from(index / 250).unwrap_or(0) + 1;
        let addrs = [SocketAddr::from(([10, 0, third, host], 5000)), SocketAddr::from(([10, 0, third, host], 5001))];
        let now = self.now;
        let [publisher, subscriber] = addrs.map(|addr| {
            let mut rtc = Rtc::builder().build(now);
            let candidate = match proto {
                Protocol::Udp => Candidate::host(addr, Protocol::Udp),
                _ => Candidate::builder().tcp().host(addr).tcptype(TcpType::Active).build(),
            };
            rtc.add_local_candidate(candidate.expect("a host candidate"));
            rtc
        });
        let mut publisher = publisher;
        let mut options = auto_subscribed();
        let mut pending = None;
        if single {
            let mut changes = publisher.sdp_api();
            changes.add_channel(crate::RELIABLE.to_owned());
            changes.add_channel_with_config(str0m::channel::ChannelConfig { label: crate::LOSSY.to_owned(), ordered: false, reliability: str0m::channel::Reliability::MaxRetransmits { retransmits: 0 }, ..Default::default() });
            for kind in [MediaKind::Audio, MediaKind::Video] {
                changes.add_media(kind, Direction::RecvOnly, None, None, None);
            }
            let (offer, waiting) = changes.apply().expect("an offer");
            pending = Some(waiting);
            options = JoinOptions { single_connection: true, offer: Some(lk::SessionDescription { r#type: "offer".into(), sdp: offer.to_sdp_string(), id: 1, ..Default::default() }), ..options };
        }
        let started = Instant::now();
        let id = self.sfu.join(now, &grant(identity, room, publish), &options);
        self.sfu_time += started.elapsed();
        self.clients.push(Client { id, publisher, subscriber, single, addrs, proto, pending, signals: Vec::new(), frames: 0, last_frame: None, gaps: 0, orientation: None, data: Vec::new(), drop_every: None, sent: 0 });
        index
    }

    pub fn signal(&mut self, index: usize, message: lk::signal_request::Message) {
        let id = self.clients[index].id;
        let started = Instant::now();
        self.sfu.signal(self.now, id, lk::SignalRequest { message: Some(message) });
        self.sfu_time += started.elapsed();
    }

    pub fn leave(&mut self, index: usize) {
        let id = self.clients[index].id;
        self.sfu.leave(self.now, id);
    }

    /// Announces a track and offers the client's publisher connection with it; its media line.
    pub fn publish(&mut self, index: usize, kind: MediaKind, name: &str) -> Mid {
        let kind_type = if kind == MediaKind::Audio { lk::TrackType::Audio } else { lk::TrackType::Video };
        self.publish_track(index, kind, lk::AddTrackRequest { cid: name.into(), name: name.into(), r#type: kind_type as i32, ..Default::default() })
    }

    /// Announces a track as `add` describes it and offers the client's publisher connection
    /// with it; its media line. With more than one layer in `add`, it is sent as simulcast
    /// layers `q`, `h` and `f`, as LiveKit's SDKs send them.
    // `AddTrackRequest.layers`: what LiveKit's SDKs announce simulcast with.
    #[allow(deprecated)]
    pub fn publish_track(&mut self, index: usize, kind: MediaKind, add: lk::AddTrackRequest) -> Mid {
        let name = add.cid.clone();
        let simulcast = (add.layers.len() > 1).then(|| {
            let mut simulcast = Simulcast::new();
            for rid in ["q", "h", "f"] {
                simulcast.add_send_layer(SimulcastLayer::new(rid));
            }
            simulcast
        });
        self.signal(index, lk::signal_request::Message::AddTrack(add));
        let client = &mut self.clients[index];
        let mut changes = client.publisher.sdp_api();
        let mid = changes.add_media(kind, Direction::SendOnly, Some("stream".into()), Some(name), simulcast);
        let (offer, pending) = changes.apply().expect("an offer");
        client.pending = Some(pending);
        self.signal(index, lk::signal_request::Message::Offer(lk::SessionDescription { r#type: "offer".into(), sdp: offer.to_sdp_string(), id: 1, ..Default::default() }));
        mid
    }

    /// Stops sending a track (its media line becomes inactive) and offers the change, as
    /// LiveKit's SDKs unpublish.
    pub fn unpublish(&mut self, index: usize, mid: Mid) {
        let client = &mut self.clients[index];
        let mut changes = client.publisher.sdp_api();
        changes.set_direction(mid, Direction::Inactive);
        let (offer, pending) = changes.apply().expect("an offer");
        client.pending = Some(pending);
        self.signal(index, lk::signal_request::Message::Offer(lk::SessionDescription { r#type: "offer".into(), sdp: offer.to_sdp_string(), id: 2, ..Default::default() }));
    }

    /// Opens data channels on a client's publisher connection (offering them if it has none
    /// yet); their ids, usable once the connection is up.
    pub fn open_channels(&mut self, index: usize, labels: &[&str]) -> Vec<ChannelId> {
        let client = &mut self.clients[index];
        let mut changes = client.publisher.sdp_api();
        let channels = labels.iter().map(|label| changes.add_channel((*label).to_owned())).collect();
        if let Some((offer, pending)) = changes.apply() {
            client.pending = Some(pending);
            self.signal(index, lk::signal_request::Message::Offer(lk::SessionDescription { r#type: "offer".into(), sdp: offer.to_sdp_string(), id: 1, ..Default::default() }));
        }
        channels
    }

    /// The payload parameters of `codec` on a client's publisher connection.
    pub fn params(&self, index: usize, codec: Codec) -> PayloadParams {
        *self.clients[index].publisher.codec_config().find(|p| p.spec().codec == codec).expect("the codec is configured")
    }

    /// Writes a frame on a client's publisher connection at media time `time` (if connected).
    pub fn write(&mut self, index: usize, mid: Mid, params: PayloadParams, time: MediaTime, frame: &[u8]) -> bool {
        self.write_layer(index, mid, None, params, time, frame)
    }

    /// Writes a frame of simulcast layer `rid` (if any).
    pub fn write_layer(&mut self, index: usize, mid: Mid, rid: Option<Rid>, params: PayloadParams, time: MediaTime, frame: &[u8]) -> bool {
        let now = self.now;
        let client = &mut self.clients[index];
        if !client.publisher.is_connected() {
            return false;
        }
        let Some(mut writer) = client.publisher.writer(mid) else { return false };
        if let Some(rid) = rid {
            writer = writer.rid(rid);
        }
        if let Some(orientation) = client.orientation {
            writer = writer.video_orientation(orientation);
        }
        writer.write(params.pt(), now, time, frame.to_vec()).is_ok()
    }

    /// Delivers everything pending, answering signalling as a LiveKit client does, then moves
    /// the clock on by `tick` and fires every timer.
    pub fn step(&mut self, tick: Duration) {
        loop {
            let mut moved = false;
            while let Some((id, response)) = self.sfu.poll_signal() {
                moved = true;
                let Some(message) = response.message else { continue };
                let Some(index) = self.clients.iter().position(|c| c.id == id) else { continue };
                match &message {
                    lk::signal_response::Message::Answer(answer) => {
                        let client = &mut self.clients[index];
                        if let (Some(pending), Ok(answer)) = (client.pending.take(), SdpAnswer::from_sdp_string(&answer.sdp)) {
                            client.publisher.sdp_api().accept_answer(pending, answer).expect("the SFU's answer is accepted");
                        }
                    }
                    lk::signal_response::Message::MediaSectionsRequirement(wanted) => {
                        let client = &mut self.clients[index];
                        let mut changes = client.publisher.sdp_api();
                        for (kind, count) in [(MediaKind::Audio, wanted.num_audios), (MediaKind::Video, wanted.num_videos)] {
                            for _ in 0..count {
                                changes.add_media(kind, Direction::RecvOnly, None, None, None);
                            }
                        }
                        // str0m offers only a change: asked for an offer alone (none of
                        // either kind), this client adds a spare audio line.
                        if wanted.num_audios + wanted.num_videos == 0 {
                            changes.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
                        }
                        let (offer, pending) = changes.apply().expect("an offer");
                        client.pending = Some(pending);
                        client.signals.push(message.clone());
                        self.signal(index, lk::signal_request::Message::Offer(lk::SessionDescription { r#type: "offer".into(), sdp: offer.to_sdp_string(), id: 3, ..Default::default() }));
                        continue;
                    }
                    lk::signal_response::Message::Offer(offer) => {
                        let answer = self.clients[index].subscriber.sdp_api().accept_offer(SdpOffer::from_sdp_string(&offer.sdp).expect("a readable offer")).expect("the SFU's offer is accepted");
                        let answer = lk::SessionDescription { r#type: "answer".into(), sdp: answer.to_sdp_string(), id: offer.id, ..Default::default() };
                        self.clients[index].signals.push(message.clone());
                        self.signal(index, lk::signal_request::Message::Answer(answer));
                        continue;
                    }
                    _ => {}
                }
                self.clients[index].signals.push(message);
            }
            while let Some(Outgoing { proto, destination, contents }) = self.sfu.poll_transmit() {
                moved = true;
                // A TCP-only client's UDP is blocked: nothing reaches it that way.
                if let Some(rtc) = self.clients.iter_mut().filter(|c| c.proto == Protocol::Udp || proto != Protocol::Udp).find_map(|c| c.rtc(destination))
                    && let Ok(contents) = contents.as_slice().try_into()
                {
                    let source = SocketAddr::from(if proto == Protocol::Udp { SFU_ADDR } else { SFU_TCP_ADDR });
                    let _ = rtc.handle_input(Input::Receive(self.now, Receive { proto, source, destination, contents }));
                }
            }
            let mut to_sfu = Vec::new();
            for client in &mut self.clients {
                for publisher in [true, false] {
                    let rtc = if publisher { &mut client.publisher } else { &mut client.subscriber };
                    loop {
                        match crate::poll_output(rtc, self.now) {
                            Ok(Output::Transmit(transmit)) => {
                                client.sent += 1;
                                if client.drop_every.is_none_or(|every| client.sent % every != 0) {
                                    to_sfu.push((transmit.proto, transmit.source, transmit.destination, transmit.contents.to_vec()));
                                }
                            }
                            Ok(Output::Event(Event::MediaData(data))) => {
                                client.frames += 1;
                                client.gaps += usize::from(client.frames > 1 && !data.contiguous);
                                client.last_frame = Some(data);
                            }
                            Ok(Output::Event(Event::ChannelData(data))) if !publisher || client.single => client.data.push(data.data),
                            Ok(Output::Event(_)) => {}
                            Ok(Output::Timeout(_)) | Err(_) => break,
                        }
                    }
                }
            }
            for (proto, source, destination, datagram) in to_sfu {
                moved = true;
                let started = Instant::now();
                self.sfu.receive(self.now, proto, source, destination, &datagram);
                let took = started.elapsed();
                self.sfu_time += took;
                if self.timing {
                    self.receive_times.push((source, took));
                }
            }
            if !moved {
                break;
            }
        }
        self.now += tick;
        let started = Instant::now();
        self.sfu.timeout(self.now);
        self.sfu_time += started.elapsed();
        for client in &mut self.clients {
            let _ = client.publisher.handle_input(Input::Timeout(self.now));
            let _ = client.subscriber.handle_input(Input::Timeout(self.now));
        }
    }
}
