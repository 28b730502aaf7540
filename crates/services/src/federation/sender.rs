//! The outbound queue: every event of a local user in a room other servers are in is queued for
//! each of them in the event's own write, then sent in transactions of up to 50, retried with
//! exponential backoff, and only removed once the destination accepted it — so nothing is lost
//! across restarts or outages.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use ruma::{OwnedServerName, ServerName, api::federation::transactions::send_transaction_message};

use super::Federation;
use super::FederationHost;
use crate::{
    events::Pdu,
    store::{Key, KeyReader, Store, StreamPos, tables},
};

const MAX_PDUS_PER_TRANSACTION: usize = 50;
const MAX_EDUS_PER_TRANSACTION: usize = 100;
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// The queue's intake: each local event is staged for the servers it goes to, in its own batch.
pub struct Outbox {
    server_name: OwnedServerName,
}

impl Outbox {
    pub fn new(server_name: OwnedServerName) -> Self {
        Self { server_name }
    }

    /// The other servers a local event goes to: those with members in the room (and an invited
    /// user's server), unless the room never federates or its ACL denies them.
    fn destinations(&self, room: &dyn crate::rooms::RoomView, pdu: &Pdu) -> crate::Result<HashSet<OwnedServerName>> {
        let federates = room.state("m.room.create", "")?.is_none_or(|create| create.content_json().get("m.federate") != Some(&serde_json::Value::Bool(false)));
        if !federates {
            return Ok(HashSet::new());
        }
        let mut servers: HashSet<OwnedServerName> = room
            .members()?
            .iter()
            .filter(|(_, m)| matches!(m, crate::rooms::Membership::Join))
            .map(|(user, _)| user.server_name().to_owned())
            .collect();
        if pdu.kind == ruma::events::TimelineEventType::RoomMember
            && let Some(target) = pdu.state_key.as_deref().and_then(|k| <&ruma::UserId>::try_from(k).ok())
        {
            servers.insert(target.server_name().to_owned());
        }
        servers.remove(&self.server_name);
        if let Some(acl) = room.state("m.room.server_acl", "")? {
            let acl = acl.content_json();
            servers.retain(|server| super::acl::content_allows(&acl, server));
        }
        Ok(servers)
    }
}

impl crate::rooms::Indexer for Outbox {
    fn stage(&self, room: &dyn crate::rooms::RoomView, event: &crate::rooms::StagedEvent<'_>, staging: &mut crate::rooms::Staging<'_>) -> crate::Result<()> {
        if !event.local {
            return Ok(());
        }
        for destination in self.destinations(room, event.pdu)? {
            let key = Key::new().str(destination.as_str()).u64(event.pos).into_vec();
            staging.batch().put(tables::FEDERATION_OUTBOX, &key, event.pdu.event_id.as_bytes());
        }
        Ok(())
    }
}

/// Queues an EDU for `destinations` (typing and receipts are queued by the rooms themselves).
pub fn queue_edu(server: &dyn FederationHost, destinations: &HashSet<OwnedServerName>, edu: &serde_json::Value) -> crate::Result<()> {
    if destinations.is_empty() || server.federation().is_none() {
        return Ok(());
    }
    let ticket = server.store().streams().allocate(&server.store())?;
    let mut batch = server.store().batch();
    for destination in destinations {
        batch.put_json(tables::FEDERATION_EDUS, &Key::new().str(destination.as_str()).u64(ticket.pos()).into_vec(), edu)?;
    }
    tokio::task::block_in_place(|| server.store().write(batch))?;
    drop(ticket);
    Ok(())
}

/// The other servers that share a room with `user` (for device-list updates).
pub fn servers_sharing_rooms(server: &dyn FederationHost, user: &ruma::UserId) -> crate::Result<HashSet<OwnedServerName>> {
    let mut servers = HashSet::new();
    for (room_id, entry) in server.rooms().user_rooms(user)? {
        if entry.membership == crate::rooms::Membership::Join {
            servers.extend(server.rooms().remote_servers(&room_id)?);
        }
    }
    Ok(servers)
}

/// Tells the servers sharing a room with `user` that their device list changed.
pub fn device_list_changed(server: &dyn FederationHost, user: &ruma::UserId, device_id: &str, deleted: bool) -> crate::Result<()> {
    if server.federation().is_none() {
        return Ok(());
    }
    let destinations = servers_sharing_rooms(server, user)?;
    let edu = serde_json::json!({
        "edu_type": "m.device_list_update",
        "content": { "user_id": user, "device_id": device_id, "stream_id": server.store().streams().current(), "prev_id": [], "deleted": deleted },
    });
    queue_edu(server, &destinations, &edu)
}

/// Tells the servers sharing a room with `user` that their cross-signing keys changed.
pub fn signing_keys_changed(server: &dyn FederationHost, user: &ruma::UserId) -> crate::Result<()> {
    if server.federation().is_none() {
        return Ok(());
    }
    let destinations = servers_sharing_rooms(server, user)?;
    let mut content = serde_json::json!({ "user_id": user });
    for (field, kind) in [("master_key", crate::e2ee::CrossSigningKind::Master), ("self_signing_key", crate::e2ee::CrossSigningKind::SelfSigning)] {
        if let Some(key) = server.e2ee().cross_signing_key(user, kind)? {
            content[field] = key;
        }
    }
    queue_edu(server, &destinations, &serde_json::json!({ "edu_type": "m.signing_key_update", "content": content }))
}

/// Tells the servers sharing a room with `user` their presence (`m.presence`).
pub fn presence_changed(server: &dyn FederationHost, user: &ruma::UserId) -> crate::Result<()> {
    if server.federation().is_none() || !server.presence_enabled() {
        return Ok(());
    }
    let Some(presence) = server.users().presence(user)? else { return Ok(()) };
    let destinations = servers_sharing_rooms(server, user)?;
    let now: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
    let mut update = serde_json::json!({
        "user_id": user,
        "presence": presence.presence,
        "last_active_ago": now.saturating_sub(presence.last_active_ts),
        "currently_active": presence.presence == "online",
    });
    if let Some(status) = presence.status_msg {
        update["status_msg"] = serde_json::json!(status);
    }
    queue_edu(server, &destinations, &serde_json::json!({ "edu_type": "m.presence", "content": { "push": [update] } }))
}

/// Per destination: when to try again, and the current backoff.
#[derive(Default)]
pub struct Backoff(Mutex<HashMap<OwnedServerName, (Instant, Duration)>>);

impl Backoff {
    fn ready(&self, destination: &ServerName) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(destination).is_none_or(|(at, _)| Instant::now() >= *at)
    }

    fn failed(&self, destination: &ServerName) -> Duration {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let next = all.get(destination).map_or(MIN_BACKOFF, |(_, last)| (*last * 2).min(MAX_BACKOFF));
        all.insert(destination.to_owned(), (Instant::now() + next, next));
        next
    }

    fn succeeded(&self, destination: &ServerName) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).remove(destination);
    }
}

/// What is queued for one destination: (position, event id) and (position, EDU JSON).
#[derive(Default)]
struct Queued {
    pdus: Vec<(StreamPos, Vec<u8>)>,
    edus: Vec<(StreamPos, Vec<u8>)>,
}

impl Queued {
    /// The transaction's id: the same for the same entries, so that a retry of one the
    /// destination did get is recognised, and another for any other entries. A destination
    /// answers an id it has seen with its first answer and drops what the transaction carries:
    /// an id that named only the first entries dropped the events queued after them when a
    /// transaction was sent again with more.
    fn transaction_id(&self) -> String {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        for list in [&self.pdus, &self.edus] {
            hash.update((list.len() as u64).to_be_bytes());
            for (pos, _) in list {
                hash.update(pos.to_be_bytes());
            }
        }
        let first = |list: &[(StreamPos, Vec<u8>)]| list.first().map_or(0, |(pos, _)| *pos);
        format!("{}-{}-{}", first(&self.pdus), first(&self.edus), hex::encode(&hash.finalize()[..8]))
    }
}

/// The destinations something is queued for: one read of each destination's first entry (the
/// sender looks at every write, and an unreachable destination's queue can be long).
fn waiting(store: &Store) -> crate::Result<BTreeSet<OwnedServerName>> {
    let mut destinations = BTreeSet::new();
    let destination_of = |key: &[u8]| KeyReader::new(key).str().map(|d| Key::new().str(d).into_vec());
    for table in [tables::FEDERATION_OUTBOX, tables::FEDERATION_EDUS] {
        for item in store.first_of_each(table, Vec::new(), destination_of) {
            let (key, _) = item?;
            if let Some(destination) = KeyReader::new(&key).str().and_then(|d| OwnedServerName::try_from(d).ok()) {
                destinations.insert(destination);
            }
        }
    }
    Ok(destinations)
}

/// What is queued for `destination`, oldest first, at most one transaction's worth. Read once
/// the destination is the sender's alone: the transaction before it has taken its entries out
/// by then, so that none is sent twice in two different transactions.
fn queued_for(store: &Store, destination: &ServerName) -> crate::Result<Queued> {
    let mut queued = Queued::default();
    let prefix = Key::new().str(destination.as_str()).into_vec();
    for (table, list, limit) in [(tables::FEDERATION_OUTBOX, &mut queued.pdus, MAX_PDUS_PER_TRANSACTION), (tables::FEDERATION_EDUS, &mut queued.edus, MAX_EDUS_PER_TRANSACTION)] {
        for item in store.scan_prefix(table, prefix.clone(), false).take(limit) {
            let (key, value) = item?;
            if let Some(pos) = KeyReader::new(&key).skip_str().u64() {
                list.push((pos, value.to_vec()));
            }
        }
    }
    Ok(queued)
}

/// Sends one transaction of what is queued for `destination`; on success its entries leave the
/// queue.
async fn send_batch(server: &dyn FederationHost, federation: &Federation, destination: &ServerName) -> crate::Result<()> {
    let queued = queued_for(&server.store(), destination)?;
    if queued.pdus.is_empty() && queued.edus.is_empty() {
        return Ok(());
    }
    let mut pdus = Vec::new();
    for (_, event_id) in &queued.pdus {
        let Ok(event_id) = ruma::OwnedEventId::try_from(String::from_utf8_lossy(event_id).as_ref()) else { continue };
        let Some(pdu) = server.rooms().pdu(&event_id)? else { continue };
        // An invite of one of the destination's users goes through /invite, which the invitee's
        // server answers for rooms it is not in yet.
        let invitee = pdu.state_key.as_deref().and_then(|k| <&ruma::UserId>::try_from(k).ok());
        if pdu.membership() == Some(crate::rooms::Membership::Invite) && invitee.is_some_and(|u| u.server_name() == destination) {
            super::membership::send_invite(server, federation, destination, &pdu).await?;
            continue;
        }
        if let Some(raw) = server.rooms().federation_pdu(&event_id)? {
            pdus.push(raw);
        }
    }
    let edus = queued
        .edus
        .iter()
        .filter_map(|(_, json)| serde_json::value::RawValue::from_string(String::from_utf8_lossy(json).into_owned()).ok())
        .map(ruma::serde::Raw::from_json)
        .collect();
    let mut request = send_transaction_message::v1::Request::new(queued.transaction_id().into(), federation.server_name().to_owned(), ruma::MilliSecondsSinceUnixEpoch::now());
    request.pdus = pdus;
    request.edus = edus;
    let answer = federation.send(destination, request).await?;
    for (event_id, result) in &answer.pdus {
        if let Err(error) = result {
            tracing::warn!(%destination, %event_id, %error, "the destination refused an event");
        }
    }
    let mut batch = server.store().batch();
    for (table, list) in [(tables::FEDERATION_OUTBOX, &queued.pdus), (tables::FEDERATION_EDUS, &queued.edus)] {
        for (pos, _) in list {
            batch.delete(table, &Key::new().str(destination.as_str()).u64(*pos).into_vec());
        }
    }
    server.store().write(batch)?;
    Ok(())
}

/// Delivers the queue until shutdown: on every new event, and on a timer for retries.
pub async fn run(server: Arc<dyn FederationHost>) {
    let Some(federation) = server.federation().cloned() else { return };
    let backoff = Arc::new(Backoff::default());
    let in_flight: Arc<Mutex<HashSet<OwnedServerName>>> = Arc::default();
    let mut watermark = server.store().streams().subscribe();
    let mut shutdown = server.shutting_down();
    loop {
        match waiting(&server.store()) {
            Ok(destinations) => {
                for destination in destinations {
                    if !backoff.ready(&destination) || !in_flight.lock().unwrap_or_else(PoisonError::into_inner).insert(destination.clone()) {
                        continue;
                    }
                    let (server, federation, backoff, in_flight) = (server.clone(), federation.clone(), backoff.clone(), in_flight.clone());
                    tokio::spawn(async move {
                        match send_batch(&*server, &federation, &destination).await {
                            Ok(()) => backoff.succeeded(&destination),
                            Err(error) => {
                                let wait = backoff.failed(&destination);
                                tracing::warn!(%destination, %error, retry_in = ?wait, "federation transaction failed");
                            }
                        }
                        in_flight.lock().unwrap_or_else(PoisonError::into_inner).remove(&destination);
                    });
                }
            }
            Err(error) => tracing::error!(%error, "reading the federation queue failed"),
        }
        tokio::select! {
            changed = watermark.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(MIN_BACKOFF) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(pdus: &[StreamPos], edus: &[StreamPos]) -> Queued {
        let entries = |list: &[StreamPos]| list.iter().map(|pos| (*pos, Vec::new())).collect();
        Queued { pdus: entries(pdus), edus: entries(edus) }
    }

    /// Synapse answered a transaction sent again with more events (as `174-0`, the id of its
    /// first) from its cache of the first, and the events added were lost.
    /// Each destination once, however long its queue, and a name another starts with apart.
    #[test]
    fn the_destinations_waiting_are_found_by_their_first_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut batch = store.batch();
        for (destination, positions) in [("a.test", 0..50), ("a.test.evil", 0..2), ("b.test", 7..8)] {
            for pos in positions {
                batch.put(tables::FEDERATION_OUTBOX, &Key::new().str(destination).u64(pos).into_vec(), b"$event");
            }
        }
        batch.put(tables::FEDERATION_EDUS, &Key::new().str("c.test").u64(1).into_vec(), b"{}");
        store.write(batch).unwrap();
        let found: Vec<String> = waiting(&store).unwrap().into_iter().map(|d| d.to_string()).collect();
        assert_eq!(found, ["a.test", "a.test.evil", "b.test", "c.test"]);
        assert_eq!(queued_for(&store, ruma::server_name!("a.test")).unwrap().pdus.len(), 50);
    }

    #[test]
    fn a_transaction_id_names_all_its_entries() {
        let id = |pdus: &[StreamPos], edus: &[StreamPos]| queued(pdus, edus).transaction_id();
        assert_eq!(id(&[174], &[]), id(&[174], &[]), "a retry of the same entries keeps its id");
        assert_ne!(id(&[174], &[]), id(&[174, 180], &[]));
        assert_ne!(id(&[174, 179, 181], &[]), id(&[174, 181], &[]));
        assert_ne!(id(&[174], &[3]), id(&[174], &[]));
        assert_ne!(id(&[174], &[]), id(&[], &[174]));
        assert!(id(&[174, 180], &[7]).starts_with("174-7-"), "{}", id(&[174, 180], &[7]));
    }
}
