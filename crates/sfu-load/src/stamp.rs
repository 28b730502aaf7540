//! What the load's frames carry: when they were sent and whose track they belong to, at a fixed
//! place behind what an SFU reads of them (a VP8 frame's header, an Opus packet's TOC byte);
//! the rest is filler up to the size the bitrate asks for.

/// The two kinds of track a publisher of the load sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Audio = 0,
    Video = 1,
}

/// Where a frame came from and when it left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Nanoseconds since the load's epoch, when the publisher wrote the frame.
    pub sent_nanos: u64,
    pub publisher: u16,
    pub kind: Kind,
}

const STAMP_BYTES: usize = 8 + 2 + 1;
/// A VP8 frame's first ten bytes: the frame tag, and on a keyframe its start code and size
/// (Janus reads them to tell a keyframe).
const VP8_HEADER: usize = 10;

impl Stamp {
    fn write(&self, into: &mut [u8]) {
        into[..8].copy_from_slice(&self.sent_nanos.to_le_bytes());
        into[8..10].copy_from_slice(&self.publisher.to_le_bytes());
        into[10] = self.kind as u8;
    }

    fn read(from: &[u8], kind: Kind) -> Option<Self> {
        let bytes = from.get(..STAMP_BYTES)?;
        (bytes[10] == kind as u8).then(|| Self {
            sent_nanos: u64::from_le_bytes(bytes[..8].try_into().expect("eight bytes")),
            publisher: u16::from_le_bytes([bytes[8], bytes[9]]),
            kind,
        })
    }

    /// A VP8 frame of `size` bytes (at least the header and the stamp) carrying this stamp.
    pub fn video_frame(&self, keyframe: bool, size: usize) -> Vec<u8> {
        let mut frame = vec![0u8; size.max(VP8_HEADER + STAMP_BYTES)];
        // Frame tag: bit 0 clear on a keyframe; show_frame set.
        frame[0] = if keyframe { 0x10 } else { 0x11 };
        if keyframe {
            frame[3..6].copy_from_slice(&[0x9d, 0x01, 0x2a]);
            frame[6..8].copy_from_slice(&640u16.to_le_bytes());
            frame[8..10].copy_from_slice(&360u16.to_le_bytes());
        }
        self.write(&mut frame[VP8_HEADER..]);
        frame
    }

    /// An Opus packet of `size` bytes carrying this stamp.
    pub fn audio_frame(&self, size: usize) -> Vec<u8> {
        let mut frame = vec![0u8; size.max(1 + STAMP_BYTES)];
        // TOC: CELT fullband, 20 ms, one frame.
        frame[0] = 0xfc;
        self.write(&mut frame[1..]);
        frame
    }

    /// The stamp a received frame of `kind` carries, if it is one of the load's.
    pub fn of(kind: Kind, frame: &[u8]) -> Option<Self> {
        match kind {
            Kind::Audio => Self::read(frame.get(1..)?, kind),
            Kind::Video => Self::read(frame.get(VP8_HEADER..)?, kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_survives_its_frame_and_keyframes_read_as_vp8_keyframes() {
        let stamp = Stamp { sent_nanos: 1_234_567_890_123, publisher: 7, kind: Kind::Video };
        let key = stamp.video_frame(true, 1250);
        assert_eq!(key.len(), 1250);
        assert_eq!(key[0] & 1, 0, "VP8's inverse key frame flag");
        assert_eq!(&key[3..6], &[0x9d, 0x01, 0x2a]);
        assert_eq!(Stamp::of(Kind::Video, &key), Some(stamp));
        let delta = stamp.video_frame(false, 4);
        assert_eq!(delta[0] & 1, 1);
        assert_eq!(Stamp::of(Kind::Video, &delta), Some(stamp), "a frame is never smaller than its stamp");

        let audio = Stamp { kind: Kind::Audio, ..stamp };
        let packet = audio.audio_frame(80);
        assert_eq!(packet.len(), 80);
        assert_eq!(Stamp::of(Kind::Audio, &packet), Some(audio));
        assert_eq!(Stamp::of(Kind::Video, &packet), None, "an audio packet is not read as video");
        assert_eq!(Stamp::of(Kind::Audio, &[0xfc, 1, 2]), None, "too short to carry a stamp");
    }
}
