//! The plugin's private key-value store (capability `kv`), kept by the server in RocksDB.
//!
//! Keys are strings, values bytes; the store is the plugin's alone and survives restarts and
//! reloads. Reads work in every hook; writes (`set`, `delete`, `set_json`) fail with
//! [`Error::NotAllowed`] during `check-event`.
//!
//! Because `on-event` is at-least-once, a side effect that must happen once is guarded by a key:
//! check it first, do the work, store the key right after.

use serde::{Serialize, de::DeserializeOwned};

use crate::{Error, bindings::limbic::plugin::host};

/// The value under `key`, if any.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
    Ok(host::kv_get(key)?)
}

/// Stores `value` under `key`, replacing any previous value.
pub fn set(key: &str, value: &[u8]) -> Result<(), Error> {
    Ok(host::kv_set(key, value)?)
}

/// Removes `key` (nothing happens if it is absent).
pub fn delete(key: &str) -> Result<(), Error> {
    Ok(host::kv_delete(key)?)
}

/// Up to `limit` entries whose key starts with `prefix`, in key order, after the key
/// `start_after` if given. Page through a prefix by passing the last key of one page as the
/// next page's `start_after`.
pub fn scan(prefix: &str, start_after: Option<&str>, limit: u32) -> Result<Vec<(String, Vec<u8>)>, Error> {
    Ok(host::kv_scan(prefix, start_after, limit)?)
}

/// The value under `key` parsed as JSON into `T`, if any.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
    match get(key)? {
        Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(Error::json)?)),
        None => Ok(None),
    }
}

/// Stores `value` under `key` as JSON.
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), Error> {
    set(key, &serde_json::to_vec(value).map_err(Error::json)?)
}

/// The value under `key` as a UTF-8 string, if any (invalid UTF-8 is an [`Error::Json`]).
pub fn get_string(key: &str) -> Result<Option<String>, Error> {
    match get(key)? {
        Some(bytes) => String::from_utf8(bytes).map(Some).map_err(|e| Error::Json(e.to_string())),
        None => Ok(None),
    }
}
