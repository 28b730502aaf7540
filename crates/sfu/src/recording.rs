//! Recording an SFU room's call: every track from the moment it starts, into Ogg/Opus and IVF.

use super::*;

/// A recording of an SFU room's call: one file per track, made as the media arrives (and
/// taken by the application to write as it goes). It lasts until stopped, even through
/// moments when nobody is in the call.
pub(crate) struct Recording {
    pub(crate) app_room: String,
    pub(crate) tracks: HashMap<String, TrackFile>,
}

pub(crate) struct TrackFile {
    pub(crate) owner: String,
    pub(crate) name: String,
    pub(crate) file: RecordingFile,
    /// Of a simulcast video track: the layer recorded (chosen at its first keyframe).
    pub(crate) rid: Option<Rid>,
}

pub(crate) enum RecordingFile {
    Audio(OggOpus),
    Video(Ivf),
}

impl RecordingFile {
    fn push(&mut self, time: u64, data: &[u8]) {
        match self {
            RecordingFile::Audio(ogg) => ogg.push(time, data),
            RecordingFile::Video(ivf) => ivf.push(time, data),
        }
    }
}

/// Bytes of a recorded track's file: those made since the last were taken, or (when the
/// recording stops) the rest of it. Appended in order, they make the file.
pub struct RecordedTrack {
    /// The application's room whose call it is.
    pub app_room: String,
    pub track_sid: String,
    /// The application's user who published the track.
    pub owner: String,
    pub track_name: String,
    pub kind: MediaKind,
    pub bytes: Vec<u8>,
}

/// Adds a packet of a track to the room's recording: Opus audio, and VP8 video from a
/// keyframe on (of a simulcast track, the best layer arriving at that keyframe).
pub(crate) fn record(recording: &mut Recording, track: &Published, owner: &str, data: &MediaData, now: Instant) {
    let numer = data.time.numer();
    if let Some(file) = recording.tracks.get_mut(&track.info.sid) {
        if file.rid == data.rid {
            file.file.push(numer, &data.data);
        }
        return;
    }
    let file = match kind_of(&track.info) {
        MediaKind::Audio if data.params.spec().codec == str0m::format::Codec::Opus => RecordingFile::Audio(OggOpus::new(recording.tracks.len() as u32 + 1, 2)),
        MediaKind::Video if data.params.spec().codec == str0m::format::Codec::Vp8 && data.is_keyframe() => {
            let best = usable_layers(track, now).last().map(|(rid, _, _)| *rid);
            if data.rid.is_some() && data.rid != best {
                return;
            }
            RecordingFile::Video(Ivf::new())
        }
        _ => return,
    };
    let mut file = TrackFile { owner: owner.to_owned(), name: track.info.name.clone(), file, rid: data.rid };
    file.file.push(numer, &data.data);
    recording.tracks.insert(track.info.sid.clone(), file);
}

impl Sfu {
    /// Whether a call of the Matrix room is being recorded.
    pub fn is_recording(&self, app_room: &str) -> bool {
        self.recordings.values().any(|r| r.app_room == app_room)
    }

    /// Starts recording an SFU room's call of `app_room`: every track from now on (video
    /// from its next keyframe). False if it is recorded already.
    pub fn start_recording(&mut self, now: Instant, room: &str, app_room: &str) -> bool {
        if self.recordings.contains_key(room) {
            return false;
        }
        self.recordings.insert(room.to_owned(), Recording { app_room: app_room.to_owned(), tracks: HashMap::new() });
        // Video starts at a keyframe: ask for one now.
        let ids: Vec<ParticipantId> = self.participants.iter().filter(|(_, p)| p.room == room).map(|(id, _)| *id).collect();
        for id in ids {
            let Some(participant) = self.participants.get_mut(&id) else { continue };
            for track in participant.tracks.iter_mut().filter(|t| kind_of(&t.info) == MediaKind::Video) {
                let Some(mid) = track.mid else { continue };
                track.last_keyframe_request = Some(now);
                if let Some(mut writer) = participant.publisher.writer(mid) {
                    let rids: Vec<Option<Rid>> = if track.layers.is_empty() { vec![None] } else { track.layers.keys().copied().map(Some).collect() };
                    for rid in rids {
                        let _ = writer.request_keyframe(rid, KeyframeRequestKind::Pli);
                    }
                    self.dirty.insert((id, Pc::Publisher));
                }
            }
        }
        self.process(now);
        true
    }

    /// What every recording made since this was last asked, to be written to its files.
    pub fn take_recorded(&mut self) -> Vec<RecordedTrack> {
        let mut taken = Vec::new();
        for recording in self.recordings.values_mut() {
            for (sid, track) in &mut recording.tracks {
                let (kind, bytes) = match &mut track.file {
                    RecordingFile::Audio(ogg) => (MediaKind::Audio, ogg.take()),
                    RecordingFile::Video(ivf) => (MediaKind::Video, ivf.take()),
                };
                if !bytes.is_empty() {
                    taken.push(RecordedTrack { app_room: recording.app_room.clone(), track_sid: sid.clone(), owner: track.owner.clone(), track_name: track.name.clone(), kind, bytes });
                }
            }
        }
        taken
    }

    /// Stops recording the calls of a Matrix room; the rest of each track's file, if any was
    /// recorded.
    pub fn stop_recording(&mut self, app_room: &str) -> Option<Vec<RecordedTrack>> {
        let rooms: Vec<String> = self.recordings.iter().filter(|(_, r)| r.app_room == app_room).map(|(room, _)| room.clone()).collect();
        if rooms.is_empty() {
            return None;
        }
        Some(
            rooms
                .iter()
                .filter_map(|room| self.recordings.remove(room))
                .flat_map(|recording| {
                    let app_room = recording.app_room;
                    recording.tracks.into_iter().map(move |(sid, track)| {
                        let (kind, bytes) = match track.file {
                            RecordingFile::Audio(ogg) => (MediaKind::Audio, ogg.finish()),
                            RecordingFile::Video(ivf) => (MediaKind::Video, ivf.finish()),
                        };
                        RecordedTrack { app_room: app_room.clone(), track_sid: sid, owner: track.owner, track_name: track.name, kind, bytes }
                    })
                })
                .collect(),
        )
    }
}
