//! The load's participants in a Limbic call: Matrix users who join one room and get call tokens
//! from Limbic's token service, then LiveKit signalling as LiveKit's SDKs speak it: over
//! `/rtc/v1`, one connection each (the first offer, of lines to receive on, in the join request;
//! `add_track` and an offer to publish; an offer with more lines whenever the SFU asks), or over
//! `/rtc`, two (join, `add_track` and an offer to publish; the SFU's offers answered to
//! subscribe).

use std::{sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use livekit_protocol as lk;
use prost::Message as _;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

use crate::{
    LoadError,
    peer::{Peer, RIDS, Shared},
};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A Limbic server with one room the load's participants join.
pub struct Limbic {
    http: reqwest::Client,
    base: String,
    room: String,
    /// Tells this run's user names from an earlier run's on the same server.
    run: String,
}

/// A call token and where to use it.
pub struct CallToken {
    jwt: String,
    url: String,
}

/// A participant in the call: its connections (the same one twice on a single connection),
/// kept alive by its signalling task.
pub struct Participant {
    pub publisher: Option<Arc<Peer>>,
    pub subscriber: Arc<Peer>,
}

/// The lines to receive on of each kind that LiveKit's SDKs offer first on a single connection.
const FIRST_LINES: usize = 3;

impl Limbic {
    pub async fn new(base: &str) -> Result<Self, LoadError> {
        let mut limbic = Self { http: reqwest::Client::new(), base: base.trim_end_matches('/').to_owned(), room: String::new(), run: format!("{:08x}", rand::random::<u32>()) };
        let owner = limbic.register("owner").await?;
        let room = limbic.post("/_matrix/client/v3/createRoom", &owner.token, json!({ "preset": "public_chat", "name": "SFU load" })).await?;
        limbic.room = room["room_id"].as_str().ok_or(LoadError::Protocol("createRoom answered without a room_id"))?.to_owned();
        Ok(limbic)
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> Result<Value, LoadError> {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(&body);
        if !token.is_empty() {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            return Err(LoadError::Refused { what: path.to_owned(), status: status.as_u16(), body: body.to_string() });
        }
        Ok(body)
    }

    async fn register(&self, name: &str) -> Result<Account, LoadError> {
        let username = format!("load-{}-{name}", self.run);
        // No password: nothing for the server to hash (Argon2's memory would blur its RSS).
        let body = self.post("/_matrix/client/v3/register", "", json!({ "username": username, "auth": { "type": "m.login.dummy" } })).await?;
        let field = |name: &str| body[name].as_str().map(str::to_owned).ok_or(LoadError::Protocol("register answered without an account"));
        Ok(Account { token: field("access_token")?, user: field("user_id")?, device: field("device_id")? })
    }

    /// A new member of the room, and their call token.
    pub async fn call_token(&self, name: &str) -> Result<CallToken, LoadError> {
        let account = self.register(name).await?;
        self.post(&format!("/_matrix/client/v3/join/{}", self.room), &account.token, json!({})).await?;
        let openid = self.post(&format!("/_matrix/client/v3/user/{}/openid/request_token", account.user), &account.token, json!({})).await?;
        let member = json!({ "id": format!("member-{}", account.device), "claimed_user_id": account.user, "claimed_device_id": account.device });
        let token = self.post("/_limbic/calls/get_token", "", json!({ "room_id": self.room, "slot_id": "m.call#ROOM", "openid_token": openid, "member": member })).await?;
        let field = |name: &str| token[name].as_str().map(str::to_owned).ok_or(LoadError::Protocol("the token service answered without jwt and url"));
        Ok(CallToken { jwt: field("jwt")?, url: field("url")? })
    }
}

struct Account {
    token: String,
    user: String,
    device: String,
}

impl Participant {
    /// Joins the call with `token`: publishing simulcast video and audio as publisher number
    /// `publish` (with those layers' frame sizes), or subscribed to everyone; over `/rtc/v1`
    /// (`single_connection`) or `/rtc`.
    pub async fn join(shared: &Arc<Shared>, token: &CallToken, publish: Option<(u16, [usize; 3])>, single_connection: bool) -> Result<Self, LoadError> {
        if single_connection {
            return Self::join_single(shared, token, publish).await;
        }
        let auto_subscribe = u8::from(publish.is_none());
        let url = format!("{}/rtc?access_token={}&auto_subscribe={auto_subscribe}&protocol=16", token.url.trim_end_matches('/'), token.jwt);
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
        let join = match next(&mut socket).await? {
            Some(lk::signal_response::Message::Join(join)) => join,
            _ => return Err(LoadError::Protocol("the first signalling message is not a join response")),
        };
        let subscriber = Arc::new(Peer::subscriber(shared.clone()).await?);
        let publisher = match publish {
            None => None,
            Some((index, frame_bytes)) => {
                send(&mut socket, lk::signal_request::Message::AddTrack(lk::AddTrackRequest { cid: "audio".into(), name: "audio".into(), r#type: lk::TrackType::Audio as i32, ..Default::default() })).await?;
                send(&mut socket, lk::signal_request::Message::AddTrack(video_track())).await?;
                let (peer, offer) = Peer::publisher(shared.clone(), index, frame_bytes).await?;
                send(&mut socket, lk::signal_request::Message::Offer(lk::SessionDescription { r#type: "offer".into(), sdp: offer, id: 1, ..Default::default() })).await?;
                Some(Arc::new(peer))
            }
        };
        tokio::spawn(signalling(socket, publisher.clone(), subscriber.clone(), ping_every(&join)));
        Ok(Self { publisher, subscriber })
    }

    async fn join_single(shared: &Arc<Shared>, token: &CallToken, publish: Option<(u16, [usize; 3])>) -> Result<Self, LoadError> {
        use base64::Engine as _;
        let (peer, offer) = Peer::single(shared.clone(), FIRST_LINES).await?;
        let peer = Arc::new(peer);
        let request = lk::JoinRequest {
            connection_settings: Some(lk::ConnectionSettings { auto_subscribe: publish.is_none(), ..Default::default() }),
            publisher_offer: Some(lk::SessionDescription { r#type: "offer".into(), sdp: offer, id: 1, ..Default::default() }),
            ..Default::default()
        };
        let wrapped = lk::WrappedJoinRequest { compression: lk::wrapped_join_request::Compression::None as i32, join_request: request.encode_to_vec() };
        let join_request = base64::engine::general_purpose::URL_SAFE.encode(wrapped.encode_to_vec()).replace('=', "%3D");
        let url = format!("{}/rtc/v1?access_token={}&join_request={join_request}", token.url.trim_end_matches('/'), token.jwt);
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
        let join = match next(&mut socket).await? {
            Some(lk::signal_response::Message::Join(join)) => join,
            _ => return Err(LoadError::Protocol("the first signalling message is not a join response")),
        };
        // The answer to the first offer comes before anything is published.
        match next(&mut socket).await? {
            Some(lk::signal_response::Message::Answer(answer)) => peer.accept_answer(answer.sdp).await.map_err(LoadError::Negotiation)?,
            _ => return Err(LoadError::Protocol("the join's offer is not answered next")),
        }
        if let Some((index, frame_bytes)) = publish {
            send(&mut socket, lk::signal_request::Message::AddTrack(lk::AddTrackRequest { cid: "audio".into(), name: "audio".into(), r#type: lk::TrackType::Audio as i32, ..Default::default() })).await?;
            send(&mut socket, lk::signal_request::Message::AddTrack(video_track())).await?;
            let offer = peer.offer_to_publish(index, frame_bytes).await.map_err(LoadError::Negotiation)?;
            send(&mut socket, lk::signal_request::Message::Offer(lk::SessionDescription { r#type: "offer".into(), sdp: offer, id: 2, ..Default::default() })).await?;
        }
        tokio::spawn(signalling(socket, Some(peer.clone()), peer.clone(), ping_every(&join)));
        Ok(Self { publisher: publish.map(|_| peer.clone()), subscriber: peer })
    }
}

/// How often to ping, as the join response says.
fn ping_every(join: &lk::JoinResponse) -> Duration {
    Duration::from_secs(u64::try_from(join.ping_interval).unwrap_or(0).clamp(1, 30))
}

/// The camera track as LiveKit's SDKs announce a simulcast one: its three layers.
#[allow(deprecated)] // `layers`: what LiveKit's SDKs announce simulcast with.
fn video_track() -> lk::AddTrackRequest {
    let sizes = [(320, 180), (640, 360), (1280, 720)];
    let qualities = [lk::VideoQuality::Low, lk::VideoQuality::Medium, lk::VideoQuality::High];
    let layers = sizes.iter().zip(qualities).map(|(&(width, height), quality)| lk::VideoLayer { quality: quality as i32, width, height, ..Default::default() }).collect();
    debug_assert_eq!(RIDS.len(), sizes.len());
    lk::AddTrackRequest { cid: "video".into(), name: "video".into(), r#type: lk::TrackType::Video as i32, width: 1280, height: 720, layers, ..Default::default() }
}

async fn send(socket: &mut Socket, message: lk::signal_request::Message) -> Result<(), LoadError> {
    let bytes = lk::SignalRequest { message: Some(message) }.encode_to_vec();
    socket.send(Message::Binary(bytes.into())).await?;
    Ok(())
}

/// The next signalling message; `None` once the server closed.
async fn next(socket: &mut Socket) -> Result<Option<lk::signal_response::Message>, LoadError> {
    while let Some(frame) = socket.next().await {
        match frame? {
            Message::Binary(bytes) => {
                let response = lk::SignalResponse::decode(bytes.as_ref()).map_err(|_| LoadError::Protocol("an undecodable signalling message"))?;
                if let Some(message) = response.message {
                    return Ok(Some(message));
                }
            }
            Message::Close(_) => return Ok(None),
            _ => {}
        }
    }
    Ok(None)
}

/// Answers the SFU's offers and takes its answers, offers a single connection's lines when the
/// SFU asks for them, and pings, until the server closes.
async fn signalling(mut socket: Socket, publisher: Option<Arc<Peer>>, subscriber: Arc<Peer>, ping_every: Duration) {
    let mut ping = tokio::time::interval(ping_every);
    let mut offers = 10;
    loop {
        let message = tokio::select! {
            message = next(&mut socket) => message,
            _ = ping.tick() => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
                if send(&mut socket, lk::signal_request::Message::Ping(now)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let outcome = match message {
            Ok(Some(lk::signal_response::Message::Offer(offer))) => match subscriber.accept_offer(offer.sdp).await {
                Ok(sdp) => send(&mut socket, lk::signal_request::Message::Answer(lk::SessionDescription { r#type: "answer".into(), sdp, id: offer.id, ..Default::default() })).await,
                Err(refused) => Err(LoadError::Negotiation(refused)),
            },
            Ok(Some(lk::signal_response::Message::MediaSectionsRequirement(wanted))) => match subscriber.offer_to_receive(wanted.num_audios, wanted.num_videos).await {
                Ok(sdp) => {
                    offers += 1;
                    send(&mut socket, lk::signal_request::Message::Offer(lk::SessionDescription { r#type: "offer".into(), sdp, id: offers, ..Default::default() })).await
                }
                Err(refused) => Err(LoadError::Negotiation(refused)),
            },
            Ok(Some(lk::signal_response::Message::Answer(answer))) => match &publisher {
                Some(publisher) => publisher.accept_answer(answer.sdp).await.map_err(LoadError::Negotiation),
                None => Ok(()),
            },
            Ok(Some(lk::signal_response::Message::Leave(_)) | None) => return,
            Ok(Some(_)) => Ok(()),
            Err(error) => Err(error),
        };
        if let Err(error) = outcome {
            eprintln!("limbic-sfu-load: a participant's signalling stopped: {error}");
            return;
        }
    }
}
