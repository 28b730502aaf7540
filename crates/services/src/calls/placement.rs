//! Calls across nodes sharing one database (spec/calls.md, "Calls across nodes").
//!
//! A call is served by one SFU, so every call of a room (and of a session's breakout rooms,
//! which go with their session) is placed on one node. Each node whose SFU runs registers it
//! ([`tables::CALL_NODES`]: where clients reach it, its load, a heartbeat every [`HEARTBEAT`]).
//! The token service places a call room on the live node with the fewest calls (then the fewest
//! participants) and hands out that node's signalling URL; a node's `/rtc` admits only calls
//! placed on it, so a client sent elsewhere gets a new token. A node is live while the database
//! counts it alive (not fenced: its session ended, see the store's `nodes`) and its heartbeat is
//! recent; a dead node's calls move on the next join. A placement is changed only by a write
//! conditional on the placement as read, so racing nodes agree on one.
//!
//! On the embedded store there is one node: nothing is registered and every call is here.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use ruma::{OwnedRoomId, RoomId};
use serde::{Deserialize, Serialize};

use super::CallsHost;
use crate::{
    error::{Error, ErrorCode, Result},
    store::{Key, KeyReader, Store, StoreError, decode, tables},
};

/// How often a node says its SFU is alive, and reports its load.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A node that has not said so for this long is passed over, even while its database session
/// lives (its SFU task stuck): its calls move on their next join. Heartbeats carry the writer's
/// clock, so the nodes' clocks must agree to well within this (NTP).
const SILENT_MS: u64 = 15_000;
/// A call nobody has been in for this long is released by its node, so that the room's next
/// call may be placed afresh.
const IDLE_MS: u64 = 60_000;
/// How often a placement is read and claimed again when other nodes change it meanwhile.
const ATTEMPTS: usize = 5;

/// A node's SFU, as it registers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CallNode {
    /// Where LiveKit clients open `/rtc` on this node.
    pub signalling_url: String,
    /// Where its SFU takes media (the host candidates it offers).
    pub media_address: String,
    /// Participants in its calls at the last heartbeat.
    pub participants: u64,
    /// When it last said it is alive, ms since the Unix epoch.
    pub heartbeat_ms: u64,
}

/// Which node serves a call room's calls.
#[derive(Debug, Serialize, Deserialize)]
struct Placement {
    node: String,
    placed_ms: u64,
}

/// Where a call room's calls are served, as the token service hands it out.
#[derive(Debug, PartialEq)]
pub struct Placed {
    /// The node's name; `None` on the embedded store.
    pub node: Option<String>,
    pub signalling_url: String,
    /// The dead node the calls were moved from, if they were just now.
    pub moved_from: Option<String>,
}

/// What [`Placements::settle`] is told to do with a placement as read.
enum Decision<T> {
    Keep(T),
    /// Place the room on the named node.
    Place(String, T),
}

/// Whether this node serves a call room's calls.
#[derive(Debug, PartialEq)]
pub enum Served {
    /// Here (placed here now, if it was nowhere or its node had died).
    Here { moved_from: Option<String> },
    /// On another live node.
    Elsewhere { node: String },
}

pub struct Placements {
    store: Arc<Store>,
    /// This node's name when the store is shared; `None` on the embedded store.
    node: Option<String>,
    signalling_url: String,
}

/// How long a node waits for the one serving a call to answer a request passed on to it.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

impl Placements {
    pub fn new(store: Arc<Store>, node_name: &str, signalling_url: String) -> Self {
        let node = store.is_shared().then(|| node_name.to_owned());
        Self { store, node, signalling_url }
    }

    /// This node's name among the others; `None` on the embedded store.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The nodes whose SFUs are alive now.
    fn live(&self) -> Result<HashMap<String, CallNode>> {
        let Some(alive) = self.store.live_nodes()? else { return Ok(HashMap::new()) };
        let now = limbic_core::now_ms();
        let mut live = HashMap::new();
        for entry in self.store.scan_prefix(tables::CALL_NODES, Vec::new(), false) {
            let (key, value) = entry?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let node: CallNode = decode(tables::CALL_NODES, &value)?;
            if alive.contains(&name) && now.saturating_sub(node.heartbeat_ms) < SILENT_MS {
                live.insert(name, node);
            }
        }
        Ok(live)
    }

    /// The live node with the fewest calls placed on it, then the fewest participants.
    fn least_loaded(&self, live: HashMap<String, CallNode>) -> Result<(String, CallNode)> {
        let mut best: Option<((usize, u64, String), CallNode)> = None;
        for (name, node) in live {
            let calls = self.store.scan_prefix(tables::CALL_NODE_ROOMS, Key::new().str(&name).into_vec(), false).count();
            let load = (calls, node.participants, name);
            if best.as_ref().is_none_or(|(least, _)| load < *least) {
                best = Some((load, node));
            }
        }
        let ((_, _, name), node) = best.ok_or_else(|| Error::with_status(ErrorCode::Unknown, http::StatusCode::SERVICE_UNAVAILABLE, "no node's SFU is running"))?;
        Ok((name, node))
    }

    /// Where the calls of `call_room` are served: on their node while it lives; otherwise on
    /// the least loaded live node, placed there now.
    pub fn place(&self, call_room: &RoomId) -> Result<Placed> {
        if self.node.is_none() {
            return Ok(Placed { node: None, signalling_url: self.signalling_url.clone(), moved_from: None });
        }
        let (url, node, moved_from) = self.settle(call_room, |current, live| {
            if let Some(placement) = current
                && let Some(node) = live.get(&placement.node)
            {
                return Ok(Decision::Keep(node.signalling_url.clone()));
            }
            let (name, node) = self.least_loaded(live)?;
            Ok(Decision::Place(name, node.signalling_url))
        })?;
        Ok(Placed { node: Some(node), signalling_url: url, moved_from })
    }

    /// Whether this node serves the calls of `call_room`: yes if they are placed here, or
    /// nowhere, or on a node that died (placed here now); otherwise where they are.
    pub fn admit(&self, call_room: &RoomId) -> Result<Served> {
        let Some(me) = self.node.clone() else { return Ok(Served::Here { moved_from: None }) };
        let (elsewhere, node, moved_from) = self.settle(call_room, |current, live| match current {
            Some(placement) if placement.node == me => Ok(Decision::Keep(false)),
            Some(placement) if live.contains_key(&placement.node) => Ok(Decision::Keep(true)),
            _ => Ok(Decision::Place(me.clone(), false)),
        })?;
        Ok(if elsewhere { Served::Elsewhere { node } } else { Served::Here { moved_from } })
    }

    /// The node `call_room` is placed on, when that is not this one.
    fn placed_elsewhere(&self, call_room: &RoomId) -> Result<Option<String>> {
        let Some(me) = &self.node else { return Ok(None) };
        let placement = self.store.get_json::<Placement>(tables::CALL_PLACEMENTS, call_room.as_bytes())?;
        Ok(placement.map(|p| p.node).filter(|node| node != me))
    }

    /// The node `call_room` is placed on, when the database counts it dead (fenced): what it
    /// recorded of the room is for another node to store.
    pub fn dead_owner(&self, call_room: &RoomId) -> Result<Option<String>> {
        let Some(node) = self.placed_elsewhere(call_room)? else { return Ok(None) };
        let alive = self.store.live_nodes()?.unwrap_or_default();
        Ok((!alive.contains(&node)).then_some(node))
    }

    /// The signalling URL of the other live node serving the calls of `call_room`; `None` when
    /// they are served here, or nowhere (nothing is placed by asking).
    pub fn elsewhere(&self, call_room: &RoomId) -> Result<Option<String>> {
        let Some(node) = self.placed_elsewhere(call_room)? else { return Ok(None) };
        Ok(self.live()?.remove(&node).map(|node| node.signalling_url))
    }

    /// Reads the placement of `call_room` and lets `decide` keep it or place the room on a
    /// node, written only if nobody changed the placement meanwhile (else read again). Returns
    /// the decision's answer, the node that serves the room, and the node it was moved from.
    fn settle<T>(&self, call_room: &RoomId, decide: impl Fn(Option<&Placement>, HashMap<String, CallNode>) -> Result<Decision<T>>) -> Result<(T, String, Option<String>)> {
        let key = call_room.as_bytes();
        for _ in 0..ATTEMPTS {
            let read = self.store.get(tables::CALL_PLACEMENTS, key)?;
            let current: Option<Placement> = read.as_deref().map(|bytes| decode(tables::CALL_PLACEMENTS, bytes)).transpose()?;
            let (node, answer) = match decide(current.as_ref(), self.live()?)? {
                Decision::Keep(answer) => return Ok((answer, current.map(|p| p.node).unwrap_or_default(), None)),
                Decision::Place(node, answer) => (node, answer),
            };
            let mut batch = self.store.batch();
            batch.expect(tables::CALL_PLACEMENTS, key, read.as_deref());
            batch.put_json(tables::CALL_PLACEMENTS, key, &Placement { node: node.clone(), placed_ms: limbic_core::now_ms() })?;
            if let Some(old) = &current {
                batch.delete(tables::CALL_NODE_ROOMS, &Key::new().str(&old.node).str(call_room.as_str()).into_vec());
            }
            batch.put(tables::CALL_NODE_ROOMS, &Key::new().str(&node).str(call_room.as_str()).into_vec(), &[]);
            match self.store.write(batch) {
                Ok(()) => {
                    let moved_from = current.map(|p| p.node).filter(|old| *old != node);
                    tracing::info!(room = %call_room, %node, ?moved_from, "placed a room's calls");
                    return Ok((answer, node, moved_from));
                }
                Err(StoreError::Conflict { .. } | StoreError::Contention) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(StoreError::Contention.into())
    }

    /// Says this node's SFU is alive, with its load.
    pub fn heartbeat(&self, media_address: &str, participants: u64) -> Result<()> {
        let Some(me) = &self.node else { return Ok(()) };
        let node = CallNode { signalling_url: self.signalling_url.clone(), media_address: media_address.to_owned(), participants, heartbeat_ms: limbic_core::now_ms() };
        let mut batch = self.store.batch();
        batch.put_json(tables::CALL_NODES, me.as_bytes(), &node)?;
        Ok(self.store.write_relaxed(batch)?)
    }

    /// This node's SFU stops: its calls move on their next join.
    pub fn deregister(&self) -> Result<()> {
        let Some(me) = &self.node else { return Ok(()) };
        let mut batch = self.store.batch();
        batch.delete(tables::CALL_NODES, me.as_bytes());
        Ok(self.store.write(batch)?)
    }

    /// The call rooms placed on this node.
    fn mine(&self) -> Result<Vec<OwnedRoomId>> {
        let Some(me) = &self.node else { return Ok(Vec::new()) };
        let mut rooms = Vec::new();
        for entry in self.store.scan_prefix(tables::CALL_NODE_ROOMS, Key::new().str(me).into_vec(), false) {
            let (key, _) = entry?;
            let mut reader = KeyReader::new(&key);
            reader.str();
            if let Some(room) = reader.str().and_then(|room| OwnedRoomId::try_from(room).ok()) {
                rooms.push(room);
            }
        }
        Ok(rooms)
    }

    /// The nodes the database counts dead (fenced) that still have an SFU registered or calls
    /// placed on them, with those call rooms.
    fn dead_nodes(&self) -> Result<BTreeMap<String, Vec<OwnedRoomId>>> {
        let Some(alive) = self.store.live_nodes()? else { return Ok(BTreeMap::new()) };
        let mut dead: BTreeMap<String, Vec<OwnedRoomId>> = BTreeMap::new();
        for entry in self.store.scan_prefix(tables::CALL_NODES, Vec::new(), false) {
            let name = String::from_utf8_lossy(&entry?.0).into_owned();
            if !alive.contains(&name) {
                dead.entry(name).or_default();
            }
        }
        for entry in self.store.scan_prefix(tables::CALL_NODE_ROOMS, Vec::new(), false) {
            let (key, _) = entry?;
            let mut reader = KeyReader::new(&key);
            let (Some(node), Some(room)) = (reader.str(), reader.str()) else { continue };
            if !alive.iter().any(|name| name == node)
                && let Ok(room) = OwnedRoomId::try_from(room)
            {
                dead.entry(node.to_owned()).or_default().push(room);
            }
        }
        Ok(dead)
    }

    /// Takes `call_room` off the dead `node`: true if this call did so, and its caller must
    /// store what the node recorded of it; false if it is placed elsewhere (its row under the
    /// node was stale, and is gone now) or another node moved it meanwhile.
    fn release_from(&self, call_room: &RoomId, node: &str) -> Result<bool> {
        let key = call_room.as_bytes();
        let read = self.store.get(tables::CALL_PLACEMENTS, key)?;
        let current: Option<Placement> = read.as_deref().map(|bytes| decode(tables::CALL_PLACEMENTS, bytes)).transpose()?;
        let placed_here = current.is_some_and(|p| p.node == node);
        let mut batch = self.store.batch();
        batch.expect(tables::CALL_PLACEMENTS, key, read.as_deref());
        if placed_here {
            batch.delete(tables::CALL_PLACEMENTS, key);
        }
        batch.delete(tables::CALL_NODE_ROOMS, &Key::new().str(node).str(call_room.as_str()).into_vec());
        match self.store.write(batch) {
            Ok(()) => Ok(placed_here),
            Err(StoreError::Conflict { .. } | StoreError::Contention) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Forgets the registration of the dead `node`, unless it registered again meanwhile.
    fn forget(&self, node: &str) -> Result<()> {
        let read = self.store.get(tables::CALL_NODES, node.as_bytes())?;
        if read.is_none() {
            return Ok(());
        }
        let mut batch = self.store.batch();
        batch.expect(tables::CALL_NODES, node.as_bytes(), read.as_deref());
        batch.delete(tables::CALL_NODES, node.as_bytes());
        match self.store.write(batch) {
            Ok(()) | Err(StoreError::Conflict { .. } | StoreError::Contention) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Releases the calls placed on this node that nobody has been in for [`IDLE_MS`]:
    /// `active` are the call rooms in use now, `last_active` when each was last seen in use
    /// (kept by the caller between rounds).
    pub fn release_idle(&self, active: &HashSet<OwnedRoomId>, last_active: &mut HashMap<OwnedRoomId, u64>) -> Result<()> {
        let Some(me) = &self.node else { return Ok(()) };
        let now = limbic_core::now_ms();
        for room in active {
            last_active.insert(room.clone(), now);
        }
        let mine = self.mine()?;
        last_active.retain(|room, _| mine.contains(room));
        for room in mine {
            let read = self.store.get(tables::CALL_PLACEMENTS, room.as_bytes())?;
            let Some(placement) = read.as_deref().map(|bytes| decode::<Placement>(tables::CALL_PLACEMENTS, bytes)).transpose()? else { continue };
            let since = last_active.get(&room).copied().unwrap_or(0).max(placement.placed_ms);
            if placement.node != *me || now.saturating_sub(since) < IDLE_MS {
                continue;
            }
            let mut batch = self.store.batch();
            batch.expect(tables::CALL_PLACEMENTS, room.as_bytes(), read.as_deref());
            batch.delete(tables::CALL_PLACEMENTS, room.as_bytes());
            batch.delete(tables::CALL_NODE_ROOMS, &Key::new().str(me).str(room.as_str()).into_vec());
            match self.store.write(batch) {
                Ok(()) | Err(StoreError::Conflict { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }
}

/// Where the calls of `room_id` are served, for the token service: placed now if they were
/// nowhere or their node died, whose recording this node then stores.
pub async fn place(server: &dyn CallsHost, room_id: &RoomId) -> Result<Placed> {
    let home = super::call_home(server.rooms(), room_id)?;
    let placed = server.calls().placements.place(&home)?;
    if let Some(from) = &placed.moved_from {
        take_over_if_dead(server, &home, from).await?;
    }
    Ok(placed)
}

/// Stores what `from` recorded of `call_room`, if the database counts it dead. A node passed
/// over while alive (silent, not fenced) stops its recording itself when it finds its call
/// placed elsewhere ([`run`]).
async fn take_over_if_dead(server: &dyn CallsHost, call_room: &RoomId, from: &str) -> Result<()> {
    if !server.store().live_nodes()?.unwrap_or_default().iter().any(|node| node == from) {
        super::recording::take_over(server, call_room, from).await;
    }
    Ok(())
}

/// Clears what the nodes the database counts dead left behind, for the node leading the
/// sweeps: each call placed on one is released (placed afresh on its next join) and what the
/// node recorded of it is stored now, rather than when somebody next joins (perhaps never);
/// then its SFU's registration goes. A node passed over while alive is left to end its calls
/// itself ([`run`]).
pub async fn sweep_dead_nodes(server: &dyn CallsHost) -> Result<()> {
    let placements = &server.calls().placements;
    for (node, rooms) in placements.dead_nodes()? {
        for room in rooms {
            if placements.release_from(&room, &node)? {
                tracing::info!(%room, %node, "released a call of a node that died");
                super::recording::take_over(server, &room, &node).await;
            }
        }
        placements.forget(&node)?;
    }
    Ok(())
}

/// Whether this node serves the calls of `room_id` ([`Placements::admit`]), for `/rtc` and
/// the requests only the call's node can answer.
pub async fn admit(server: &dyn CallsHost, room_id: &RoomId) -> Result<Served> {
    let home = super::call_home(server.rooms(), room_id)?;
    let served = server.calls().placements.admit(&home)?;
    if let Served::Here { moved_from: Some(from) } = &served {
        take_over_if_dead(server, &home, from).await?;
    }
    Ok(served)
}

/// The signalling URL of the other node serving the calls of `room_id`, to pass a request
/// that only it can answer to; `None` to answer here (also for a request passed on already).
pub fn serving_elsewhere(server: &dyn CallsHost, room_id: &RoomId, headers: &http::HeaderMap) -> Result<Option<String>> {
    if crate::cluster::passed_on(headers) {
        return Ok(None);
    }
    server.calls().placements.elsewhere(&super::call_home(server.rooms(), room_id)?)
}

/// Keeps this node's SFU registered while it runs: a heartbeat with its load every
/// [`HEARTBEAT`], and the calls placed here that nobody has used for a while released.
pub async fn run(server: Arc<dyn CallsHost>) {
    let Some(sfu) = server.calls().sfu.get().cloned() else { return };
    let placements = &server.calls().placements;
    if placements.node().is_none() {
        return;
    }
    let media_address = sfu.addresses.udp.to_string();
    let mut tick = tokio::time::interval(HEARTBEAT);
    let mut shutdown = server.shutting_down();
    let mut last_active = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let Some((live, recorded)) = sfu.run(|sfu, _| (sfu.live(), sfu.recorded_rooms())).await else { return };
        if let Err(error) = placements.heartbeat(&media_address, live.len() as u64) {
            tracing::warn!(%error, "could not register this node's SFU");
        }
        // Each Matrix room with a call here, by the room its calls are placed by.
        let rooms: HashSet<OwnedRoomId> = live.into_iter().map(|participant| participant.app_room).chain(recorded).filter_map(|room| OwnedRoomId::try_from(room).ok()).collect();
        let by_home: Vec<(OwnedRoomId, OwnedRoomId)> = rooms.into_iter().map(|room| (super::call_home(server.rooms(), &room).unwrap_or_else(|_| room.clone()), room)).collect();
        // Calls placed elsewhere meanwhile (this node was passed over while silent) end here,
        // so that no call is split between two nodes: their participants join again there.
        for (home, room) in &by_home {
            if let Ok(Some(node)) = placements.placed_elsewhere(home) {
                tracing::warn!(%room, %node, "this node's call was placed on another node: ending it here");
                super::recording::moved_away(&*server, home).await;
                let app_room = room.to_string();
                sfu.run(move |sfu, _| sfu.close(&app_room)).await;
            }
        }
        let active: HashSet<OwnedRoomId> = by_home.into_iter().map(|(home, _)| home).collect();
        if let Err(error) = placements.release_idle(&active, &mut last_active) {
            tracing::warn!(%error, "could not release this node's idle calls");
        }
    }
}

#[cfg(test)]
mod tests {
    use ruma::owned_room_id;

    use super::*;

    fn node(url: &str, name: &str) -> Placements {
        let store = Arc::new(Store::open_node(url, 2, name, true).unwrap());
        Placements::new(store, name, format!("ws://{name}.test"))
    }

    #[test]
    fn calls_spread_over_the_live_nodes_and_move_when_theirs_is_gone() {
        let url = limbic_test_postgres::TempPostgres::shared().new_database("call_placements");
        let (a, b) = (Arc::new(node(&url, "a")), Arc::new(node(&url, "b")));
        let (first, second, third) = (owned_room_id!("!first:test.local"), owned_room_id!("!second:test.local"), owned_room_id!("!third:test.local"));
        // No SFU has registered: no call can be placed.
        assert!(a.place(&first).is_err());
        a.heartbeat("127.0.0.1:7882", 0).unwrap();
        b.heartbeat("127.0.0.1:7883", 3).unwrap();

        // The first call goes to the node with fewer participants, the second to the one
        // without a call; each stays where it is, whoever asks.
        let placed = a.place(&first).unwrap();
        assert_eq!(placed, Placed { node: Some("a".into()), signalling_url: "ws://a.test".into(), moved_from: None });
        assert_eq!(b.place(&second).unwrap().node.as_deref(), Some("b"));
        assert_eq!(b.place(&first).unwrap(), placed);
        assert_eq!(a.admit(&first).unwrap(), Served::Here { moved_from: None });
        assert_eq!(b.admit(&first).unwrap(), Served::Elsewhere { node: "a".into() });
        assert_eq!((a.elsewhere(&first).unwrap(), b.elsewhere(&first).unwrap()), (None, Some("ws://a.test".into())));
        // A room placed nowhere is admitted by whichever node is asked first.
        assert_eq!(b.admit(&third).unwrap(), Served::Here { moved_from: None });
        assert_eq!(a.admit(&third).unwrap(), Served::Elsewhere { node: "b".into() });

        // Nodes racing to admit one room placed nowhere, each of which would place it on
        // itself, agree on one node: exactly one is told it serves the room.
        let race = owned_room_id!("!race:test.local");
        let here: Vec<bool> = std::thread::scope(|scope| {
            let racers: Vec<_> = (0..6).map(|i| {
                let (node, race) = (if i % 2 == 0 { a.clone() } else { b.clone() }, race.clone());
                scope.spawn(move || matches!(node.admit(&race).unwrap(), Served::Here { .. }))
            }).collect();
            racers.into_iter().map(|racer| racer.join().unwrap()).collect()
        });
        let winner = if here[0] { "a" } else { "b" };
        assert!(here.iter().enumerate().all(|(i, here)| *here == ((i % 2 == 0) == (winner == "a"))), "{here:?}");

        // Node b's SFU stops: its calls move to a on their next join, and say whence. The
        // database counts b alive, so nothing of it is for a to store.
        b.deregister().unwrap();
        assert_eq!(a.place(&second).unwrap(), Placed { node: Some("a".into()), signalling_url: "ws://a.test".into(), moved_from: Some("b".into()) });
        assert_eq!(a.admit(&third).unwrap(), Served::Here { moved_from: Some("b".into()) });
        if winner == "b" {
            assert_eq!(a.admit(&race).unwrap(), Served::Here { moved_from: Some("b".into()) });
        }
        assert_eq!(a.mine().unwrap().len(), 4);
        assert_eq!(b.dead_owner(&first).unwrap(), None, "a is alive");

        // Calls nobody has been in for a while are released; one in use, or placed just now, is
        // not.
        let mut batch = a.store.batch();
        for room in [&first, &second] {
            batch.put_json(tables::CALL_PLACEMENTS, room.as_bytes(), &Placement { node: "a".into(), placed_ms: 0 }).unwrap();
        }
        a.store.write(batch).unwrap();
        let mut last_active = HashMap::new();
        a.release_idle(&HashSet::from([first.clone()]), &mut last_active).unwrap();
        let mut left = a.mine().unwrap();
        left.sort();
        let mut expected = vec![first.clone(), third.clone(), race.clone()];
        expected.sort();
        assert_eq!(left, expected);
        assert!(a.store.get(tables::CALL_PLACEMENTS, second.as_bytes()).unwrap().is_none());
        assert_eq!(b.admit(&second).unwrap(), Served::Here { moved_from: None }, "placed afresh");
    }

    #[test]
    fn a_dead_nodes_calls_are_released_once_and_its_registration_goes() {
        let postgres = limbic_test_postgres::TempPostgres::shared();
        let url = postgres.new_database("dead_call_nodes");
        let database = url.rsplit('/').next().unwrap().to_owned();
        let (a, b) = (node(&url, "a"), node(&url, "b"));
        a.heartbeat("127.0.0.1:7882", 5).unwrap();
        b.heartbeat("127.0.0.1:7883", 0).unwrap();
        let (first, second, third) = (owned_room_id!("!first:test.local"), owned_room_id!("!second:test.local"), owned_room_id!("!third:test.local"));
        assert_eq!(b.place(&first).unwrap().node.as_deref(), Some("b"));
        assert_eq!(b.place(&second).unwrap().node.as_deref(), Some("a"));
        assert_eq!(b.admit(&third).unwrap(), Served::Here { moved_from: None });
        assert!(a.dead_nodes().unwrap().is_empty(), "both are alive");

        postgres.psql(&database, "UPDATE limbic_nodes SET fenced = true WHERE name = 'b'");
        let dead = a.dead_nodes().unwrap();
        assert_eq!(dead.keys().collect::<Vec<_>>(), ["b"]);
        let mut rooms = dead["b"].clone();
        rooms.sort();
        assert_eq!(rooms, [first.clone(), third.clone()]);
        // A join moves the third call first: whoever moved it stores its recording, not the sweep.
        assert_eq!(a.place(&third).unwrap().moved_from.as_deref(), Some("b"));
        assert!(!a.release_from(&third, "b").unwrap());
        // The first is released, once.
        assert!(a.release_from(&first, "b").unwrap());
        assert!(!a.release_from(&first, "b").unwrap(), "released twice");
        a.forget("b").unwrap();
        assert!(a.dead_nodes().unwrap().is_empty(), "{:?}", a.dead_nodes());
        assert!(a.store.get(tables::CALL_NODES, b"b").unwrap().is_none());
        assert_eq!(a.place(&first).unwrap(), Placed { node: Some("a".into()), signalling_url: "ws://a.test".into(), moved_from: None }, "placed afresh");
        assert_eq!(a.admit(&second).unwrap(), Served::Here { moved_from: None }, "a live node's call stays");
    }

    #[test]
    fn on_the_embedded_store_every_call_is_here() {
        let dir = tempfile::tempdir().unwrap();
        let placements = Placements::new(Arc::new(Store::open(dir.path()).unwrap()), "", "ws://here.test".into());
        let room = owned_room_id!("!r:test.local");
        assert_eq!(placements.place(&room).unwrap(), Placed { node: None, signalling_url: "ws://here.test".into(), moved_from: None });
        assert_eq!(placements.admit(&room).unwrap(), Served::Here { moved_from: None });
        assert_eq!(placements.elsewhere(&room).unwrap(), None);
    }
}
