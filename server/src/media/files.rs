//! Content-addressed files: each is named by the sha256 of its bytes, so identical content is
//! stored once, and appears under that name only complete and durable.

use std::{
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

/// Files being written carry this prefix until they are renamed to their sha256.
const TEMP_PREFIX: &str = ".tmp-";

#[derive(Clone)]
pub(super) struct Files {
    root: PathBuf,
}

impl Files {
    /// Opens the store under `root`, creating its 256 fan-out directories (named by the first
    /// byte of the sha256) and removing the temporary files of writes a crash interrupted.
    pub(super) fn open(root: &Path) -> io::Result<Self> {
        for byte in 0..=u8::MAX {
            let dir = root.join(hex::encode([byte]));
            fs::create_dir_all(&dir)?;
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    fs::remove_file(entry.path())?;
                }
            }
        }
        // New directories are durable only once their parent is synced.
        sync_dir(root)?;
        Ok(Self { root: root.to_owned() })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.root.join(&sha256[..2]).join(sha256)
    }

    /// Stores `bytes` unless identical content is already there, and returns their sha256.
    /// The file is written under a temporary name in its final directory, synced, renamed and
    /// the directory synced: a crash leaves either nothing or the complete file.
    pub(super) fn put(&self, bytes: &[u8]) -> io::Result<String> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let path = self.path(&sha256);
        if path.exists() {
            return Ok(sha256);
        }
        let dir = path.parent().expect("content paths have a fan-out directory");
        let temp = dir.join(format!("{TEMP_PREFIX}{}", crate::users::random_string(16)));
        let written = File::create_new(&temp)
            .and_then(|mut file| {
                file.write_all(bytes)?;
                file.sync_all()
            })
            .and_then(|()| fs::rename(&temp, &path))
            .and_then(|()| sync_dir(dir));
        if written.is_err() {
            let _ = fs::remove_file(&temp);
        }
        written.map(|()| sha256)
    }

    pub(super) fn read(&self, sha256: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path(sha256))
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_files(root: &Path) -> Vec<PathBuf> {
        fs::read_dir(root)
            .unwrap()
            .flat_map(|dir| fs::read_dir(dir.unwrap().path()).unwrap())
            .map(|entry| entry.unwrap().path())
            .collect()
    }

    #[test]
    fn identical_content_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::open(dir.path()).unwrap();
        let a = files.put(b"hello").unwrap();
        assert_eq!(files.put(b"hello").unwrap(), a);
        let b = files.put(b"other").unwrap();
        assert_ne!(a, b);
        assert_eq!(files.read(&a).unwrap(), b"hello");
        assert_eq!(all_files(dir.path()).len(), 2);
    }

    #[test]
    fn reopening_removes_interrupted_writes() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::open(dir.path()).unwrap();
        let sha256 = files.put(b"kept").unwrap();
        fs::write(dir.path().join("ab").join(format!("{TEMP_PREFIX}crashed")), b"half").unwrap();
        Files::open(dir.path()).unwrap();
        assert_eq!(all_files(dir.path()), vec![files.path(&sha256)]);
    }
}
