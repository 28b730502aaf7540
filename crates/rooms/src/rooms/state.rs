//! State snapshots: each state event starts a snapshot that records its own entry on top of a
//! parent snapshot; every few generations a full copy bounds the walk. Snapshot ids are the
//! stream positions of the events that created them; 0 is the empty state.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use ruma::OwnedEventId;
use serde::{Deserialize, Serialize};

use crate::{
    error::Result,
    store::{Batch, Key, KeyReader, Store, StreamPos, tables},
};

pub type StateKey = (String, String);
pub type StateMap = BTreeMap<StateKey, OwnedEventId>;

pub const EMPTY_SNAPSHOT: u64 = 0;
const MAX_CHAIN: u32 = 32;
/// State entries kept in the cache, summed over its snapshots.
const CACHE_STATE_ENTRIES: usize = 50_000;

#[derive(Serialize, Deserialize)]
struct Snapshot {
    parent: Option<u64>,
    generation: u32,
    entries: Vec<(String, String, OwnedEventId)>,
}

#[derive(Default)]
pub struct SnapshotCache {
    maps: Mutex<CachedMaps>,
}

#[derive(Default)]
struct CachedMaps {
    maps: HashMap<u64, Arc<StateMap>>,
    /// State entries summed over `maps`.
    entries: usize,
}

impl CachedMaps {
    fn get(&self, id: &u64) -> Option<&Arc<StateMap>> {
        self.maps.get(id)
    }

    fn insert(&mut self, id: u64, map: Arc<StateMap>) {
        self.entries += map.len();
        if let Some(old) = self.maps.insert(id, map) {
            self.entries -= old.len();
        }
        if self.entries > CACHE_STATE_ENTRIES {
            // Old snapshots (low ids) are the least likely to be read again.
            let mut ids: Vec<u64> = self.maps.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                if self.entries <= CACHE_STATE_ENTRIES / 2 {
                    break;
                }
                if let Some(map) = self.maps.remove(&id) {
                    self.entries -= map.len();
                }
            }
        }
    }
}

impl SnapshotCache {
    /// State entries held, summed over the snapshots.
    #[cfg(test)]
    pub fn entries(&self) -> usize {
        self.maps.lock().expect("snapshot cache").entries
    }

    /// Forgets every snapshot read so far (they are read again on demand).
    pub fn clear(&self) {
        *self.maps.lock().expect("snapshot cache") = CachedMaps::default();
    }

    /// The full state of a snapshot.
    pub fn load(&self, store: &Store, id: u64) -> Result<Arc<StateMap>> {
        if id == EMPTY_SNAPSHOT {
            return Ok(Arc::default());
        }
        if let Some(map) = self.maps.lock().expect("snapshot cache").get(&id) {
            return Ok(map.clone());
        }
        let mut chain = Vec::new();
        let mut next = Some(id);
        let mut base = Arc::<StateMap>::default();
        while let Some(current) = next {
            if let Some(map) = self.maps.lock().expect("snapshot cache").get(&current) {
                base = map.clone();
                break;
            }
            let snapshot: Snapshot = store
                .get_json(tables::STATE_SNAPSHOTS, &current.to_be_bytes())?
                .ok_or_else(|| crate::Error::internal(format!("missing state snapshot {current}")))?;
            next = snapshot.parent;
            chain.push(snapshot);
        }
        let mut map = (*base).clone();
        for snapshot in chain.into_iter().rev() {
            for (kind, state_key, event_id) in snapshot.entries {
                map.insert((kind, state_key), event_id);
            }
        }
        let map = Arc::new(map);
        let mut cache = self.maps.lock().expect("snapshot cache");
        cache.insert(id, map.clone());
        Ok(map)
    }

    /// Writes the snapshot `id` = `parent` + one entry into the batch.
    pub fn write_child(
        &self,
        store: &Store,
        batch: &mut Batch,
        parent: u64,
        id: StreamPos,
        entry: (StateKey, OwnedEventId),
        pending: &HashMap<u64, u32>,
    ) -> Result<u32> {
        self.write_entries(store, batch, parent, id, vec![entry], pending)
    }

    /// Writes the snapshot `id` = `parent` + `entries` into the batch (a state resolution
    /// changes several keys at once).
    pub fn write_entries(
        &self,
        store: &Store,
        batch: &mut Batch,
        parent: u64,
        id: StreamPos,
        entries: Vec<(StateKey, OwnedEventId)>,
        pending: &HashMap<u64, u32>,
    ) -> Result<u32> {
        let parent_generation = match pending.get(&parent) {
            Some(generation) => *generation,
            None if parent == EMPTY_SNAPSHOT => 0,
            None => store
                .get_json::<Snapshot>(tables::STATE_SNAPSHOTS, &parent.to_be_bytes())?
                .map(|s| s.generation)
                .ok_or_else(|| crate::Error::internal(format!("missing state snapshot {parent}")))?,
        };
        let snapshot = if parent_generation >= MAX_CHAIN && !pending.contains_key(&parent) {
            let mut map = (*self.load(store, parent)?).clone();
            map.extend(entries);
            Snapshot {
                parent: None,
                generation: 0,
                entries: map.into_iter().map(|((k, s), e)| (k, s, e)).collect(),
            }
        } else {
            Snapshot {
                parent: (parent != EMPTY_SNAPSHOT).then_some(parent),
                generation: parent_generation + 1,
                entries: entries.into_iter().map(|((k, s), e)| (k, s, e)).collect(),
            }
        };
        batch.put_json(tables::STATE_SNAPSHOTS, &id.to_be_bytes(), &snapshot)?;
        Ok(snapshot.generation)
    }
}

/// Files the snapshot `id`, made at a position that is no event's, under its room (the room's
/// purge finds it there; an event's snapshot goes with the event).
pub fn index_snapshot(batch: &mut Batch, room_id: &ruma::RoomId, id: StreamPos) {
    batch.put(tables::ROOM_SNAPSHOTS, &Key::new().str(room_id.as_str()).u64(id).into_vec(), &[]);
}

/// Stages the removal of the snapshots filed under the room by [`index_snapshot`].
pub fn stage_indexed_removal(store: &Store, batch: &mut Batch, room_id: &ruma::RoomId) -> Result<()> {
    for item in store.scan_prefix(tables::ROOM_SNAPSHOTS, Key::new().str(room_id.as_str()).into_vec(), false) {
        let (key, _) = item?;
        let id = KeyReader::new(&key).skip_str().u64().ok_or_else(|| crate::Error::internal("corrupt room snapshot key"))?;
        batch.delete(tables::STATE_SNAPSHOTS, &id.to_be_bytes());
        batch.delete(tables::ROOM_SNAPSHOTS, &key);
    }
    Ok(())
}

pub fn state_key(room_id: &str, kind: &str, state_key: &str) -> Vec<u8> {
    Key::new().str(room_id).str(kind).str(state_key).into_vec()
}
