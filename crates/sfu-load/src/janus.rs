//! The load's participants in a Janus VideoRoom, through Janus's HTTP API: a session and a
//! VideoRoom handle each, a long poll per session for the plugin's events (which carry the
//! answers to asynchronous requests and the SDP), and the whole SDP in one offer or answer
//! (Janus half-trickles: its candidates are in its SDP, ours in ours).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{
    LoadError,
    peer::{Peer, Shared},
};

const PLUGIN: &str = "janus.plugin.videoroom";
/// How long an asynchronous request may take to be answered by an event.
const EVENT_WITHIN: Duration = Duration::from_secs(20);

pub struct Janus {
    http: reqwest::Client,
    base: String,
    transactions: AtomicU64,
}

/// A session with one VideoRoom handle, and the events addressed to it.
struct Handle {
    session: u64,
    handle: u64,
    events: mpsc::UnboundedReceiver<Value>,
}

/// A participant in the VideoRoom; its feed id if it publishes.
pub struct Participant {
    pub peer: Arc<Peer>,
    pub feed: Option<u64>,
}

impl Janus {
    pub fn new(base: &str) -> Self {
        Self { http: reqwest::Client::new(), base: base.trim_end_matches('/').to_owned(), transactions: AtomicU64::new(1) }
    }

    fn transaction(&self) -> String {
        format!("t{}", self.transactions.fetch_add(1, Ordering::Relaxed))
    }

    /// POSTs `body` to `path` with a fresh transaction; Janus's answer, refused unless it is
    /// `success` or `ack`.
    async fn post(&self, path: &str, mut body: Value) -> Result<Value, LoadError> {
        let transaction = self.transaction();
        body["transaction"] = json!(transaction);
        let answer: Value = self.http.post(format!("{}{path}", self.base)).json(&body).send().await?.json().await?;
        match answer["janus"].as_str() {
            Some("success" | "ack") => Ok(answer),
            _ => Err(LoadError::Refused { what: format!("Janus {}", body["janus"]), status: 200, body: answer.to_string() }),
        }
    }

    /// A new session with a VideoRoom handle; its events come from a long poll.
    async fn attach(self: &Arc<Self>) -> Result<(Handle, tokio::task::JoinHandle<()>), LoadError> {
        let created = self.post("/janus", json!({ "janus": "create" })).await?;
        let session = created["data"]["id"].as_u64().ok_or(LoadError::Protocol("Janus created a session without an id"))?;
        let attached = self.post(&format!("/janus/{session}"), json!({ "janus": "attach", "plugin": PLUGIN })).await?;
        let handle = attached["data"]["id"].as_u64().ok_or(LoadError::Protocol("Janus attached a handle without an id"))?;
        let (deliver, events) = mpsc::unbounded_channel();
        let poll = tokio::spawn(long_poll(self.clone(), session, deliver));
        Ok((Handle { session, handle, events }, poll))
    }

    /// Sends a VideoRoom request (with `jsep`, if any) and waits for the event that answers it;
    /// the event, refused if the plugin answered with an error.
    async fn request(&self, handle: &mut Handle, body: Value, jsep: Option<Value>) -> Result<Value, LoadError> {
        let transaction = self.transaction();
        let mut message = json!({ "janus": "message", "transaction": transaction, "body": body });
        if let Some(jsep) = jsep {
            message["jsep"] = jsep;
        }
        let answer: Value = self.http.post(format!("{}/janus/{}/{}", self.base, handle.session, handle.handle)).json(&message).send().await?.json().await?;
        let event = match answer["janus"].as_str() {
            Some("success") => answer,
            Some("ack") => tokio::time::timeout(EVENT_WITHIN, async {
                while let Some(event) = handle.events.recv().await {
                    if event["transaction"] == json!(transaction) {
                        return Some(event);
                    }
                }
                None
            })
            .await
            .map_err(|_| LoadError::Timeout("a Janus event answering a request"))?
            .ok_or(LoadError::Protocol("Janus's event stream ended"))?,
            _ => return Err(LoadError::Refused { what: format!("Janus {}", body["request"]), status: 200, body: answer.to_string() }),
        };
        let data = &event["plugindata"]["data"];
        if data.get("error").is_some() {
            return Err(LoadError::Refused { what: format!("VideoRoom {}", body["request"]), status: 200, body: data.to_string() });
        }
        Ok(event)
    }

    /// Tells Janus the client has no more candidates than its SDP's.
    async fn candidates_complete(&self, handle: &Handle) -> Result<(), LoadError> {
        self.post(&format!("/janus/{}/{}", handle.session, handle.handle), json!({ "janus": "trickle", "candidate": { "completed": true } })).await.map(drop)
    }

    /// Creates the VideoRoom every participant of the run joins, for `publishers` publishers
    /// of Opus and VP8; its number.
    pub async fn create_room(self: &Arc<Self>, publishers: usize) -> Result<u64, LoadError> {
        let (mut handle, poll) = self.attach().await?;
        let room = 1000 + u64::from(rand::random::<u16>());
        let body = json!({ "request": "create", "room": room, "publishers": publishers, "audiocodec": "opus", "videocodec": "vp8", "bitrate": 0, "permanent": false });
        let created = self.request(&mut handle, body, None).await;
        poll.abort();
        created.map(|_| room)
    }

    /// Joins `room` as publisher number `index` and publishes (layers' frame sizes
    /// `frame_bytes`).
    pub async fn publish(self: &Arc<Self>, shared: &Arc<Shared>, room: u64, index: u16, frame_bytes: [usize; 3]) -> Result<Participant, LoadError> {
        let (mut handle, _) = self.attach().await?;
        let joined = self.request(&mut handle, json!({ "request": "join", "ptype": "publisher", "room": room, "display": format!("publisher {index}") }), None).await?;
        let feed = joined["plugindata"]["data"]["id"].as_u64().ok_or(LoadError::Protocol("VideoRoom joined a publisher without an id"))?;
        let (peer, offer) = Peer::publisher(shared.clone(), index, frame_bytes).await?;
        // Our layers are listed lowest first, as LiveKit's SDKs list them; Janus assumes the
        // highest first unless told.
        let jsep = json!({ "type": "offer", "sdp": offer, "rid_order": "lmh" });
        let configured = self.request(&mut handle, json!({ "request": "publish", "audiocodec": "opus", "videocodec": "vp8" }), Some(jsep)).await?;
        let answer = configured["jsep"]["sdp"].as_str().ok_or(LoadError::Protocol("VideoRoom published without an answer"))?;
        peer.accept_answer(answer.to_owned()).await.map_err(LoadError::Negotiation)?;
        self.candidates_complete(&handle).await?;
        Ok(Participant { peer: Arc::new(peer), feed: Some(feed) })
    }

    /// Joins `room` as a subscriber to every stream of `feeds`.
    pub async fn subscribe(self: &Arc<Self>, shared: &Arc<Shared>, room: u64, feeds: &[u64]) -> Result<Participant, LoadError> {
        let (mut handle, _) = self.attach().await?;
        let streams: Vec<Value> = feeds.iter().map(|feed| json!({ "feed": feed })).collect();
        let attached = self.request(&mut handle, json!({ "request": "join", "ptype": "subscriber", "room": room, "streams": streams }), None).await?;
        let offer = attached["jsep"]["sdp"].as_str().ok_or(LoadError::Protocol("VideoRoom attached a subscriber without an offer"))?;
        let peer = Peer::subscriber(shared.clone()).await?;
        let answer = peer.accept_offer(offer.to_owned()).await.map_err(LoadError::Negotiation)?;
        self.request(&mut handle, json!({ "request": "start" }), Some(json!({ "type": "answer", "sdp": answer }))).await?;
        self.candidates_complete(&handle).await?;
        Ok(Participant { peer: Arc::new(peer), feed: None })
    }
}

/// Long-polls a session's events for as long as it lives (the poll is also its keep-alive),
/// handing them to `deliver`.
async fn long_poll(janus: Arc<Janus>, session: u64, deliver: mpsc::UnboundedSender<Value>) {
    let url = format!("{}/janus/{session}?maxev=10", janus.base);
    loop {
        let Ok(response) = janus.http.get(&url).send().await else { return };
        let Ok(events) = response.json::<Value>().await else { return };
        let events = match events {
            Value::Array(events) => events,
            event => vec![event],
        };
        for event in events {
            if event["janus"] == "error" && event["error"]["code"] == 458 {
                return; // no such session
            }
            // Nobody may be waiting any more; the poll still keeps the session alive.
            let _ = deliver.send(event);
        }
    }
}
