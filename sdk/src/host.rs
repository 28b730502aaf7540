//! The host functions behind one trait, so that a plugin's logic can run against the real server
//! ([`WasmHost`]) or, in native unit tests, against a fake (`testing::FakeHost`, with the crate
//! feature `testing`).
//!
//! ```
//! use limbic_plugin_sdk::{Error, Host, WasmHost};
//!
//! /// Counts the calls of a route: plugin logic written against any host.
//! fn count_visit(host: &impl Host, page: &str) -> Result<u64, Error> {
//!     let key = format!("visits:{page}");
//!     let visits = host.kv_get_json::<u64>(&key)?.unwrap_or(0) + 1;
//!     host.kv_set_json(&key, &visits)?;
//!     Ok(visits)
//! }
//!
//! // In the plugin's hooks: `count_visit(&WasmHost, "home")`; in its tests, a `FakeHost`.
//! # let _ = |page: &str| count_visit(&WasmHost, page);
//! ```

use serde::{Serialize, de::DeserializeOwned};

use crate::{Error, Event, HttpResponse, LogLevel, Member, OutboundRequest, RoomSpec, clock, http, kv, log, rooms};

/// What the server offers a plugin: the WIT `host` interface (see the [`kv`], [`rooms`],
/// [`http`], [`log`] and [`clock`] modules for what each call does and which capability it
/// needs), plus secure random bytes from WASI.
///
/// Write a plugin's logic against `&impl Host` (or `&dyn Host`: the trait is object safe, the
/// generic helpers aside), call it with [`WasmHost`] from the [`Plugin`](crate::Plugin) hooks,
/// and with `testing::FakeHost` in native unit tests.
pub trait Host {
    /// [`kv::get`]: the value under `key`, if any.
    fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, Error>;
    /// [`kv::set`]: stores `value` under `key`.
    fn kv_set(&self, key: &str, value: &[u8]) -> Result<(), Error>;
    /// [`kv::delete`]: removes `key`.
    fn kv_delete(&self, key: &str) -> Result<(), Error>;
    /// [`kv::scan`]: up to `limit` entries whose key starts with `prefix`, in key order, after
    /// `start_after` if given.
    fn kv_scan(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> Result<Vec<(String, Vec<u8>)>, Error>;

    /// [`rooms::state_event`]: the room's current state event of this type and state key.
    fn state_event(&self, room_id: &str, event_type: &str, state_key: &str) -> Result<Option<Event>, Error>;
    /// [`rooms::room_state`]: the room's whole current state.
    fn room_state(&self, room_id: &str) -> Result<Vec<Event>, Error>;
    /// [`rooms::members`]: the room's members and their membership.
    fn members(&self, room_id: &str) -> Result<Vec<Member>, Error>;
    /// Sends an event whose content is JSON text (the WIT `send-event`): a state event when
    /// `state_key` is given. `sender` `None` is the plugin's user. Returns the event id. The
    /// typed [`send_event`](Host::send_event), [`send_state`](Host::send_state) and
    /// [`send_text`](Host::send_text) call this.
    fn send_raw(
        &self,
        room_id: &str,
        sender: Option<&str>,
        event_type: &str,
        state_key: Option<&str>,
        content: &str,
    ) -> Result<String, Error>;
    /// [`rooms::create_room`]: creates a room with `creator` (`None`: the plugin's user).
    fn create_room(&self, creator: Option<&str>, spec: &RoomSpec) -> Result<String, Error>;
    /// [`rooms::invite`]: invites `user_id`, as `sender` (`None`: the plugin's user).
    fn invite(&self, room_id: &str, sender: Option<&str>, user_id: &str) -> Result<(), Error>;

    /// [`http::fetch`]: outbound HTTP.
    fn fetch(&self, request: &OutboundRequest) -> Result<HttpResponse, Error>;

    /// [`log::log`]: writes to the server's log.
    fn log(&self, level: LogLevel, message: &str);
    /// [`clock::now_ms`]: milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// [`server_name`](crate::server_name): the server's name.
    fn server_name(&self) -> String;
    /// [`plugin_user`](crate::plugin_user): the user the plugin acts as by default.
    fn plugin_user(&self) -> String;
    /// Fills `bytes` from a cryptographically secure source: the host's `wasi:random`, which
    /// needs no capability.
    fn random(&self, bytes: &mut [u8]) -> Result<(), Error>;

    /// [`kv::get_json`]: the value under `key` parsed as JSON.
    fn kv_get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Error>
    where
        Self: Sized,
    {
        match self.kv_get(key)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    /// [`kv::set_json`]: stores `value` under `key` as JSON.
    fn kv_set_json<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), Error>
    where
        Self: Sized,
    {
        self.kv_set(key, &serde_json::to_vec(value)?)
    }

    /// [`kv::get_string`]: the value under `key` as UTF-8 (invalid UTF-8 is an
    /// [`Error::Json`]).
    fn kv_get_string(&self, key: &str) -> Result<Option<String>, Error> {
        match self.kv_get(key)? {
            Some(bytes) => String::from_utf8(bytes).map(Some).map_err(|e| Error::Json(e.to_string())),
            None => Ok(None),
        }
    }

    /// [`rooms::send_event`]: a message-like event with `content` serialized to JSON.
    fn send_event<T: Serialize + ?Sized>(
        &self,
        room_id: &str,
        sender: Option<&str>,
        event_type: &str,
        content: &T,
    ) -> Result<String, Error>
    where
        Self: Sized,
    {
        self.send_raw(room_id, sender, event_type, None, &serde_json::to_string(content)?)
    }

    /// [`rooms::send_state`]: a state event with `content` serialized to JSON.
    fn send_state<T: Serialize + ?Sized>(
        &self,
        room_id: &str,
        sender: Option<&str>,
        event_type: &str,
        state_key: &str,
        content: &T,
    ) -> Result<String, Error>
    where
        Self: Sized,
    {
        self.send_raw(room_id, sender, event_type, Some(state_key), &serde_json::to_string(content)?)
    }

    /// [`rooms::send_text`]: an `m.room.message` of msgtype `m.text` with this body.
    fn send_text(&self, room_id: &str, sender: Option<&str>, body: &str) -> Result<String, Error> {
        let content = serde_json::json!({ "msgtype": "m.text", "body": body });
        self.send_raw(room_id, sender, "m.room.message", None, &content.to_string())
    }
}

/// The real host: each call goes to the server through the component's imports. Outside a
/// `wasm32` component (a native test) those do not exist, and calling them panics; only
/// [`random`](Host::random) works everywhere.
#[derive(Clone, Copy, Debug, Default)]
pub struct WasmHost;

impl Host for WasmHost {
    fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        kv::get(key)
    }
    fn kv_set(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        kv::set(key, value)
    }
    fn kv_delete(&self, key: &str) -> Result<(), Error> {
        kv::delete(key)
    }
    fn kv_scan(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> Result<Vec<(String, Vec<u8>)>, Error> {
        kv::scan(prefix, start_after, limit)
    }
    fn state_event(&self, room_id: &str, event_type: &str, state_key: &str) -> Result<Option<Event>, Error> {
        rooms::state_event(room_id, event_type, state_key)
    }
    fn room_state(&self, room_id: &str) -> Result<Vec<Event>, Error> {
        rooms::room_state(room_id)
    }
    fn members(&self, room_id: &str) -> Result<Vec<Member>, Error> {
        rooms::members(room_id)
    }
    fn send_raw(
        &self,
        room_id: &str,
        sender: Option<&str>,
        event_type: &str,
        state_key: Option<&str>,
        content: &str,
    ) -> Result<String, Error> {
        rooms::send_raw(room_id, sender, event_type, state_key, content)
    }
    fn create_room(&self, creator: Option<&str>, spec: &RoomSpec) -> Result<String, Error> {
        rooms::create_room(creator, spec)
    }
    fn invite(&self, room_id: &str, sender: Option<&str>, user_id: &str) -> Result<(), Error> {
        rooms::invite(room_id, sender, user_id)
    }
    fn fetch(&self, request: &OutboundRequest) -> Result<HttpResponse, Error> {
        http::fetch(request)
    }
    fn log(&self, level: LogLevel, message: &str) {
        log::log(level, message)
    }
    fn now_ms(&self) -> u64 {
        clock::now_ms()
    }
    fn server_name(&self) -> String {
        crate::server_name()
    }
    fn plugin_user(&self) -> String {
        crate::plugin_user()
    }
    fn random(&self, bytes: &mut [u8]) -> Result<(), Error> {
        // On wasm32-wasip2: wasi:random/random (get-random-u64), the host's secure source.
        getrandom::fill(bytes).map_err(|e| Error::Failed(format!("no random source: {e}")))
    }
}
