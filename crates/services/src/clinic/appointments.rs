//! Appointment links: booking systems that own appointments create a session per appointment
//! and hand each participant a link whose token (an HS256 JWT, audience `limbic-join:<room>`)
//! logs in exactly that user once, through the `org.matrix.login.jwt` login type.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use ruma::{OwnedDeviceId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, ServerName, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ClinicHost, Kind, RecordingPolicy, Role};
use crate::{
    audit::{Audit, AuditRecord},
    config::AppointmentsConfig,
    error::{Error, ErrorCode, Result},
    rooms::Membership,
    store::{Batch, Hold, Store, StoreError, tables},
    users::random_string,
};

/// The login type of link tokens.
pub const JWT_LOGIN: &str = "org.matrix.login.jwt";
const AUDIENCE_PREFIX: &str = "limbic-join:";
const SECRET_KEY: &[u8] = b"appointments_jwt_secret";

#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    iss: String,
    exp: u64,
    iat: u64,
    jti: String,
}

/// A verified, not yet redeemed link token.
pub struct Link {
    pub user_id: OwnedUserId,
    pub room_id: OwnedRoomId,
    jti: String,
    exp: u64,
}

pub struct Appointments {
    store: Arc<Store>,
    config: AppointmentsConfig,
    issuer: OwnedServerName,
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// Serializes creation so that one appointment never gets two rooms.
    creating: tokio::sync::Mutex<()>,
    /// Serializes the replay check with the write that marks a token used.
    redeeming: std::sync::Mutex<()>,
}

impl Appointments {
    /// Uses the configured key, or the one kept in the store (generated on first start).
    pub fn open(store: Arc<Store>, config: AppointmentsConfig, issuer: OwnedServerName) -> Result<Self> {
        let secret = store.secret(SECRET_KEY, &config.jwt_secret)?;
        Ok(Self {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            store,
            config,
            issuer,
            creating: tokio::sync::Mutex::new(()),
            redeeming: std::sync::Mutex::new(()),
        })
    }

    /// Checks the booking service's `Authorization` header in constant time; the endpoint
    /// does not exist while no shared secret is configured.
    pub fn authorize_service(&self, authorization: Option<&str>) -> Result<()> {
        if self.config.shared_secret.is_empty() {
            return Err(Error::not_found("appointment links are not enabled"));
        }
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| Error::new(ErrorCode::MissingToken, "missing service token"))?;
        // Comparing digests keeps the time independent of where, and of how long, they differ.
        let (given, expected) = (Sha256::digest(token.trim()), Sha256::digest(&self.config.shared_secret));
        if given.iter().zip(expected.iter()).fold(0u8, |diff, (a, b)| diff | (a ^ b)) != 0 {
            return Err(Error::new(ErrorCode::UnknownToken, "invalid service token"));
        }
        Ok(())
    }

    /// Held while an appointment's room is looked up and, if missing, created (by this process,
    /// and against the other nodes sharing the store).
    pub async fn lock_creation(&self) -> Result<(tokio::sync::MutexGuard<'_, ()>, Hold)> {
        let guard = self.creating.lock().await;
        Ok((guard, self.store.hold("appointment rooms").await?))
    }

    pub fn room(&self, appointment_id: &str) -> Result<Option<OwnedRoomId>> {
        Ok(self
            .store
            .get(tables::APPOINTMENTS, appointment_id.as_bytes())?
            .and_then(|id| String::from_utf8(id).ok())
            .and_then(|id| OwnedRoomId::try_from(id).ok()))
    }

    /// Stages the appointment's room, to be written with the room itself.
    pub fn stage_room(&self, batch: &mut Batch, appointment_id: &str, room_id: &RoomId) {
        batch.put(tables::APPOINTMENTS, appointment_id.as_bytes(), room_id.as_bytes());
    }

    /// A fresh join link for `user_id` into `room_id`.
    pub fn link(&self, user_id: &UserId, room_id: &RoomId) -> Result<String> {
        let now = now_seconds();
        let claims = Claims {
            sub: user_id.to_string(),
            aud: format!("{AUDIENCE_PREFIX}{room_id}"),
            iss: self.issuer.to_string(),
            exp: now + self.config.token_lifetime_seconds,
            iat: now,
            jti: random_string(32),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).map_err(Error::internal)?;
        Ok(format!("{}?token={token}", self.config.link_base_url))
    }

    /// How long a link's token stays valid, in seconds.
    pub fn token_lifetime_seconds(&self) -> u64 {
        self.config.token_lifetime_seconds
    }

    /// Checks a link token's signature, issuer, expiry and audience.
    pub fn verify(&self, token: &str) -> Result<Link> {
        verify_link(token, &self.decoding, &self.issuer)
    }

    /// Marks the link used within `batch` (the new device) and writes it with `record`;
    /// a link that was used before is refused and nothing is written.
    pub fn redeem(&self, audit: &Audit, mut batch: Batch, link: &Link, record: AuditRecord) -> Result<()> {
        let used = || Error::forbidden("this appointment link has been used already");
        let _redeeming = self.redeeming.lock().map_err(|_| Error::internal("link redemption lock poisoned"))?;
        if self.store.contains(tables::LINK_TOKENS_USED, link.jti.as_bytes())? {
            return Err(used());
        }
        // Another node may redeem the same link at the same moment: only one write claims it.
        batch.expect(tables::LINK_TOKENS_USED, link.jti.as_bytes(), None);
        batch.put(tables::LINK_TOKENS_USED, link.jti.as_bytes(), &link.exp.to_be_bytes());
        match audit.write_with(&self.store, batch, vec![record]) {
            Err(Error::Store(StoreError::Conflict { table })) if table == tables::LINK_TOKENS_USED.name() => Err(used()),
            written => written,
        }
    }
}

/// The device an appointment link signs in: what the client asked for, and where from.
pub struct NewDevice {
    pub device_id: Option<OwnedDeviceId>,
    pub display_name: Option<String>,
    pub ip: Option<String>,
}

/// The answer to a login with a link token: Matrix's login response, and the session room.
#[derive(Debug, Serialize)]
pub struct SignedIn {
    pub user_id: OwnedUserId,
    pub access_token: String,
    pub device_id: OwnedDeviceId,
    #[serde(rename = "org.limbic.room_id")]
    pub room_id: OwnedRoomId,
}

/// Signs in exactly the user a link token names, once: the token is spent in the same write as
/// the new device and the audit entry. A deactivated user, or one who has become a server admin
/// since the link was made (they sign in with their password only), is refused. Then takes the
/// user to the session's door.
pub async fn sign_in(server: &dyn ClinicHost, token: &str, device: NewDevice) -> Result<SignedIn> {
    let link = server.appointments().verify(token)?;
    if server.users().account(&link.user_id)?.is_none_or(|a| a.deactivated) {
        return Err(Error::forbidden("this appointment link is for an unknown or deactivated user"));
    }
    if server.users().is_admin(&link.user_id)? {
        return Err(Error::forbidden("appointment links never sign in a server admin"));
    }
    let mut batch = server.store().batch();
    let (device_id, access_token) = server.users().stage_device(&mut batch, &link.user_id, device.device_id, device.display_name, device.ip.clone())?;
    let record = AuditRecord::new("login", &link.user_id)
        .room(&link.room_id)
        .details(serde_json::json!({ "device_id": device_id, "ip": device.ip, "type": JWT_LOGIN }));
    server.appointments().redeem(server.audit(), batch, &link, record)?;
    tracing::info!(user_id = %link.user_id, %device_id, room_id = %link.room_id, "login by appointment link");
    // The login stands even if the knock does not (a cancelled session, say): the user is
    // signed in and the client can show why they cannot enter.
    if let Err(e) = enter_waiting_room(server, &link).await {
        tracing::warn!(user_id = %link.user_id, room_id = %link.room_id, "appointment link knock refused: {e}");
    }
    Ok(SignedIn { user_id: link.user_id, access_token, device_id, room_id: link.room_id })
}

/// Users with a role join themselves once the join window opens (the clinic policy decides);
/// everyone else is put in the waiting room: a knock on their behalf.
async fn enter_waiting_room(server: &dyn ClinicHost, link: &Link) -> Result<()> {
    if super::session_role(server.rooms(), &link.room_id, link.user_id.as_str())?.is_some() {
        return Ok(());
    }
    let membership = server.rooms().membership(&link.room_id, &link.user_id)?;
    if matches!(membership, Some(Membership::Join | Membership::Invite | Membership::Knock)) {
        return Ok(());
    }
    crate::membership::set(server, &link.user_id, &link.room_id, &link.user_id, "knock", Some("appointment link"), None).await?;
    Ok(())
}

impl Appointments {
    /// Forgets redeemed tokens that have expired (with a minute's margin for clock steps):
    /// validation refuses them anyway, so the replay index stays as small as the live links.
    pub fn prune_used(&self) -> Result<usize> {
        let cutoff = now_seconds().saturating_sub(60);
        let mut batch = self.store.batch();
        let mut pruned = 0;
        for item in self.store.scan_prefix(tables::LINK_TOKENS_USED, Vec::new(), false) {
            let (jti, exp) = item?;
            let exp = <[u8; 8]>::try_from(exp.as_ref()).map(u64::from_be_bytes).unwrap_or(0);
            if exp < cutoff {
                batch.delete(tables::LINK_TOKENS_USED, &jti);
                pruned += 1;
            }
        }
        self.store.write(batch)?;
        Ok(pruned)
    }
}

/// The link in a token signed with `key` by `issuer`, if it is valid now.
pub fn verify_link(token: &str, key: &DecodingKey, issuer: &ServerName) -> Result<Link> {
    let mut validation = Validation::new(Algorithm::HS256);
    // Links are short-lived and single-use: no grace period after expiry.
    validation.leeway = 0;
    validation.validate_aud = false;
    validation.set_issuer(&[issuer.as_str()]);
    validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
    let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
        .map_err(|e| {
            Error::forbidden(match e.kind() {
                ErrorKind::ExpiredSignature => "this appointment link has expired".to_owned(),
                ErrorKind::InvalidSignature => "this appointment link's token is not valid (bad signature)".to_owned(),
                _ => format!("this appointment link's token is not valid: {e}"),
            })
        })?
        .claims;
    let room_id = claims
        .aud
        .strip_prefix(AUDIENCE_PREFIX)
        .and_then(|room| OwnedRoomId::try_from(room).ok())
        .ok_or_else(|| Error::forbidden("this token is not an appointment link"))?;
    let user_id = OwnedUserId::try_from(claims.sub)
        .ok()
        .filter(|user| user.server_name() == issuer)
        .ok_or_else(|| Error::forbidden("this appointment link is for an unknown user"))?;
    Ok(Link { user_id, room_id, jti: claims.jti, exp: claims.exp })
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_forgets_only_expired_redeemed_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let issuer = OwnedServerName::try_from("clinic.test").unwrap();
        let appointments = Appointments::open(store.clone(), AppointmentsConfig::default(), issuer).unwrap();
        let mut batch = store.batch();
        let now = now_seconds();
        for (jti, exp) in [("expired", now - 3600), ("just-expired", now - 10), ("live", now + 3600)] {
            batch.put(tables::LINK_TOKENS_USED, jti.as_bytes(), &exp.to_be_bytes());
        }
        store.write(batch).unwrap();

        assert_eq!(appointments.prune_used().unwrap(), 1);
        assert!(!store.contains(tables::LINK_TOKENS_USED, b"expired").unwrap());
        // Within the clock-step margin, and still valid: both kept, so neither can be replayed.
        assert!(store.contains(tables::LINK_TOKENS_USED, b"just-expired").unwrap());
        assert!(store.contains(tables::LINK_TOKENS_USED, b"live").unwrap());
    }
}

// --- booking ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAppointment {
    pub appointment_id: String,
    pub therapist: OwnedUserId,
    pub client: OwnedUserId,
    pub kind: Option<Kind>,
    pub title: String,
    pub starts_at: u64,
    pub ends_at: u64,
    pub timezone: String,
}

/// The role `user_id` holds in the session, if any.
fn role(server: &dyn ClinicHost, room_id: &RoomId, user_id: &UserId) -> Result<Option<Role>> {
    super::session_role(server.rooms(), room_id, user_id.as_str())
}


/// A link signs in whoever it names, so the booking service may name as client only a plain
/// account (or a new one): never a server admin or a verified therapist, whose login links
/// would hand the service their powers.
fn refuse_privileged_client(server: &dyn ClinicHost, client: &UserId) -> Result<()> {
    if server.users().is_admin(client)? {
        return Err(Error::forbidden(format!("{client} is a server admin and cannot be booked as a client")));
    }
    if server.clinic().is_verified_therapist(client)? {
        return Err(Error::forbidden(format!("{client} is a verified therapist and cannot be booked as a client")));
    }
    Ok(())
}

/// A link a therapist made for one of their session's clients.
#[derive(Serialize)]
pub struct ClientLink {
    pub url: String,
    /// When its token stops being valid, ms since the Unix epoch (it signs in once before that).
    pub expires_at: u64,
}

/// A fresh sign-in link into `room_id` for `client`, made by one of the session's therapists: for
/// clients without a Matrix app. Only for a local client or observer of the session, never for
/// a server admin or a verified therapist (a link signs in without a password); audited
/// `link_created` with the therapist as actor.
pub fn link_for_client(server: &dyn ClinicHost, therapist: &UserId, room_id: &RoomId, client: &UserId) -> Result<ClientLink> {
    super::sessions::require_therapist(server, therapist, room_id, "make sign-in links")?;
    if client.server_name() != server.server_name() {
        return Err(Error::invalid_param(format!("{client} is a user of another server: links sign in this server's users")));
    }
    if !matches!(super::session_role(server.rooms(), room_id, client.as_str())?, Some(Role::Client | Role::Observer)) {
        return Err(Error::not_found(format!("{client} is not a client or observer of this session")));
    }
    if server.users().account(client)?.is_none_or(|account| account.deactivated) {
        return Err(Error::not_found(format!("{client} has no active account")));
    }
    refuse_privileged_client(server, client)?;
    let url = server.appointments().link(client, room_id)?;
    let record = AuditRecord::new("link_created", therapist).room(room_id).target(client);
    server.audit().write_with(server.store(), server.store().batch(), vec![record])?;
    let expires_at = now_seconds().saturating_add(server.appointments().token_lifetime_seconds()).saturating_mul(1000);
    Ok(ClientLink { url, expires_at })
}

/// An appointment's session room and a fresh login link for each of its two users.
#[derive(Serialize)]
pub struct Booked {
    pub room_id: OwnedRoomId,
    /// By user id.
    pub links: std::collections::BTreeMap<OwnedUserId, String>,
}

/// Creates the appointment's session (once per appointment id: a repeat call gets new links for
/// the same two users) for the booking service, which the caller has authorized.
pub async fn book(server: &dyn ClinicHost, request: NewAppointment) -> Result<Booked> {
    if request.appointment_id.is_empty() {
        return Err(Error::bad_json("appointment_id must not be empty"));
    }
    if request.therapist == request.client {
        return Err(Error::bad_json("the therapist cannot be the client"));
    }
    if request.client.server_name() != server.server_name() {
        return Err(Error::invalid_param("the client must be a user of this server"));
    }
    if !server.clinic().is_verified_therapist(&request.therapist)? {
        return Err(Error::forbidden(format!("{} is not a verified therapist", request.therapist)));
    }
    refuse_privileged_client(server, &request.client)?;
    if server.users().is_admin(&request.therapist)? {
        return Err(Error::forbidden(format!("{} is a server admin: appointment links never sign in an admin", request.therapist)));
    }

    let _creating = server.appointments().lock_creation().await?;
    let room_id = match server.appointments().room(&request.appointment_id)? {
        Some(room_id) => {
            // A repeat call gets new links, but only for the appointment's own participants.
            if role(server, &room_id, &request.therapist)? != Some(Role::Therapist) || role(server, &room_id, &request.client)? != Some(Role::Client) {
                return Err(Error::with_status(
                    ErrorCode::InvalidParam,
                    http::StatusCode::CONFLICT,
                    "this appointment exists with another therapist or client",
                ));
            }
            room_id
        }
        None => {
            // Clients booked from outside may not have an account yet; they sign in by link.
            if !server.users().exists(&request.client)? {
                server.users().create(&request.client, None, false)?;
            }
            let session = super::sessions::NewSession {
                kind: request.kind.unwrap_or(Kind::Individual),
                title: request.title,
                starts_at: request.starts_at,
                ends_at: request.ends_at,
                timezone: request.timezone,
                participants: vec![super::sessions::Participant { user_id: request.client.clone(), role: Role::Client }],
                recording_policy: RecordingPolicy::default(),
                max_participants: None,
                join_window_minutes: None,
                passcode: None,
            };
            let (mut writer, _) = super::sessions::stage(server, &request.therapist, session).await?;
            let room_id = writer.room_id().clone();
            server.appointments().stage_room(writer.batch(), &request.appointment_id, &room_id);
            writer.commit()?.finish().await;
            room_id
        }
    };
    let mut links = std::collections::BTreeMap::new();
    for user_id in [request.therapist, request.client] {
        let link = server.appointments().link(&user_id, &room_id)?;
        links.insert(user_id, link);
    }
    Ok(Booked { room_id, links })
}
