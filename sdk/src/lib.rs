//! The SDK for Limbic plugins.
//!
//! A Limbic plugin is a WebAssembly component (target `wasm32-wasip2`) that implements the
//! `plugin` world of the WIT package `limbic:plugin@0.1.0` (the contract, in this crate's
//! `wit/plugin.wit`, documented in the repository's `spec/plugins.md`). With this crate a plugin
//! is a type that implements [`Plugin`] plus one [`export_plugin!`] line; the crate owns the
//! generated bindings, so a plugin crate depends on `limbic-plugin-sdk` (and usually `serde`),
//! never on `wit-bindgen` itself.
//!
//! # A complete plugin
//!
//! This is the `wordfilter` plugin of the repository (`plugins/wordfilter`, built in CI with the
//! other first-party plugins). It refuses messages that contain one of the words in its config.
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "wordfilter"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [dependencies]
//! limbic-plugin-sdk = { path = "../../sdk" }
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! `plugin.toml`, the manifest beside it:
//!
//! ```toml
//! name = "wordfilter"
//! version = "0.1.0"
//! api = "0.1.0"
//! description = "Refuses messages whose body contains one of the configured words (case-insensitive). Config: {\"words\": [\"...\"]}."
//! capabilities = []
//!
//! [check_event]
//! event_types = ["m.room.message"]
//! ```
//!
//! `src/lib.rs` (`plugins/wordfilter` is this example, built in CI; this copy is compiled as a
//! doctest too, natively, where the exports are plain functions that nobody calls):
//!
//! ```
//! use limbic_plugin_sdk::{Event, Plugin, Verdict, export_plugin, serde_json};
//! use serde::Deserialize;
//!
//! /// The reason a refused message gets.
//! pub const REASON: &str = "message contains a blocked word";
//!
//! #[derive(Deserialize)]
//! struct Config {
//!     words: Vec<String>,
//! }
//!
//! /// The plugin: the blocked words, lower case.
//! pub struct WordFilter {
//!     words: Vec<String>,
//! }
//!
//! impl WordFilter {
//!     /// Whether `body` contains a blocked word.
//!     pub fn blocks(&self, body: &str) -> bool {
//!         let body = body.to_lowercase();
//!         self.words.iter().any(|word| body.contains(word.as_str()))
//!     }
//! }
//!
//! impl Plugin for WordFilter {
//!     fn new(config: serde_json::Value) -> Result<Self, String> {
//!         let config: Config = limbic_plugin_sdk::parse_config(config)?;
//!         let words = config.words.iter().map(|w| w.trim().to_lowercase()).filter(|w| !w.is_empty()).collect();
//!         Ok(WordFilter { words })
//!     }
//!
//!     fn check_event(&self, event: &Event, _state: &[Event]) -> Verdict {
//!         #[derive(Deserialize)]
//!         struct Message {
//!             body: Option<String>,
//!         }
//!         match event.content::<Message>() {
//!             Ok(Message { body: Some(body) }) if self.blocks(&body) => Verdict::deny(REASON),
//!             _ => Verdict::Allow,
//!         }
//!     }
//! }
//!
//! export_plugin!(WordFilter);
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release`; the component is
//! `target/wasm32-wasip2/release/wordfilter.wasm`.
//!
//! # How calls reach a plugin
//!
//! The server calls `init` once per instance with the plugin's config from the server config
//! (JSON); [`export_plugin!`] parses it, calls [`Plugin::new`] and keeps the value for the
//! instance's lifetime. Every later export (`check-event`, `on-event`, `handle-http`, `on-tick`)
//! calls the matching [`Plugin`] method on it. An export called before a successful `init`
//! never panics: `check-event` denies, `handle-http` answers 503, `on-event` and `on-tick`
//! return an error.
//!
//! A component has a single thread, and the host runs one call at a time per instance, so a
//! plugin keeps mutable state in [`Cell`](std::cell::Cell)/[`RefCell`](std::cell::RefCell)
//! fields. That state lives only as long as the instance: the host restarts an instance after a
//! trap or a timeout, and may reload the plugin, so anything that must survive goes to [`kv`].
//!
//! A panic in a plugin aborts the call (the instance traps); the server contains it, logs it
//! and restarts the instance.
//!
//! # Host functions
//!
//! [`kv`], [`rooms`], [`http`], [`log`], [`clock`], [`server_name`] and [`plugin_user`] wrap the
//! WIT imports. Except for log, clock and the two names, each needs a capability that the
//! manifest declares and the operator grants; without it the call returns
//! [`Error::NotGranted`]. Writes (kv, sending events, creating rooms, invites) and outbound HTTP
//! are not allowed during `check-event` ([`Error::NotAllowed`]).
//!
//! Outside a `wasm32` component (for example in a plugin's native unit tests) the host functions
//! do not exist: calling one panics. The [`Host`] trait has them all as methods: write the logic
//! you unit-test against `&impl Host`, pass [`WasmHost`] (the real host) from the [`Plugin`]
//! methods, and in tests `testing::FakeHost`, an in-memory server (crate feature `testing`, for
//! `[dev-dependencies]`).
//!
//! # Clinic events
//!
//! [`clinic`] has serde types and constants for the `org.limbic.*` event types of therapy
//! sessions (`org.limbic.session`, `org.limbic.session.role`, `org.limbic.breakout`, recording
//! and hands), see the repository's `spec/sessions.md`: the crate `limbic-clinic-model`, which
//! the server uses too.

#![warn(missing_docs)]

#[doc(hidden)]
pub mod bindings;
pub mod clinic;
pub mod clock;
mod error;
mod host;
pub mod http;
pub mod kv;
pub mod log;
pub mod rooms;
#[cfg(feature = "testing")]
pub mod testing;
mod types;

pub use bindings::limbic::plugin::types::{
    Caller, Event, HostError, HttpRequest, HttpResponse, LogLevel, MatrixError, Member, OutboundRequest, RoomSpec,
    StateEntry, Verdict,
};
pub use error::Error;
pub use host::{Host, WasmHost};
/// Re-exported so plugins can name `serde_json::Value` and use `serde_json::json!` without a
/// dependency of their own.
pub use serde_json;
pub use types::percent_decode;

/// The version of the WIT package (`limbic:plugin`) this SDK was built against: what a
/// plugin's manifest puts in `api`.
pub const API_VERSION: &str = "0.1.0";

/// A Limbic plugin. Implement it on your type and export the type with [`export_plugin!`].
///
/// Only [`new`](Plugin::new) is required; every hook has a default that does nothing (or, for
/// HTTP, answers 404). The server only calls the hooks the manifest (`plugin.toml`) asks for:
/// `[check_event]`, `[on_event]`, `[http]` and `[tick]`.
pub trait Plugin: Sized + 'static {
    /// Builds the plugin from its config: the `config` table of its `[[plugins]]` entry in the
    /// server config, as JSON (an empty object when there is none; empty text or `null` from the
    /// host count as none). Called once per instance, from the `init` export. An error fails the
    /// instance's start; the server logs it.
    ///
    /// [`parse_config`] deserializes it into your own config type with a clear error.
    fn new(config: serde_json::Value) -> Result<Self, String>;

    /// Allows or denies an event at the authorize step, before it is persisted. `state` holds
    /// the room's current state events of the types in the manifest's
    /// `[check_event] state_types`. Runs on the request path: keep it fast. Host writes and
    /// outbound HTTP fail here with [`Error::NotAllowed`]; reads (kv, rooms) work if granted.
    ///
    /// A [`Verdict::Deny`] reaches the client as `403 M_FORBIDDEN` with the reason.
    fn check_event(&self, event: &Event, state: &[Event]) -> Verdict {
        let _ = (event, state);
        Verdict::Allow
    }

    /// An event was persisted. Called off the request path, in stream order (so in order per
    /// room), at least once: after a restart the server may deliver an event again, so make
    /// side effects idempotent (see [`kv`]). An error is logged; the event is not retried.
    fn on_event(&self, event: &Event) -> Result<(), String> {
        let _ = event;
        Ok(())
    }

    /// A request to one of the plugin's routes, `/_limbic/plugins/<name>/...`;
    /// [`HttpRequest::path`] is the part after `/_limbic/plugins/<name>`. `request.caller` is
    /// the authenticated user, if the request carried a valid access token. The default answers
    /// `404 M_NOT_FOUND`.
    fn handle_http(&self, request: HttpRequest) -> HttpResponse {
        let _ = request;
        HttpResponse::not_found()
    }

    /// Scheduled work, every `[tick] seconds` of the manifest. `now_ms` is the time of the
    /// tick in ms since the Unix epoch. An error is logged.
    fn on_tick(&self, now_ms: u64) -> Result<(), String> {
        let _ = now_ms;
        Ok(())
    }
}

/// Deserializes a plugin's config (the value [`Plugin::new`] gets) into `T`, with an error
/// message that says it is the config that is wrong.
pub fn parse_config<T: serde::de::DeserializeOwned>(config: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(config).map_err(|e| format!("invalid plugin config: {e}"))
}

/// The server's name, e.g. `clinic.example`.
pub fn server_name() -> String {
    bindings::limbic::plugin::host::server_name()
}

/// The Matrix user id the plugin acts as by default (when a host call has no `sender`).
pub fn plugin_user() -> String {
    bindings::limbic::plugin::host::plugin_user()
}

/// Exports a [`Plugin`] type as the component's `plugin` world. Use it once, at the root of
/// the plugin's crate:
///
/// ```ignore
/// limbic_plugin_sdk::export_plugin!(MyPlugin);
/// ```
///
/// (The crate-level example shows it in a whole plugin.)
///
/// It generates the `init`, `check-event`, `on-event`, `handle-http` and `on-tick` exports:
/// `init` builds the plugin with [`Plugin::new`] from the parsed config and keeps it for the
/// instance (a second `init` is refused); the other exports call the plugin's methods, and
/// answer without panicking if `init` has not succeeded.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            ::std::thread_local! {
                static __LIMBIC_PLUGIN: ::core::cell::OnceCell<$plugin> =
                    const { ::core::cell::OnceCell::new() };
            }

            struct __LimbicPluginExports;

            impl $crate::__private::Guest for __LimbicPluginExports {
                fn init(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    __LIMBIC_PLUGIN.with(|slot| $crate::__private::init::<$plugin>(slot, &config))
                }
                fn check_event(event: $crate::Event, state: ::std::vec::Vec<$crate::Event>) -> $crate::Verdict {
                    __LIMBIC_PLUGIN.with(|slot| $crate::__private::check_event::<$plugin>(slot, &event, &state))
                }
                fn on_event(event: $crate::Event) -> ::core::result::Result<(), ::std::string::String> {
                    __LIMBIC_PLUGIN.with(|slot| $crate::__private::on_event::<$plugin>(slot, &event))
                }
                fn handle_http(request: $crate::HttpRequest) -> $crate::HttpResponse {
                    __LIMBIC_PLUGIN.with(|slot| $crate::__private::handle_http::<$plugin>(slot, request))
                }
                fn on_tick(now_ms: u64) -> ::core::result::Result<(), ::std::string::String> {
                    __LIMBIC_PLUGIN.with(|slot| $crate::__private::on_tick::<$plugin>(slot, now_ms))
                }
            }

    $crate::bindings::__export_plugin_world!(__LimbicPluginExports with_types_in $crate::bindings);
        };
    };
}

/// What [`export_plugin!`] expands to; not part of the API.
#[doc(hidden)]
pub mod __private {
    use std::cell::OnceCell;

    pub use crate::bindings::Guest;
    use crate::{Event, HttpRequest, HttpResponse, Plugin, Verdict};

    const NOT_INITIALISED: &str = "the plugin is not initialised (init has not succeeded)";

    /// Parses the config text: empty text and `null` mean an empty object.
    pub fn parse_config_text(config: &str) -> Result<serde_json::Value, String> {
        if config.trim().is_empty() {
            return Ok(serde_json::Value::Object(Default::default()));
        }
        match serde_json::from_str(config) {
            Ok(serde_json::Value::Null) => Ok(serde_json::Value::Object(Default::default())),
            Ok(value) => Ok(value),
            Err(e) => Err(format!("the plugin config is not valid JSON: {e}")),
        }
    }

    pub fn init<P: Plugin>(slot: &OnceCell<P>, config: &str) -> Result<(), String> {
        if slot.get().is_some() {
            return Err("the plugin is already initialised".into());
        }
        let plugin = P::new(parse_config_text(config)?)?;
        slot.set(plugin).map_err(|_| "the plugin is already initialised".to_string())
    }

    pub fn check_event<P: Plugin>(slot: &OnceCell<P>, event: &Event, state: &[Event]) -> Verdict {
        match slot.get() {
            Some(plugin) => plugin.check_event(event, state),
            None => Verdict::Deny(NOT_INITIALISED.into()),
        }
    }

    pub fn on_event<P: Plugin>(slot: &OnceCell<P>, event: &Event) -> Result<(), String> {
        slot.get().ok_or(NOT_INITIALISED)?.on_event(event)
    }

    pub fn handle_http<P: Plugin>(slot: &OnceCell<P>, request: HttpRequest) -> HttpResponse {
        match slot.get() {
            Some(plugin) => plugin.handle_http(request),
            None => HttpResponse::error(503, "M_UNKNOWN", NOT_INITIALISED),
        }
    }

    pub fn on_tick<P: Plugin>(slot: &OnceCell<P>, now_ms: u64) -> Result<(), String> {
        slot.get().ok_or(NOT_INITIALISED)?.on_tick(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::OnceCell;

    use super::*;

    struct Echo {
        word: String,
    }

    impl Plugin for Echo {
        fn new(config: serde_json::Value) -> Result<Self, String> {
            #[derive(serde::Deserialize)]
            struct Config {
                #[serde(default = "default_word")]
                word: String,
            }
            fn default_word() -> String {
                "bad".into()
            }
            let config: Config = parse_config(config)?;
            Ok(Echo { word: config.word })
        }

        fn check_event(&self, event: &Event, _state: &[Event]) -> Verdict {
            if event.content.contains(&self.word) { Verdict::deny("no") } else { Verdict::Allow }
        }
    }

    fn event(content: &str) -> Event {
        Event {
            event_id: "$e".into(),
            room_id: "!r:s".into(),
            sender: "@u:s".into(),
            event_type: "m.room.message".into(),
            state_key: None,
            content: content.into(),
            origin_server_ts: 1,
        }
    }

    #[test]
    fn calls_before_init_fail_without_panicking() {
        let slot: OnceCell<Echo> = OnceCell::new();
        assert!(matches!(__private::check_event(&slot, &event("{}"), &[]), Verdict::Deny(_)));
        assert!(__private::on_event(&slot, &event("{}")).is_err());
        assert!(__private::on_tick(&slot, 0).is_err());
        let request = HttpRequest {
            method: "GET".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![],
            body: vec![],
            caller: None,
        };
        assert_eq!(__private::handle_http(&slot, request).status, 503);
    }

    #[test]
    fn init_parses_the_config_once() {
        let slot: OnceCell<Echo> = OnceCell::new();
        assert!(__private::init(&slot, "not json").is_err());
        assert!(__private::init(&slot, r#"{"word": 5}"#).unwrap_err().starts_with("invalid plugin config"));
        __private::init(&slot, "").unwrap();
        assert_eq!(slot.get().unwrap().word, "bad");
        assert_eq!(__private::parse_config_text("null").unwrap(), serde_json::json!({}));
        assert_eq!(__private::parse_config_text(" ").unwrap(), serde_json::json!({}));
        assert!(__private::init(&slot, r#"{"word": "x"}"#).is_err());
        assert_eq!(__private::check_event(&slot, &event(r#"{"body":"bad"}"#), &[]), Verdict::deny("no"));
        assert_eq!(__private::check_event(&slot, &event(r#"{"body":"ok"}"#), &[]), Verdict::Allow);
        assert!(__private::on_event(&slot, &event("{}")).is_ok());
        assert!(__private::on_tick(&slot, 0).is_ok());
    }
}
