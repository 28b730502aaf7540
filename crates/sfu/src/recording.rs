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
    Video(Ivf, Vp8Frames),
}

impl RecordingFile {
    fn push(&mut self, incoming: &Incoming, packet: &RtpPacket) {
        match self {
            RecordingFile::Audio(ogg) => ogg.push(incoming.time, &packet.payload),
            RecordingFile::Video(ivf, frames) => {
                if let Some(vp8) = &incoming.vp8
                    && let Some(frame) = frames.push(incoming.seq, incoming.time, packet.header.marker, vp8, &packet.payload)
                {
                    ivf.push(incoming.time, &frame);
                }
            }
        }
    }
}

/// VP8 frames put together from their packets (RFC 7741) as they arrive, for a recording. A
/// frame missing a packet is left out, and so is every frame after it until the next keyframe:
/// they could not be decoded.
pub(crate) struct Vp8Frames {
    /// The frame being put together: its RTP time, what it holds so far, and the sequence
    /// number of the packet expected next.
    time: u64,
    data: Vec<u8>,
    next_seq: Option<u64>,
    /// A packet was missed since the last keyframe began.
    broken: bool,
}

impl Vp8Frames {
    pub(crate) fn new() -> Self {
        Self { time: 0, data: Vec::new(), next_seq: None, broken: true }
    }

    /// A packet of the stream; the frame it completes, if it does.
    pub(crate) fn push(&mut self, seq: u64, time: u64, marker: bool, vp8: &Vp8, payload: &[u8]) -> Option<Vec<u8>> {
        if vp8.starts_frame {
            // The frame before was cut short, or one was missed whole.
            self.broken |= !self.data.is_empty() || self.next_seq.is_some_and(|next| next != seq);
            // A keyframe needs nothing that came before it.
            self.broken &= !vp8.starts_keyframe;
            self.data.clear();
            self.time = time;
        } else if self.next_seq != Some(seq) || self.time != time {
            self.broken = true;
        }
        self.next_seq = Some(seq + 1);
        if self.broken {
            self.data.clear();
            return None;
        }
        self.data.extend_from_slice(payload.get(vp8.header_len..)?);
        marker.then(|| std::mem::take(&mut self.data))
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
pub(crate) fn record(recording: &mut Recording, track: &Published, owner: &str, rid: Option<Rid>, incoming: &Incoming, packet: &RtpPacket, now: Instant) {
    if let Some(file) = recording.tracks.get_mut(&track.info.sid) {
        if file.rid == rid {
            file.file.push(incoming, packet);
        }
        return;
    }
    let file = match kind_of(&track.info) {
        MediaKind::Audio => RecordingFile::Audio(OggOpus::new(recording.tracks.len() as u32 + 1, 2)),
        MediaKind::Video if incoming.vp8.is_some_and(|vp8| vp8.starts_keyframe) => {
            let best = usable_layers(track, now).last().map(|(rid, _, _)| *rid);
            if rid.is_some() && rid != best {
                return;
            }
            RecordingFile::Video(Ivf::new(), Vp8Frames::new())
        }
        MediaKind::Video => return,
    };
    let mut file = TrackFile { owner: owner.to_owned(), name: track.info.name.clone(), file, rid };
    file.file.push(incoming, packet);
    recording.tracks.insert(track.info.sid.clone(), file);
}

impl Sfu {
    /// Whether a call of the Matrix room is being recorded.
    pub fn is_recording(&self, app_room: &str) -> bool {
        self.recordings.values().any(|r| r.app_room == app_room)
    }

    /// The Matrix rooms whose calls are being recorded.
    pub fn recorded_rooms(&self) -> Vec<String> {
        let mut rooms: Vec<String> = self.recordings.values().map(|r| r.app_room.clone()).collect();
        rooms.sort();
        rooms.dedup();
        rooms
    }

    /// Starts recording an SFU room's call of `app_room`: every track from now on (video
    /// from its next keyframe). False if it is recorded already.
    pub fn start_recording(&mut self, now: Instant, room: &str, app_room: &str) -> bool {
        if self.recordings.contains_key(room) {
            return false;
        }
        self.recordings.insert(room.to_owned(), Recording { app_room: app_room.to_owned(), tracks: HashMap::new() });
        self.announce_room(room);
        // Video starts at a keyframe: ask for one now.
        let ids: Vec<ParticipantId> = self.participants.iter().filter(|(_, p)| p.room == room).map(|(id, _)| *id).collect();
        for id in ids {
            let Some(participant) = self.participants.get_mut(&id) else { continue };
            for track in participant.tracks.iter_mut().filter(|t| kind_of(&t.info) == MediaKind::Video) {
                let Some(mid) = track.mid else { continue };
                track.last_keyframe_request = Some(now);
                let rids: Vec<Option<Rid>> = if track.layers.is_empty() { vec![None] } else { track.layers.keys().copied().map(Some).collect() };
                for rid in rids {
                    request_keyframe(&mut participant.publisher, mid, rid, KeyframeRequestKind::Pli);
                }
                self.dirty.insert((id, Pc::Publisher));
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
                    RecordingFile::Video(ivf, _) => (MediaKind::Video, ivf.take()),
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
        let stopped: Vec<Recording> = rooms.iter().filter_map(|room| self.recordings.remove(room)).collect();
        for room in &rooms {
            self.announce_room(room);
        }
        Some(
            stopped
                .into_iter()
                .flat_map(|recording| {
                    let app_room = recording.app_room;
                    recording.tracks.into_iter().map(move |(sid, track)| {
                        let (kind, bytes) = match track.file {
                            RecordingFile::Audio(ogg) => (MediaKind::Audio, ogg.finish()),
                            RecordingFile::Video(ivf, _) => (MediaKind::Video, ivf.finish()),
                        };
                        RecordedTrack { app_room: app_room.clone(), track_sid: sid, owner: track.owner, track_name: track.name, kind, bytes }
                    })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet of a VP8 frame: a one-byte descriptor (S set on the first), then `data`.
    fn push(frames: &mut Vp8Frames, seq: u64, time: u64, first: bool, marker: bool, data: &[u8]) -> Option<Vec<u8>> {
        let mut payload = vec![if first { 0x10 } else { 0x00 }];
        payload.extend_from_slice(data);
        let vp8 = Vp8::parse(&payload).unwrap();
        frames.push(seq, time, marker, &vp8, &payload)
    }

    #[test]
    fn frames_are_put_together_and_those_after_a_loss_wait_for_a_keyframe() {
        let mut frames = Vp8Frames::new();
        assert_eq!(push(&mut frames, 1, 0, true, true, &[0x11, 1]), None, "no keyframe yet");
        assert_eq!(push(&mut frames, 2, 3000, true, false, &[0x10, 2]), None);
        assert_eq!(push(&mut frames, 3, 3000, false, true, &[3, 4]), Some(vec![0x10, 2, 3, 4]), "a keyframe of two packets");
        assert_eq!(push(&mut frames, 4, 6000, true, true, &[0x11, 5]), Some(vec![0x11, 5]));
        // Packet 5 is lost: its frame, and the next, are left out until a keyframe.
        assert_eq!(push(&mut frames, 6, 9000, false, true, &[6]), None);
        assert_eq!(push(&mut frames, 7, 12000, true, true, &[0x11, 7]), None);
        assert_eq!(push(&mut frames, 8, 15000, true, true, &[0x10, 8]), Some(vec![0x10, 8]));
        // A whole frame lost (9): the next delta frame waits too.
        assert_eq!(push(&mut frames, 10, 21000, true, true, &[0x11, 10]), None);
    }
}
