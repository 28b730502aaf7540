//! The audit key: a secret kept outside the store that MACs every entry, so that whoever can
//! write the store but not read this file cannot rewrite entries and recompute the chain
//! unnoticed.
//!
//! The file is TOML, `0600`: the key (32 random bytes, hex) and how many entries the log held
//! when the key was made. Those entries predate keying and carry no MAC; every later one must.
//! Keeping that number outside the store is what stops an attacker from passing a rewritten
//! log off as one that was never keyed.

use std::path::Path;

use hmac::{Hmac, Mac};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use sha2::Sha256;

use crate::{
    error::{Error, Result},
    secrets::{read_key_file, write_key_file},
};

const KEY_LEN: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    key: String,
    unkeyed_entries: u64,
}

pub(super) struct AuditKey {
    key: [u8; KEY_LEN],
    /// Entries `1..=unkeyed_entries` were written before the key existed.
    pub(super) unkeyed_entries: u64,
}

fn failed(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::internal(format!("audit key file {}: {what}", path.display()))
}

impl AuditKey {
    /// The key in `path`, or `None` when there is no such file. Refuses one others may read.
    pub(super) fn load(path: &Path) -> Result<Option<Self>> {
        let Some(text) = read_key_file(path).map_err(|e| failed(path, e))? else { return Ok(None) };
        let file: KeyFile = toml::from_str(&text).map_err(|e| failed(path, e))?;
        let key = hex::decode(&file.key)
            .ok()
            .and_then(|bytes| <[u8; KEY_LEN]>::try_from(bytes).ok())
            .ok_or_else(|| failed(path, format!("`key` is not {} hex digits", 2 * KEY_LEN)))?;
        Ok(Some(Self { key, unkeyed_entries: file.unkeyed_entries }))
    }

    /// A new random key written to `path` (`0600`), for a log that holds `unkeyed_entries`.
    pub(super) fn create(path: &Path, unkeyed_entries: u64) -> Result<Self> {
        let mut key = [0u8; KEY_LEN];
        SystemRandom::new().fill(&mut key).map_err(|_| failed(path, "no randomness"))?;
        let text = format!(
            "# The key of Limbic's audit log (spec/audit.md). Keep it secret, and apart from the store's backups.\n\
             key = \"{}\"\nunkeyed_entries = {unkeyed_entries}\n",
            hex::encode(key)
        );
        write_key_file(path, text.as_bytes()).map_err(|e| failed(path, e))?;
        Ok(Self { key, unkeyed_entries })
    }

    fn mac_of(&self, hash: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(hash.as_bytes());
        mac
    }

    /// Hex HMAC-SHA256 of an entry's `hash` (which covers all of it and the previous hash).
    pub(super) fn mac(&self, hash: &str) -> String {
        hex::encode(self.mac_of(hash).finalize().into_bytes())
    }

    /// Whether `mac` is this key's MAC of `hash`, compared in constant time.
    pub(super) fn verifies(&self, hash: &str, mac: &str) -> bool {
        hex::decode(mac).is_ok_and(|mac| self.mac_of(hash).verify_slice(&mac).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn the_key_file_is_private_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        assert!(AuditKey::load(&path).unwrap().is_none());
        let key = AuditKey::create(&path, 7).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let again = AuditKey::load(&path).unwrap().unwrap();
        assert_eq!((again.key, again.unkeyed_entries), (key.key, 7));
        let mac = key.mac("abc");
        assert!(again.verifies("abc", &mac) && !again.verifies("abd", &mac) && !again.verifies("abc", "zz"));
        assert!(!AuditKey::create(&dir.path().join("other.key"), 0).unwrap().verifies("abc", &mac), "another key");
        assert!(AuditKey::create(&path, 0).is_err(), "an existing key is never replaced");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(AuditKey::load(&path).is_err(), "a key others may read");
    }
}
