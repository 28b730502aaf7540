//! A deliberately badly behaved plugin, for the server's sandbox tests. Never load it on a real
//! server.
//!
//! Routes (under `/_limbic/plugins/misbehave`, any caller):
//! - `GET /loop`: never returns (a busy loop), until the host's time budget interrupts it;
//! - `GET /bomb`: allocates and touches memory 1 MiB at a time, keeping all of it, until an
//!   allocation fails (the instance traps) or the host's memory cap stops it;
//! - `GET /trap`: traps at once (`unreachable`);
//! - `GET /panic`: panics (on wasm32-wasip2 a panic prints to stderr and then traps);
//! - `GET /ungranted`: calls `http-fetch` (not in the manifest) and `kv-set`, and answers 200 with
//!   what each returned: `{"http": "not-granted: http", "kv": "not-granted: kv"}` when nothing is
//!   granted; `"ok"` for a call that succeeded;
//! - `GET /room?room_id=…`: reads the room with `room-state`, `room-members` and `state-event`
//!   (`m.room.create`) and answers 200 with `{"state": ["<type> <content>", …], "members":
//!   [<user id>, …], "create": <bool>}`, or an error string in place of each that failed
//!   (`rooms.read` must be granted);
//! - `GET /ok`: `{"ok": true, "instance": <init calls in this instance's memory>, "calls": <GET
//!   /ok calls in this instance>, "started_ms": <clock at init>, "generation": <a kv counter
//!   bumped at every init, or null without kv>}`.
//!
//! A restarted instance has fresh memory, so `instance` is 1 in every instance that answers and
//! `calls` starts again at 1; `started_ms` and (with `kv` granted) `generation` change.
//!
//! `check-event` on `m.room.message`: a body containing `loop-in-check` never returns, one with
//! `trap-in-check` traps, one with `deny-me` is denied with the reason [`DENY_REASON`]; anything
//! else is allowed.

use std::{
    cell::Cell,
    sync::atomic::{AtomicU64, Ordering},
};

use limbic_plugin_sdk::{
    Event, HttpRequest, HttpResponse, OutboundRequest, Plugin, Verdict, clock, export_plugin, http, kv, rooms, serde_json,
};
use serde::Deserialize;

/// The reason `check-event` denies a message containing `deny-me` with.
pub const DENY_REASON: &str = "misbehave: the message asked to be denied";

/// How many times `init` ran in this instance's memory.
static INITS: AtomicU64 = AtomicU64::new(0);

/// The plugin's per-instance state.
pub struct Misbehave {
    calls: Cell<u64>,
    started_ms: u64,
    generation: Option<u64>,
}

/// What `check-event` does with a message body.
#[derive(Debug, PartialEq, Eq)]
pub enum CheckAction {
    /// Let it through.
    Allow,
    /// Deny it with [`DENY_REASON`].
    Deny,
    /// Never return.
    Loop,
    /// Trap.
    Trap,
}

/// What `check-event` does with this body: the dangerous instructions win over `deny-me`.
pub fn check_action(body: &str) -> CheckAction {
    if body.contains("loop-in-check") {
        CheckAction::Loop
    } else if body.contains("trap-in-check") {
        CheckAction::Trap
    } else if body.contains("deny-me") {
        CheckAction::Deny
    } else {
        CheckAction::Allow
    }
}

/// Spins until the host interrupts the call.
fn spin() -> ! {
    let mut i: u64 = 0;
    loop {
        i = std::hint::black_box(i.wrapping_add(1));
    }
}

/// Traps the instance.
fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    panic!("misbehave: trap");
}

/// Allocates 1 MiB chunks, writes to every page of each and keeps them all, until allocation
/// fails (which aborts: a trap).
fn bomb() -> ! {
    const CHUNK: usize = 1 << 20;
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; CHUNK];
        for i in (0..CHUNK).step_by(4096) {
            chunk[i] = 1;
        }
        kept.push(std::hint::black_box(chunk));
    }
}

/// A host call's outcome as `/ungranted` reports it.
fn outcome<T>(result: Result<T, limbic_plugin_sdk::Error>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

impl Plugin for Misbehave {
    fn new(_config: serde_json::Value) -> Result<Self, String> {
        INITS.fetch_add(1, Ordering::SeqCst);
        // A counter that survives restarts, if kv is granted.
        let generation = kv::get_json::<u64>("generation")
            .and_then(|previous| {
                let next = previous.unwrap_or(0) + 1;
                kv::set_json("generation", &next).map(|()| next)
            })
            .ok();
        Ok(Misbehave { calls: Cell::new(0), started_ms: clock::now_ms(), generation })
    }

    fn check_event(&self, event: &Event, _state: &[Event]) -> Verdict {
        #[derive(Deserialize)]
        struct Message {
            body: Option<String>,
        }
        let body = event.content::<Message>().ok().and_then(|m| m.body).unwrap_or_default();
        match check_action(&body) {
            CheckAction::Allow => Verdict::Allow,
            CheckAction::Deny => Verdict::deny(DENY_REASON),
            CheckAction::Loop => spin(),
            CheckAction::Trap => trap(),
        }
    }

    fn handle_http(&self, request: HttpRequest) -> HttpResponse {
        if request.method != "GET" {
            return HttpResponse::not_found();
        }
        match request.path.as_str() {
            "/loop" => spin(),
            "/bomb" => bomb(),
            "/trap" => trap(),
            "/panic" => panic!("misbehave: /panic"),
            "/ungranted" => {
                let http = outcome(http::fetch(&OutboundRequest::get("https://example.com/")));
                let kv = outcome(kv::set("ungranted-probe", b"1"));
                HttpResponse::json(200, &serde_json::json!({ "http": http, "kv": kv }))
            }
            "/room" => {
                let room = request.query_param("room_id").unwrap_or_default();
                let reported = |result: Result<serde_json::Value, limbic_plugin_sdk::Error>| result.unwrap_or_else(|e| e.to_string().into());
                let state = rooms::room_state(&room).map(|events| events.iter().map(|e| format!("{} {}", e.event_type, e.content)).collect::<Vec<_>>().into());
                let members = rooms::members(&room).map(|members| members.into_iter().map(|m| m.user_id).collect::<Vec<_>>().into());
                let create = rooms::state_event(&room, "m.room.create", "").map(|event| event.is_some().into());
                HttpResponse::json(200, &serde_json::json!({ "state": reported(state), "members": reported(members), "create": reported(create) }))
            }
            "/ok" => {
                self.calls.set(self.calls.get() + 1);
                HttpResponse::json(
                    200,
                    &serde_json::json!({
                        "ok": true,
                        "instance": INITS.load(Ordering::SeqCst),
                        "calls": self.calls.get(),
                        "started_ms": self.started_ms,
                        "generation": self.generation,
                    }),
                )
            }
            _ => HttpResponse::not_found(),
        }
    }
}

export_plugin!(Misbehave);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_actions() {
        assert_eq!(check_action("hello"), CheckAction::Allow);
        assert_eq!(check_action("please deny-me"), CheckAction::Deny);
        assert_eq!(check_action("deny-me loop-in-check"), CheckAction::Loop);
        assert_eq!(check_action("trap-in-check"), CheckAction::Trap);
    }

    #[test]
    fn outcomes() {
        assert_eq!(outcome::<()>(Ok(())), "ok");
        assert_eq!(outcome::<()>(Err(limbic_plugin_sdk::Error::NotGranted("http".into()))), "not-granted: http");
    }
}
