//! The server's ed25519 signing key: generated on first start and kept in the store.

use ruma::{
    OwnedServerName,
    serde::Base64,
    signatures::{Ed25519KeyPair, PublicKeySet},
};
use serde::{Deserialize, Serialize};

use limbic_store::{Store, StoreError, tables};

const SIGNING_KEY: &[u8] = b"signing_key";

#[derive(Serialize, Deserialize)]
struct StoredKey {
    version: String,
    /// PKCS#8 DER, base64.
    pkcs8: String,
}

pub struct ServerSigningKey {
    server_name: OwnedServerName,
    pair: Ed25519KeyPair,
}

impl ServerSigningKey {
    /// Loads the key, generating and persisting one on first start.
    pub fn load_or_generate(store: &Store, server_name: OwnedServerName) -> Result<Self, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { table: "global", reason };
        let stored = match store.get_json::<StoredKey>(tables::GLOBAL, SIGNING_KEY)? {
            Some(stored) => stored,
            None => {
                let stored = StoredKey {
                    version: random_version(),
                    pkcs8: Base64::<ruma::serde::base64::Standard, _>::new(Ed25519KeyPair::generate().to_vec())
                        .encode(),
                };
                let mut batch = store.batch();
                batch.put_json(tables::GLOBAL, SIGNING_KEY, &stored)?;
                store.write(batch)?;
                tracing::info!(key_id = %format!("ed25519:{}", stored.version), "generated server signing key");
                stored
            }
        };
        let der = Base64::<ruma::serde::base64::Standard, Vec<u8>>::parse(&stored.pkcs8)
            .map_err(|e| corrupt(format!("signing key: {e}")))?;
        let pair = Ed25519KeyPair::from_der(der.as_bytes(), stored.version)
            .map_err(|e| corrupt(format!("signing key: {e}")))?;
        Ok(Self { server_name, pair })
    }

    /// A fresh key, kept nowhere (tests sign other servers' events with one).
    pub fn generate(server_name: OwnedServerName) -> Self {
        let pair = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), random_version()).expect("ruma decodes the DER it generated");
        Self { server_name, pair }
    }

    /// A key of `server_name` from its key pair (the fuzzing harnesses sign with a fixed one).
    pub fn from_pair(server_name: OwnedServerName, pair: Ed25519KeyPair) -> Self {
        Self { server_name, pair }
    }

    pub fn server_name(&self) -> &OwnedServerName {
        &self.server_name
    }

    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.pair
    }

    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.pair.version())
    }

    pub fn public_key_set(&self) -> PublicKeySet {
        let mut set = PublicKeySet::new();
        set.insert(self.key_id(), Base64::new(self.pair.public_key().to_vec()));
        set
    }
}

/// GLOBAL key of the keys rotated out: `[{key_id, key, expired_ts}]`.
const OLD_KEYS: &[u8] = b"old_signing_keys";

#[derive(Serialize, Deserialize)]
struct OldKey {
    key_id: String,
    /// Public key, unpadded base64.
    key: String,
    expired_ts: u64,
}

impl ServerSigningKey {
    /// The keys this server used before, as (key id, public key, when they expired): other
    /// servers still check old signatures with them.
    pub fn old_keys(store: &Store) -> Result<Vec<(String, String, u64)>, StoreError> {
        let old: Vec<OldKey> = store.get_json(tables::GLOBAL, OLD_KEYS)?.unwrap_or_default();
        Ok(old.into_iter().map(|k| (k.key_id, k.key, k.expired_ts)).collect())
    }

    /// Replaces the signing key with a new one (server stopped); the current one is kept as an
    /// old key, expired now. Returns the new key id.
    pub fn rotate(store: &Store, server_name: OwnedServerName) -> Result<String, StoreError> {
        let current = Self::load_or_generate(store, server_name)?;
        let mut old: Vec<OldKey> = store.get_json(tables::GLOBAL, OLD_KEYS)?.unwrap_or_default();
        old.push(OldKey {
            key_id: current.key_id(),
            key: Base64::<ruma::serde::base64::Standard, _>::new(current.pair.public_key().to_vec()).encode(),
            expired_ts: ruma::MilliSecondsSinceUnixEpoch::now().0.into(),
        });
        let stored = StoredKey {
            version: random_version(),
            pkcs8: Base64::<ruma::serde::base64::Standard, _>::new(Ed25519KeyPair::generate().to_vec()).encode(),
        };
        let mut batch = store.batch();
        batch.put_json(tables::GLOBAL, OLD_KEYS, &old)?;
        batch.put_json(tables::GLOBAL, SIGNING_KEY, &stored)?;
        store.write(batch)?;
        Ok(format!("ed25519:{}", stored.version))
    }
}

fn random_version() -> String {
    use rand::RngExt;
    let suffix: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(6)
        .map(char::from)
        .collect();
    format!("a_{suffix}")
}
