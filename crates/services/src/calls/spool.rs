//! Recordings on disk while they are made: a directory per Matrix room (its id in hex) under
//! the media store's `recordings/`, holding each track's file as far as it is made
//! (`<track sid>.ogg` or `.ivf`, appended to and synced every second) and what it is
//! (`<track sid>.json`). A crash loses at most the last second; at start-up the files are
//! repaired and stored as a recording stopped by the restart ([`super::recording::repair`]).

use std::{
    fs::{self, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
};

use ruma::{OwnedRoomId, RoomId};
use serde::{Deserialize, Serialize};
use str0m::media::MediaKind;

use super::sfu::{RecordedTrack, containers};

/// What a track's file is, kept beside it.
#[derive(Serialize, Deserialize)]
struct Description {
    owner: String,
    track_name: String,
    video: bool,
}

/// A finished (or repaired) track file, ready to be stored.
pub struct SpooledTrack {
    pub owner: String,
    pub track_name: String,
    pub kind: MediaKind,
    pub bytes: Vec<u8>,
    pub duration_ms: u64,
}

#[derive(Clone)]
pub struct Spool {
    root: PathBuf,
}

impl Spool {
    pub fn open(root: PathBuf) -> io::Result<Self> {
        crate::secrets::private_dir(&root)?;
        Ok(Self { root })
    }

    /// Runs file work on it off the async threads.
    pub async fn blocking<T: Send + 'static>(&self, work: impl FnOnce(&Spool) -> io::Result<T> + Send + 'static) -> io::Result<T> {
        let spool = self.clone();
        tokio::task::spawn_blocking(move || work(&spool)).await.map_err(io::Error::other)?
    }

    fn room_dir(&self, room_id: &RoomId) -> PathBuf {
        self.root.join(hex::encode(room_id.as_bytes()))
    }

    /// A recording of the room begins: its directory exists from now on, so that a crash before
    /// its first second is repaired too.
    pub fn begin(&self, room_id: &RoomId) -> io::Result<()> {
        fs::create_dir_all(self.room_dir(room_id))
    }

    /// Appends what the SFU made to each track's file, and syncs it.
    pub fn append(&self, made: &[RecordedTrack]) -> io::Result<()> {
        for track in made {
            let Ok(room_id) = RoomId::parse(&track.app_room) else { continue };
            let dir = self.room_dir(&room_id);
            fs::create_dir_all(&dir)?;
            let extension = if track.kind == MediaKind::Video { "ivf" } else { "ogg" };
            let description = dir.join(format!("{}.json", track.track_sid));
            if !description.exists() {
                let what = Description { owner: track.owner.clone(), track_name: track.track_name.clone(), video: track.kind == MediaKind::Video };
                let temporary = dir.join(format!("{}.json.tmp", track.track_sid));
                fs::write(&temporary, serde_json::to_vec(&what).map_err(io::Error::other)?)?;
                fs::rename(&temporary, &description)?;
            }
            let mut file = OpenOptions::new().create(true).append(true).open(dir.join(format!("{}.{extension}", track.track_sid)))?;
            file.write_all(&track.bytes)?;
            file.sync_data()?;
        }
        Ok(())
    }

    /// The rooms with a recording on disk.
    pub fn rooms(&self) -> io::Result<Vec<OwnedRoomId>> {
        let mut rooms = Vec::new();
        for entry in fs::read_dir(&self.root)? {
            let name = entry?.file_name();
            match room_of(&name) {
                Some(room) => rooms.push(room),
                None => tracing::warn!(name = %name.to_string_lossy(), "a stray entry among the recordings being made"),
            }
        }
        Ok(rooms)
    }

    /// The room's recorded tracks, each file made whole (a torn end dropped, its header and
    /// last page put right). A file that is not one is left out.
    pub fn tracks(&self, room_id: &RoomId) -> io::Result<Vec<SpooledTrack>> {
        let dir = self.room_dir(room_id);
        let mut tracks = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(tracks),
            Err(error) => return Err(error),
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(what) = serde_json::from_slice::<Description>(&fs::read(&path)?) else { continue };
            let (kind, extension) = if what.video { (MediaKind::Video, "ivf") } else { (MediaKind::Audio, "ogg") };
            let mut bytes = read_or_empty(&path.with_extension(extension))?;
            let duration = if what.video { containers::repair_ivf(&mut bytes) } else { containers::repair_ogg(&mut bytes) };
            match duration {
                Some(duration_ms) => tracks.push(SpooledTrack { owner: what.owner, track_name: what.track_name, kind, bytes, duration_ms }),
                None => tracing::warn!(path = %path.display(), "a recorded track with no usable file"),
            }
        }
        Ok(tracks)
    }

    /// Whether a recording of the room is on disk.
    pub fn has(&self, room_id: &RoomId) -> bool {
        self.room_dir(room_id).is_dir()
    }

    /// The room's recording is stored: its files go.
    pub fn remove(&self, room_id: &RoomId) -> io::Result<()> {
        match fs::remove_dir_all(self.room_dir(room_id)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }
}

/// The room whose recording a spool's directory holds, if `name` is one.
fn room_of(name: &std::ffi::OsStr) -> Option<OwnedRoomId> {
    hex::decode(name.to_string_lossy().as_bytes()).ok().and_then(|bytes| String::from_utf8(bytes).ok()).and_then(|id| OwnedRoomId::try_from(id).ok())
}

/// The recordings being made under `recordings` (the embedded store's spool is the directory
/// itself, each node's on a shared database its `<node>/`) that a store moved to another engine
/// takes along into the spool of `node` (`None`: the embedded store's), where the server started
/// on it repairs and stores them. Refused if one room's recording is in two spools: they would
/// make one recording of two calls.
pub struct Gathering {
    target: PathBuf,
    /// Each recording's spool and its directory's name.
    moving: Vec<(PathBuf, std::ffi::OsString)>,
}

impl Gathering {
    pub fn plan(recordings: &Path, node: Option<&str>) -> io::Result<Self> {
        let target = node.map_or_else(|| recordings.to_owned(), |node| recordings.join(node));
        let mut spools = vec![recordings.to_owned()];
        let mut found: Vec<(PathBuf, std::ffi::OsString)> = Vec::new();
        while let Some(spool) = spools.pop() {
            let entries = match fs::read_dir(&spool) {
                Ok(entries) => entries,
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            for entry in entries {
                let entry = entry?;
                if !entry.file_type()?.is_dir() {
                    continue;
                }
                let name = entry.file_name();
                match room_of(&name) {
                    Some(_) => found.push((spool.clone(), name)),
                    // A node's spool, one level down only.
                    None if spool == recordings => spools.push(entry.path()),
                    None => {}
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (_, name) in &found {
            if !seen.insert(name.clone()) {
                let room = room_of(name).map(|room| room.to_string()).unwrap_or_default();
                return Err(io::Error::other(format!("the recording of room {room} is in the spools of two nodes under {}: store one of them first", recordings.display())));
            }
        }
        Ok(Self { moving: found.into_iter().filter(|(spool, _)| *spool != target).collect(), target })
    }

    /// Moves them; returns how many.
    pub fn apply(self) -> io::Result<usize> {
        if !self.moving.is_empty() {
            crate::secrets::private_dir(&self.target)?;
        }
        for (spool, name) in &self.moving {
            fs::rename(spool.join(name), self.target.join(name))?;
        }
        Ok(self.moving.len())
    }
}

fn read_or_empty(path: &Path) -> io::Result<Vec<u8>> {
    match fs::read(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made(sid: &str, kind: MediaKind, bytes: Vec<u8>) -> RecordedTrack {
        RecordedTrack { app_room: "!r:test.local".into(), track_sid: sid.into(), owner: "@ana:test.local".into(), track_name: "mic".into(), kind, bytes }
    }

    #[test]
    fn tracks_written_piece_by_piece_come_back_whole_and_go_when_stored() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path().join("recordings")).unwrap();
        let room: OwnedRoomId = "!r:test.local".try_into().unwrap();
        spool.begin(&room).unwrap();
        assert_eq!(spool.rooms().unwrap(), std::slice::from_ref(&room));
        assert!(spool.tracks(&room).unwrap().is_empty(), "begun, nothing recorded yet");

        let mut ogg = containers::OggOpus::new(1, 2);
        for n in 0..5u64 {
            ogg.push(n * 960, &[7; 30]);
            spool.append(&[made("TR_a", MediaKind::Audio, ogg.take())]).unwrap();
        }
        // Cut short: the pending packet never made it; four packets of 20 ms are there.
        let tracks = spool.tracks(&room).unwrap();
        assert_eq!(tracks.len(), 1);
        assert_eq!((tracks[0].kind, tracks[0].duration_ms, tracks[0].owner.as_str()), (MediaKind::Audio, 4 * 20, "@ana:test.local"));
        spool.append(&[made("TR_a", MediaKind::Audio, ogg.finish())]).unwrap();
        assert_eq!(spool.tracks(&room).unwrap()[0].duration_ms, 5 * 20);

        spool.remove(&room).unwrap();
        assert!(spool.rooms().unwrap().is_empty());
        spool.remove(&room).unwrap();
    }

    /// A store moved between engines takes the recordings being made along: from the embedded
    /// store's spool into a node's, from the nodes' spools into the embedded store's; a room
    /// in two spools stops the move before anything moved.
    #[test]
    fn recordings_being_made_are_gathered_into_the_spool_the_new_engine_reads() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("recordings");
        let room = |id: &str| -> OwnedRoomId { id.try_into().unwrap() };
        let (r, s) = (room("!r:test.local"), room("!s:test.local"));
        Spool::open(root.clone()).unwrap().begin(&r).unwrap();
        assert_eq!(Gathering::plan(&root, Some("node-a")).unwrap().apply().unwrap(), 1);
        assert_eq!(Spool::open(root.join("node-a")).unwrap().rooms().unwrap(), std::slice::from_ref(&r));

        Spool::open(root.join("node-b")).unwrap().begin(&s).unwrap();
        assert_eq!(Gathering::plan(&root, None).unwrap().apply().unwrap(), 2);
        let mut gathered = Spool::open(root.clone()).unwrap().rooms().unwrap();
        gathered.sort();
        assert_eq!(gathered, [r.clone(), s.clone()]);
        assert_eq!(Gathering::plan(&root, None).unwrap().apply().unwrap(), 0, "nothing left to move");

        Spool::open(root.join("node-b")).unwrap().begin(&r).unwrap();
        let Err(refused) = Gathering::plan(&root, Some("node-c")) else { panic!("a room in two spools was not refused") };
        assert!(refused.to_string().contains("!r:test.local"), "{refused}");
        assert!(!root.join("node-c").exists(), "something moved");
    }
}
