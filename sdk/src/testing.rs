//! A fake server for a plugin's native unit tests (crate feature `testing`): [`FakeHost`]
//! implements [`Host`] in memory.
//!
//! ```toml
//! [dev-dependencies]
//! limbic-plugin-sdk = { path = "../../sdk", features = ["testing"] }
//! ```
//!
//! ```
//! use limbic_plugin_sdk::{Error, Event, Host, testing::FakeHost};
//!
//! /// The plugin's logic: greets a room once.
//! fn greet(host: &impl Host, room_id: &str) -> Result<(), Error> {
//!     let key = format!("greeted:{room_id}");
//!     if host.kv_get(&key)?.is_none() {
//!         let event_id = host.send_text(room_id, None, "Hello!")?;
//!         host.kv_set(&key, event_id.as_bytes())?;
//!     }
//!     Ok(())
//! }
//!
//! let fake = FakeHost::new().with_plugin_user("@greeter:clinic.example");
//! greet(&fake, "!r:clinic.example").unwrap();
//! greet(&fake, "!r:clinic.example").unwrap();
//! let sent = fake.sent();
//! assert_eq!(sent.len(), 1, "once");
//! assert_eq!(sent[0].sender, "@greeter:clinic.example");
//! assert_eq!(sent[0].content_json().unwrap()["body"], "Hello!");
//! ```

use std::{
    cell::{Cell, RefCell},
    collections::{BTreeMap, VecDeque},
};

use crate::{Error, Event, Host, HttpResponse, LogLevel, Member, OutboundRequest, RoomSpec, clinic};

/// The names of the [`Host`] methods a test can make fail ([`FakeHost::fail`]) and count
/// ([`FakeHost::calls`]). The provided methods (`send_state`, `kv_get_json`, ...) go through
/// these (`send_raw`, `kv_get`, ...).
pub const HOST_METHODS: &[&str] = &[
    "kv_get",
    "kv_set",
    "kv_delete",
    "kv_scan",
    "state_event",
    "room_state",
    "members",
    "send_raw",
    "create_room",
    "invite",
    "fetch",
    "log",
    "now_ms",
    "server_name",
    "plugin_user",
    "random",
];

/// What a plugin did in rooms through a [`FakeHost`], in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoomAction {
    /// [`Host::create_room`]: the creator as the plugin passed it, the spec, and the new room's
    /// id.
    CreateRoom {
        /// `None`: the plugin's user.
        creator: Option<String>,
        /// What the plugin asked for.
        spec: RoomSpec,
        /// The id the fake gave the room.
        room_id: String,
    },
    /// An event sent with [`Host::send_raw`] (or a typed helper), as the fake stored it: the
    /// sender is the plugin's user when the plugin passed none.
    Send(Event),
    /// [`Host::invite`].
    Invite {
        /// The room.
        room_id: String,
        /// `None`: the plugin's user.
        sender: Option<String>,
        /// Who was invited.
        user_id: String,
    },
}

/// An in-memory [`Host`] for native tests:
///
/// - **kv**: a sorted map; [`kv`](FakeHost::kv) shows it.
/// - **rooms**: the current state of each room, which the test seeds with
///   [`persist`](FakeHost::persist) (as the server persists an event before `on-event`);
///   members come from its `m.room.member` events. State events the plugin sends land there too;
///   [`create_room`](Host::create_room) gives the room its creator's join, name, topic, power
///   levels, initial state and invites, with the id `!<plugin user's localpart><n>:<server
///   name>` (n counting from 0). [`room_actions`](FakeHost::room_actions) and
///   [`sent`](FakeHost::sent) record what the plugin did.
/// - **clock**: starts at 0 and only moves when the test says
///   ([`set_now`](FakeHost::set_now), [`advance`](FakeHost::advance)), or by
///   [`set_fetch_ms`](FakeHost::set_fetch_ms) per request.
/// - **HTTP**: each request is recorded ([`fetched`](FakeHost::fetched)) and answered with the
///   next of the responses queued by [`respond_once`](FakeHost::respond_once), else the standing
///   one of [`respond`](FakeHost::respond) (at first an empty `200`).
/// - **log**: lines `"<level>: <message>"` ([`logs`](FakeHost::logs)).
/// - **random**: not random at all: the n-th call fills the buffer with the byte n (1, 2, ...).
/// - **failures**: [`fail`](FakeHost::fail) makes a host method return an error until
///   [`recover`](FakeHost::recover); [`calls`](FakeHost::calls) counts the calls of each.
///
/// The server name is `clinic.example` and the plugin's user `@plugin:clinic.example` unless set
/// with [`with_server_name`](FakeHost::with_server_name) and
/// [`with_plugin_user`](FakeHost::with_plugin_user). Capabilities are not checked.
pub struct FakeHost {
    server_name: String,
    plugin_user: String,
    now: Cell<u64>,
    fetch_ms: Cell<u64>,
    kv: RefCell<BTreeMap<String, Vec<u8>>>,
    state: RefCell<BTreeMap<String, Vec<Event>>>,
    actions: RefCell<Vec<RoomAction>>,
    requests: RefCell<Vec<OutboundRequest>>,
    queued: RefCell<VecDeque<Result<HttpResponse, Error>>>,
    response: RefCell<Result<HttpResponse, Error>>,
    logs: RefCell<Vec<String>>,
    failures: RefCell<BTreeMap<String, Error>>,
    calls: RefCell<BTreeMap<&'static str, u32>>,
    random: Cell<u8>,
    ids: Cell<u64>,
    rooms_created: Cell<u32>,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost::new()
    }
}

impl FakeHost {
    /// An empty server `clinic.example` at time 0.
    pub fn new() -> Self {
        FakeHost {
            server_name: "clinic.example".into(),
            plugin_user: "@plugin:clinic.example".into(),
            now: Cell::new(0),
            fetch_ms: Cell::new(0),
            kv: RefCell::default(),
            state: RefCell::default(),
            actions: RefCell::default(),
            requests: RefCell::default(),
            queued: RefCell::default(),
            response: RefCell::new(Ok(empty_response(200))),
            logs: RefCell::default(),
            failures: RefCell::default(),
            calls: RefCell::default(),
            random: Cell::new(0),
            ids: Cell::new(0),
            rooms_created: Cell::new(0),
        }
    }

    /// Sets the server name.
    pub fn with_server_name(mut self, server_name: &str) -> Self {
        self.server_name = server_name.into();
        self
    }

    /// Sets the plugin's user id.
    pub fn with_plugin_user(mut self, user_id: &str) -> Self {
        self.plugin_user = user_id.into();
        self
    }

    /// Sets the clock (ms since the epoch).
    pub fn set_now(&self, now_ms: u64) {
        self.now.set(now_ms);
    }

    /// Moves the clock on.
    pub fn advance(&self, ms: u64) {
        self.now.set(self.now.get() + ms);
    }

    /// How long each [`fetch`](Host::fetch) takes on the clock (0 at first).
    pub fn set_fetch_ms(&self, ms: u64) {
        self.fetch_ms.set(ms);
    }

    /// A copy of the kv store.
    pub fn kv(&self) -> BTreeMap<String, Vec<u8>> {
        self.kv.borrow().clone()
    }

    /// Puts a state event into its room's current state, replacing the one of the same type and
    /// state key (as the server persists an event before `on-event` sees it). Events without a
    /// state key change nothing.
    pub fn persist(&self, event: &Event) {
        if event.state_key.is_none() {
            return;
        }
        let mut state = self.state.borrow_mut();
        let room = state.entry(event.room_id.clone()).or_default();
        room.retain(|e| !(e.event_type == event.event_type && e.state_key == event.state_key));
        room.push(event.clone());
    }

    /// A new event id (`$fake1`, `$fake2`, ...), as the fake gives the events it stores.
    pub fn next_event_id(&self) -> String {
        self.ids.set(self.ids.get() + 1);
        format!("$fake{}", self.ids.get())
    }

    /// What the plugin did in rooms, in order.
    pub fn room_actions(&self) -> Vec<RoomAction> {
        self.actions.borrow().clone()
    }

    /// The events the plugin sent, in order.
    pub fn sent(&self) -> Vec<Event> {
        let actions = self.actions.borrow();
        actions
            .iter()
            .filter_map(|action| if let RoomAction::Send(e) = action { Some(e.clone()) } else { None })
            .collect()
    }

    /// Answers every later request with `response` (after those queued with
    /// [`respond_once`](FakeHost::respond_once)).
    pub fn respond(&self, response: Result<HttpResponse, Error>) {
        *self.response.borrow_mut() = response;
    }

    /// Answers every later request with this status, no headers and an empty body.
    pub fn respond_status(&self, status: u16) {
        self.respond(Ok(empty_response(status)));
    }

    /// Queues the answer to one request; queued answers go first, in order.
    pub fn respond_once(&self, response: Result<HttpResponse, Error>) {
        self.queued.borrow_mut().push_back(response);
    }

    /// The requests the plugin made, in order.
    pub fn fetched(&self) -> Vec<OutboundRequest> {
        self.requests.borrow().clone()
    }

    /// Forgets the requests made so far.
    pub fn clear_fetched(&self) {
        self.requests.borrow_mut().clear();
    }

    /// The log, one `"<level>: <message>"` per line (`error`, `warn`, `info`, `debug`).
    pub fn logs(&self) -> Vec<String> {
        self.logs.borrow().clone()
    }

    /// Makes the host method `method` (one of [`HOST_METHODS`], e.g. `"send_raw"` or `"kv_set"`)
    /// fail with `error` until [`recover`](FakeHost::recover). Methods that cannot fail (`log`,
    /// `now_ms`, the names) ignore it.
    ///
    /// # Panics
    /// If `method` is not a host method.
    pub fn fail(&self, method: &str, error: Error) {
        assert!(HOST_METHODS.contains(&method), "{method} is not a host method");
        self.failures.borrow_mut().insert(method.into(), error);
    }

    /// Lets `method` work again.
    pub fn recover(&self, method: &str) {
        self.failures.borrow_mut().remove(method);
    }

    /// How often the plugin (or the test) called the host method `method` (one of
    /// [`HOST_METHODS`]).
    pub fn calls(&self, method: &str) -> u32 {
        self.calls.borrow().get(method).copied().unwrap_or(0)
    }

    /// Counts a call and returns the failure set for it, if any.
    fn call(&self, method: &'static str) -> Result<(), Error> {
        *self.calls.borrow_mut().entry(method).or_default() += 1;
        match self.failures.borrow().get(method) {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Stores an event the fake makes up (state it creates or the plugin sends).
    fn store(&self, room_id: &str, sender: &str, event_type: &str, state_key: Option<&str>, content: String) -> Event {
        let event = Event {
            event_id: self.next_event_id(),
            room_id: room_id.into(),
            sender: sender.into(),
            event_type: event_type.into(),
            state_key: state_key.map(Into::into),
            content,
            origin_server_ts: self.now.get(),
        };
        self.persist(&event);
        event
    }

    fn acting(&self, sender: Option<&str>) -> String {
        sender.unwrap_or(&self.plugin_user).to_owned()
    }
}

fn empty_response(status: u16) -> HttpResponse {
    HttpResponse { status, headers: Vec::new(), body: Vec::new() }
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
    }
}

impl Host for FakeHost {
    fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.call("kv_get")?;
        Ok(self.kv.borrow().get(key).cloned())
    }

    fn kv_set(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        self.call("kv_set")?;
        self.kv.borrow_mut().insert(key.into(), value.into());
        Ok(())
    }

    fn kv_delete(&self, key: &str) -> Result<(), Error> {
        self.call("kv_delete")?;
        self.kv.borrow_mut().remove(key);
        Ok(())
    }

    fn kv_scan(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> Result<Vec<(String, Vec<u8>)>, Error> {
        self.call("kv_scan")?;
        Ok(self
            .kv
            .borrow()
            .iter()
            .filter(|(key, _)| key.starts_with(prefix) && start_after.is_none_or(|after| key.as_str() > after))
            .take(limit as usize)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect())
    }

    fn state_event(&self, room_id: &str, event_type: &str, state_key: &str) -> Result<Option<Event>, Error> {
        self.call("state_event")?;
        let state = self.state.borrow();
        Ok(state.get(room_id).and_then(|room| room.iter().find(|e| e.is_state_of(event_type, state_key)).cloned()))
    }

    fn room_state(&self, room_id: &str) -> Result<Vec<Event>, Error> {
        self.call("room_state")?;
        Ok(self.state.borrow().get(room_id).cloned().unwrap_or_default())
    }

    fn members(&self, room_id: &str) -> Result<Vec<Member>, Error> {
        self.call("members")?;
        let state = self.state.borrow();
        let events = state.get(room_id).map(Vec::as_slice).unwrap_or_default();
        Ok(events
            .iter()
            .filter(|e| e.event_type == clinic::MEMBER)
            .filter_map(|e| {
                #[derive(serde::Deserialize)]
                struct Membership {
                    membership: String,
                }
                let content: Membership = e.content().ok()?;
                Some(Member { user_id: e.state_key.clone()?, membership: content.membership })
            })
            .collect())
    }

    fn send_raw(
        &self,
        room_id: &str,
        sender: Option<&str>,
        event_type: &str,
        state_key: Option<&str>,
        content: &str,
    ) -> Result<String, Error> {
        self.call("send_raw")?;
        if !serde_json::from_str::<serde_json::Value>(content).is_ok_and(|c| c.is_object()) {
            return Err(Error::Invalid(format!("the content of {event_type} is not a JSON object")));
        }
        let event = self.store(room_id, &self.acting(sender), event_type, state_key, content.into());
        let event_id = event.event_id.clone();
        self.actions.borrow_mut().push(RoomAction::Send(event));
        Ok(event_id)
    }

    fn create_room(&self, creator: Option<&str>, spec: &RoomSpec) -> Result<String, Error> {
        self.call("create_room")?;
        let n = self.rooms_created.get();
        self.rooms_created.set(n + 1);
        let localpart = self.plugin_user.trim_start_matches('@').split(':').next().unwrap_or_default();
        let room_id = format!("!{localpart}{n}:{}", self.server_name);
        let by = self.acting(creator);
        let json = |value: serde_json::Value| value.to_string();
        self.store(&room_id, &by, "m.room.create", Some(""), json(serde_json::json!({ "room_version": "11" })));
        self.store(&room_id, &by, clinic::MEMBER, Some(&by), json(serde_json::json!({ "membership": "join" })));
        let mut users: BTreeMap<String, i64> = spec.power_levels.iter().cloned().collect();
        users.insert(by.clone(), 100);
        self.store(&room_id, &by, "m.room.power_levels", Some(""), json(serde_json::json!({ "users": users })));
        if let Some(name) = &spec.name {
            self.store(&room_id, &by, "m.room.name", Some(""), json(serde_json::json!({ "name": name })));
        }
        if let Some(topic) = &spec.topic {
            self.store(&room_id, &by, "m.room.topic", Some(""), json(serde_json::json!({ "topic": topic })));
        }
        for entry in &spec.initial_state {
            self.store(&room_id, &by, &entry.event_type, Some(&entry.state_key), entry.content.clone());
        }
        for user in &spec.invite {
            self.store(&room_id, &by, clinic::MEMBER, Some(user), json(serde_json::json!({ "membership": "invite" })));
        }
        self.actions.borrow_mut().push(RoomAction::CreateRoom {
            creator: creator.map(Into::into),
            spec: spec.clone(),
            room_id: room_id.clone(),
        });
        Ok(room_id)
    }

    fn invite(&self, room_id: &str, sender: Option<&str>, user_id: &str) -> Result<(), Error> {
        self.call("invite")?;
        let content = serde_json::json!({ "membership": "invite" }).to_string();
        self.store(room_id, &self.acting(sender), clinic::MEMBER, Some(user_id), content);
        self.actions.borrow_mut().push(RoomAction::Invite {
            room_id: room_id.into(),
            sender: sender.map(Into::into),
            user_id: user_id.into(),
        });
        Ok(())
    }

    fn fetch(&self, request: &OutboundRequest) -> Result<HttpResponse, Error> {
        self.call("fetch")?;
        self.requests.borrow_mut().push(request.clone());
        self.advance(self.fetch_ms.get());
        let queued = self.queued.borrow_mut().pop_front();
        queued.unwrap_or_else(|| self.response.borrow().clone())
    }

    fn log(&self, level: LogLevel, message: &str) {
        let _ = self.call("log");
        self.logs.borrow_mut().push(format!("{}: {message}", level_name(level)));
    }

    fn now_ms(&self) -> u64 {
        let _ = self.call("now_ms");
        self.now.get()
    }

    fn server_name(&self) -> String {
        let _ = self.call("server_name");
        self.server_name.clone()
    }

    fn plugin_user(&self) -> String {
        let _ = self.call("plugin_user");
        self.plugin_user.clone()
    }

    fn random(&self, bytes: &mut [u8]) -> Result<(), Error> {
        self.call("random")?;
        self.random.set(self.random.get().wrapping_add(1));
        bytes.fill(self.random.get());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StateEntry;

    const ROOM: &str = "!r:clinic.example";

    fn state(event_type: &str, state_key: &str, content: serde_json::Value) -> Event {
        Event {
            event_id: format!("${event_type}{state_key}"),
            room_id: ROOM.into(),
            sender: "@t:clinic.example".into(),
            event_type: event_type.into(),
            state_key: Some(state_key.into()),
            content: content.to_string(),
            origin_server_ts: 1,
        }
    }

    #[test]
    fn kv() {
        let fake = FakeHost::new();
        fake.kv_set("a:1", b"x").unwrap();
        fake.kv_set("a:2", b"y").unwrap();
        fake.kv_set_json("b", &[1, 2]).unwrap();
        assert_eq!(fake.kv_get("a:1").unwrap(), Some(b"x".to_vec()));
        assert_eq!(fake.kv_get_string("a:2").unwrap().as_deref(), Some("y"));
        assert_eq!(fake.kv_get_json::<Vec<u8>>("b").unwrap(), Some(vec![1, 2]));
        assert!(matches!(fake.kv_get_json::<String>("b"), Err(Error::Json(_))));
        let keys = |page: Vec<(String, Vec<u8>)>| page.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(keys(fake.kv_scan("a:", None, 10).unwrap()), ["a:1", "a:2"]);
        assert_eq!(keys(fake.kv_scan("a:", Some("a:1"), 10).unwrap()), ["a:2"]);
        assert_eq!(keys(fake.kv_scan("", None, 1).unwrap()), ["a:1"]);
        fake.kv_delete("a:1").unwrap();
        assert_eq!(fake.kv().keys().collect::<Vec<_>>(), ["a:2", "b"]);
        assert_eq!((fake.calls("kv_set"), fake.calls("kv_delete"), fake.calls("kv_get")), (3, 1, 4));
    }

    #[test]
    fn rooms() {
        let fake = FakeHost::new().with_plugin_user("@bot:clinic.example");
        fake.persist(&state(clinic::SESSION, "", serde_json::json!({ "title": "old" })));
        fake.persist(&state(clinic::SESSION, "", serde_json::json!({ "title": "new" })));
        fake.persist(&state(clinic::MEMBER, "@ann:clinic.example", serde_json::json!({ "membership": "join" })));
        fake.persist(&Event { state_key: None, ..state("m.room.message", "", serde_json::json!({})) });
        assert_eq!(fake.room_state(ROOM).unwrap().len(), 2);
        let session = fake.state_event(ROOM, clinic::SESSION, "").unwrap().unwrap();
        assert_eq!(session.content_json().unwrap()["title"], "new");
        assert_eq!(fake.state_event(ROOM, clinic::SESSION, "x").unwrap(), None);
        assert!(fake.room_state("!other:clinic.example").unwrap().is_empty());

        let spec = RoomSpec {
            topic: Some("t".into()),
            invite: vec!["@ann:clinic.example".into()],
            initial_state: vec![StateEntry::new("org.example", "k", &serde_json::json!({ "a": 1 })).unwrap()],
            ..RoomSpec::named("Chat")
        };
        let room = fake.create_room(None, &spec).unwrap();
        assert_eq!(room, "!bot0:clinic.example");
        assert_eq!(fake.create_room(Some("@t:clinic.example"), &RoomSpec::default()).unwrap(), "!bot1:clinic.example");
        let members = fake.members(&room).unwrap();
        let membership = |user: &str| members.iter().find(|m| m.user_id == user).map(|m| m.membership.as_str());
        assert_eq!(membership("@bot:clinic.example"), Some("join"));
        assert_eq!(membership("@ann:clinic.example"), Some("invite"));
        assert!(fake.state_event(&room, "org.example", "k").unwrap().is_some());
        assert!(fake.state_event(&room, "m.room.topic", "").unwrap().is_some());

        fake.invite(&room, Some("@t:clinic.example"), "@bob:clinic.example").unwrap();
        fake.set_now(7);
        let text = fake.send_text(&room, None, "hi").unwrap();
        let link = fake
            .send_state(
                ROOM,
                Some("@t:clinic.example"),
                "org.example.link",
                "",
                &serde_json::json!({ "room_id": room }),
            )
            .unwrap();
        assert_ne!(text, link);
        assert!(matches!(fake.send_raw(ROOM, None, "x", None, "[1]"), Err(Error::Invalid(_))));
        let linked = fake.state_event(ROOM, "org.example.link", "").unwrap().unwrap();
        assert_eq!(
            (linked.event_id.as_str(), linked.sender.as_str(), linked.origin_server_ts),
            (link.as_str(), "@t:clinic.example", 7)
        );

        let sent = fake.sent();
        assert_eq!(sent.len(), 2);
        assert_eq!((sent[0].sender.as_str(), sent[0].state_key.as_deref()), ("@bot:clinic.example", None));
        assert_eq!(sent[0].content_json().unwrap(), serde_json::json!({ "msgtype": "m.text", "body": "hi" }));
        let actions = fake.room_actions();
        assert_eq!(actions.len(), 5);
        assert_eq!(actions[0], RoomAction::CreateRoom { creator: None, spec, room_id: room.clone() });
        assert_eq!(
            actions[2],
            RoomAction::Invite {
                room_id: room,
                sender: Some("@t:clinic.example".into()),
                user_id: "@bob:clinic.example".into()
            }
        );
    }

    #[test]
    fn http_clock_log_and_random() {
        let fake = FakeHost::new();
        fake.set_now(1_000);
        fake.set_fetch_ms(10);
        assert_eq!(fake.fetch(&OutboundRequest::get("https://a.example/")).unwrap().status, 200);
        fake.respond_status(503);
        fake.respond_once(Ok(HttpResponse::json(201, &serde_json::json!({}))));
        fake.respond_once(Err(Error::Failed("timeout".into())));
        assert_eq!(fake.fetch(&OutboundRequest::get("https://b.example/")).unwrap().status, 201);
        assert_eq!(fake.fetch(&OutboundRequest::get("https://c.example/")), Err(Error::Failed("timeout".into())));
        assert_eq!(fake.fetch(&OutboundRequest::get("https://d.example/")).unwrap().status, 503);
        let urls: Vec<String> = fake.fetched().into_iter().map(|r| r.url).collect();
        assert_eq!(urls, ["https://a.example/", "https://b.example/", "https://c.example/", "https://d.example/"]);
        fake.clear_fetched();
        assert!(fake.fetched().is_empty());
        assert_eq!(fake.now_ms(), 1_040);
        fake.advance(5);
        assert_eq!(fake.now_ms(), 1_045);

        fake.log(LogLevel::Warn, "careful");
        fake.log(LogLevel::Debug, "detail");
        assert_eq!(fake.logs(), ["warn: careful", "debug: detail"]);

        let (mut a, mut b) = ([0u8; 4], [0u8; 2]);
        fake.random(&mut a).unwrap();
        fake.random(&mut b).unwrap();
        assert_eq!((a, b), ([1; 4], [2; 2]));
        assert_eq!(
            (fake.server_name(), fake.plugin_user()),
            ("clinic.example".into(), "@plugin:clinic.example".into())
        );
        assert_eq!(FakeHost::new().with_server_name("x.example").server_name(), "x.example");
    }

    #[test]
    fn failures() {
        let fake = FakeHost::new();
        let refused =
            Error::Refused(crate::MatrixError { status: 403, errcode: "M_FORBIDDEN".into(), message: "no".into() });
        fake.fail("send_raw", refused.clone());
        assert_eq!(fake.send_text(ROOM, None, "hi"), Err(refused.clone()));
        assert_eq!(fake.send_state(ROOM, None, "t", "", &serde_json::json!({})), Err(refused));
        assert!(fake.sent().is_empty());
        fake.recover("send_raw");
        assert!(fake.send_text(ROOM, None, "hi").is_ok());
        assert_eq!(fake.calls("send_raw"), 3);
        fake.fail("kv_get", Error::NotGranted("kv".into()));
        assert_eq!(fake.kv_get_string("k").unwrap_err().to_string(), "not-granted: kv");
        // A dyn Host works too.
        let host: &dyn Host = &fake;
        assert!(host.kv_get("k").is_err());
        assert_eq!(host.send_text(ROOM, None, "again").map(|id| id.starts_with('$')), Ok(true));
    }

    #[test]
    #[should_panic(expected = "send_event is not a host method")]
    fn failing_an_unknown_method_panics() {
        FakeHost::new().fail("send_event", Error::Failed("x".into()));
    }
}
