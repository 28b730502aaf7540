//! Content-addressed files: each is named by the sha256 of its bytes, so identical content is
//! stored once, and appears under that name only complete and durable.

use std::{
    fs::{self, File},
    io::{self, Write},
    os::unix::fs::DirBuilderExt,
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
        // Only the server's user may enter the media store.
        crate::secrets::private_dir(root)?;
        remove_temp_files(root)?;
        for byte in 0..=u8::MAX {
            let dir = root.join(hex::encode([byte]));
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
            // Writes before streamed uploads kept their temporary files here.
            remove_temp_files(&dir)?;
        }
        // New directories are durable only once their parent is synced.
        sync_dir(root)?;
        Ok(Self { root: root.to_owned() })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.root.join(&sha256[..2]).join(sha256)
    }

    /// Starts writing content whose sha256 is not known yet: a temporary file at the root of
    /// the store, hashed as it is written.
    pub(super) fn create(&self) -> io::Result<TempFile> {
        let path = self.root.join(format!("{TEMP_PREFIX}{}", crate::users::random_string(16)));
        let file = File::create_new(&path)?;
        Ok(TempFile { files: self.clone(), path, file: Some(file), hasher: Sha256::new() })
    }

    /// Stores `bytes` unless identical content is already there, and returns their sha256.
    pub(super) fn put(&self, bytes: &[u8]) -> io::Result<String> {
        let mut temp = self.create()?;
        temp.write(bytes)?;
        temp.persist()
    }

    /// The content file, open for reading; `NotFound` when it is gone. Once open, it stays
    /// readable to the end even if its media is deleted meanwhile.
    pub(super) fn open_file(&self, sha256: &str) -> io::Result<File> {
        File::open(self.path(sha256))
    }

    pub(super) fn read(&self, sha256: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path(sha256))
    }

    /// Removes the file, durably; a file already gone is fine.
    pub(super) fn remove(&self, sha256: &str) -> io::Result<()> {
        let path = self.path(sha256);
        match fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            removed => removed.and_then(|()| sync_dir(path.parent().expect("content paths have a fan-out directory"))),
        }
    }
}

/// Content being written. Dropped before [`TempFile::persist`] (a refused or interrupted
/// upload, an error), its file is removed; a crash leaves it to the next [`Files::open`].
pub(super) struct TempFile {
    files: Files,
    path: PathBuf,
    /// `None` once persisted.
    file: Option<File>,
    hasher: Sha256,
}

impl TempFile {
    pub(super) fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.file.as_mut().expect("written before persisting").write_all(bytes)
    }

    /// Makes the content durable under its sha256, which it returns: synced, renamed and the
    /// directory synced, so that a crash leaves either nothing or the complete file under that
    /// name. When identical content is already stored, this copy is dropped instead.
    pub(super) fn persist(mut self) -> io::Result<String> {
        let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        let path = self.files.path(&sha256);
        let file = self.file.take().expect("persisted once");
        if path.exists() {
            // Dropping `self` removes this copy.
            return Ok(sha256);
        }
        file.sync_all()?;
        drop(file);
        fs::rename(&self.path, &path)?;
        sync_dir(path.parent().expect("content paths have a fan-out directory"))?;
        Ok(sha256)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // After a rename the temporary name is already gone; otherwise the copy is abandoned.
        let _ = fs::remove_file(&self.path);
    }
}

/// Removes what interrupted writes left in `dir`.
fn remove_temp_files(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
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
        files.remove(&a).unwrap();
        files.remove(&a).unwrap();
        assert_eq!(all_files(dir.path()), vec![files.path(&b)]);
    }

    #[test]
    fn reopening_removes_interrupted_writes() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::open(dir.path()).unwrap();
        let sha256 = files.put(b"kept").unwrap();
        fs::write(dir.path().join("ab").join(format!("{TEMP_PREFIX}crashed")), b"half").unwrap();
        let mut streamed = files.create().unwrap();
        streamed.write(b"half an upload").unwrap();
        std::mem::forget(streamed);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 257);
        Files::open(dir.path()).unwrap();
        assert_eq!(all_files(dir.path()), vec![files.path(&sha256)]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 256);
    }

    #[test]
    fn abandoned_writes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::open(dir.path()).unwrap();
        let mut temp = files.create().unwrap();
        temp.write(b"refused").unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 257);
        drop(temp);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 256);
        assert!(all_files(dir.path()).is_empty());
        // Content written in pieces is named by the hash of the whole.
        let mut temp = files.create().unwrap();
        temp.write(b"hel").unwrap();
        temp.write(b"lo").unwrap();
        assert_eq!(temp.persist().unwrap(), files.put(b"hello").unwrap());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 256);
        assert_eq!(all_files(dir.path()).len(), 1);
    }
}
