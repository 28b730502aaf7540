//! Server-side room key backup: versions and the encrypted session keys stored under them.

use std::collections::BTreeMap;

use ruma::UserId;
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

use crate::{
    error::{Error, Result},
    store::{Key, KeyReader, Store, tables},
};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Version {
    algorithm: String,
    auth_data: JsonValue,
    /// Bumped on every change to the version's keys.
    etag: u64,
    #[serde(default)]
    deleted: bool,
}

/// Errors specific to key backup, mapped to the spec's errors.
pub enum BackupError {
    UnknownVersion,
    WrongVersion { current: Option<String> },
}

impl From<BackupError> for Error {
    fn from(error: BackupError) -> Self {
        match error {
            BackupError::UnknownVersion => Error::not_found("unknown backup version"),
            BackupError::WrongVersion { current } => Error::Detailed {
                status: http::StatusCode::FORBIDDEN,
                body: json!({
                    "errcode": "M_WRONG_ROOM_KEYS_VERSION",
                    "error": "the backup version is not the current one",
                    "current_version": current,
                }),
            },
        }
    }
}

pub struct Backups<'a> {
    store: &'a Store,
}

fn version_key(user_id: &UserId, version: u64) -> Vec<u8> {
    Key::new().str(user_id.as_str()).u64(version).into_vec()
}

fn parse_version(version: &str) -> Result<u64> {
    version.parse().map_err(|_| BackupError::UnknownVersion.into())
}

/// Whether `new` should replace `old` (the spec's rules, in order).
fn better_session(new: &JsonValue, old: &JsonValue) -> bool {
    let verified = |v: &JsonValue| v.get("is_verified").and_then(JsonValue::as_bool).unwrap_or(false);
    let index = |v: &JsonValue| v.get("first_message_index").and_then(JsonValue::as_u64).unwrap_or(u64::MAX);
    let forwarded = |v: &JsonValue| v.get("forwarded_count").and_then(JsonValue::as_u64).unwrap_or(u64::MAX);
    if verified(new) != verified(old) {
        return verified(new);
    }
    if index(new) != index(old) {
        return index(new) < index(old);
    }
    forwarded(new) < forwarded(old)
}

impl<'a> Backups<'a> {
    pub(super) fn new(store: &'a Store) -> Self {
        Self { store }
    }

    fn latest(&self, user_id: &UserId) -> Result<Option<(u64, Version)>> {
        for item in self.store.scan_prefix(tables::BACKUP_VERSIONS, Key::new().str(user_id.as_str()).into_vec(), true) {
            let (key, value) = item?;
            let version: Version = crate::store::decode(tables::BACKUP_VERSIONS, &value)?;
            if !version.deleted {
                let number = KeyReader::new(&key).skip_str().u64().unwrap_or(0);
                return Ok(Some((number, version)));
            }
        }
        Ok(None)
    }

    fn get(&self, user_id: &UserId, number: u64) -> Result<Version> {
        self.store
            .get_json::<Version>(tables::BACKUP_VERSIONS, &version_key(user_id, number))?
            .filter(|v| !v.deleted)
            .ok_or_else(|| BackupError::UnknownVersion.into())
    }

    fn count(&self, user_id: &UserId, number: u64) -> Result<usize> {
        let prefix = Key::new().str(user_id.as_str()).u64(number).into_vec();
        Ok(self.store.scan_prefix(tables::BACKUP_KEYS, prefix, false).count())
    }

    fn info(&self, user_id: &UserId, number: u64, version: &Version) -> Result<JsonValue> {
        Ok(json!({
            "algorithm": version.algorithm,
            "auth_data": version.auth_data,
            "etag": version.etag.to_string(),
            "count": self.count(user_id, number)?,
            "version": number.to_string(),
        }))
    }

    pub fn create(&self, user_id: &UserId, algorithm: String, auth_data: JsonValue) -> Result<String> {
        let last = self
            .store
            .scan_prefix(tables::BACKUP_VERSIONS, Key::new().str(user_id.as_str()).into_vec(), true)
            .next()
            .transpose()?
            .and_then(|(key, _)| KeyReader::new(&key).skip_str().u64())
            .unwrap_or(0);
        let number = last + 1;
        let mut batch = self.store.batch();
        batch.put_json(tables::BACKUP_VERSIONS, &version_key(user_id, number), &Version { algorithm, auth_data, etag: 0, deleted: false })?;
        self.store.write(batch)?;
        Ok(number.to_string())
    }

    /// The info of `version`, or of the latest version.
    pub fn version_info(&self, user_id: &UserId, version: Option<&str>) -> Result<JsonValue> {
        let (number, record) = match version {
            Some(v) => {
                let number = parse_version(v)?;
                (number, self.get(user_id, number)?)
            }
            None => self.latest(user_id)?.ok_or_else(|| Error::not_found("no backup version"))?,
        };
        self.info(user_id, number, &record)
    }

    pub fn update(&self, user_id: &UserId, version: &str, algorithm: String, auth_data: JsonValue) -> Result<()> {
        let number = parse_version(version)?;
        let mut record = self.get(user_id, number)?;
        if record.algorithm != algorithm {
            return Err(Error::invalid_param("the algorithm of a backup version cannot change"));
        }
        record.auth_data = auth_data;
        let mut batch = self.store.batch();
        batch.put_json(tables::BACKUP_VERSIONS, &version_key(user_id, number), &record)?;
        self.store.write(batch)?;
        Ok(())
    }

    /// Deletes a version and its keys in one batch.
    pub fn delete_version(&self, user_id: &UserId, version: &str) -> Result<()> {
        let number = parse_version(version)?;
        let mut record = self.get(user_id, number)?;
        record.deleted = true;
        let mut batch = self.store.batch();
        batch.put_json(tables::BACKUP_VERSIONS, &version_key(user_id, number), &record)?;
        for item in self.store.scan_prefix(tables::BACKUP_KEYS, Key::new().str(user_id.as_str()).u64(number).into_vec(), false) {
            batch.delete(tables::BACKUP_KEYS, &item?.0);
        }
        self.store.write(batch)?;
        Ok(())
    }

    /// Stores session keys `{room: {session: key_data}}` into the current version.
    pub fn put_keys(&self, user_id: &UserId, version: &str, rooms: BTreeMap<String, BTreeMap<String, JsonValue>>) -> Result<JsonValue> {
        let number = parse_version(version)?;
        let current = self.latest(user_id)?;
        let Some((latest, mut record)) = current.filter(|(n, _)| *n == number) else {
            if self.get(user_id, number).is_err() {
                return Err(BackupError::UnknownVersion.into());
            }
            return Err(BackupError::WrongVersion { current: self.latest(user_id)?.map(|(n, _)| n.to_string()) }.into());
        };
        let mut batch = self.store.batch();
        let mut changed = false;
        for (room, sessions) in rooms {
            for (session, data) in sessions {
                let key = Key::new().str(user_id.as_str()).u64(latest).str(&room).str(&session).into_vec();
                let existing: Option<JsonValue> = self.store.get_json(tables::BACKUP_KEYS, &key)?;
                if existing.as_ref().is_none_or(|old| better_session(&data, old)) {
                    batch.put_json(tables::BACKUP_KEYS, &key, &data)?;
                    changed = true;
                }
            }
        }
        if changed {
            record.etag += 1;
            batch.put_json(tables::BACKUP_VERSIONS, &version_key(user_id, latest), &record)?;
        }
        self.store.write(batch)?;
        Ok(json!({ "etag": record.etag.to_string(), "count": self.count(user_id, latest)? }))
    }

    /// Keys of a version, optionally narrowed to a room or a session:
    /// `{room: {"sessions": {session: key_data}}}`.
    pub fn get_keys(&self, user_id: &UserId, version: &str, room: Option<&str>, session: Option<&str>) -> Result<BTreeMap<String, BTreeMap<String, JsonValue>>> {
        let number = parse_version(version)?;
        self.get(user_id, number)?;
        let mut prefix = Key::new().str(user_id.as_str()).u64(number);
        if let Some(room) = room {
            prefix = prefix.str(room);
            if let Some(session) = session {
                prefix = prefix.str(session);
            }
        }
        let mut rooms: BTreeMap<String, BTreeMap<String, JsonValue>> = BTreeMap::new();
        for item in self.store.scan_prefix(tables::BACKUP_KEYS, prefix.into_vec(), false) {
            let (key, value) = item?;
            let mut reader = KeyReader::new(&key);
            reader.str();
            reader.u64();
            if let (Some(room), Some(session)) = (reader.str(), reader.str()) {
                rooms.entry(room.to_owned()).or_default().insert(session.to_owned(), crate::store::decode(tables::BACKUP_KEYS, &value)?);
            }
        }
        Ok(rooms)
    }

    pub fn delete_keys(&self, user_id: &UserId, version: &str, room: Option<&str>, session: Option<&str>) -> Result<JsonValue> {
        let number = parse_version(version)?;
        let mut record = self.get(user_id, number)?;
        let mut prefix = Key::new().str(user_id.as_str()).u64(number);
        if let Some(room) = room {
            prefix = prefix.str(room);
            if let Some(session) = session {
                prefix = prefix.str(session);
            }
        }
        let mut batch = self.store.batch();
        for item in self.store.scan_prefix(tables::BACKUP_KEYS, prefix.into_vec(), false) {
            batch.delete(tables::BACKUP_KEYS, &item?.0);
        }
        record.etag += 1;
        batch.put_json(tables::BACKUP_VERSIONS, &version_key(user_id, number), &record)?;
        self.store.write(batch)?;
        Ok(json!({ "etag": record.etag.to_string(), "count": self.count(user_id, number)? }))
    }
}
