//! The audit log: an append-only, hash-chained record of security-relevant actions. Each entry
//! commits to the previous one (`prev_hash`), so removing or altering an entry is detected by
//! [`Audit::verify`]. Entries are written in the same atomic batch as the action they record.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};
use sha2::{Digest, Sha256};

use crate::{
    error::Result,
    store::{Batch, KeyReader, Store, tables},
};

/// What happened, before it is placed in the chain.
#[derive(Clone, Debug)]
pub struct AuditRecord {
    pub action: &'static str,
    pub actor: Option<String>,
    pub room_id: Option<String>,
    pub target: Option<String>,
    pub details: JsonValue,
}

impl AuditRecord {
    pub fn new(action: &'static str, actor: impl ToString) -> Self {
        Self { action, actor: Some(actor.to_string()), room_id: None, target: None, details: json!({}) }
    }

    pub fn room(mut self, room_id: impl ToString) -> Self {
        self.room_id = Some(room_id.to_string());
        self
    }

    pub fn target(mut self, target: impl ToString) -> Self {
        self.target = Some(target.to_string());
        self
    }

    pub fn details(mut self, details: JsonValue) -> Self {
        self.details = details;
        self
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    pub seq: u64,
    pub ts: u64,
    pub action: String,
    pub actor: Option<String>,
    pub room_id: Option<String>,
    pub target: Option<String>,
    pub details: JsonValue,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEntry {
    /// sha256 over the entry's canonical JSON without its own hash.
    fn compute_hash(&self) -> String {
        let mut value = serde_json::to_value(self).expect("audit entries serialize");
        if let Some(object) = value.as_object_mut() {
            object.remove("hash");
        }
        // serde_json's maps are ordered, so this serialization is canonical.
        hex::encode(Sha256::digest(serde_json::to_vec(&value).expect("JSON serializes")))
    }
}

/// The outcome of checking the whole chain.
#[derive(Debug, Serialize)]
pub struct Verification {
    pub entries: u64,
    pub valid: bool,
    /// The first entry that does not check out, and why.
    pub first_invalid: Option<u64>,
    pub reason: Option<String>,
}

/// The chain's head: the last sequence number and hash written.
struct Head {
    seq: u64,
    hash: String,
}

const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

pub struct Audit {
    head: Mutex<Head>,
}

/// Filters for reading the log.
#[derive(Default)]
pub struct AuditQuery {
    pub user: Option<String>,
    pub room_id: Option<String>,
    pub from_ts: Option<u64>,
    pub to_ts: Option<u64>,
    /// Only entries with a larger sequence number (for paging).
    pub after: Option<u64>,
    pub limit: usize,
}

impl Audit {
    pub fn load(store: &Store) -> Result<Self> {
        let last = store.scan_prefix(tables::AUDIT_LOG, Vec::new(), true).next().transpose()?;
        let head = match last {
            Some((_, value)) => {
                let entry: AuditEntry = crate::store::decode(tables::AUDIT_LOG, &value)?;
                Head { seq: entry.seq, hash: entry.hash }
            }
            None => Head { seq: 0, hash: GENESIS_HASH.to_owned() },
        };
        Ok(Self { head: Mutex::new(head) })
    }

    /// Chains `records` onto the log inside `batch` and writes the batch. The chain's lock is
    /// held until the write is durable, so entries are never reordered or lost.
    pub fn write_with(&self, store: &Store, mut batch: Batch, records: Vec<AuditRecord>) -> Result<()> {
        let mut head = self.head.lock().expect("audit head lock");
        let mut seq = head.seq;
        let mut hash = head.hash.clone();
        let now: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
        for record in records {
            seq += 1;
            let mut entry = AuditEntry {
                seq,
                ts: now,
                action: record.action.to_owned(),
                actor: record.actor,
                room_id: record.room_id,
                target: record.target,
                details: record.details,
                prev_hash: hash,
                hash: String::new(),
            };
            entry.hash = entry.compute_hash();
            hash = entry.hash.clone();
            batch.put_json(store, tables::AUDIT_LOG, &seq.to_be_bytes(), &entry)?;
        }
        tokio::task::block_in_place(|| store.write(batch))?;
        head.seq = seq;
        head.hash = hash;
        Ok(())
    }

    pub fn query(&self, store: &Store, query: &AuditQuery) -> Result<Vec<AuditEntry>> {
        let start = query.after.map_or(1, |a| a + 1).to_be_bytes();
        let mut out = Vec::new();
        for item in store.scan_from(tables::AUDIT_LOG, Vec::new(), &start, false) {
            let (_, value) = item?;
            let entry: AuditEntry = crate::store::decode(tables::AUDIT_LOG, &value)?;
            let user_matches = query.user.as_ref().is_none_or(|u| entry.actor.as_ref() == Some(u) || entry.target.as_ref() == Some(u));
            let room_matches = query.room_id.as_ref().is_none_or(|r| entry.room_id.as_ref() == Some(r));
            let time_matches = query.from_ts.is_none_or(|t| entry.ts >= t) && query.to_ts.is_none_or(|t| entry.ts <= t);
            if user_matches && room_matches && time_matches {
                out.push(entry);
                if out.len() >= query.limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Recomputes every hash and link of the chain.
    pub fn verify(store: &Store) -> Result<Verification> {
        let mut expected_seq = 1;
        let mut prev = GENESIS_HASH.to_owned();
        let mut entries = 0;
        for item in store.scan_prefix(tables::AUDIT_LOG, Vec::new(), false) {
            let (key, value) = item?;
            let key_seq = KeyReader::new(&key).u64().unwrap_or(0);
            let fail = |reason: String| Verification { entries, valid: false, first_invalid: Some(key_seq), reason: Some(reason) };
            let entry: AuditEntry = match serde_json::from_slice(&value) {
                Ok(entry) => entry,
                Err(e) => return Ok(fail(format!("unreadable entry: {e}"))),
            };
            if entry.seq != key_seq || entry.seq != expected_seq {
                return Ok(fail(format!("expected entry {expected_seq}, found {}", entry.seq)));
            }
            if entry.prev_hash != prev {
                return Ok(fail("does not link to the previous entry".into()));
            }
            if entry.compute_hash() != entry.hash {
                return Ok(fail("content does not match its hash".into()));
            }
            prev = entry.hash;
            expected_seq += 1;
            entries += 1;
        }
        Ok(Verification { entries, valid: true, first_invalid: None, reason: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn tampering_is_detected_and_the_chain_resumes_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let audit = Audit::load(&store).unwrap();
            audit.write_with(&store, store.batch(), vec![AuditRecord::new("login", "@a:x"), AuditRecord::new("join", "@a:x").room("!r:x")]).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let audit = Audit::load(&store).unwrap();
        audit.write_with(&store, store.batch(), vec![AuditRecord::new("leave", "@a:x").room("!r:x")]).unwrap();
        let check = Audit::verify(&store).unwrap();
        assert!(check.valid && check.entries == 3, "{check:?}");
        let by_room = audit.query(&store, &AuditQuery { room_id: Some("!r:x".into()), limit: 10, ..Default::default() }).unwrap();
        assert_eq!(by_room.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["join", "leave"]);

        // Edit entry 2's actor in place: its hash no longer matches.
        let mut entry: AuditEntry = store.get_json(tables::AUDIT_LOG, &2u64.to_be_bytes()).unwrap().unwrap();
        entry.actor = Some("@mallory:x".into());
        let mut batch = store.batch();
        batch.put_json(&store, tables::AUDIT_LOG, &2u64.to_be_bytes(), &entry).unwrap();
        store.write(batch).unwrap();
        let check = Audit::verify(&store).unwrap();
        assert_eq!((check.valid, check.first_invalid), (false, Some(2)));

        // Re-hashing the edited entry breaks the link from entry 3 instead.
        entry.hash = entry.compute_hash();
        let mut batch = store.batch();
        batch.put_json(&store, tables::AUDIT_LOG, &2u64.to_be_bytes(), &entry).unwrap();
        store.write(batch).unwrap();
        assert_eq!(Audit::verify(&store).unwrap().first_invalid, Some(3));

        // Deleting an entry leaves a gap.
        let mut batch = store.batch();
        batch.delete(&store, tables::AUDIT_LOG, &2u64.to_be_bytes());
        store.write(batch).unwrap();
        assert_eq!(Audit::verify(&store).unwrap().first_invalid, Some(3));
    }
}
