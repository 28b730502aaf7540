//! Appointment links: the booking service's endpoint (`/_limbic/service/v1/appointments`) and
//! the `org.matrix.login.jwt` login with a link's token. Tokens are made and checked by
//! `clinic::appointments`; sessions are built exactly as the sessions API builds them.

use axum::{Json, Router, extract::State, http::HeaderMap, routing::post};
use ruma::api::client::session::login;
use serde_json::{Value as JsonValue, json};

use super::{
    AppState, Ruma,
    membership::set_membership,
    sessions::parse_body,
};
use crate::{
    audit::AuditRecord,
    clinic::appointments::{self, JWT_LOGIN, Link},
    error::{Error, ErrorCode, Result},
    rooms::Membership,
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    router.route("/_limbic/service/v1/appointments", post(create_appointment))
}

/// Creates the appointment's session (once per appointment id) and returns fresh links.
async fn create_appointment(State(server): State<AppState>, headers: HeaderMap, body: axum::body::Bytes) -> Result<Json<appointments::Booked>> {
    let authorization = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    server.appointments.authorize_service(authorization)?;
    Ok(Json(appointments::book(&server, parse_body(&body)?).await?))
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
    if server.users.is_admin(&link.user_id)? {
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
    if crate::clinic::session_role(&server.rooms, &link.room_id, link.user_id.as_str())?.is_some() {
        return Ok(());
    }
    let membership = server.rooms.membership(&link.room_id, &link.user_id)?;
    if matches!(membership, Some(Membership::Join | Membership::Invite | Membership::Knock)) {
        return Ok(());
    }
    set_membership(server, &link.user_id, &link.room_id, &link.user_id, "knock", Some("appointment link"), None).await?;
    Ok(())
}
