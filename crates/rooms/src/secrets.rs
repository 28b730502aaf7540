//! Secrets at rest: the server key that seals values kept in the store (what plugins store,
//! such as CalDAV passwords), in a file outside the store; and directories and key files that
//! only the server's user may open.
//!
//! A sealed value is [`SEALED`], a random 96-bit nonce, then ChaCha20-Poly1305 ciphertext and
//! tag; the associated data is the value's table and key, so a sealed value moved to another
//! key does not open. Values written before sealing existed are read as they are, and sealed at
//! the next start ([`SecretKey::seal_table`]).

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::Path,
};

use ring::{
    aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};

use crate::{
    error::{Error, Result},
    store::{Store, Table, tables},
};

/// The start of every sealed value; no value stored before sealing (JSON, text, ids) starts
/// with a NUL byte.
const SEALED: &[u8] = b"\0sealed:1\0";
/// GLOBAL key of a value sealed on first start: a key file that does not open it is not this
/// store's.
const KEY_CHECK: &[u8] = b"secrets_key_check";
const KEY_CHECK_PLAINTEXT: &[u8] = b"limbic";
const KEY_LEN: usize = 32;

pub struct SecretKey {
    key: LessSafeKey,
    random: SystemRandom,
}

impl SecretKey {
    /// The key in `path`, created (`0600`) on first start. Refuses a key file others may read,
    /// a missing one when the store holds values sealed with it, and another store's.
    pub fn load_or_create(path: &Path, store: &Store) -> Result<Self> {
        let failed = |what: String| Error::internal(format!("key file {}: {what}", path.display()));
        let check = store.get(tables::GLOBAL, KEY_CHECK)?;
        let key = match read_key_file(path).map_err(failed)? {
            Some(text) => {
                let bytes = hex::decode(text.trim()).ok().filter(|b| b.len() == KEY_LEN);
                Self::new(&bytes.ok_or_else(|| failed(format!("not {} hex digits", 2 * KEY_LEN)))?)
            }
            None => {
                if check.is_some() {
                    return Err(failed("missing, and the store holds values sealed with it: restore it from a backup".into()));
                }
                let mut bytes = [0u8; KEY_LEN];
                SystemRandom::new().fill(&mut bytes).map_err(|_| failed("no randomness".into()))?;
                write_key_file(path, format!("{}\n", hex::encode(bytes)).as_bytes()).map_err(|e| failed(e.to_string()))?;
                tracing::info!(file = %path.display(), "generated the key that seals secrets in the store");
                Self::new(&bytes)
            }
        };
        match check {
            Some(sealed) => {
                if key.open(tables::GLOBAL, KEY_CHECK, &sealed).ok().as_deref() != Some(KEY_CHECK_PLAINTEXT) {
                    return Err(failed("it is not the key this store's secrets are sealed with".into()));
                }
            }
            None => {
                let mut batch = store.batch();
                batch.put(tables::GLOBAL, KEY_CHECK, &key.seal(tables::GLOBAL, KEY_CHECK, KEY_CHECK_PLAINTEXT));
                store.write(batch)?;
            }
        }
        Ok(key)
    }

    fn new(bytes: &[u8]) -> Self {
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("a 256-bit key");
        Self { key: LessSafeKey::new(key), random: SystemRandom::new() }
    }

    /// `value` sealed for `key` of `table`.
    pub fn seal(&self, table: Table, key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).expect("the system's random source");
        let mut sealed = value.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(associated_data(table, key)), &mut sealed)
            .expect("values of the store fit ChaCha20-Poly1305");
        [SEALED, &nonce, &sealed].concat()
    }

    /// The value stored under `key` of `table`: opened if sealed, as it is if written before
    /// sealing existed.
    pub fn open(&self, table: Table, key: &[u8], stored: &[u8]) -> Result<Vec<u8>> {
        let Some(rest) = stored.strip_prefix(SEALED) else { return Ok(stored.to_vec()) };
        let corrupt = || Error::internal(format!("a sealed value of table {} does not open with the server key", table.name()));
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN).ok_or_else(corrupt)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| corrupt())?;
        let mut opened = sealed.to_vec();
        let plaintext = self.key.open_in_place(nonce, Aad::from(associated_data(table, key)), &mut opened).map_err(|_| corrupt())?;
        Ok(plaintext.to_vec())
    }

    /// Seals every value of `table` stored before sealing existed, in one batch, and compacts
    /// the table so that the plaintext leaves the files on disk. Returns how many it sealed.
    pub fn seal_table(&self, store: &Store, table: Table) -> Result<usize> {
        let mut batch = store.batch();
        let mut sealed = 0;
        for item in store.scan_prefix(table, Vec::new(), false) {
            let (key, value) = item?;
            if !value.starts_with(SEALED) {
                batch.put(table, &key, &self.seal(table, &key, &value));
                sealed += 1;
            }
        }
        if sealed > 0 {
            store.write(batch)?;
            store.compact(table)?;
            tracing::info!(table = table.name(), values = sealed, "sealed values stored in plaintext by an earlier version");
        }
        Ok(sealed)
    }
}

fn associated_data(table: Table, key: &[u8]) -> Vec<u8> {
    [table.name().as_bytes(), &[0xFF], key].concat()
}

/// The contents of a key file, `None` when there is none; refused when others may read it.
pub(crate) fn read_key_file(path: &Path) -> Result<Option<String>, String> {
    match fs::metadata(path) {
        Ok(metadata) if metadata.mode() & 0o077 != 0 => {
            Err(format!("others may read it (mode {:o}); `chmod 600` it", metadata.mode() & 0o777))
        }
        Ok(_) => fs::read_to_string(path).map(Some).map_err(|e| e.to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Writes a new key file only the server's user may read, durably.
pub(crate) fn write_key_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(contents)?;
    file.sync_all()?;
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Creates `path` and its missing parents with mode `0700` (only the server's user may enter
/// them), and warns about an existing one others may enter: the operator may have meant it.
pub fn private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path)?;
    let mode = fs::metadata(path)?.mode();
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %path.display(), mode = format!("{:o}", mode & 0o777), "others may enter this data directory; `chmod 700` it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn store(dir: &Path) -> Store {
        Store::open(&dir.join("db")).unwrap()
    }

    #[test]
    fn sealed_values_open_only_for_their_key_and_plaintext_ones_read_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let key = SecretKey::load_or_create(&dir.path().join("db.key"), &store).unwrap();
        let sealed = key.seal(tables::PLUGIN_KV, b"k", b"password");
        assert!(!sealed.windows(8).any(|w| w == b"password"));
        assert_eq!(key.open(tables::PLUGIN_KV, b"k", &sealed).unwrap(), b"password");
        assert_ne!(key.seal(tables::PLUGIN_KV, b"k", b"password"), sealed, "a fresh nonce each time");
        assert!(key.open(tables::PLUGIN_KV, b"other", &sealed).is_err(), "bound to its key");
        assert!(key.open(tables::GLOBAL, b"k", &sealed).is_err(), "bound to its table");
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(key.open(tables::PLUGIN_KV, b"k", &flipped).is_err());
        assert_eq!(key.open(tables::PLUGIN_KV, b"k", b"{\"old\":1}").unwrap(), b"{\"old\":1}");
    }

    #[test]
    fn the_key_file_is_private_kept_and_must_be_the_stores() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.key");
        let sealed = {
            let store = store(dir.path());
            let key = SecretKey::load_or_create(&path, &store).unwrap();
            assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
            key.seal(tables::PLUGIN_KV, b"k", b"v")
        };
        let store = store(dir.path());
        let key = SecretKey::load_or_create(&path, &store).unwrap();
        assert_eq!(key.open(tables::PLUGIN_KV, b"k", &sealed).unwrap(), b"v", "the same key after a restart");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(SecretKey::load_or_create(&path, &store).is_err(), "a key others may read");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();

        let moved = dir.path().join("moved.key");
        fs::rename(&path, &moved).unwrap();
        let err = SecretKey::load_or_create(&path, &store).err().unwrap();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(!path.exists(), "no new key replaces a lost one");

        let other = tempfile::tempdir().unwrap();
        let other_key = other.path().join("db.key");
        SecretKey::load_or_create(&other_key, &self::store(other.path())).unwrap();
        let err = SecretKey::load_or_create(&other_key, &store).err().unwrap();
        assert!(err.to_string().contains("not the key"), "{err}");
    }

    #[test]
    fn plaintext_values_are_sealed_at_start_and_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let mut batch = store.batch();
        batch.put(tables::PLUGIN_KV, b"calendar\xFFcaldav:@a:x", b"{\"password\":\"pw\"}");
        store.write(batch).unwrap();
        let key = SecretKey::load_or_create(&dir.path().join("db.key"), &store).unwrap();
        assert_eq!(key.seal_table(&store, tables::PLUGIN_KV).unwrap(), 1);
        assert_eq!(key.seal_table(&store, tables::PLUGIN_KV).unwrap(), 0, "sealed once");
        let stored = store.get(tables::PLUGIN_KV, b"calendar\xFFcaldav:@a:x").unwrap().unwrap();
        assert!(stored.starts_with(SEALED));
        assert_eq!(key.open(tables::PLUGIN_KV, b"calendar\xFFcaldav:@a:x", &stored).unwrap(), b"{\"password\":\"pw\"}");
    }

    #[test]
    fn private_dirs_are_created_0700() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        private_dir(&nested).unwrap();
        for path in [dir.path().join("a"), nested] {
            assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o700, "{}", path.display());
        }
    }
}
