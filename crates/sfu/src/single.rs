//! LiveKit's single peer connection (`/rtc/v1`): the client publishes and receives on one
//! connection, and always offers. Media lines to receive on are the client's: it offers some
//! from the start (LiveKit's JavaScript SDK three of each kind), and more when asked with
//! `media_sections_requirement`. Each answer binds the down tracks waiting to spare lines and
//! names every line by the track it carries (the stream id `PA_…|TR_…` LiveKit's SDKs read);
//! a line that carries nothing is answered inactive, so that a browser fires its track only
//! once it is named. A line whose track stopped is never bound again: the client keeps it,
//! inactive.

use super::{signalling::open_down_line, *};

/// How many lines to receive on one client's offer may have: a call's worth of tracks many
/// times over (lines are not reused), far beyond what a session needs.
pub(crate) const RECEIVING_LINES_MAX: usize = 256;

/// A single connection's lines to receive on.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    /// Lines that carried nothing after the last answer, for the next to bind.
    spare: Vec<(Mid, MediaKind)>,
    /// Lines whose down track stopped.
    retired: HashSet<Mid>,
    /// The client was asked for an offer (`media_sections_requirement`) it has not sent yet.
    pub(crate) asked: bool,
    /// An offer of the client's was answered: until then its lines are not known, and its
    /// first offer comes unasked (in the join request, or from a browser right after `join`).
    answered: bool,
}

/// An SDP's media lines: those the client sends on, receives on (or neither, inactive), and
/// data.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct LineCount {
    pub(crate) sending: usize,
    pub(crate) receiving: usize,
    pub(crate) data: usize,
}

/// Counts an offer's media lines by what the client does on them.
pub(crate) fn count_lines(sdp: &str) -> LineCount {
    let mut count = LineCount::default();
    for section in sections(sdp).skip(1) {
        if section.first().is_some_and(|m| m.starts_with("m=application")) {
            count.data += 1;
        } else if section.contains(&"a=recvonly") {
            count.receiving += 1;
        } else {
            count.sending += 1;
        }
    }
    count
}

/// An SDP's lines, split into the session part and then one part per media line.
fn sections(sdp: &str) -> impl Iterator<Item = Vec<&str>> {
    let mut parts: Vec<Vec<&str>> = vec![Vec::new()];
    for line in sdp.lines() {
        if line.starts_with("m=") {
            parts.push(Vec::new());
        }
        if let Some(part) = parts.last_mut() {
            part.push(line);
        }
    }
    parts.into_iter()
}

/// Our answer with each line we send on named by the track it carries (`carried`: mid to the
/// publisher's and the track's sids; the stream id is `<publisher>|<track>`, the track id the
/// track's sid), and those that carry nothing inactive, unnamed.
fn name_lines(answer: &str, carried: &HashMap<String, (String, String)>) -> String {
    let mut named = String::with_capacity(answer.len());
    for section in sections(answer) {
        let sending = section.contains(&"a=sendonly");
        let track = section.iter().find_map(|line| line.strip_prefix("a=mid:")).and_then(|mid| carried.get(mid));
        for line in section {
            match (sending, track) {
                (true, Some((publisher, track))) => {
                    // `a=msid:<stream> <track>`, and the same in each `a=ssrc:<ssrc> msid:` line.
                    if line.starts_with("a=msid:") {
                        named.push_str(&format!("a=msid:{publisher}|{track} {track}"));
                    } else if let Some((ssrc, _)) = line.strip_prefix("a=ssrc:").and_then(|rest| rest.split_once(" msid:")) {
                        named.push_str(&format!("a=ssrc:{ssrc} msid:{publisher}|{track} {track}"));
                    } else {
                        named.push_str(line);
                    }
                }
                (true, None) => {
                    if line == "a=sendonly" {
                        named.push_str("a=inactive");
                    } else if line.starts_with("a=msid:") || line.starts_with("a=ssrc:") || line.starts_with("a=ssrc-group:") {
                        continue;
                    } else {
                        named.push_str(line);
                    }
                }
                (false, _) => named.push_str(line),
            }
            named.push_str("\r\n");
        }
    }
    named
}

/// The lines of our answer we send on (the client's lines to receive on), with their kind.
fn sending_lines(answer: &str) -> Vec<(Mid, MediaKind)> {
    sections(answer)
        .skip(1)
        .filter(|section| section.contains(&"a=sendonly"))
        .filter_map(|section| {
            let kind = if section.first()?.starts_with("m=audio") { MediaKind::Audio } else if section.first()?.starts_with("m=video") { MediaKind::Video } else { return None };
            let mid = section.iter().find_map(|line| line.strip_prefix("a=mid:"))?;
            Some((Mid::from(mid), kind))
        })
        .collect()
}

impl Sfu {
    /// Our answer to a single connection's offer (`answer`, as str0m made it): the down tracks
    /// waiting bound to the spare lines of their kind, every line named or made inactive; and
    /// which track each named line carries (the answer's `mid_to_track_id`, which LiveKit's
    /// Rust SDK reads). Tracks left waiting ask for more lines ([`Self::ask_for_lines`]).
    pub(crate) fn bind_lines(&mut self, id: ParticipantId, answer: &str) -> (String, HashMap<String, String>) {
        let sids: HashMap<ParticipantId, String> = self.participants.iter().map(|(pid, p)| (*pid, p.info.sid.clone())).collect();
        let Some(participant) = self.participants.get_mut(&id) else { return (answer.to_owned(), HashMap::new()) };
        participant.lines.asked = false;
        participant.lines.answered = true;
        // The offer answered with these lines inactive is the one their stops waited for.
        participant.lines.retired.extend(participant.to_stop.drain(..));
        let bound: HashSet<Mid> = participant.down.iter().filter_map(|d| d.state.mid()).collect();
        let mut spare: Vec<(Mid, MediaKind)> = sending_lines(answer).into_iter().filter(|(mid, _)| !bound.contains(mid) && !participant.lines.retired.contains(mid)).collect();
        for down in participant.down.iter_mut().filter(|d| d.state == DownState::ToOpen) {
            let Some(at) = spare.iter().position(|(_, kind)| *kind == down.kind) else { continue };
            let (mid, _) = spare.remove(at);
            down.state = DownState::Open(mid);
            open_down_line(&mut participant.publisher, mid);
        }
        participant.lines.spare = spare;
        let carried: HashMap<String, (String, String)> =
            participant.down.iter().filter_map(|d| Some((d.state.mid()?.to_string(), (sids.get(&d.publisher)?.clone(), d.track_sid.clone())))).collect();
        if participant.down.iter().any(|d| d.state == DownState::ToOpen) {
            self.to_negotiate.insert(id);
        }
        self.dirty.insert((id, Pc::Publisher));
        let tracks = carried.iter().map(|(mid, (_, track))| (mid.clone(), track.clone())).collect();
        (name_lines(answer, &carried), tracks)
    }

    /// Asks a single connection's client for an offer, once at a time and not before its first
    /// was answered: with as many more lines to receive on as its waiting down tracks need
    /// beyond its spare ones (none, when an offer is all it takes: to bind spare lines, or to
    /// make stopped ones inactive).
    pub(crate) fn ask_for_lines(&mut self, id: ParticipantId) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        let waiting = |kind: MediaKind| participant.down.iter().filter(|d| d.state == DownState::ToOpen && d.kind == kind).count();
        let spare = |kind: MediaKind| participant.lines.spare.iter().filter(|(_, k)| *k == kind).count();
        if participant.lines.asked || !participant.lines.answered || (waiting(MediaKind::Audio) + waiting(MediaKind::Video) == 0 && participant.to_stop.is_empty()) {
            return;
        }
        let needed = |kind: MediaKind| u32::try_from(waiting(kind).saturating_sub(spare(kind))).unwrap_or(u32::MAX);
        let requirement = lk::MediaSectionsRequirement { num_audios: needed(MediaKind::Audio), num_videos: needed(MediaKind::Video) };
        participant.lines.asked = true;
        self.signals.push_back((id, response(lk::signal_response::Message::MediaSectionsRequirement(requirement))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1 2 3\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\na=msid:abc def\r\na=ssrc:11 cname:x\r\na=ssrc:11 msid:abc def\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\na=mid:1\r\na=sendonly\r\na=msid:ghi jkl\r\na=ssrc-group:FID 21 22\r\na=ssrc:21 msid:ghi jkl\r\na=ssrc:22 msid:ghi jkl\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\na=mid:2\r\na=recvonly\r\n\
        m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:3\r\n";

    #[test]
    fn lines_are_named_by_their_tracks_and_those_without_one_made_inactive() {
        let carried = HashMap::from([("0".to_owned(), ("PA_ana".to_owned(), "TR_mic".to_owned()))]);
        let named = name_lines(ANSWER, &carried);
        let section = |mid: &str| named.split("m=").find(|s| s.contains(&format!("a=mid:{mid}\r\n"))).unwrap().to_owned();
        assert!(section("0").contains("a=sendonly\r\na=msid:PA_ana|TR_mic TR_mic\r\n") && section("0").contains("a=ssrc:11 msid:PA_ana|TR_mic TR_mic\r\n"), "{named}");
        assert!(section("0").contains("a=ssrc:11 cname:x\r\n"));
        assert!(section("1").contains("a=inactive\r\n") && !section("1").contains("sendonly") && !section("1").contains("ssrc") && !section("1").contains("msid"), "{named}");
        assert!(section("2").contains("a=recvonly\r\n"), "a line we receive on is left alone");
        assert!(named.starts_with("v=0\r\n") && named.contains("a=group:BUNDLE 0 1 2 3\r\n") && named.ends_with("a=mid:3\r\n"));
        assert_eq!(sending_lines(ANSWER), [(Mid::from("0"), MediaKind::Audio), (Mid::from("1"), MediaKind::Video)]);
    }

    #[test]
    fn an_offers_lines_are_counted_by_what_the_client_does_on_them() {
        let offer = ANSWER.replace("a=sendonly", "a=recvonly").replacen("a=recvonly", "a=sendonly", 1);
        assert_eq!(count_lines(&offer), LineCount { sending: 1, receiving: 2, data: 1 });
    }
}
