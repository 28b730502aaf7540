//! The files recordings are written in: Ogg with Opus (RFC 7845) for audio, IVF for VP8
//! video, built from the packets the SFU already has (no transcoding). Each is written as it
//! is made: `take` hands over the bytes made since, `finish` the rest; and `repair_*` make a
//! file cut short (by a crash) whole again.

/// The Ogg CRC-32: polynomial 0x04c11db7, not reflected, initial value 0.
fn ogg_crc(data: &[u8]) -> u32 {
    let mut crc = 0u32;
    for byte in data {
        crc ^= u32::from(*byte) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 { (crc << 1) ^ 0x04c1_1db7 } else { crc << 1 };
        }
    }
    crc
}

/// An Ogg Opus stream: the identification and comment headers, then one page per packet with
/// its granule position (48 kHz samples from the start).
pub struct OggOpus {
    bytes: Vec<u8>,
    serial: u32,
    sequence: u32,
    /// The RTP time (48 kHz) of the first packet.
    first: Option<u64>,
    last_granule: u64,
    /// The latest packet, written when the next arrives or with the end-of-stream flag.
    pending: Option<Vec<u8>>,
}

/// Samples of one 20 ms Opus frame at 48 kHz, the duration assumed of each packet.
const OPUS_PACKET_SAMPLES: u64 = 960;

impl OggOpus {
    pub fn new(serial: u32, channels: u8) -> Self {
        let mut stream = Self { bytes: Vec::new(), serial, sequence: 0, first: None, last_granule: 0, pending: None };
        let mut head = b"OpusHead".to_vec();
        head.push(1); // version
        head.push(channels);
        head.extend_from_slice(&0u16.to_le_bytes()); // pre-skip
        head.extend_from_slice(&48_000u32.to_le_bytes());
        head.extend_from_slice(&0i16.to_le_bytes()); // output gain
        head.push(0); // channel mapping family
        stream.page(&head, 0, 0x02);
        let vendor = b"limbic";
        let mut tags = b"OpusTags".to_vec();
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor);
        tags.extend_from_slice(&0u32.to_le_bytes());
        stream.page(&tags, 0, 0);
        stream
    }

    /// One Opus packet sent at RTP time `rtp_time` (48 kHz, extended).
    pub fn push(&mut self, rtp_time: u64, packet: &[u8]) {
        if let Some(previous) = self.pending.take() {
            self.page(&previous, self.last_granule, 0);
        }
        let first = *self.first.get_or_insert(rtp_time);
        let granule = rtp_time.saturating_sub(first) + OPUS_PACKET_SAMPLES;
        // Granule positions never go back, even for a late packet.
        self.last_granule = self.last_granule.max(granule);
        self.pending = Some(packet.to_vec());
    }

    /// The bytes made since the last `take` (whole pages).
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }

    /// The rest of the file, its last page marked as the end of the stream.
    pub fn finish(mut self) -> Vec<u8> {
        let last = self.pending.take().unwrap_or_default();
        self.page(&last, self.last_granule, 0x04);
        self.bytes
    }

    fn page(&mut self, packet: &[u8], granule: u64, header_type: u8) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(b"OggS");
        self.bytes.push(0);
        self.bytes.push(header_type);
        self.bytes.extend_from_slice(&granule.to_le_bytes());
        self.bytes.extend_from_slice(&self.serial.to_le_bytes());
        self.bytes.extend_from_slice(&self.sequence.to_le_bytes());
        self.bytes.extend_from_slice(&0u32.to_le_bytes()); // CRC, filled in below
        // Lacing: 255s, then the remainder (a 0 ends a packet whose size is a multiple of 255).
        let mut lacing = vec![255u8; packet.len() / 255];
        lacing.push((packet.len() % 255) as u8);
        self.bytes.push(lacing.len() as u8);
        self.bytes.extend_from_slice(&lacing);
        self.bytes.extend_from_slice(packet);
        let crc = ogg_crc(&self.bytes[start..]);
        self.bytes[start + 22..start + 26].copy_from_slice(&crc.to_le_bytes());
        self.sequence += 1;
    }
}

/// Where an IVF header keeps its frame count, which is known only at the end.
const IVF_FRAME_COUNT_AT: usize = 24;
const IVF_HEADER: usize = 32;
const IVF_FRAME_HEADER: usize = 12;

/// An IVF file of VP8 frames with 90 kHz timestamps. Its header, written with the first
/// frame, counts no frames: [`repair_ivf`] counts them in the finished file.
pub struct Ivf {
    bytes: Vec<u8>,
    first: Option<u64>,
    last_pts: u64,
}

impl Default for Ivf {
    fn default() -> Self {
        Self::new()
    }
}

impl Ivf {
    pub fn new() -> Self {
        Self { bytes: Vec::new(), first: None, last_pts: 0 }
    }

    /// One VP8 frame at RTP time `rtp_time` (90 kHz, extended). The first is a keyframe,
    /// whose size the header takes.
    pub fn push(&mut self, rtp_time: u64, frame: &[u8]) {
        if self.first.is_none() {
            let (width, height) = vp8_keyframe_size(frame).unwrap_or_default();
            self.bytes.extend_from_slice(b"DKIF");
            self.bytes.extend_from_slice(&0u16.to_le_bytes()); // version
            self.bytes.extend_from_slice(&(IVF_HEADER as u16).to_le_bytes());
            self.bytes.extend_from_slice(b"VP80");
            self.bytes.extend_from_slice(&width.to_le_bytes());
            self.bytes.extend_from_slice(&height.to_le_bytes());
            self.bytes.extend_from_slice(&90_000u32.to_le_bytes()); // time base: 1/90000
            self.bytes.extend_from_slice(&1u32.to_le_bytes());
            self.bytes.extend_from_slice(&0u32.to_le_bytes()); // frame count, at the end
            self.bytes.extend_from_slice(&0u32.to_le_bytes());
        }
        let first = *self.first.get_or_insert(rtp_time);
        let pts = rtp_time.saturating_sub(first).max(self.last_pts);
        self.last_pts = pts;
        self.bytes.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&pts.to_le_bytes());
        self.bytes.extend_from_slice(frame);
    }

    /// The bytes made since the last `take` (whole frames).
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }

    /// The rest of the file; [`repair_ivf`] puts the frame count in the header.
    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

fn set_ivf_frame_count(file: &mut [u8], count: u32) {
    if let Some(field) = file.get_mut(IVF_FRAME_COUNT_AT..IVF_FRAME_COUNT_AT + 4) {
        field.copy_from_slice(&count.to_le_bytes());
    }
}

/// Makes an IVF file cut short whole: a torn last frame is dropped and the header counts the
/// frames there are. Its duration (ms), or `None` if it is no IVF file.
pub fn repair_ivf(file: &mut Vec<u8>) -> Option<u64> {
    if file.len() < IVF_HEADER || &file[..4] != b"DKIF" {
        return None;
    }
    let (mut at, mut count, mut last_pts) = (IVF_HEADER, 0u32, 0u64);
    while let Some(header) = file.get(at..at + IVF_FRAME_HEADER) {
        let size = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
        if file.len() < at + IVF_FRAME_HEADER + size {
            break;
        }
        last_pts = u64::from_le_bytes(header[4..].try_into().ok()?);
        at += IVF_FRAME_HEADER + size;
        count += 1;
    }
    file.truncate(at);
    set_ivf_frame_count(file, count);
    Some(last_pts / 90)
}

/// Makes an Ogg Opus file cut short whole: a torn last page is dropped and the last whole page
/// marks the end of the stream. Its duration (ms), or `None` if it is no Ogg file.
pub fn repair_ogg(file: &mut Vec<u8>) -> Option<u64> {
    const PAGE_HEADER: usize = 27;
    let (mut at, mut last) = (0usize, None);
    while let Some(header) = file.get(at..at + PAGE_HEADER) {
        if &header[..4] != b"OggS" {
            break;
        }
        let segments = usize::from(header[26]);
        let Some(lacing) = file.get(at + PAGE_HEADER..at + PAGE_HEADER + segments) else { break };
        let end = at + PAGE_HEADER + segments + lacing.iter().map(|l| usize::from(*l)).sum::<usize>();
        if file.len() < end {
            break;
        }
        last = Some(at);
        at = end;
    }
    let last = last?;
    file.truncate(at);
    let granule = u64::from_le_bytes(file[last + 6..last + 14].try_into().ok()?);
    file[last + 5] |= 0x04;
    file[last + 22..last + 26].copy_from_slice(&[0; 4]);
    let crc = ogg_crc(&file[last..]);
    file[last + 22..last + 26].copy_from_slice(&crc.to_le_bytes());
    Some(granule / 48)
}

/// The dimensions in a VP8 keyframe's header (RFC 6386 section 9.1).
fn vp8_keyframe_size(frame: &[u8]) -> Option<(u16, u16)> {
    let is_keyframe = frame.first()? & 1 == 0;
    if !is_keyframe || frame.get(3..6)? != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let width = u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff;
    let height = u16::from_le_bytes([*frame.get(8)?, *frame.get(9)?]) & 0x3fff;
    Some((width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pages of an Ogg stream: (header type, granule, packet), each page's CRC checked.
    fn pages(mut bytes: &[u8]) -> Vec<(u8, u64, Vec<u8>)> {
        let mut pages = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(&bytes[..4], b"OggS");
            let segments = bytes[26] as usize;
            let length: usize = bytes[27..27 + segments].iter().map(|l| *l as usize).sum();
            let end = 27 + segments + length;
            let mut page = bytes[..end].to_vec();
            let crc = u32::from_le_bytes(page[22..26].try_into().unwrap());
            page[22..26].fill(0);
            assert_eq!(ogg_crc(&page), crc, "page CRC");
            pages.push((bytes[5], u64::from_le_bytes(bytes[6..14].try_into().unwrap()), bytes[27 + segments..end].to_vec()));
            bytes = &bytes[end..];
        }
        pages
    }

    #[test]
    fn ogg_crc_matches_the_reference() {
        // The CRC of "123456789" under Ogg's parameters (CRC-32/MPEG-2 without the final xor
        // and with initial 0): 0x89a1897f.
        assert_eq!(ogg_crc(b"123456789"), 0x89a1_897f);
    }

    #[test]
    fn ogg_opus_has_headers_granules_and_an_end() {
        let mut ogg = OggOpus::new(7, 2);
        let big = vec![0xab; 600];
        ogg.push(1_000, &[1, 2, 3]);
        ogg.push(1_960, &big);
        ogg.push(50_000, &[4]); // after a gap (DTX, mute): the granule follows the clock
        let mut file = ogg.finish();
        let pages = pages(&file);
        assert_eq!(repair_ogg(&mut file), Some((50_000 - 1_000 + 960) / 48), "a whole file is left as it is");
        assert_eq!(super::tests::pages(&file), pages);
        assert_eq!(pages.len(), 5);
        assert_eq!((pages[0].0, &pages[0].2[..8]), (0x02, &b"OpusHead"[..]));
        assert_eq!(&pages[1].2[..8], b"OpusTags");
        assert_eq!((pages[2].1, pages[2].2.clone()), (960, vec![1, 2, 3]));
        assert_eq!((pages[3].1, pages[3].2.len()), (1_920, 600));
        assert_eq!((pages[4].0, pages[4].1, pages[4].2.clone()), (0x04, 49_960, vec![4]));
    }

    #[test]
    fn ivf_has_a_header_and_timed_frames() {
        let mut keyframe = vec![0x10, 0, 0, 0x9d, 0x01, 0x2a];
        keyframe.extend_from_slice(&320u16.to_le_bytes());
        keyframe.extend_from_slice(&180u16.to_le_bytes());
        let mut ivf = Ivf::new();
        ivf.push(9_000, &keyframe);
        ivf.push(12_000, &[0x11, 1, 2]);
        let mut file = ivf.finish();
        assert_eq!(repair_ivf(&mut file), Some(33));
        assert_eq!(&file[..4], b"DKIF");
        assert_eq!(&file[8..12], b"VP80");
        assert_eq!(u16::from_le_bytes([file[12], file[13]]), 320);
        assert_eq!(u16::from_le_bytes([file[14], file[15]]), 180);
        assert_eq!(u32::from_le_bytes(file[24..28].try_into().unwrap()), 2);
        let second = 32 + 12 + keyframe.len();
        assert_eq!(u64::from_le_bytes(file[second + 4..second + 12].try_into().unwrap()), 3_000);
    }

    #[test]
    fn a_file_written_as_it_is_made_and_cut_short_is_repaired() {
        // Ogg: taken in pieces, the file is the one made at once; cut mid-page, it keeps its
        // whole pages and ends on the last of them.
        let mut ogg = OggOpus::new(7, 2);
        let mut written = ogg.take();
        for n in 0..10u64 {
            ogg.push(n * 960, &[n as u8; 40]);
            written.extend(ogg.take());
        }
        let mut whole = written.clone();
        whole.extend(ogg.finish());
        assert_eq!(pages(&whole).len(), 2 + 10);
        let mut cut = written[..written.len() - 10].to_vec();
        assert_eq!(repair_ogg(&mut cut), Some(8 * 960 / 48), "the ninth packet's page is whole, the tenth is pending");
        let repaired = pages(&cut);
        assert_eq!(repaired.len(), 2 + 8);
        assert_eq!(repaired.last().unwrap().0 & 0x04, 0x04, "the last page ends the stream");
        assert_eq!(repair_ogg(&mut b"not ogg".to_vec()), None);

        // IVF: cut in the third frame, two remain, counted.
        let mut keyframe = vec![0x10, 0, 0, 0x9d, 0x01, 0x2a];
        keyframe.extend_from_slice(&320u16.to_le_bytes());
        keyframe.extend_from_slice(&180u16.to_le_bytes());
        let mut ivf = Ivf::new();
        let mut written = Vec::new();
        for n in 0..3u64 {
            ivf.push(n * 3_000, if n == 0 { &keyframe } else { &[0x11, 1, 2, 3] });
            written.extend(ivf.take());
        }
        let mut cut = written[..written.len() - 2].to_vec();
        assert_eq!(repair_ivf(&mut cut), Some(3_000 / 90));
        assert_eq!(u32::from_le_bytes(cut[24..28].try_into().unwrap()), 2);
        assert_eq!(cut.len(), 32 + 2 * 12 + keyframe.len() + 4);
        assert_eq!(repair_ivf(&mut vec![0; 10]), None);
    }
}
