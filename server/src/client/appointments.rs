//! Appointment links: the booking service's endpoint (`/_limbic/service/v1/appointments`) and
//! the `org.matrix.login.jwt` login with a link's token. Tokens are made and checked by
//! `clinic::appointments`; sessions are built exactly as the sessions API builds them.

use axum::{Json, Router, extract::State, http::HeaderMap, routing::post};
use ruma::{OwnedUserId, UserId, api::client::session::login};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{
    AppState, Ruma,
    membership::set_membership,
    sessions::parse_body,
};
use crate::{
    audit::AuditRecord,
    clinic::{Kind, RecordingPolicy, Role, appointments::{JWT_LOGIN, Link}},
    error::{Error, ErrorCode, Result},
    rooms::Membership,
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    router.route("/_limbic/service/v1/appointments", post(create_appointment))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAppointment {
    appointment_id: String,
    therapist: OwnedUserId,
    client: OwnedUserId,
    kind: Option<Kind>,
    title: String,
    starts_at: u64,
    ends_at: u64,
    timezone: String,
}

/// The role `user_id` holds in the session, if any.
fn role(server: &AppState, room_id: &ruma::RoomId, user_id: &UserId) -> Result<Option<Role>> {
    crate::clinic::session_role(&server.rooms, room_id, user_id.as_str())
}

fn is_admin(server: &AppState, user_id: &UserId) -> Result<bool> {
    Ok(server.users.account(user_id)?.is_some_and(|a| a.admin))
}

/// A link signs in whoever it names, so the booking service may name as client only a plain
/// account (or a new one): never a server admin or a verified therapist, whose login links
/// would hand the service their powers.
fn refuse_privileged_client(server: &AppState, client: &UserId) -> Result<()> {
    if is_admin(server, client)? {
        return Err(Error::forbidden(format!("{client} is a server admin and cannot be booked as a client")));
    }
    if server.clinic.is_verified_therapist(client)? {
        return Err(Error::forbidden(format!("{client} is a verified therapist and cannot be booked as a client")));
    }
    Ok(())
}

/// Creates the appointment's session (once per appointment id) and returns fresh links.
async fn create_appointment(State(server): State<AppState>, headers: HeaderMap, body: axum::body::Bytes) -> Result<Json<JsonValue>> {
    let authorization = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    server.appointments.authorize_service(authorization)?;
    let request: CreateAppointment = parse_body(&body)?;
    if request.appointment_id.is_empty() {
        return Err(Error::bad_json("appointment_id must not be empty"));
    }
    if request.therapist == request.client {
        return Err(Error::bad_json("the therapist cannot be the client"));
    }
    if request.client.server_name() != server.server_name() {
        return Err(Error::invalid_param("the client must be a user of this server"));
    }
    if !server.clinic.is_verified_therapist(&request.therapist)? {
        return Err(Error::forbidden(format!("{} is not a verified therapist", request.therapist)));
    }
    refuse_privileged_client(&server, &request.client)?;
    if is_admin(&server, &request.therapist)? {
        return Err(Error::forbidden(format!("{} is a server admin: appointment links never sign in an admin", request.therapist)));
    }

    let _creating = server.appointments.lock_creation().await;
    let room_id = match server.appointments.room(&request.appointment_id)? {
        Some(room_id) => {
            // A repeat call gets new links, but only for the appointment's own participants.
            if role(&server, &room_id, &request.therapist)? != Some(Role::Therapist) || role(&server, &room_id, &request.client)? != Some(Role::Client) {
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
            if !server.users.exists(&request.client)? {
                server.users.create(&request.client, None, false)?;
            }
            let session = crate::clinic::sessions::NewSession {
                kind: request.kind.unwrap_or(Kind::Individual),
                title: request.title,
                starts_at: request.starts_at,
                ends_at: request.ends_at,
                timezone: request.timezone,
                participants: vec![crate::clinic::sessions::Participant { user_id: request.client.clone(), role: Role::Client }],
                recording_policy: RecordingPolicy::default(),
                max_participants: None,
                join_window_minutes: None,
                passcode: None,
            };
            let (mut writer, _) = crate::clinic::sessions::stage(&server, &request.therapist, session).await?;
            let room_id = writer.room_id().clone();
            server.appointments.stage_room(writer.batch(), &request.appointment_id, &room_id);
            writer.commit()?;
            room_id
        }
    };
    let mut links = serde_json::Map::new();
    for user_id in [&request.therapist, &request.client] {
        links.insert(user_id.to_string(), json!(server.appointments.link(user_id, &room_id)?));
    }
    Ok(Json(json!({ "room_id": room_id, "links": links })))
}

/// Logs in exactly the user a link token names, once; the token is spent in the same write as
/// the new device and the audit entry. The response names the session room.
pub(super) async fn jwt_login(server: &AppState, req: &Ruma<login::v3::Request>) -> Result<Json<JsonValue>> {
    let data = req.body.login_info.data();
    let token = data
        .get("token")
        .and_then(JsonValue::as_str)
        .ok_or_else(|| Error::new(ErrorCode::MissingParam, "missing token"))?;
    let link = server.appointments.verify(token)?;
    if server.users.account(&link.user_id)?.is_none_or(|a| a.deactivated) {
        return Err(Error::forbidden("this appointment link is for an unknown or deactivated user"));
    }
    // Whoever became an admin since the link was made signs in with their password only.
    if is_admin(server, &link.user_id)? {
        return Err(Error::forbidden("appointment links never sign in a server admin"));
    }
    let mut batch = server.store.batch();
    let ip = req.ip.map(|ip| ip.to_string());
    let (device_id, access_token) = server.users.stage_device(
        &mut batch,
        &link.user_id,
        req.body.device_id.clone(),
        req.body.initial_device_display_name.clone(),
        ip.clone(),
    )?;
    let record = AuditRecord::new("login", &link.user_id)
        .room(&link.room_id)
        .details(json!({ "device_id": device_id, "ip": ip, "type": JWT_LOGIN }));
    server.appointments.redeem(&server.audit, batch, &link, record)?;
    tracing::info!(user_id = %link.user_id, %device_id, room_id = %link.room_id, "login by appointment link");
    // The login stands even if the knock does not (a cancelled session, say): the user is
    // signed in and the client can show why they cannot enter.
    if let Err(e) = enter_waiting_room(server, &link).await {
        tracing::warn!(user_id = %link.user_id, room_id = %link.room_id, "appointment link knock refused: {e}");
    }
    Ok(Json(json!({
        "user_id": link.user_id,
        "access_token": access_token,
        "device_id": device_id,
        "org.limbic.room_id": link.room_id,
    })))
}

/// Users with a role join themselves once the join window opens (the clinic policy decides);
/// everyone else is put in the waiting room: a knock on their behalf.
async fn enter_waiting_room(server: &AppState, link: &Link) -> Result<()> {
    if role(server, &link.room_id, &link.user_id)?.is_some() {
        return Ok(());
    }
    let membership = server.rooms.membership(&link.room_id, &link.user_id)?;
    if matches!(membership, Some(Membership::Join | Membership::Invite | Membership::Knock)) {
        return Ok(());
    }
    set_membership(server, &link.user_id, &link.room_id, &link.user_id, "knock", Some("appointment link"), None).await?;
    Ok(())
}
