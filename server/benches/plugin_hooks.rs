//! The added latency of one `check-event` call: `Plugins::check_event` on a message event with
//! no plugins loaded, and with the wordfilter plugin (a real component, on a warm instance).
//!
//!   cargo build --manifest-path plugins/Cargo.toml --target-dir plugins/target --target wasm32-wasip2 --release
//!   cargo bench -p limbic-server --bench plugin_hooks
//!
//! Prints mean, p50 and p99 per call for both, and the difference (the hook's cost).

use std::{path::PathBuf, sync::Arc, time::Instant};

use limbic_server::{
    audit::Audit,
    config::Config,
    events::{Pdu, ServerSigningKey, rules_for},
    plugins::Plugins,
    rooms::{Membership, RoomView, Rooms},
    store::Store,
};
use ruma::{OwnedRoomId, OwnedUserId, RoomVersionId, room_version_rules::RoomVersionRules};

/// A room with no state: what check-event is handed does not matter to the wordfilter.
struct NoState {
    rooms: Rooms,
    room_id: OwnedRoomId,
    rules: RoomVersionRules,
}

impl NoState {
    fn new(dir: &std::path::Path) -> Self {
        let store = Arc::new(Store::open(&dir.join("db-rooms")).expect("store"));
        let key = Arc::new(ServerSigningKey::generate(ruma::server_name!("bench.local").to_owned()));
        let audit = Arc::new(Audit::load(&store, &dir.join("audit.key")).expect("audit"));
        let rooms = Rooms::new(store, key, audit, false);
        Self { rooms, room_id: ruma::owned_room_id!("!room:bench.local"), rules: rules_for(&RoomVersionId::V11).expect("rules") }
    }
}

impl RoomView for NoState {
    fn room_id(&self) -> &ruma::RoomId {
        &self.room_id
    }
    fn rooms(&self) -> &Rooms {
        &self.rooms
    }
    fn state(&self, _: &str, _: &str) -> limbic_server::Result<Option<Pdu>> {
        Ok(None)
    }
    fn state_of_type(&self, _: &str) -> limbic_server::Result<Vec<(String, Pdu)>> {
        Ok(Vec::new())
    }
    fn members(&self) -> limbic_server::Result<std::collections::HashMap<OwnedUserId, Membership>> {
        Ok(Default::default())
    }
    fn rules(&self) -> limbic_server::Result<&RoomVersionRules> {
        Ok(&self.rules)
    }
    /// No writer behind the bench's view, and nothing else claims: every claim is granted.
    fn claim(&self, _: &str) -> limbic_server::Result<bool> {
        Ok(true)
    }
}

const CALLS: usize = 20_000;

fn plugins(dir: &std::path::Path, with_wordfilter: bool) -> Plugins {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut toml = format!(
        "server_name = \"bench.local\"\n[database]\npath = {:?}\n[plugin_host]\ncache_dir = {:?}\n",
        dir.join("db").display().to_string(),
        repo.join("target/plugin-cache").display().to_string(),
    );
    if with_wordfilter {
        let wasm = repo.join("plugins/target/wasm32-wasip2/release/wordfilter.wasm");
        assert!(wasm.exists(), "build the plugins first: {}", wasm.display());
        toml.push_str(&format!(
            "[[plugins]]\nname = \"wordfilter\"\npath = {:?}\nmanifest = {:?}\n[plugins.config]\nwords = [\"forbidden\", \"blocked\"]\n",
            wasm.display().to_string(),
            repo.join("plugins/wordfilter/plugin.toml").display().to_string(),
        ));
    }
    let config = Config::from_toml(&toml, std::iter::empty()).expect("bench config");
    let store = Arc::new(Store::open(&dir.join(if with_wordfilter { "db-plugins" } else { "db-none" })).expect("store"));
    Plugins::load(&config, store).expect("plugins load")
}

/// Per-call times in microseconds, sorted.
fn measure(plugins: &Plugins, room: &NoState, event: &Pdu) -> Vec<f64> {
    for _ in 0..1000 {
        plugins.check_event(event, room).expect("allowed");
    }
    let mut times = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let start = Instant::now();
        plugins.check_event(event, room).expect("allowed");
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    times
}

fn summary(times: &[f64]) -> (f64, f64, f64) {
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    (mean, times[times.len() / 2], times[times.len() * 99 / 100])
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let event: Pdu = serde_json::from_value(serde_json::json!({
        "event_id": "$bench:bench.local",
        "room_id": "!room:bench.local",
        "sender": "@alice:bench.local",
        "origin_server_ts": 1_700_000_000_000u64,
        "type": "m.room.message",
        "content": { "msgtype": "m.text", "body": "How did the breathing exercise go this week? Let's talk about it on Tuesday." },
        "prev_events": [],
        "auth_events": [],
        "depth": 1,
    }))
    .expect("event");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (none, wordfilter) = runtime.block_on(async {
        let none = plugins(dir.path(), false);
        let wordfilter = plugins(dir.path(), true);
        let (event, room) = (event.clone(), NoState::new(dir.path()));
        // check-event runs inside the server's runtime, as in the event pipeline.
        tokio::task::spawn_blocking(move || (measure(&none, &room, &event), measure(&wordfilter, &room, &event))).await.expect("bench")
    });
    let (none, wordfilter) = (summary(&none), summary(&wordfilter));
    println!("check-event, {CALLS} calls each (µs per call)");
    println!("| plugins | mean | p50 | p99 |");
    println!("|---|---|---|---|");
    println!("| none | {:.2} | {:.2} | {:.2} |", none.0, none.1, none.2);
    println!("| wordfilter | {:.2} | {:.2} | {:.2} |", wordfilter.0, wordfilter.1, wordfilter.2);
    println!("| added by the hook | {:.2} | {:.2} | {:.2} |", wordfilter.0 - none.0, wordfilter.1 - none.1, wordfilter.2 - none.2);
}
