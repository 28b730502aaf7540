//! A down-track's RTP as the subscriber sees it: one stream, although the SFU forwards it from
//! several in turn (a simulcast track's layers; a publisher's new SSRC). Sequence numbers go on
//! without a gap or a repeat at a switch, the RTP clock goes on by the time that passed, and
//! VP8's picture ids and TL0PICIDX go on, so that the decoder sees no loss.
//!
//! Packets are rewritten by offsets fixed at each switch, not renumbered in the order they
//! arrive: a packet that comes late (reordered, or resent after the SFU's NACK) lands where it
//! belongs.

use std::time::Instant;

use str0m::rtp::{SeqNo, Ssrc, Vp8Descriptor, Vp8Patch};

/// A packet from a publisher, as far as rewriting it goes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Incoming {
    pub ssrc: Ssrc,
    /// Extended sequence number and RTP time.
    pub seq: u64,
    pub time: u64,
    /// The RTP clock's rate.
    pub frequency: u32,
    pub arrived: Instant,
    pub vp8: Option<Vp8>,
}

/// A VP8 packet's payload descriptor (RFC 7741 section 4.2).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Vp8 {
    descriptor: Vp8Descriptor,
    /// The picture id and how many values its field holds (7 or 15 bits).
    picture_id: Option<(u16, u16)>,
    tl0_pic_idx: Option<u8>,
    /// Bytes of the descriptor: the VP8 payload follows.
    pub header_len: usize,
    /// The first packet of a keyframe.
    pub starts_keyframe: bool,
    /// The first packet of a frame (S set, partition 0).
    pub starts_frame: bool,
}

impl Vp8 {
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let descriptor = Vp8Descriptor::parse(payload).ok()?;
        let extended = payload[0] & 0x80 != 0;
        let extension = if extended { payload[1] } else { 0 };
        // The picture id, when present, comes right after the extension byte; its first bit
        // says whether it has 15 bits.
        let picture_id = descriptor.picture_id().map(|id| (id, if payload[2] & 0x80 != 0 { 1 << 15 } else { 1 << 7 }));
        let optional = [0x80, 0x40, 0x30].iter().filter(|bit| extension & **bit != 0).count();
        let header_len = 1 + usize::from(extended) + optional + usize::from(picture_id.is_some_and(|(_, values)| values > 128));
        Some(Self {
            descriptor,
            picture_id,
            tl0_pic_idx: descriptor.tl0_pic_idx(),
            header_len,
            starts_keyframe: descriptor.starts_keyframe(payload),
            starts_frame: payload[0] & 0x17 == 0x10,
        })
    }
}

/// What a packet becomes on the down-track.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Rewritten {
    pub seq: SeqNo,
    pub time: u32,
    pub vp8_patch: Option<Vp8Patch>,
}

/// The newest packet written to the down-track, as written.
#[derive(Clone, Copy, Debug)]
struct Written {
    seq: u64,
    time: u64,
    arrived: Instant,
    picture_id: Option<u16>,
    tl0_pic_idx: Option<u8>,
}

#[derive(Debug, Default)]
pub(crate) struct Rewriter {
    /// The stream forwarded, and what is added to its numbers.
    source: Option<Ssrc>,
    seq_offset: i64,
    time_offset: i64,
    picture_id_offset: u16,
    tl0_offset: u8,
    /// The first sequence number written from the source: its packets from before are dropped.
    floor: u64,
    last: Option<Written>,
}

impl Rewriter {
    /// The stream being forwarded.
    pub fn source(&self) -> Option<Ssrc> {
        self.source
    }

    /// Forwards `packet`'s stream from `packet` on (for video, the first packet of a keyframe).
    /// The first stream keeps its numbers; a later one continues where the last left off.
    pub fn switch_to(&mut self, packet: &Incoming) {
        self.source = Some(packet.ssrc);
        let Some(last) = self.last else {
            // Sequence numbers as on the wire: the subscriber's SRTP starts at rollover 0.
            self.seq_offset = i64::from(packet.seq as u16) - packet.seq as i64;
            self.floor = u64::from(packet.seq as u16);
            return;
        };
        let elapsed = packet.arrived.saturating_duration_since(last.arrived);
        let ticks = ((elapsed.as_secs_f64() * f64::from(packet.frequency)) as u64).max(1);
        self.seq_offset = (last.seq + 1) as i64 - packet.seq as i64;
        self.time_offset = (last.time + ticks) as i64 - packet.time as i64;
        self.floor = last.seq + 1;
        let vp8 = packet.vp8.as_ref();
        if let (Some(last_id), Some((id, values))) = (last.picture_id, vp8.and_then(|v| v.picture_id)) {
            self.picture_id_offset = (last_id.wrapping_add(1).wrapping_sub(id)) % values;
        }
        if let (Some(last_idx), Some(idx)) = (last.tl0_pic_idx, vp8.and_then(|v| v.tl0_pic_idx)) {
            self.tl0_offset = last_idx.wrapping_add(1).wrapping_sub(idx);
        }
    }

    /// Stops forwarding: the next stream switched to continues the numbers.
    pub fn pause(&mut self) {
        self.source = None;
    }

    /// The packet as the subscriber gets it; none if it is not of the stream forwarded, or from
    /// before the switch to it.
    pub fn rewrite(&mut self, packet: &Incoming) -> Option<Rewritten> {
        if self.source != Some(packet.ssrc) {
            return None;
        }
        let seq = u64::try_from(packet.seq as i64 + self.seq_offset).ok().filter(|seq| *seq >= self.floor)?;
        let time = (packet.time as i64 + self.time_offset).max(0) as u64;
        let vp8 = packet.vp8.as_ref();
        let picture_id = vp8.and_then(|v| v.picture_id).map(|(id, values)| (id + self.picture_id_offset) % values);
        let tl0_pic_idx = vp8.and_then(|v| v.tl0_pic_idx).map(|idx| idx.wrapping_add(self.tl0_offset));
        let vp8_patch = vp8.filter(|_| self.picture_id_offset != 0 || self.tl0_offset != 0).and_then(|v| {
            let mut patch = v.descriptor.patch();
            if let Some(id) = picture_id {
                patch = patch.picture_id(id);
            }
            if let Some(idx) = tl0_pic_idx {
                patch = patch.tl0_pic_idx(idx);
            }
            patch.build().ok()
        });
        if self.last.is_none_or(|last| seq > last.seq) {
            self.last = Some(Written { seq, time, arrived: packet.arrived, picture_id, tl0_pic_idx });
        }
        Some(Rewritten { seq: seq.into(), time: time as u32, vp8_patch })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A VP8 payload: descriptor with a 15-bit picture id, TL0PICIDX and TID, then `first`.
    fn vp8(start: bool, picture_id: u16, tl0: u8, first: u8) -> Vec<u8> {
        vec![0x80 | if start { 0x10 } else { 0 }, 0xe0, 0x80 | (picture_id >> 8) as u8, picture_id as u8, tl0, 0x20, first, 0x42]
    }

    fn packet(ssrc: u32, seq: u64, time: u64, arrived: Instant, payload: &[u8]) -> Incoming {
        Incoming { ssrc: ssrc.into(), seq, time, frequency: 90_000, arrived, vp8: Vp8::parse(payload) }
    }

    #[test]
    fn a_vp8_descriptor_is_read() {
        let keyframe = Vp8::parse(&vp8(true, 300, 7, 0x10)).unwrap();
        assert_eq!((keyframe.picture_id, keyframe.tl0_pic_idx, keyframe.header_len), (Some((300, 1 << 15)), Some(7), 6));
        assert!(keyframe.starts_keyframe && keyframe.starts_frame);
        let later = Vp8::parse(&vp8(false, 300, 7, 0x10)).unwrap();
        assert!(!later.starts_keyframe && !later.starts_frame);
        let delta = Vp8::parse(&vp8(true, 301, 7, 0x11)).unwrap();
        assert!(!delta.starts_keyframe && delta.starts_frame);
        // No extension: the payload follows the first byte.
        let plain = Vp8::parse(&[0x10, 0x10, 0x00]).unwrap();
        assert_eq!((plain.picture_id, plain.header_len), (None, 1));
        // A 7-bit picture id.
        let short = Vp8::parse(&[0x90, 0x80, 0x7f, 0x10]).unwrap();
        assert_eq!((short.picture_id, short.header_len), (Some((127, 128)), 3));
        assert!(Vp8::parse(&[0x90]).is_none(), "a cut descriptor");
    }

    #[test]
    fn the_first_stream_keeps_its_numbers_and_a_late_packet_lands_where_it_belongs() {
        let start = Instant::now();
        let mut rewriter = Rewriter::default();
        // A stream far into its sequence (rollover 1).
        let first = packet(1, 70_000, 9_000, start, &vp8(true, 10, 1, 0x10));
        assert_eq!(rewriter.rewrite(&first), None, "nothing before the switch");
        rewriter.switch_to(&first);
        let out = rewriter.rewrite(&first).unwrap();
        assert_eq!((*out.seq, out.time, out.vp8_patch), (70_000 - 65_536, 9_000, None));
        assert_eq!(*rewriter.rewrite(&packet(1, 70_002, 12_000, start, &vp8(true, 12, 1, 0x11))).unwrap().seq, 70_002 - 65_536);
        assert_eq!(*rewriter.rewrite(&packet(1, 70_001, 9_000, start, &vp8(false, 10, 1, 0x42))).unwrap().seq, 70_001 - 65_536, "late, in its place");
        assert_eq!(rewriter.rewrite(&packet(1, 69_999, 6_000, start, &vp8(true, 9, 1, 0x11))), None, "from before the switch");
        assert_eq!(rewriter.rewrite(&packet(2, 5, 6_000, start, &vp8(true, 9, 1, 0x11))), None, "another stream");
    }

    #[test]
    fn a_switch_continues_the_numbers_the_clock_and_the_picture_ids() {
        let start = Instant::now();
        let mut rewriter = Rewriter::default();
        let low = packet(1, 100, 1_000, start, &vp8(true, 32_767, 255, 0x10));
        rewriter.switch_to(&low);
        rewriter.rewrite(&low).unwrap();
        // The high layer's keyframe, 50 ms later, on its own numbers.
        let later = start + Duration::from_millis(50);
        let high = packet(2, 5_000, 700_000, later, &vp8(true, 40, 3, 0x10));
        rewriter.switch_to(&high);
        let out = rewriter.rewrite(&high).unwrap();
        assert_eq!((*out.seq, out.time), (101, 1_000 + 4_500));
        let mut rewritten = high.vp8.unwrap().descriptor.patch().picture_id(0).tl0_pic_idx(0).build().unwrap();
        assert_eq!(out.vp8_patch, Some(rewritten), "picture id 32767 + 1 wraps to 0, TL0PICIDX 255 + 1 to 0");
        let next = packet(2, 5_001, 703_000, later, &vp8(true, 41, 3, 0x11));
        let out = rewriter.rewrite(&next).unwrap();
        rewritten = next.vp8.unwrap().descriptor.patch().picture_id(1).tl0_pic_idx(0).build().unwrap();
        assert_eq!((*out.seq, out.time, out.vp8_patch), (102, 1_000 + 4_500 + 3_000, Some(rewritten)));
        // The low layer's packets no longer pass.
        assert_eq!(rewriter.rewrite(&packet(1, 101, 4_000, later, &vp8(true, 0, 0, 0x11))), None);
    }
}
