//! LiveKit's signalling requests of one participant: offers and answers of their peer
//! connections, trickled candidates, tracks, mutes, subscriptions, and renegotiation.

use super::*;

impl Sfu {
    pub(crate) fn publisher_offer(&mut self, id: ParticipantId, offer: lk::SessionDescription) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        // A media line per track, and one for data: counted before the offer is parsed. A
        // single connection's lines to receive on have their own bound.
        let counted = single::count_lines(&offer.sdp);
        let (media_lines, data_lines) = if participant.single() { (counted.sending, counted.data) } else { (counted.sending + counted.receiving, counted.data) };
        if media_lines > self.limits.tracks_per_participant || data_lines > 1 || (participant.single() && counted.receiving > single::RECEIVING_LINES_MAX) {
            tracing::info!(participant = id, media_lines, data_lines, receiving = counted.receiving, "refused a publisher offer with more media lines than allowed");
            return;
        }
        let parsed = match SdpOffer::from_sdp_string(&offer.sdp) {
            Ok(parsed) => parsed,
            Err(error) => {
                tracing::info!(participant = id, %error, "an unreadable publisher offer");
                return;
            }
        };
        let single = participant.single();
        match participant.publisher.sdp_api().accept_offer(parsed) {
            Ok(answer) => {
                let (sdp, mid_to_track_id) = if single { self.bind_lines(id, &answer.to_sdp_string()) } else { (answer.to_sdp_string(), HashMap::new()) };
                let answer = lk::SessionDescription { r#type: "answer".to_owned(), sdp, id: offer.id, mid_to_track_id };
                self.signals.push_back((id, response(lk::signal_response::Message::Answer(answer))));
            }
            Err(error) => tracing::info!(participant = id, %error, "a publisher offer was refused"),
        }
    }

    pub(crate) fn subscriber_answer(&mut self, id: ParticipantId, answer: &lk::SessionDescription) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        // A single connection's client answers nothing: it always offers.
        let Some(subscriber) = participant.subscriber.as_mut() else { return };
        let Some(pending) = participant.subscriber_pending.take() else { return };
        let accepted = SdpAnswer::from_sdp_string(&answer.sdp).map_err(|e| e.to_string()).and_then(|parsed| subscriber.sdp_api().accept_answer(pending, parsed).map_err(|e| e.to_string()));
        match accepted {
            Ok(()) => {
                for down in &mut participant.down {
                    if let DownState::Negotiating(mid) = down.state {
                        down.state = DownState::Open(mid);
                        open_down_line(subscriber, mid);
                    }
                }
                if !participant.to_stop.is_empty() || participant.down.iter().any(|d| d.state == DownState::ToOpen) {
                    self.to_negotiate.insert(id);
                }
            }
            Err(error) => tracing::info!(participant = id, %error, "a subscriber answer was refused"),
        }
    }

    pub(crate) fn trickle(&mut self, id: ParticipantId, trickle: &lk::TrickleRequest) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        let Ok(init) = serde_json::from_str::<serde_json::Value>(&trickle.candidate_init) else { return };
        let Some(line) = init.get("candidate").and_then(serde_json::Value::as_str).filter(|c| !c.is_empty()) else { return };
        let Ok(candidate) = Candidate::from_sdp_string(line) else { return };
        let pc = if trickle.target == lk::SignalTarget::Subscriber as i32 { Pc::Subscriber } else { Pc::Publisher };
        participant.rtc(pc).add_remote_candidate(candidate);
    }

    // `simulcast`, `layers` and `disable_dtx` are deprecated in LiveKit's protocol, but its
    // SDKs still send and read them (the Python SDK's `set_video_quality` needs `simulcast`).
    #[allow(deprecated)]
    pub(crate) fn add_track(&mut self, id: ParticipantId, add: lk::AddTrackRequest) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        if !participant.rights.publish {
            tracing::info!(participant = id, "refused a track of a participant who may not publish");
            return;
        }
        if participant.tracks.len() >= self.limits.tracks_per_participant {
            tracing::info!(participant = id, "refused a track beyond the limit");
            // LiveKit's answer to a track over its limits.
            let refusal = lk::RequestResponse {
                reason: lk::request_response::Reason::LimitExceeded as i32,
                message: format!("a participant publishes at most {} tracks", self.limits.tracks_per_participant),
                request: Some(lk::request_response::Request::AddTrack(add)),
                ..Default::default()
            };
            self.signals.push_back((id, response(lk::signal_response::Message::RequestResponse(refusal))));
            return;
        }
        let simulcast = add.layers.len() > 1 || !add.simulcast_codecs.is_empty();
        let info = lk::TrackInfo {
            sid: random_sid("TR_"),
            r#type: add.r#type,
            name: add.name.clone(),
            muted: add.muted,
            width: add.width,
            height: add.height,
            simulcast,
            disable_dtx: add.disable_dtx,
            source: add.source,
            layers: add.layers.clone(),
            stream: add.stream.clone(),
            ..Default::default()
        };
        participant.tracks.push(Published { info: info.clone(), cid: add.cid.clone(), mid: None, last_keyframe_request: None, level: 0.0, layers: HashMap::new(), dynacast: Dynacast::default() });
        let published = lk::TrackPublishedResponse { cid: add.cid, track: Some(info) };
        self.signals.push_back((id, response(lk::signal_response::Message::TrackPublished(published))));
    }

    pub(crate) fn mute(&mut self, id: ParticipantId, mute: &lk::MuteTrackRequest) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        let Some(track) = participant.tracks.iter_mut().find(|t| t.info.sid == mute.sid) else { return };
        if track.info.muted == mute.muted {
            return;
        }
        track.info.muted = mute.muted;
        participant.bump_version();
        self.broadcast_update(id);
    }

    pub(crate) fn subscription(&mut self, now: Instant, id: ParticipantId, update: &lk::UpdateSubscription) {
        let wanted: Vec<&String> = update.track_sids.iter().chain(update.participant_tracks.iter().flat_map(|p| p.track_sids.iter())).collect();
        if update.subscribe {
            let Some(room) = self.participants.get(&id).map(|p| p.room.as_str()) else { return };
            let found: Vec<(ParticipantId, String, MediaKind)> = wanted
                .iter()
                .filter_map(|sid| self.find_track(room, sid).map(|(publisher, kind)| (publisher, (*sid).clone(), kind)))
                .collect();
            let Some(participant) = self.participants.get_mut(&id) else { return };
            if !participant.rights.subscribe {
                return;
            }
            for (publisher, track_sid, kind) in found {
                if publisher != id && !participant.down.iter().any(|d| d.track_sid == track_sid) {
                    participant.down.push(DownTrack::new(publisher, track_sid, kind));
                    self.to_negotiate.insert(id);
                }
            }
        } else {
            let Some(participant) = self.participants.get_mut(&id) else { return };
            let stopped: Vec<Mid> = participant.down.iter().filter(|d| wanted.contains(&&d.track_sid)).filter_map(|d| d.state.mid()).collect();
            participant.down.retain(|d| !wanted.contains(&&d.track_sid));
            self.stop_media(now, id, &stopped);
        }
    }

    /// A subscriber's wish for the quality of video tracks it gets (or to pause them).
    pub(crate) fn track_settings(&mut self, id: ParticipantId, settings: &lk::UpdateTrackSettings) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        let wanted = if settings.disabled { lk::VideoQuality::Off as i32 } else { settings.quality };
        for down in participant.down.iter_mut().filter(|d| settings.track_sids.contains(&d.track_sid)) {
            down.layers.wanted = wanted;
        }
    }

    /// The publisher and kind of a track published in the SFU room `room`: a track id learnt
    /// elsewhere (another call, an earlier one) reaches no track of another room.
    pub(crate) fn find_track(&self, room: &str, track_sid: &str) -> Option<(ParticipantId, MediaKind)> {
        self.participants
            .iter()
            .filter(|(_, p)| p.room == room)
            .find_map(|(id, p)| p.tracks.iter().find(|t| t.info.sid == track_sid && t.mid.is_some()).map(|t| (*id, kind_of(&t.info))))
    }

    /// Removes media lines from a participant's subscriber connection, with its next offer.
    pub(crate) fn stop_media(&mut self, _now: Instant, id: ParticipantId, mids: &[Mid]) {
        let Some(participant) = self.participants.get_mut(&id) else { return };
        if !mids.is_empty() {
            participant.to_stop.extend_from_slice(mids);
            self.to_negotiate.insert(id);
        }
    }

    /// Tells the others in the room the participant's current state.
    pub(crate) fn broadcast_update(&mut self, id: ParticipantId) {
        let Some(participant) = self.participants.get(&id) else { return };
        let info = participant.public_info();
        let room = participant.room.clone();
        let update = response(lk::signal_response::Message::Update(lk::ParticipantUpdate { participants: vec![info] }));
        for (other, p) in &self.participants {
            if *other != id && p.room == room {
                self.signals.push_back((*other, update.clone()));
            }
        }
    }

    /// What LiveKit's SDKs are told of an SFU room: its ids, when it opened, who is in it, and
    /// whether it is recorded (`active_recording`: SDKs show it, e.g. `Room.isRecording` and the
    /// `RecordingStatusChanged` event of the JS SDK).
    pub(crate) fn room_info(&self, room: &str) -> lk::Room {
        let members: Vec<&Participant> = self.participants.values().filter(|p| p.room == room).collect();
        let opened = self.opened.get(room).copied().unwrap_or_else(now_ms);
        lk::Room {
            sid: format!("RM_{}", room_sid(room)),
            name: room.to_owned(),
            num_participants: members.len() as u32,
            num_publishers: members.iter().filter(|p| p.tracks.iter().any(|t| t.mid.is_some())).count() as u32,
            active_recording: self.recordings.contains_key(room),
            creation_time: opened / 1000,
            creation_time_ms: opened,
            ..Default::default()
        }
    }

    /// Tells everyone in `room` what it now is (LiveKit's `room_update`).
    pub(crate) fn announce_room(&mut self, room: &str) {
        let update = response(lk::signal_response::Message::RoomUpdate(lk::RoomUpdate { room: Some(self.room_info(room)) }));
        for (id, participant) in &self.participants {
            if participant.room == room {
                self.signals.push_back((*id, update.clone()));
            }
        }
    }

    /// Offers the subscriber connection what changed: down tracks waiting for it, media lines
    /// to remove. One offer at a time; what comes meanwhile waits for the answer. A single
    /// connection's client is asked for an offer instead.
    pub(crate) fn negotiate(&mut self, id: ParticipantId) {
        if self.participants.get(&id).is_some_and(Participant::single) {
            self.ask_for_lines(id);
            return;
        }
        let sids: HashMap<ParticipantId, String> = self.participants.iter().map(|(pid, p)| (*pid, p.info.sid.clone())).collect();
        let Some(participant) = self.participants.get_mut(&id) else { return };
        let Some(subscriber) = participant.subscriber.as_mut() else { return };
        let channels_due = participant.subscriber_channels.is_none() && self.data_rooms.contains(&participant.room);
        let changes_due = channels_due || participant.ice_restart_due || !participant.to_stop.is_empty() || participant.down.iter().any(|d| d.state == DownState::ToOpen);
        if participant.subscriber_pending.is_some() || !changes_due {
            return;
        }
        let mut changes = subscriber.sdp_api();
        if std::mem::take(&mut participant.ice_restart_due) {
            changes.ice_restart(true);
        }
        let channels = channels_due.then(|| {
            let reliable = changes.add_channel_with_config(ChannelConfig { label: RELIABLE.to_owned(), ordered: true, ..Default::default() });
            let lossy = changes.add_channel_with_config(ChannelConfig { label: LOSSY.to_owned(), ordered: false, reliability: Reliability::MaxRetransmits { retransmits: 0 }, ..Default::default() });
            HashMap::from([(RELIABLE, reliable), (LOSSY, lossy)])
        });
        for mid in participant.to_stop.drain(..) {
            if participant.bundle_tag == Some(mid) {
                changes.set_direction(mid, Direction::Inactive);
            } else {
                changes.stop_media(mid);
            }
        }
        let mut added = Vec::new();
        let offer_id = participant.next_offer_id;
        for (index, down) in participant.down.iter().enumerate().filter(|(_, d)| d.state == DownState::ToOpen) {
            // LiveKit's SDKs read the publisher's and the track's sids from the stream id. The
            // track id names the media line: an inactive line keeps its `msid`, and WebRTC
            // refuses an offer in which two lines have the same.
            let stream = format!("{}|{}", sids.get(&down.publisher).map_or("", String::as_str), down.track_sid);
            let track = format!("{}-{offer_id}", down.track_sid);
            added.push((index, changes.add_media(down.kind, Direction::SendOnly, Some(stream), Some(track), None)));
        }
        let Some((offer, pending)) = changes.apply() else { return };
        self.dirty.insert((id, Pc::Subscriber));
        if channels.is_some() {
            participant.subscriber_channels = channels;
        }
        if participant.last_offer.is_none() && participant.subscriber_channels.is_none() {
            participant.bundle_tag = added.first().map(|(_, mid)| *mid);
        }
        for (index, mid) in added {
            participant.down[index].state = DownState::Negotiating(mid);
        }
        participant.subscriber_pending = Some(pending);
        participant.next_offer_id += 1;
        let offer = lk::SessionDescription { r#type: "offer".to_owned(), sdp: offer.to_sdp_string(), id: offer_id, ..Default::default() };
        participant.last_offer = Some(offer.clone());
        self.signals.push_back((id, response(lk::signal_response::Message::Offer(offer))));
    }
}

/// A down track's media line: it keeps what NACKs may ask for again ([`RTX_HISTORY`]), and
/// sends each packet as it comes, video too. The publisher paced its packets already; held in
/// str0m's pacer at the subscriber's estimate (which lags a link that narrows), video queued
/// for up to two seconds, and after a switch to a lower layer its keyframe waited behind the
/// old layer's packets: the picture stopped for seconds. Sent at once, what a narrowed link
/// cannot carry is lost instead, which brings the estimate down sooner, and the lower layer's
/// keyframe goes out as soon as it comes.
pub(crate) fn open_down_line(rtc: &mut Rtc, mid: Mid) {
    if let Some(stream) = rtc.direct_api().stream_tx_by_mid(mid, None) {
        stream.set_rtx_cache(RTX_MAX_PACKETS, RTX_HISTORY, RTX_RATIO_CAP);
        stream.set_unpaced(true);
    }
}
