//! Calls: who may join which call with what rights, and the LiveKit-format access tokens
//! (HS256 JWTs) that carry it to the built-in SFU.
//!
//! A call belongs to a Matrix room. Anyone joined to the room may join its call; in a therapy
//! session (or one of its breakout rooms) only while the session is open or in progress, with
//! rights from the session role: observers only listen and watch, clients also publish,
//! therapists also mute and remove others and record. The rights are checked again whenever a
//! token is used ([`still_allowed`]), and [`warden`] drops participants whose rights end.

pub mod media;
pub mod recording;
pub mod placement;
pub mod spool;
pub mod turn;
pub mod warden;

/// The SFU core: a crate of its own, which knows nothing of Matrix.
pub use limbic_sfu as sfu;
pub use limbic_sfu::Rights;

use std::sync::{Arc, OnceLock};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ruma::{OwnedRoomId, RoomId, UserId};
use serde::{Deserialize, Serialize};

use crate::{
    clinic::{BREAKOUT, Role, SESSION, Status, session_role},
    config::{CallsConfig, DATA_PACKET_MIN_COST, ListenConfig, RateLimit, VoipConfig},
    error::{Error, ErrorCode, Result},
    rooms::Rooms,
    store::Store,
};

/// What recordings and the warden reach of the server: with the rooms and the local send path,
/// this service (its SFU) and the media store recordings are uploaded to.
pub trait CallsHost: crate::host::LocalServer {
    fn calls(&self) -> &Calls;
    fn media(&self) -> &crate::media::Media;
}

const SECRET_KEY: &[u8] = b"calls_api_secret";

/// Where this server serves the token service (`/sfu/get`, `/get_token`).
pub const SERVICE_PATH: &str = "/_limbic/calls";

/// What a session role may do in a call.
fn rights_of(role: Role) -> Rights {
    match role {
        Role::Therapist | Role::CoTherapist => Rights { publish: true, subscribe: true, moderate: true, record: true },
        Role::Client => Rights { publish: true, subscribe: true, moderate: false, record: false },
        Role::Observer => Rights { publish: false, subscribe: true, moderate: false, record: false },
    }
}

/// The SFU's limits from `[calls]`.
pub fn sfu_limits(config: &CallsConfig) -> sfu::Limits {
    sfu::Limits {
        participants_per_call: config.max_participants_per_call,
        tracks_per_participant: config.max_tracks_per_participant,
        data_channels: config.max_data_channels,
        data_packet_bytes: config.max_data_packet_bytes,
        data_rate: sfu_rate(config.data_rate),
        data_packet_min_cost: DATA_PACKET_MIN_COST,
    }
}

pub fn sfu_rate(limit: RateLimit) -> sfu::Rate {
    sfu::Rate { per_second: limit.per_second, burst: limit.burst }
}

/// LiveKit's video grant, as its SDKs and servers spell it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VideoGrant {
    pub room_join: bool,
    pub room: String,
    pub can_publish: bool,
    pub can_subscribe: bool,
    pub can_publish_data: bool,
    #[serde(default)]
    pub room_admin: bool,
    #[serde(default)]
    pub room_record: bool,
}

/// The claims of a call token: LiveKit's, plus the Matrix room the call belongs to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub iss: String,
    /// The participant identity.
    pub sub: String,
    pub nbf: u64,
    pub exp: u64,
    #[serde(default)]
    pub name: String,
    pub video: VideoGrant,
    #[serde(rename = "org.limbic.room_id")]
    pub matrix_room: OwnedRoomId,
    #[serde(rename = "org.limbic.user_id")]
    pub matrix_user: String,
    /// The node whose SFU serves the call, when nodes share the database.
    #[serde(rename = "org.limbic.node", default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Claims {
    pub fn rights(&self) -> Rights {
        Rights {
            publish: self.video.can_publish,
            subscribe: self.video.can_subscribe,
            moderate: self.video.room_admin,
            record: self.video.room_record,
        }
    }

    /// What the SFU admits the holder to.
    pub fn grant(&self) -> sfu::Grant {
        sfu::Grant {
            room: self.video.room.clone(),
            identity: self.sub.clone(),
            name: self.name.clone(),
            app_room: self.matrix_room.to_string(),
            app_user: self.matrix_user.clone(),
            rights: self.rights(),
            publish_data: self.video.can_publish_data,
        }
    }
}

/// A participant admitted to a call, before it becomes a token.
pub struct Admission {
    pub identity: String,
    pub display_name: String,
    pub user_id: String,
    pub matrix_room: OwnedRoomId,
    /// The SFU room, named by the token service's rules.
    pub sfu_room: String,
    pub rights: Rights,
    /// The node the call is placed on ([`placement`]).
    pub node: Option<String>,
}

pub struct Calls {
    pub config: CallsConfig,
    /// Where clients get call tokens (MatrixRTC's `livekit_service_url`).
    pub service_url: String,
    /// Where LiveKit clients open the signalling WebSocket.
    pub signalling_url: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// The running SFU, once the server serves.
    pub sfu: OnceLock<media::SfuHandle>,
    /// TURN credentials, for `/voip/turnServer` and the SFU's join response.
    pub turn: turn::Turn,
    /// Recordings on disk while they are made; held while what the SFU made is written, so that
    /// pieces of a file are appended in the order they were taken.
    pub spool: tokio::sync::Mutex<spool::Spool>,
    /// Where each node's recordings are made, when nodes share the database (and the media
    /// directory): a directory per node under it.
    recordings: std::path::PathBuf,
    /// Which node serves which call.
    pub placements: placement::Placements,
}

impl Calls {
    /// The URLs default to the client listener's address. Recordings being made are written
    /// under `recordings` (in a directory named after `node` when nodes share the store).
    pub fn open(store: &Arc<Store>, config: CallsConfig, voip: &VoipConfig, listen: &ListenConfig, recordings: &std::path::Path, node: &str) -> Result<Self> {
        let secret = store.secret(SECRET_KEY, &config.api_secret)?;
        let or_listener = |configured: &str, default: String| if configured.is_empty() { default } else { configured.trim_end_matches('/').to_owned() };
        if store.is_shared() && config.enabled && config.signalling_url.is_empty() && listen.address.is_unspecified() {
            // Another node would send callers, and pass requests, to an address that is none.
            return Err(Error::internal(format!(
                "[calls] signalling_url must name this node's own address when nodes share a database and [listen] address is {}",
                listen.address
            )));
        }
        let signalling_url = or_listener(&config.signalling_url, format!("ws://{}:{}", listen.address, listen.port));
        let placements = placement::Placements::new(store.clone(), node, signalling_url.clone());
        let spool = spool_at(&placements.node().map_or_else(|| recordings.to_owned(), |node| recordings.join(node)))?;
        Ok(Self {
            service_url: or_listener(&config.service_url, format!("http://{}:{}{SERVICE_PATH}", listen.address, listen.port)),
            signalling_url,
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            config,
            sfu: OnceLock::new(),
            turn: turn::Turn::open(store, voip)?,
            spool: tokio::sync::Mutex::new(spool),
            recordings: recordings.to_owned(),
            placements,
        })
    }

    /// Where `node` made its recordings (another node, whose calls this one takes over).
    pub fn spool_of(&self, node: &str) -> Result<spool::Spool> {
        spool_at(&self.recordings.join(node))
    }

    /// The token for `admission`, valid from now for the configured lifetime.
    pub fn issue(&self, admission: Admission, now_seconds: u64) -> Result<String> {
        let rights = admission.rights;
        let claims = Claims {
            iss: self.config.api_key.clone(),
            sub: admission.identity,
            nbf: now_seconds,
            exp: now_seconds + self.config.token_lifetime_seconds,
            name: admission.display_name,
            video: VideoGrant {
                room_join: true,
                room: admission.sfu_room,
                can_publish: rights.publish,
                can_subscribe: rights.subscribe,
                can_publish_data: rights.publish,
                room_admin: rights.moderate,
                room_record: rights.record,
            },
            matrix_room: admission.matrix_room,
            matrix_user: admission.user_id,
            node: admission.node,
        };
        self.sign(&claims)
    }

    /// A token granting what `claims` grant, valid from now for the configured lifetime: sent
    /// to a participant during a call (LiveKit's `refresh_token`), so that their SDK can still
    /// resume after the token it joined with expired.
    pub fn refresh(&self, claims: &Claims, now_seconds: u64) -> Result<String> {
        self.sign(&Claims { nbf: now_seconds, exp: now_seconds + self.config.token_lifetime_seconds, ..claims.clone() })
    }

    /// How often a participant in a call gets a fresh token: at half a token's lifetime, so
    /// that the one they hold always has half of it left.
    pub fn refresh_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.config.token_lifetime_seconds.max(1) * 500)
    }

    fn sign(&self, claims: &Claims) -> Result<String> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding).map_err(Error::internal)
    }

    /// The claims of a token this server issued, if it is valid now.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        verify_token(token, &self.decoding, &self.config.api_key)
    }
}

fn spool_at(path: &std::path::Path) -> Result<spool::Spool> {
    spool::Spool::open(path.to_owned()).map_err(|e| Error::internal(format!("cannot open {}: {e}", path.display())))
}

/// The claims of a call token signed with `key` by `issuer`, if it is valid now.
pub fn verify_token(token: &str, key: &DecodingKey, issuer: &str) -> Result<Claims> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&[issuer]);
    validation.validate_nbf = true;
    validation.leeway = 0;
    validation.required_spec_claims = ["exp", "nbf", "iss", "sub"].into_iter().map(str::to_owned).collect();
    jsonwebtoken::decode::<Claims>(token, key, &validation)
        .map(|data| data.claims)
        .map_err(|e| Error::new(ErrorCode::UnknownToken, format!("invalid call token: {e}")))
}

/// What `user` may do in the call of `room_id`, under the clinic's rules; refused with
/// `M_FORBIDDEN` and the reason when they may not join it.
pub fn rights_in(rooms: &Rooms, room_id: &RoomId, user: &UserId) -> Result<Rights> {
    if !rooms.is_joined(room_id, user)? {
        return Err(Error::forbidden("only members of the room may join its call"));
    }
    let Some(session_room) = open_session_call(rooms, room_id)? else {
        // An ordinary room: every member publishes; moderators by power level.
        let moderate = rooms.user_power_level(room_id, user)? >= 50;
        return Ok(Rights { publish: true, subscribe: true, moderate, record: false });
    };
    let role = session_role(rooms, &session_room, user.as_str())?.ok_or_else(|| Error::forbidden("only the session's participants may join its call"))?;
    Ok(rights_of(role))
}

/// The session room whose roles govern the call of `room_id` (`None` for an ordinary room's
/// call, which is always open); refused with the reason while the call is closed to everyone.
/// A breakout room's call follows its session's status, and ends when the breakout closes.
fn open_session_call(rooms: &Rooms, room_id: &RoomId) -> Result<Option<OwnedRoomId>> {
    let session_room = match breakout_of(rooms, room_id)? {
        Some((_, true)) => return Err(Error::forbidden("this breakout room is closed")),
        Some((session_room, false)) => session_room,
        None => room_id.to_owned(),
    };
    let Some(content) = rooms.state_content(&session_room, SESSION, "")? else { return Ok(None) };
    match crate::clinic::parse_session(&content)?.status {
        Status::Open | Status::InProgress => Ok(Some(session_room)),
        status => Err(Error::forbidden(format!(
            "the session's call is open only while the session is open or in progress (it is {})",
            serde_json::to_value(status).ok().and_then(|s| s.as_str().map(str::to_owned)).unwrap_or_default()
        ))),
    }
}

/// The room whose calls go together on one node: a breakout room's session room, or the room.
pub fn call_home(rooms: &Rooms, room_id: &RoomId) -> Result<OwnedRoomId> {
    Ok(breakout_of(rooms, room_id)?.map_or_else(|| room_id.to_owned(), |(session_room, _)| session_room))
}

/// The session room of a breakout room, and whether the breakout is closed; `None` for a room
/// that is not a breakout.
fn breakout_of(rooms: &Rooms, room_id: &RoomId) -> Result<Option<(OwnedRoomId, bool)>> {
    let Some(content) = rooms.state_content(room_id, BREAKOUT, "")? else { return Ok(None) };
    let (breakout, session_room) = crate::clinic::parse_breakout(&content)?;
    Ok(Some((session_room, breakout.closed)))
}

/// Whether `user` still has, in the call of `room_id`, every right a call token `granted`
/// them: a token outlives a kick, a ban, a removal from the session, a lesser role and the
/// session's end, so it is checked again against [`rights_in`] whenever it is used.
pub fn still_allowed(rooms: &Rooms, room_id: &RoomId, user: &str, granted: Rights) -> Result<()> {
    let user = UserId::parse(user).map_err(|_| Error::forbidden("the call token names no valid user"))?;
    if !rights_in(rooms, room_id, &user)?.cover(granted) {
        return Err(Error::forbidden("the user's role no longer allows what this call token grants; a new token is needed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(dir: &std::path::Path, lifetime: u64) -> Calls {
        let store = Arc::new(Store::open(dir).unwrap());
        Calls::open(&store, CallsConfig { token_lifetime_seconds: lifetime, ..CallsConfig::default() }, &VoipConfig::default(), &ListenConfig::default(), &dir.with_extension("recordings"), "").unwrap()
    }

    fn admission() -> Admission {
        Admission {
            identity: "@ana:test.local:DEV".into(),
            display_name: "Ana".into(),
            user_id: "@ana:test.local".into(),
            matrix_room: "!r:test.local".try_into().unwrap(),
            sfu_room: "!r:test.local".into(),
            rights: rights_of(Role::Observer),
            node: None,
        }
    }

    #[test]
    fn tokens_round_trip_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let calls = calls(dir.path(), 60);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let token = calls.issue(admission(), now).unwrap();
        let claims = calls.verify(&token).unwrap();
        assert_eq!(claims.sub, "@ana:test.local:DEV");
        assert_eq!(claims.rights(), Rights { publish: false, subscribe: true, moderate: false, record: false });
        assert!(claims.video.room_join);
        // Expired, not yet valid, or signed with another key: refused.
        assert!(calls.verify(&calls.issue(admission(), now - 120).unwrap()).is_err());
        assert!(calls.verify(&calls.issue(admission(), now + 120).unwrap()).is_err());
        // A refreshed token grants the same, from later on.
        let claims = calls.verify(&token).unwrap();
        let refreshed = calls.verify(&calls.refresh(&claims, now - 10).unwrap()).unwrap();
        assert_eq!(Claims { nbf: claims.nbf, exp: claims.exp, ..refreshed.clone() }, claims);
        assert_eq!((refreshed.nbf, refreshed.exp), (now - 10, claims.exp - 10));
        let other = tempfile::tempdir().unwrap();
        assert!(self::calls(other.path(), 60).verify(&token).is_err());
        // The stored key survives a restart.
        drop(calls);
        assert!(self::calls(dir.path(), 60).verify(&token).is_ok());
    }
}
