//! The audit log: an append-only, hash-chained record of security-relevant actions. Each entry
//! commits to the previous one (`prev_hash`), so removing or altering an entry is detected by
//! [`Audit::verify`]. Entries are written in the same atomic batch as the action they record.
//!
//! The chain alone protects nothing from whoever can write the store: they could rewrite the
//! newest entries and recompute every hash. So each entry also carries a MAC under a key kept
//! outside the store ([`key`]), and the newest entry (the head) can be exported off the machine
//! and checked later, which finds entries deleted from the end.

mod key;

use std::{path::Path, sync::Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};
use sha2::{Digest, Sha256};

use self::key::AuditKey;
use crate::{
    error::{Error, Result},
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
    /// HMAC-SHA256 of `hash` under the audit key; absent on entries written before the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl AuditEntry {
    /// sha256 over the entry's canonical JSON without its own hash and MAC (so an entry written
    /// before MACs existed hashes as it did then).
    fn compute_hash(&self) -> String {
        let mut value = serde_json::to_value(self).expect("audit entries serialize");
        if let Some(object) = value.as_object_mut() {
            object.remove("hash");
            object.remove("mac");
        }
        // serde_json's maps are ordered, so this serialization is canonical.
        hex::encode(Sha256::digest(serde_json::to_vec(&value).expect("JSON serializes")))
    }
}

/// The newest entry, as exported for a later [`Audit::verify`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
    pub mac: Option<String>,
    pub ts: u64,
}

/// The outcome of checking the whole chain.
#[derive(Debug, Serialize)]
pub struct Verification {
    pub entries: u64,
    pub valid: bool,
    /// The first entry that does not check out (or is missing), and why.
    pub first_invalid: Option<u64>,
    pub reason: Option<String>,
    /// The first entry that must carry a MAC: those before it predate the audit key.
    pub keyed_from: u64,
}

/// The chain's head: the last sequence number and hash written.
struct Head {
    seq: u64,
    hash: String,
}

const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl Head {
    fn genesis() -> Self {
        Self { seq: 0, hash: GENESIS_HASH.to_owned() }
    }
}

pub struct Audit {
    head: Mutex<Head>,
    key: AuditKey,
}

/// Filters for reading the log.
#[derive(Default)]
pub struct AuditQuery {
    pub user: Option<String>,
    pub action: Option<String>,
    pub room_id: Option<String>,
    pub from_ts: Option<u64>,
    pub to_ts: Option<u64>,
    /// Only entries with a larger sequence number (for paging).
    pub after: Option<u64>,
    pub limit: usize,
}

impl Audit {
    /// The log in `store`, keyed with the key in `key_path`. On first start the key is made
    /// (`0600`), recording how many entries predate it, and its first keyed entry is
    /// `audit_keyed`. A missing key file for a keyed log is refused: a new key would hide
    /// whatever was done to the log meanwhile.
    pub fn load(store: &Store, key_path: &Path) -> Result<Self> {
        let newest = Self::newest(store)?;
        let head = newest.as_ref().map_or_else(Head::genesis, |entry| Head { seq: entry.seq, hash: entry.hash.clone() });
        let Some(key) = AuditKey::load(key_path)? else {
            if newest.as_ref().is_some_and(|entry| entry.mac.is_some()) {
                return Err(Error::internal(format!(
                    "audit key file {} is missing, and the audit log is keyed with it: restore it from a backup",
                    key_path.display()
                )));
            }
            let audit = Self { key: AuditKey::create(key_path, head.seq)?, head: Mutex::new(head) };
            tracing::info!(file = %key_path.display(), unkeyed_entries = audit.key.unkeyed_entries, "generated the audit log's key");
            let record = AuditRecord::new("audit_keyed", "server").details(json!({ "unkeyed_entries": audit.key.unkeyed_entries }));
            audit.append(store, store.batch(), vec![record], |batch| store.write(batch))?;
            return Ok(audit);
        };
        if let Some(entry) = newest.filter(|e| e.seq > key.unkeyed_entries && !e.mac.as_ref().is_some_and(|mac| key.verifies(&e.hash, mac))) {
            // Keep serving (the log is evidence, and verification names the entry), but loudly.
            tracing::error!(seq = entry.seq, file = %key_path.display(), "the audit log's newest entry does not carry this key's MAC: a wrong key file, or the log was tampered with; see GET /_limbic/admin/v1/audit/verify");
        }
        Ok(Self { key, head: Mutex::new(head) })
    }

    fn newest(store: &Store) -> Result<Option<AuditEntry>> {
        let last = store.scan_prefix(tables::AUDIT_LOG, Vec::new(), true).next().transpose()?;
        Ok(last.map(|(_, value)| crate::store::decode(tables::AUDIT_LOG, &value)).transpose()?)
    }

    /// The newest entry as stored, for export; `None` for an empty log.
    pub fn head(store: &Store) -> Result<Option<AuditHead>> {
        Ok(Self::newest(store)?.map(|entry| AuditHead { seq: entry.seq, hash: entry.hash, mac: entry.mac, ts: entry.ts }))
    }

    /// Chains `records` onto the log inside `batch` and writes the batch. The chain's lock is
    /// held until the write is durable, so entries are never reordered or lost.
    pub fn write_with(&self, store: &Store, batch: Batch, records: Vec<AuditRecord>) -> Result<()> {
        self.append(store, batch, records, |batch| tokio::task::block_in_place(|| store.write(batch)))
    }

    /// How many times an append starts again after other nodes appended first.
    const SHARED_ATTEMPTS: usize = 100;

    fn append(&self, store: &Store, batch: Batch, records: Vec<AuditRecord>, write: impl Fn(Batch) -> crate::store::Result<()>) -> Result<()> {
        let mut head = self.head.lock().expect("audit head lock");
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Other nodes sharing the store append to the same chain: its head is the newest
            // entry stored, and the write claims the next sequence number, so that of two nodes
            // appending at once one writes and the other starts again from the new head.
            if store.is_shared() {
                *head = Self::newest(store)?.map_or_else(Head::genesis, |entry| Head { seq: entry.seq, hash: entry.hash });
            }
            let mut attempt_batch = batch.clone();
            let chained = self.chain(&head, &records, &mut attempt_batch)?;
            attempt_batch.expect(tables::AUDIT_LOG, &(head.seq + 1).to_be_bytes(), None);
            match write(attempt_batch) {
                Ok(()) => {
                    *head = chained;
                    return Ok(());
                }
                Err(crate::store::StoreError::Conflict { table: "audit_log" } | crate::store::StoreError::Contention) if attempt < Self::SHARED_ATTEMPTS => {
                    // A moment apart, so that nodes appending at once do not meet again.
                    std::thread::sleep(std::time::Duration::from_micros(rand::random_range(0..1_000 * attempt.min(10) as u64)));
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Puts `records` into `batch` as the entries after `head`; the new head.
    fn chain(&self, head: &Head, records: &[AuditRecord], batch: &mut Batch) -> Result<Head> {
        let mut seq = head.seq;
        let mut hash = head.hash.clone();
        let now: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
        for record in records.iter().cloned() {
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
                mac: None,
            };
            entry.hash = entry.compute_hash();
            entry.mac = Some(self.key.mac(&entry.hash));
            hash = entry.hash.clone();
            batch.put_json(tables::AUDIT_LOG, &seq.to_be_bytes(), &entry)?;
        }
        Ok(Head { seq, hash })
    }

    pub fn query(&self, store: &Store, query: &AuditQuery) -> Result<Vec<AuditEntry>> {
        // Nothing follows the last possible sequence number.
        let Some(first) = query.after.map_or(Some(1), |after| after.checked_add(1)) else {
            return Ok(Vec::new());
        };
        let start = first.to_be_bytes();
        let mut out = Vec::new();
        for item in store.scan_from(tables::AUDIT_LOG, Vec::new(), &start, false) {
            let (_, value) = item?;
            let entry: AuditEntry = crate::store::decode(tables::AUDIT_LOG, &value)?;
            let user_matches = query.user.as_ref().is_none_or(|u| entry.actor.as_ref() == Some(u) || entry.target.as_ref() == Some(u));
            let room_matches = query.room_id.as_ref().is_none_or(|r| entry.room_id.as_ref() == Some(r));
            let action_matches = query.action.as_ref().is_none_or(|a| &entry.action == a);
            let time_matches = query.from_ts.is_none_or(|t| entry.ts >= t) && query.to_ts.is_none_or(|t| entry.ts <= t);
            if user_matches && action_matches && room_matches && time_matches {
                out.push(entry);
                if out.len() >= query.limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Recomputes every hash, link and MAC of the chain; with `exported` (the `seq` and `hash`
    /// of a head exported earlier), also checks that this entry is still there, unchanged.
    pub fn verify(&self, store: &Store, exported: Option<(u64, &str)>) -> Result<Verification> {
        let keyed_from = self.key.unkeyed_entries + 1;
        let mut expected_seq = 1;
        let mut prev = GENESIS_HASH.to_owned();
        let mut entries = 0;
        let fail = |entries, seq, reason: String| Ok(Verification { entries, valid: false, first_invalid: Some(seq), reason: Some(reason), keyed_from });
        for item in store.scan_prefix(tables::AUDIT_LOG, Vec::new(), false) {
            let (key, value) = item?;
            let key_seq = KeyReader::new(&key).u64().unwrap_or(0);
            let entry: AuditEntry = match serde_json::from_slice(&value) {
                Ok(entry) => entry,
                Err(e) => return fail(entries, key_seq, format!("unreadable entry: {e}")),
            };
            if entry.seq != key_seq || entry.seq != expected_seq {
                return fail(entries, key_seq, format!("expected entry {expected_seq}, found {}", entry.seq));
            }
            if entry.prev_hash != prev {
                return fail(entries, key_seq, "does not link to the previous entry".into());
            }
            if entry.compute_hash() != entry.hash {
                return fail(entries, key_seq, "content does not match its hash".into());
            }
            match &entry.mac {
                Some(mac) if !self.key.verifies(&entry.hash, mac) => {
                    return fail(entries, key_seq, "its MAC does not match: written without the audit key".into());
                }
                None if entry.seq >= keyed_from => {
                    return fail(entries, key_seq, format!("no MAC, though every entry from {keyed_from} on carries one"));
                }
                _ => {}
            }
            if let Some((seq, hash)) = exported
                && seq == entry.seq
                && hash != entry.hash
            {
                return fail(entries, key_seq, "differs from the exported head: rewritten since the export".into());
            }
            prev = entry.hash;
            expected_seq += 1;
            entries += 1;
        }
        // What must exist beyond the end: the first keyed entry, and the exported head.
        let must_reach = exported.map_or(keyed_from, |(seq, _)| seq.max(keyed_from));
        if entries < must_reach {
            let what = if must_reach == keyed_from { "the first keyed entry" } else { "the exported head" };
            return fail(entries, expected_seq, format!("missing: the log ends at entry {entries}, before {what} ({must_reach}); its newest entries were deleted"));
        }
        Ok(Verification { entries, valid: true, first_invalid: None, reason: None, keyed_from })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &Store, entry: &AuditEntry) {
        let mut batch = store.batch();
        batch.put_json(tables::AUDIT_LOG, &entry.seq.to_be_bytes(), entry).unwrap();
        store.write(batch).unwrap();
    }

    fn get(store: &Store, seq: u64) -> AuditEntry {
        store.get_json(tables::AUDIT_LOG, &seq.to_be_bytes()).unwrap().unwrap()
    }

    fn first_invalid(audit: &Audit, store: &Store, exported: Option<(u64, &str)>) -> (Option<u64>, String) {
        let check = audit.verify(store, exported).unwrap();
        (check.first_invalid, check.reason.unwrap_or_default())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn nodes_appending_at_once_make_one_unbroken_chain() {
        let url = limbic_test_postgres::TempPostgres::shared().new_database("audit_nodes");
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("audit.key");
        let nodes: Vec<(Store, Audit)> = ["a", "b", "c"]
            .into_iter()
            .map(|name| {
                let store = Store::open_node(&url, 2, name, true).unwrap();
                let audit = Audit::load(&store, &key).unwrap();
                (store, audit)
            })
            .collect();
        std::thread::scope(|scope| {
            for (node, (store, audit)) in nodes.iter().enumerate() {
                for writer in 0..3 {
                    scope.spawn(move || {
                        for i in 0..10 {
                            let records = vec![AuditRecord::new("login", format!("@{node}-{writer}-{i}:x")), AuditRecord::new("logout", "@x:x")];
                            audit.append(store, store.batch(), records, |batch| store.write(batch)).unwrap();
                        }
                    });
                }
            }
        });
        let (store, audit) = &nodes[0];
        let check = audit.verify(store, None).unwrap();
        // One `audit_keyed` (the first node to start made the key), then 90 pairs.
        assert!(check.valid, "{:?}", check.reason);
        assert_eq!(check.entries, 181);
        let logins = audit.query(store, &AuditQuery { action: Some("login".into()), limit: 1000, ..Default::default() }).unwrap();
        assert_eq!(logins.len(), 90, "every node's entries are in the chain");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn tampering_is_detected_and_the_chain_resumes_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("audit.key");
        {
            let store = Store::open(&dir.path().join("db")).unwrap();
            let audit = Audit::load(&store, &key).unwrap();
            audit.write_with(&store, store.batch(), vec![AuditRecord::new("login", "@a:x"), AuditRecord::new("join", "@a:x").room("!r:x")]).unwrap();
        }
        let store = Store::open(&dir.path().join("db")).unwrap();
        let audit = Audit::load(&store, &key).unwrap();
        audit.write_with(&store, store.batch(), vec![AuditRecord::new("leave", "@a:x").room("!r:x")]).unwrap();
        let check = audit.verify(&store, None).unwrap();
        assert!(check.valid && check.entries == 4 && check.keyed_from == 1, "{check:?}");
        let actions = audit.query(&store, &AuditQuery { limit: 10, ..Default::default() }).unwrap();
        assert_eq!(actions.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["audit_keyed", "login", "join", "leave"], "keyed once");
        let by_room = audit.query(&store, &AuditQuery { room_id: Some("!r:x".into()), limit: 10, ..Default::default() }).unwrap();
        assert_eq!(by_room.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["join", "leave"]);
        let joins = audit.query(&store, &AuditQuery { action: Some("join".into()), limit: 10, ..Default::default() }).unwrap();
        assert_eq!(joins.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);

        // Edit entry 3's actor in place: its hash no longer matches.
        let mut entry = get(&store, 3);
        entry.actor = Some("@mallory:x".into());
        put(&store, &entry);
        assert_eq!(first_invalid(&audit, &store, None).0, Some(3));

        // Re-hashing the edited entry leaves its MAC behind.
        entry.hash = entry.compute_hash();
        put(&store, &entry);
        let (seq, reason) = first_invalid(&audit, &store, None);
        assert_eq!(seq, Some(3));
        assert!(reason.contains("MAC"), "{reason}");

        // Deleting an entry leaves a gap.
        let mut batch = store.batch();
        batch.delete(tables::AUDIT_LOG, &3u64.to_be_bytes());
        store.write(batch).unwrap();
        assert_eq!(first_invalid(&audit, &store, None).0, Some(4));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_rechained_rewrite_fails_its_mac_and_a_truncation_its_exported_head() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let audit = Audit::load(&store, &dir.path().join("audit.key")).unwrap();
        let records = (0..4).map(|i| AuditRecord::new("login", format!("@u{i}:x"))).collect();
        audit.write_with(&store, store.batch(), records).unwrap();
        let head = Audit::head(&store).unwrap().unwrap();
        assert_eq!((head.seq, head.mac.as_ref().map(String::len)), (5, Some(64)));
        let exported = Some((head.seq, head.hash.as_str()));
        assert!(audit.verify(&store, exported).unwrap().valid);

        // Entry 4 rewritten and the chain recomputed from it, with or without a MAC.
        let original: Vec<AuditEntry> = (4..=5).map(|seq| get(&store, seq)).collect();
        for mac in [None, original[0].mac.clone()] {
            let mut prev = get(&store, 3).hash;
            for entry in &original {
                let mut entry = entry.clone();
                entry.target = Some("@someone-else:x".into());
                entry.prev_hash = prev;
                entry.hash = entry.compute_hash();
                entry.mac = mac.clone();
                prev = entry.hash.clone();
                put(&store, &entry);
            }
            let (seq, reason) = first_invalid(&audit, &store, None);
            assert_eq!(seq, Some(4), "{reason}");
            assert!(reason.contains("MAC"), "{reason}");
        }
        original.iter().for_each(|entry| put(&store, entry));
        assert!(audit.verify(&store, exported).unwrap().valid, "restored");

        // The newest two deleted: the chain alone still checks out, the exported head does not.
        let mut batch = store.batch();
        for seq in [4u64, 5] {
            batch.delete(tables::AUDIT_LOG, &seq.to_be_bytes());
        }
        store.write(batch).unwrap();
        assert!(audit.verify(&store, None).unwrap().valid);
        let (seq, reason) = first_invalid(&audit, &store, exported);
        assert_eq!(seq, Some(4));
        assert!(reason.contains("exported head"), "{reason}");

        // Written again up to and past the head's seq: the head's hash differs.
        let audit = Audit::load(&store, &dir.path().join("audit.key")).unwrap();
        audit.write_with(&store, store.batch(), vec![AuditRecord::new("login", "@u:x"), AuditRecord::new("login", "@v:x")]).unwrap();
        assert!(audit.verify(&store, None).unwrap().valid);
        assert_eq!(first_invalid(&audit, &store, exported).0, Some(5));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn entries_older_than_the_key_stay_a_verifiable_unkeyed_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("audit.key");
        let store = Store::open(&dir.path().join("db")).unwrap();
        // Two entries as an earlier version wrote them: chained, no MAC.
        let mut prev = GENESIS_HASH.to_owned();
        for seq in 1..=2 {
            let mut entry = AuditEntry {
                seq, ts: seq, action: "login".into(), actor: Some("@a:x".into()), room_id: None, target: None,
                details: json!({}), prev_hash: prev, hash: String::new(), mac: None,
            };
            entry.hash = entry.compute_hash();
            assert!(!serde_json::to_string(&entry).unwrap().contains("mac"), "stored as before");
            prev = entry.hash.clone();
            put(&store, &entry);
        }
        let audit = Audit::load(&store, &key_path).unwrap();
        let check = audit.verify(&store, None).unwrap();
        assert!(check.valid && check.entries == 3 && check.keyed_from == 3, "{check:?}");
        assert_eq!((get(&store, 3).action.as_str(), get(&store, 3).details["unkeyed_entries"].as_u64()), ("audit_keyed", Some(2)));

        // Passing keyed entries off as unkeyed ones: the boundary is in the key file.
        let mut entry = get(&store, 3);
        entry.mac = None;
        put(&store, &entry);
        let (seq, reason) = first_invalid(&audit, &store, None);
        assert_eq!(seq, Some(3));
        assert!(reason.contains("no MAC"), "{reason}");
        // So is deleting every keyed entry.
        let mut batch = store.batch();
        batch.delete(tables::AUDIT_LOG, &3u64.to_be_bytes());
        store.write(batch).unwrap();
        assert_eq!(first_invalid(&audit, &store, None).0, Some(3));

        // A keyed log whose key file is gone does not open: a new key would cover the tracks.
        audit.write_with(&store, store.batch(), vec![AuditRecord::new("login", "@a:x")]).unwrap();
        std::fs::remove_file(&key_path).unwrap();
        let err = Audit::load(&store, &key_path).err().unwrap();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(!key_path.exists());
    }
}
