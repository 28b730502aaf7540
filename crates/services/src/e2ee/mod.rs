//! End-to-end encryption support: device keys, one-time and fallback keys, cross-signing keys
//! and signatures, the device-list change log, to-device messages and server-side key backup.
//! The server stores and relays; it never sees plaintext.

mod backup;

use std::{collections::BTreeMap, sync::Arc};

use ruma::{OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

pub use backup::BackupError;

use crate::{
    error::{Error, Result},
    store::{Batch, Key, KeyReader, Store, StreamPos, StreamTicket, tables},
};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct FallbackKey {
    key_id: String,
    key: JsonValue,
    used: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ToDeviceMessage {
    pub sender: OwnedUserId,
    #[serde(rename = "type")]
    pub kind: String,
    pub content: JsonValue,
}

/// The cross-signing key kinds, as named in `/keys/query` responses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrossSigningKind {
    Master,
    SelfSigning,
    UserSigning,
}

impl CrossSigningKind {
    pub const ALL: [Self; 3] = [Self::Master, Self::SelfSigning, Self::UserSigning];

    fn as_str(self) -> &'static str {
        match self {
            Self::Master => "master",
            Self::SelfSigning => "self_signing",
            Self::UserSigning => "user_signing",
        }
    }

    fn usage(self) -> &'static str {
        self.as_str()
    }
}

pub struct E2ee {
    store: Arc<Store>,
}

fn device_key(user_id: &UserId, device_id: &str) -> Vec<u8> {
    Key::new().str(user_id.as_str()).str(device_id).into_vec()
}

/// Merges the `signatures` of `incoming` into `stored`.
fn merge_signatures(stored: &mut JsonValue, incoming: &JsonValue) {
    let Some(new) = incoming.get("signatures").and_then(JsonValue::as_object) else { return };
    let signatures = stored
        .as_object_mut()
        .map(|o| o.entry("signatures").or_insert_with(|| json!({})));
    let Some(JsonValue::Object(signatures)) = signatures else { return };
    for (signer, keys) in new {
        let entry = signatures.entry(signer.clone()).or_insert_with(|| json!({}));
        if let (Some(entry), Some(keys)) = (entry.as_object_mut(), keys.as_object()) {
            for (key_id, signature) in keys {
                entry.insert(key_id.clone(), signature.clone());
            }
        }
    }
}

impl E2ee {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    fn ticket(&self) -> Result<StreamTicket> {
        Ok(self.store.streams().allocate(&self.store)?)
    }

    fn write(&self, batch: Batch, ticket: Option<StreamTicket>) -> Result<()> {
        tokio::task::block_in_place(|| self.store.write(batch))?;
        drop(ticket);
        Ok(())
    }

    /// Records that a user of another server changed their devices (a device-list update over
    /// federation), so that local users who share a room see it in `device_lists.changed`.
    pub fn record_remote_key_change(&self, user_id: &UserId) -> Result<()> {
        let ticket = self.ticket()?;
        let mut batch = self.store.batch();
        self.log_key_change(&mut batch, user_id, ticket.pos());
        self.write(batch, Some(ticket))
    }

    /// Records in `batch` that `user_id`'s devices or cross-signing keys changed at `pos`.
    fn log_key_change(&self, batch: &mut Batch, user_id: &UserId, pos: StreamPos) {
        batch.put(tables::KEY_CHANGES, &pos.to_be_bytes(), user_id.as_bytes());
    }

    // --- device, one-time and fallback keys ---

    /// Stores uploaded keys for the caller's device and returns the one-time key counts.
    pub fn upload_keys(
        &self,
        user_id: &UserId,
        device_id: &str,
        device_keys: Option<JsonValue>,
        one_time_keys: BTreeMap<String, JsonValue>,
        fallback_keys: BTreeMap<String, JsonValue>,
    ) -> Result<BTreeMap<String, u64>> {
        let store = &self.store;
        let mut batch = store.batch();
        let mut ticket = None;
        if let Some(keys) = device_keys {
            if keys.get("user_id").and_then(JsonValue::as_str) != Some(user_id.as_str())
                || keys.get("device_id").and_then(JsonValue::as_str) != Some(device_id)
            {
                return Err(Error::invalid_param("device_keys must be for the caller's user and device"));
            }
            let existing: Option<JsonValue> = store.get_json(tables::DEVICE_KEYS, &device_key(user_id, device_id))?;
            if existing.as_ref() != Some(&keys) {
                let mut keys = keys;
                // Keep signatures others uploaded for this device.
                if let Some(existing) = &existing {
                    merge_signatures(&mut keys, existing);
                }
                batch.put_json(tables::DEVICE_KEYS, &device_key(user_id, device_id), &keys)?;
                let t = self.ticket()?;
                self.log_key_change(&mut batch, user_id, t.pos());
                ticket = Some(t);
            }
        }
        for (id, key) in one_time_keys {
            let key_id = Key::new().str(user_id.as_str()).str(device_id).str(&id).into_vec();
            if store.contains(tables::ONE_TIME_KEYS, &key_id)? {
                continue;
            }
            batch.put_json(tables::ONE_TIME_KEYS, &key_id, &key)?;
        }
        for (id, key) in fallback_keys {
            let algorithm = id.split(':').next().unwrap_or_default().to_owned();
            let record = FallbackKey { key_id: id, key, used: false };
            batch.put_json(tables::FALLBACK_KEYS, &Key::new().str(user_id.as_str()).str(device_id).str(&algorithm).into_vec(), &record)?;
        }
        self.write(batch, ticket)?;
        self.one_time_key_counts(user_id, device_id)
    }

    /// One-time keys left per algorithm; `signed_curve25519` always, as clients (matrix-sdk)
    /// upload new keys only when they see its count.
    pub fn one_time_key_counts(&self, user_id: &UserId, device_id: &str) -> Result<BTreeMap<String, u64>> {
        let mut counts = BTreeMap::from([("signed_curve25519".to_owned(), 0)]);
        for item in self.store.scan_prefix(tables::ONE_TIME_KEYS, device_key(user_id, device_id), false) {
            let (key, _) = item?;
            let mut reader = KeyReader::new(&key);
            reader.str();
            reader.str();
            if let Some(algorithm) = reader.str().and_then(|id| id.split(':').next()) {
                *counts.entry(algorithm.to_owned()).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    pub fn unused_fallback_key_types(&self, user_id: &UserId, device_id: &str) -> Result<Vec<String>> {
        Ok(self
            .store
            .children::<FallbackKey>(tables::FALLBACK_KEYS, &[user_id.as_str(), device_id])?
            .into_iter()
            .filter(|(_, k)| !k.used)
            .map(|(algorithm, _)| algorithm)
            .collect())
    }

    /// Device keys of a user: all devices, or only `only`.
    pub fn device_keys(&self, user_id: &UserId, only: &[String]) -> Result<BTreeMap<String, JsonValue>> {
        let all: Vec<(String, JsonValue)> = self.store.children(tables::DEVICE_KEYS, &[user_id.as_str()])?;
        Ok(all.into_iter().filter(|(device, _)| only.is_empty() || only.contains(device)).collect())
    }

    /// Takes one one-time key of `algorithm` for the device, or its fallback key.
    pub fn claim_key(&self, user_id: &UserId, device_id: &str, algorithm: &str) -> Result<Option<(String, JsonValue)>> {
        let store = &self.store;
        let prefix = Key::new().str(user_id.as_str()).str(device_id).into_vec();
        for item in store.scan_prefix(tables::ONE_TIME_KEYS, prefix, false) {
            let (key, value) = item?;
            let mut reader = KeyReader::new(&key);
            reader.str();
            reader.str();
            let Some(id) = reader.str() else { continue };
            if id.split(':').next() == Some(algorithm) {
                let mut batch = store.batch();
                batch.delete(tables::ONE_TIME_KEYS, &key);
                self.write(batch, None)?;
                let value: JsonValue = crate::store::decode(tables::ONE_TIME_KEYS, &value)?;
                return Ok(Some((id.to_owned(), value)));
            }
        }
        let fallback_key = Key::new().str(user_id.as_str()).str(device_id).str(algorithm).into_vec();
        let Some(mut fallback) = store.get_json::<FallbackKey>(tables::FALLBACK_KEYS, &fallback_key)? else {
            return Ok(None);
        };
        if !fallback.used {
            fallback.used = true;
            let mut batch = store.batch();
            batch.put_json(tables::FALLBACK_KEYS, &fallback_key, &fallback)?;
            self.write(batch, None)?;
        }
        Ok(Some((fallback.key_id, fallback.key)))
    }

    /// Stages the removal of a device's keys and pending messages into `batch`.
    pub fn stage_device_removal(&self, batch: &mut Batch, user_id: &UserId, device_id: &str, pos: StreamPos) -> Result<()> {
        let store = &self.store;
        batch.delete(tables::DEVICE_KEYS, &device_key(user_id, device_id));
        for table in [tables::ONE_TIME_KEYS, tables::FALLBACK_KEYS, tables::TO_DEVICE] {
            for item in store.scan_prefix(table, device_key(user_id, device_id), false) {
                batch.delete(table, &item?.0);
            }
        }
        self.log_key_change(batch, user_id, pos);
        Ok(())
    }

    // --- cross-signing ---

    pub fn cross_signing_key(&self, user_id: &UserId, kind: CrossSigningKind) -> Result<Option<JsonValue>> {
        Ok(self.store.get_json(tables::CROSS_SIGNING_KEYS, &Key::new().str(user_id.as_str()).str(kind.as_str()).into_vec())?)
    }

    /// Stores new cross-signing keys after checking their user and usage.
    pub fn upload_cross_signing_keys(&self, user_id: &UserId, keys: &[(CrossSigningKind, JsonValue)]) -> Result<()> {
        let store = &self.store;
        let mut batch = store.batch();
        for (kind, key) in keys {
            if key.get("user_id").and_then(JsonValue::as_str) != Some(user_id.as_str()) {
                return Err(Error::invalid_param(format!("{} key must belong to the caller", kind.as_str())));
            }
            let usage = key.get("usage").and_then(JsonValue::as_array);
            if !usage.is_some_and(|u| u.iter().any(|v| v == kind.usage())) {
                return Err(Error::invalid_param(format!("{} key must have usage {}", kind.as_str(), kind.usage())));
            }
            if key.get("keys").and_then(JsonValue::as_object).is_none_or(|k| k.len() != 1) {
                return Err(Error::invalid_param(format!("{} key must contain exactly one public key", kind.as_str())));
            }
            batch.put_json(tables::CROSS_SIGNING_KEYS, &Key::new().str(user_id.as_str()).str(kind.as_str()).into_vec(), key)?;
        }
        let ticket = self.ticket()?;
        self.log_key_change(&mut batch, user_id, ticket.pos());
        self.write(batch, Some(ticket))
    }

    /// Adds uploaded signatures to device keys or cross-signing keys. Returns per-key failures.
    pub fn upload_signatures(&self, signed: &BTreeMap<String, BTreeMap<String, JsonValue>>) -> Result<BTreeMap<String, BTreeMap<String, JsonValue>>> {
        let store = &self.store;
        let mut batch = store.batch();
        let mut failures: BTreeMap<String, BTreeMap<String, JsonValue>> = BTreeMap::new();
        let ticket = self.ticket()?;
        for (user, keys) in signed {
            let Ok(user_id) = <&UserId>::try_from(user.as_str()) else { continue };
            let mut changed = false;
            for (key_id, object) in keys {
                let mut fail = |reason: &str| {
                    failures.entry(user.clone()).or_default().insert(key_id.clone(), json!({ "errcode": "M_INVALID_SIGNATURE", "error": reason }));
                };
                // A device id, or the unpadded base64 public key of a cross-signing key.
                if let Some(mut stored) = store.get_json::<JsonValue>(tables::DEVICE_KEYS, &device_key(user_id, key_id))? {
                    merge_signatures(&mut stored, object);
                    batch.put_json(tables::DEVICE_KEYS, &device_key(user_id, key_id), &stored)?;
                    changed = true;
                    continue;
                }
                let mut found = false;
                for kind in CrossSigningKind::ALL {
                    if let Some(mut stored) = self.cross_signing_key(user_id, kind)?
                        && stored.get("keys").and_then(JsonValue::as_object).is_some_and(|k| k.contains_key(&format!("ed25519:{key_id}")))
                    {
                        merge_signatures(&mut stored, object);
                        batch.put_json(tables::CROSS_SIGNING_KEYS, &Key::new().str(user_id.as_str()).str(kind.as_str()).into_vec(), &stored)?;
                        changed = true;
                        found = true;
                    }
                }
                if !found {
                    fail("unknown key");
                }
            }
            if changed {
                self.log_key_change(&mut batch, user_id, ticket.pos());
            }
        }
        self.write(batch, Some(ticket))?;
        Ok(failures)
    }

    /// Users whose keys changed in (from, to].
    pub fn key_changes(&self, from: StreamPos, to: StreamPos) -> Result<Vec<OwnedUserId>> {
        let mut users = Vec::new();
        let start = from.saturating_add(1).to_be_bytes();
        for item in self.store.scan_from(tables::KEY_CHANGES, Vec::new(), &start, false) {
            let (key, user) = item?;
            let pos = KeyReader::new(&key).u64().unwrap_or(u64::MAX);
            if pos > to {
                break;
            }
            if let Ok(user) = OwnedUserId::try_from(String::from_utf8_lossy(&user).into_owned())
                && !users.contains(&user)
            {
                users.push(user);
            }
        }
        Ok(users)
    }

    // --- to-device messages ---

    /// Queues messages for devices; `"*"` addresses every device of a user.
    pub fn send_to_device(
        &self,
        sender: &UserId,
        kind: &str,
        messages: &BTreeMap<OwnedUserId, BTreeMap<String, JsonValue>>,
        device_ids: impl Fn(&UserId) -> Result<Vec<String>>,
    ) -> Result<()> {
        let store = &self.store;
        let ticket = self.ticket()?;
        let mut batch = store.batch();
        for (user, devices) in messages {
            for (device, content) in devices {
                let targets = if device == "*" { device_ids(user)? } else { vec![device.clone()] };
                for target in targets {
                    let message = ToDeviceMessage { sender: sender.to_owned(), kind: kind.to_owned(), content: content.clone() };
                    let key = Key::new().str(user.as_str()).str(&target).u64(ticket.pos()).into_vec();
                    batch.put_json(tables::TO_DEVICE, &key, &message)?;
                }
            }
        }
        self.write(batch, Some(ticket))
    }

    /// Drops messages the device acknowledged (by syncing from `acknowledged`) and returns the
    /// pending ones up to `upto`, oldest first.
    pub fn to_device_messages(&self, user_id: &UserId, device_id: &str, acknowledged: Option<StreamPos>, upto: StreamPos) -> Result<Vec<ToDeviceMessage>> {
        let store = &self.store;
        let mut batch = store.batch();
        let mut pending = Vec::new();
        for item in store.scan_prefix(tables::TO_DEVICE, device_key(user_id, device_id), false) {
            let (key, value) = item?;
            let mut reader = KeyReader::new(&key);
            reader.str();
            reader.str();
            let pos = reader.u64().unwrap_or(0);
            if acknowledged.is_some_and(|a| pos <= a) {
                batch.delete(tables::TO_DEVICE, &key);
            } else if pos <= upto {
                pending.push(crate::store::decode(tables::TO_DEVICE, &value)?);
            }
        }
        if !batch.is_empty() {
            self.write(batch, None)?;
        }
        Ok(pending)
    }

    pub fn backups(&self) -> backup::Backups<'_> {
        backup::Backups::new(&self.store)
    }
}
