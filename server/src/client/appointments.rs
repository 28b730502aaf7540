//! Appointment links: the booking service's endpoint (`/_limbic/service/v1/appointments`) and
//! the `org.matrix.login.jwt` login with a link's token. Tokens are made and checked by
//! `clinic::appointments`; sessions are built exactly as the sessions API builds them.

use axum::{Json, Router, extract::State, http::HeaderMap, routing::post};
use ruma::api::client::session::login;
use serde_json::Value as JsonValue;

use super::{AppState, Ruma, sessions::parse_body};
use crate::{
    clinic::appointments,
    error::{Error, ErrorCode, Result},
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

/// Logs in with a link token (`clinic::appointments::sign_in`, which also takes the user to the
/// session's door). The response names the session room.
pub(super) async fn jwt_login(server: &AppState, req: &Ruma<login::v3::Request>) -> Result<Json<appointments::SignedIn>> {
    let data = req.body.login_info.data();
    let token = data
        .get("token")
        .and_then(JsonValue::as_str)
        .ok_or_else(|| Error::new(ErrorCode::MissingParam, "missing token"))?;
    let device = appointments::NewDevice {
        device_id: req.body.device_id.clone(),
        display_name: req.body.initial_device_display_name.clone(),
        ip: req.ip.map(|ip| ip.to_string()),
    };
    Ok(Json(appointments::sign_in(&**server, token, device).await?))
}
