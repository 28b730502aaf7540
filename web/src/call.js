// Camera and microphone, and the call through Limbic's built-in SFU with LiveKit's JavaScript
// client: connecting, publishing, the video tiles, moderation (LiveKit's RoomService) and the
// receive statistics the browser test reads.

import {
  DisconnectReason,
  Room,
  RoomEvent,
  Track,
  VideoPresets,
  createLocalAudioTrack,
  createLocalVideoTrack,
} from 'livekit-client';

import { jwtClaims } from './matrix.js';
import { el } from './ui.js';

const CAMERA = { resolution: VideoPresets.h540.resolution };

/** What went wrong getting a device: `denied` (permission), `missing` (none), `busy`, `other`. */
export function mediaProblem(error) {
  switch (error?.name) {
    case 'NotAllowedError':
    case 'SecurityError':
    case 'PermissionDeniedError':
      return 'denied';
    case 'NotFoundError':
    case 'OverconstrainedError':
    case 'DevicesNotFoundError':
      return 'missing';
    case 'NotReadableError':
    case 'AbortError':
      return 'busy';
    default:
      return 'other';
  }
}

/**
 * The camera and microphone tracks: acquired before the call for the preview, then published
 * as they are, so the user is asked for permission once and keeps the devices they chose.
 */
export class LocalMedia {
  constructor() {
    this.audio = null;
    this.video = null;
  }

  /** Gets the tracks asked for that are not there yet; returns the error of each that failed. */
  async acquire({ audio = true, video = true } = {}) {
    const failures = {};
    // One at a time, so that a refused camera still leaves the microphone (and the other way).
    if (audio && !this.audio) {
      try { this.audio = await createLocalAudioTrack({ echoCancellation: true, noiseSuppression: true }); }
      catch (error) { failures.audio = error; }
    }
    if (video && !this.video) {
      try { this.video = await createLocalVideoTrack(CAMERA); }
      catch (error) { failures.video = error; }
    }
    return failures;
  }

  /** Inputs by kind, labelled once permission is given. */
  async devices() {
    const all = await navigator.mediaDevices.enumerateDevices();
    return {
      audioinput: all.filter((d) => d.kind === 'audioinput' && d.deviceId),
      videoinput: all.filter((d) => d.kind === 'videoinput' && d.deviceId),
    };
  }

  currentDevice(kind) {
    const track = kind === 'audioinput' ? this.audio : this.video;
    return track?.mediaStreamTrack?.getSettings().deviceId ?? null;
  }

  /** Switches a track to another device; a published track goes on with the new one. */
  async useDevice(kind, deviceId) {
    const track = kind === 'audioinput' ? this.audio : this.video;
    if (track) await track.restartTrack({ ...(kind === 'videoinput' ? CAMERA : {}), deviceId: { exact: deviceId } });
  }

  stop() {
    this.audio?.stop();
    this.video?.stop();
    this.audio = null;
    this.video = null;
  }
}

/**
 * One participation in the session's call. `events` receives the call's news for the page:
 * {type: 'joined'|'left'|'speaker', name}, {type: 'muted-by-moderator'}, {type: 'local-changed'},
 * {type: 'audio-blocked', blocked}, {type: 'moderated'|'moderation-failed', message} and
 * {type: 'disconnected', removed}.
 */
export class Call {
  constructor({ matrix, roomId, media, tiles, audioSink, moderator, events }) {
    this.matrix = matrix;
    this.roomId = roomId;
    this.media = media;
    this.tilesElement = tiles;
    this.audioSink = audioSink;
    this.moderator = moderator;
    this.events = events;
    this.tiles = new Map(); // key -> {element, video, participant, screen}
    this.raisedHands = new Set();
    this.userOf = () => null;
    this.room = null;
    this.token = null;
    this.sfuRoom = null;
    this.leaving = false;
    this.mutingSelf = false; // tells our own mute from a moderator's
  }

  async connect() {
    const openIdToken = await this.matrix.openIdToken();
    const { url, jwt } = await this.matrix.callToken(this.roomId, openIdToken);
    this.token = jwt;
    // RoomService requests name the SFU room, which only the call token knows.
    this.sfuRoom = jwtClaims(jwt)?.video?.room ?? null;

    const room = new Room({
      // The SFU sends none of the quality updates that adaptive streams and dynacast react
      // to, so both stay off: every subscriber asks for the best layer its bandwidth allows.
      adaptiveStream: false,
      dynacast: false,
      publishDefaults: {
        videoCodec: 'vp8', // what the SFU forwards (with Opus)
        red: false, // plain Opus
        simulcast: true,
        videoSimulcastLayers: [VideoPresets.h180, VideoPresets.h360],
      },
    });
    this.room = room;
    this.wire(room);
    await room.connect(url, jwt, { autoSubscribe: true });

    const local = room.localParticipant;
    this.renderTile(local);
    for (const participant of room.remoteParticipants.values()) this.renderTile(participant);
    // Observers may only watch and listen.
    if (local.permissions?.canPublish !== false) {
      if (this.media.audio) await local.publishTrack(this.media.audio);
      if (this.media.video) await local.publishTrack(this.media.video);
    }
    this.renderTile(local);
    this.events({ type: 'audio-blocked', blocked: !room.canPlaybackAudio });
  }

  wire(room) {
    room
      .on(RoomEvent.ParticipantConnected, (participant) => {
        this.renderTile(participant);
        this.events({ type: 'joined', name: displayName(participant) });
      })
      .on(RoomEvent.ParticipantDisconnected, (participant) => {
        this.removeTiles(participant);
        this.events({ type: 'left', name: displayName(participant) });
      })
      .on(RoomEvent.TrackPublished, (_publication, participant) => this.renderTile(participant))
      .on(RoomEvent.TrackSubscribed, (track, _publication, participant) => {
        if (track.kind === Track.Kind.Audio) this.audioSink.append(track.attach());
        this.renderTile(participant);
      })
      .on(RoomEvent.TrackUnsubscribed, (track, _publication, participant) => {
        track.detach().forEach((element) => { if (element.parentElement === this.audioSink) element.remove(); });
        this.renderTile(participant);
      })
      .on(RoomEvent.TrackMuted, (publication, participant) => {
        this.renderTile(participant);
        if (participant === room.localParticipant) {
          if (publication.source === Track.Source.Microphone && !this.mutingSelf) this.events({ type: 'muted-by-moderator' });
          this.events({ type: 'local-changed' });
        }
      })
      .on(RoomEvent.TrackUnmuted, (_publication, participant) => {
        this.renderTile(participant);
        if (participant === room.localParticipant) this.events({ type: 'local-changed' });
      })
      .on(RoomEvent.LocalTrackPublished, (publication) => {
        // Tracks the SDK created itself (a camera turned on without a preview) become ours.
        if (publication.source === Track.Source.Microphone) this.media.audio = publication.track;
        if (publication.source === Track.Source.Camera) this.media.video = publication.track;
        this.renderTile(room.localParticipant);
        this.events({ type: 'local-changed' });
      })
      .on(RoomEvent.LocalTrackUnpublished, () => {
        this.renderTile(room.localParticipant);
        this.events({ type: 'local-changed' });
      })
      .on(RoomEvent.ActiveSpeakersChanged, (speakers) => {
        for (const tile of this.tiles.values()) {
          tile.element.classList.toggle('speaking', speakers.includes(tile.participant) && !tile.screen);
        }
        const loudest = speakers.find((p) => p !== room.localParticipant);
        if (loudest) this.events({ type: 'speaker', name: displayName(loudest) });
      })
      .on(RoomEvent.AudioPlaybackStatusChanged, () => this.events({ type: 'audio-blocked', blocked: !room.canPlaybackAudio }))
      .on(RoomEvent.Disconnected, (reason) => {
        for (const participant of [room.localParticipant, ...room.remoteParticipants.values()]) this.removeTiles(participant);
        this.audioSink.replaceChildren();
        if (!this.leaving) this.events({ type: 'disconnected', removed: reason === DisconnectReason.PARTICIPANT_REMOVED });
      });
  }

  startAudio() { return this.room?.startAudio(); }

  get micEnabled() { return !!this.room?.localParticipant.isMicrophoneEnabled; }
  get cameraEnabled() { return !!this.room?.localParticipant.isCameraEnabled; }
  get screenSharing() { return !!this.room?.localParticipant.isScreenShareEnabled; }

  async setMic(enabled) {
    this.mutingSelf = true;
    try { await this.room.localParticipant.setMicrophoneEnabled(enabled); }
    finally { this.mutingSelf = false; }
  }

  async setCamera(enabled) {
    await this.room.localParticipant.setCameraEnabled(enabled, CAMERA);
  }

  async setScreenShare(enabled) {
    const local = this.room.localParticipant;
    if (!enabled) {
      // The SFU does not tell others about unpublished tracks, so mute first: they see the
      // share stop instead of its last frame.
      await local.getTrackPublication(Track.Source.ScreenShare)?.mute();
    }
    await local.setScreenShareEnabled(enabled, { audio: false });
  }

  async leave() {
    this.leaving = true;
    await this.room?.disconnect();
  }

  /** LiveKit RoomService, with the therapist's own call token (it carries `roomAdmin`). */
  async roomService(method, body) {
    const response = await fetch(`/twirp/livekit.RoomService/${method}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${this.token}` },
      body: JSON.stringify({ room: this.sfuRoom, ...body }),
    });
    if (!response.ok) {
      const answer = await response.json().catch(() => ({}));
      throw new Error(answer.msg || `the server answered HTTP ${response.status}`);
    }
  }

  async muteParticipant(participant) {
    const microphone = participant.getTrackPublication(Track.Source.Microphone);
    if (!microphone) return;
    await this.roomService('MutePublishedTrack', { identity: participant.identity, trackSid: microphone.trackSid, muted: true });
  }

  removeParticipant(participant) {
    return this.roomService('RemoveParticipant', { identity: participant.identity });
  }

  /** Video frames decoded from each other participant (inbound-rtp `framesDecoded`). */
  async videoStats() {
    const participants = [];
    for (const participant of this.room?.remoteParticipants.values() ?? []) {
      let framesDecoded = 0;
      for (const publication of participant.videoTrackPublications.values()) {
        const report = await publication.track?.getRTCStatsReport();
        report?.forEach((stat) => {
          if (stat.type === 'inbound-rtp' && stat.kind === 'video') framesDecoded += stat.framesDecoded ?? 0;
        });
      }
      participants.push({ name: displayName(participant), framesDecoded });
    }
    return { framesDecoded: participants.reduce((sum, p) => sum + p.framesDecoded, 0), participants };
  }

  /** Which participants have a raised hand: Matrix user ids, mapped to participants by `userOf`. */
  setRaisedHands(userIds, userOf) {
    this.raisedHands = new Set(userIds);
    this.userOf = userOf;
    for (const tile of this.tiles.values()) this.updateTile(tile);
  }

  // --- tiles -----------------------------------------------------------------------------

  renderTile(participant) {
    if (!this.room) return;
    this.ensureTile(participant, false);
    const screen = participant.getTrackPublication(Track.Source.ScreenShare);
    if (screen?.track && !screen.isMuted) this.ensureTile(participant, true);
    else this.dropTile(tileKey(participant, true));
  }

  ensureTile(participant, screen) {
    const key = tileKey(participant, screen);
    let tile = this.tiles.get(key);
    if (!tile) {
      tile = this.createTile(participant, screen);
      this.tiles.set(key, tile);
      this.tilesElement.append(tile.element);
    }
    this.updateTile(tile);
  }

  createTile(participant, screen) {
    const local = participant === this.room.localParticipant;
    const name = displayName(participant);
    const video = el('video', {
      class: local && !screen ? 'mirrored' : null,
      'data-testid': local ? 'local-video' : 'remote-video',
      autoplay: true,
      playsinline: true,
      muted: true,
      'aria-hidden': 'true',
    });
    video.muted = true; // the attribute alone does not mute; sound plays through the audio sink
    const label = screen ? `${name}'s screen` : local ? `${name} (you)` : name;
    const placeholder = el('div', { class: 'tile-placeholder', 'aria-hidden': 'true', text: name.slice(0, 1).toUpperCase() });
    const micOff = el('span', { class: 'badge', 'data-testid': 'mic-muted', text: 'Microphone off', hidden: true });
    const hand = el('span', { class: 'badge badge-hand', 'data-testid': 'hand-raised', text: 'Hand raised', hidden: true });
    const caption = el('div', { class: 'tile-caption' }, el('span', { class: 'tile-name', text: label }), screen ? null : micOff, screen ? null : hand);
    const element = el('li', {
      class: screen ? 'tile tile-screen' : 'tile',
      'data-testid': screen ? 'tile-screen' : local ? 'tile-local' : 'tile-remote',
      'data-participant': name,
      'aria-label': label,
    }, video, placeholder, caption);
    if (this.moderator && !local && !screen) {
      const mute = el('button', {
        type: 'button', class: 'button button-small', 'data-testid': 'mute-participant',
        'aria-label': `Mute ${name}'s microphone`, text: 'Mute',
        onclick: () => this.moderate(() => this.muteParticipant(participant), `You muted ${name}.`),
      });
      const remove = el('button', {
        type: 'button', class: 'button button-small button-danger', 'data-testid': 'remove-participant',
        'aria-label': `Remove ${name} from the call`, text: 'Remove',
        onclick: () => {
          if (window.confirm(`Remove ${name} from the call? They can rejoin with their link's page.`)) {
            this.moderate(() => this.removeParticipant(participant), `You removed ${name} from the call.`);
          }
        },
      });
      element.append(el('div', { class: 'tile-actions' }, mute, remove));
    }
    return { element, video, placeholder, micOff, hand, participant, screen, attached: null };
  }

  async moderate(action, done) {
    try {
      await action();
      this.events({ type: 'moderated', message: done });
    } catch (error) {
      this.events({ type: 'moderation-failed', message: error.message });
    }
  }

  updateTile(tile) {
    const { participant, screen } = tile;
    const source = screen ? Track.Source.ScreenShare : Track.Source.Camera;
    const publication = participant.getTrackPublication(source);
    const track = publication?.track && !publication.isMuted ? publication.track : null;
    if (track !== tile.attached) {
      tile.attached?.detach(tile.video);
      if (track) track.attach(tile.video);
      tile.attached = track;
    }
    tile.element.classList.toggle('video-off', !track);
    if (!screen) {
      const microphone = participant.getTrackPublication(Track.Source.Microphone);
      tile.micOff.hidden = !!microphone && !microphone.isMuted;
      tile.hand.hidden = !this.raisedHands.has(this.userOf(participant));
      const mute = tile.element.querySelector('[data-testid="mute-participant"]');
      if (mute) mute.disabled = !tile.micOff.hidden; // muted already (participants unmute themselves)
    }
  }

  removeTiles(participant) {
    this.dropTile(tileKey(participant, false));
    this.dropTile(tileKey(participant, true));
  }

  dropTile(key) {
    const tile = this.tiles.get(key);
    if (!tile) return;
    tile.attached?.detach(tile.video);
    tile.element.remove();
    this.tiles.delete(key);
  }
}

function displayName(participant) {
  return participant.name || participant.identity;
}

function tileKey(participant, screen) {
  return `${participant.identity}${screen ? '\u0000screen' : ''}`;
}
