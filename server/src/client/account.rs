//! Registration, login, logout, whoami, devices, password, deactivation, profile and the
//! Synapse-compatible shared-secret admin registration.

use axum::{Json, Router, extract::State, routing::get};
use hmac::{Hmac, Mac};
use ruma::{
    OwnedUserId, UserId,
    api::client::{
        account::{change_password, deactivate, get_username_availability, register, request_openid_token, whoami},
        device::{delete_device, delete_devices, get_device, get_devices, update_device},
        profile::{get_avatar_url, get_display_name, get_profile, set_avatar_url, set_display_name},
        session::{get_login_types, login, logout, logout_all},
    },
};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, RumaResponse, route};
use crate::{
    audit::AuditRecord,
    config::RegistrationMode,
    error::{Error, ErrorCode, Result},
    ratelimit::Action,
    users::{Caller, random_string},
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<register::v3::Request, _, _>(router, register_handler);
    let router = route::<get_username_availability::v3::Request, _, _>(router, username_available);
    let router = route::<get_login_types::v3::Request, _, _>(router, login_types);
    let router = route::<login::v3::Request, _, _>(router, login_handler);
    let router = route::<logout::v3::Request, _, _>(router, logout_handler);
    let router = route::<logout_all::v3::Request, _, _>(router, logout_all_handler);
    let router = route::<whoami::v3::Request, _, _>(router, whoami_handler);
    let router = route::<get_devices::v3::Request, _, _>(router, devices_handler);
    let router = route::<get_device::v3::Request, _, _>(router, device_handler);
    let router = route::<update_device::v3::Request, _, _>(router, update_device_handler);
    let router = route::<delete_device::v3::Request, _, _>(router, delete_device_handler);
    let router = route::<delete_devices::v3::Request, _, _>(router, delete_devices_handler);
    let router = route::<change_password::v3::Request, _, _>(router, change_password_handler);
    let router = route::<deactivate::v3::Request, _, _>(router, deactivate_handler);
    let router = route::<get_profile::v3::Request, _, _>(router, profile_handler);
    let router = route::<get_display_name::v3::Request, _, _>(router, displayname_handler);
    let router = route::<set_display_name::v3::Request, _, _>(router, set_displayname_handler);
    let router = route::<get_avatar_url::v3::Request, _, _>(router, avatar_handler);
    let router = route::<set_avatar_url::v3::Request, _, _>(router, set_avatar_handler);
    let router = route::<request_openid_token::v3::Request, _, _>(router, openid_token_handler);
    router
        .route("/_synapse/admin/v1/register", get(admin_register_nonce).post(admin_register))
}

fn local_user_id(server: &AppState, localpart: &str) -> Result<OwnedUserId> {
    crate::users::local_user_id(localpart, server.server_name())
}

/// The user-interactive auth 401 body for the given flows.
fn uiaa_challenge(flows: &[&[&str]], completed: &[&str], params: JsonValue) -> Error {
    Error::Uiaa(json!({
        "flows": flows.iter().map(|stages| json!({ "stages": stages })).collect::<Vec<_>>(),
        "params": params,
        "session": random_string(16),
        "completed": completed,
    }))
}

/// Requires the request's `auth` to prove the caller's password (the m.login.password stage).
pub(super) fn require_password_auth<T, B>(server: &AppState, caller: &Caller, req: &Ruma<T, B>) -> Result<()> {
    let auth = req.json.as_ref().and_then(|b| b.get("auth")).filter(|a| !a.is_null());
    let Some(auth) = auth else {
        return Err(uiaa_challenge(&[&["m.login.password"]], &[], json!({})));
    };
    if auth.get("type").and_then(JsonValue::as_str) != Some("m.login.password") {
        return Err(uiaa_challenge(&[&["m.login.password"]], &[], json!({})));
    }
    let user = auth
        .get("identifier")
        .and_then(|i| i.get("user"))
        .or_else(|| auth.get("user"))
        .and_then(JsonValue::as_str)
        .unwrap_or(caller.user_id.as_str());
    let claimed = if user.starts_with('@') { user.to_owned() } else { format!("@{user}:{}", server.server_name()) };
    if claimed != caller.user_id.as_str() {
        return Err(Error::forbidden("authentication is for another user"));
    }
    let password = auth.get("password").and_then(JsonValue::as_str).unwrap_or_default();
    // Only failures count (a success gives its token back), per account and per address: a
    // stolen access token must not become a way to guess the password.
    let keys = req.rate_keys();
    server.rate_limiter.check(Action::Reauth, &keys)?;
    server.users.check_password(&caller.user_id, password).map_err(|_| {
        Error::Uiaa(json!({
            "errcode": "M_FORBIDDEN",
            "error": "invalid password",
            "flows": [{ "stages": ["m.login.password"] }],
            "params": {},
            "completed": [],
        }))
    })?;
    server.rate_limiter.refund(Action::Reauth, &keys);
    Ok(())
}

async fn register_handler(
    State(server): State<AppState>,
    req: Ruma<register::v3::Request>,
) -> Result<RumaResponse<register::v3::Response>> {
    server.rate_limiter.check(Action::Registration, &req.rate_keys())?;
    if req.body.kind == register::RegistrationKind::Guest {
        return Err(Error::new(ErrorCode::GuestAccessForbidden, "guest access is not enabled"));
    }
    let config = &server.config.registration;
    let (flow, params): (&[&str], JsonValue) = match config.mode {
        RegistrationMode::Closed => return Err(Error::forbidden("registration is closed on this server")),
        RegistrationMode::Open => (&["m.login.dummy"], json!({})),
        RegistrationMode::Token => (&["m.login.registration_token"], json!({})),
    };
    let auth = req.json.as_ref().and_then(|b| b.get("auth")).filter(|a| !a.is_null());
    let completed = match auth.and_then(|a| a.get("type")).and_then(JsonValue::as_str) {
        Some("m.login.dummy") if config.mode == RegistrationMode::Open => true,
        Some("m.login.registration_token") if config.mode == RegistrationMode::Token => {
            let token = auth.and_then(|a| a.get("token")).and_then(JsonValue::as_str).unwrap_or_default();
            if !config.tokens.iter().any(|t| t == token) {
                return Err(Error::forbidden("invalid registration token"));
            }
            true
        }
        _ => false,
    };
    let localpart = req.body.username.clone().unwrap_or_else(|| random_string(12).to_lowercase());
    let user_id = local_user_id(&server, &localpart)?;
    if server.users.exists(&user_id)? {
        return Err(Error::new(ErrorCode::UserInUse, "user id already taken"));
    }
    if !completed {
        return Err(uiaa_challenge(&[flow], &[], params));
    }
    let password = req.body.password.as_deref().filter(|p| !p.is_empty());
    server.users.create(&user_id, password, false)?;
    tracing::info!(%user_id, "registered user");

    let mut response = register::v3::Response::new(user_id.clone());
    if !req.body.inhibit_login {
        let (device_id, token) = server.users.create_device(
            &user_id,
            req.body.device_id.clone(),
            req.body.initial_device_display_name.clone(),
            req.ip.map(|ip| ip.to_string()),
        )?;
        response.access_token = Some(token);
        response.device_id = Some(device_id);
    }
    Ok(response.into())
}

async fn username_available(
    State(server): State<AppState>,
    req: Ruma<get_username_availability::v3::Request>,
) -> Result<RumaResponse<get_username_availability::v3::Response>> {
    let user_id = local_user_id(&server, &req.body.username)?;
    if server.users.exists(&user_id)? {
        return Err(Error::new(ErrorCode::UserInUse, "user id already taken"));
    }
    Ok(get_username_availability::v3::Response::new(true).into())
}

async fn login_types(_req: Ruma<get_login_types::v3::Request>) -> Json<JsonValue> {
    Json(json!({ "flows": [{ "type": "m.login.password" }, { "type": crate::clinic::appointments::JWT_LOGIN }] }))
}

/// The localpart a password login names, whichever way it is written.
fn login_account(info: &login::v3::LoginInfo) -> Option<String> {
    let login::v3::LoginInfo::Password(password) = info else { return None };
    let Some(ruma::api::client::uiaa::UserIdentifier::Matrix(id)) = &password.identifier else { return None };
    let user = id.user.strip_prefix('@').unwrap_or(&id.user);
    Some(user.split(':').next().unwrap_or_default().to_lowercase())
}

async fn login_handler(
    State(server): State<AppState>,
    req: Ruma<login::v3::Request>,
) -> Result<axum::response::Response> {
    use axum::response::IntoResponse;
    // Counted against the account named as well as the address, so that neither many
    // addresses nor many accounts get around the limit.
    let keys = crate::ratelimit::RateKeys { subject: login_account(&req.body.login_info), address: req.ip };
    server.rate_limiter.check(Action::Login, &keys)?;
    // ruma keeps login types it does not know, such as appointment links, as custom data.
    if req.body.login_info.login_type() == crate::clinic::appointments::JWT_LOGIN {
        return Ok(super::appointments::jwt_login(&server, &req).await?.into_response());
    }
    let login::v3::LoginInfo::Password(password) = &req.body.login_info else {
        return Err(Error::with_status(ErrorCode::Unknown, http::StatusCode::BAD_REQUEST, "unsupported login type"));
    };
    let user = match &password.identifier {
        Some(ruma::api::client::uiaa::UserIdentifier::Matrix(id)) => id.user.clone(),
        _ => return Err(Error::forbidden("only user identifiers are supported")),
    };
    let user_id = if user.starts_with('@') {
        UserId::parse(user.as_str()).map_err(|_| Error::forbidden("invalid username or password"))?
    } else {
        local_user_id(&server, &user).map_err(|_| Error::forbidden("invalid username or password"))?
    };
    if user_id.server_name() != server.server_name() {
        return Err(Error::forbidden("invalid username or password"));
    }
    server.users.check_password(&user_id, &password.password)?;
    let mut batch = server.store.batch();
    let ip = req.ip.map(|ip| ip.to_string());
    let (device_id, token) = server.users.stage_device(
        &mut batch,
        &user_id,
        req.body.device_id.clone(),
        req.body.initial_device_display_name.clone(),
        ip.clone(),
    )?;
    let record = AuditRecord::new("login", &user_id).details(json!({ "device_id": device_id, "ip": ip, "type": "m.login.password" }));
    server.audit.write_with(&server.store, batch, vec![record])?;
    tracing::info!(%user_id, %device_id, "login");
    Ok(RumaResponse::from(login::v3::Response::new(user_id, token, device_id)).into_response())
}

async fn logout_handler(
    State(server): State<AppState>,
    req: Ruma<logout::v3::Request>,
) -> Result<RumaResponse<logout::v3::Response>> {
    let caller = req.caller();
    crate::accounts::delete_devices(&*server, &caller.user_id, [caller.device_id.as_str()])?;
    Ok(logout::v3::Response::new().into())
}

async fn logout_all_handler(
    State(server): State<AppState>,
    req: Ruma<logout_all::v3::Request>,
) -> Result<RumaResponse<logout_all::v3::Response>> {
    crate::accounts::delete_all_devices(&*server, &req.caller().user_id, None)?;
    Ok(logout_all::v3::Response::new().into())
}

async fn whoami_handler(req: Ruma<whoami::v3::Request>) -> RumaResponse<whoami::v3::Response> {
    let caller = req.caller();
    let mut response = whoami::v3::Response::new(caller.user_id.clone(), false);
    response.device_id = Some(caller.device_id.clone());
    response.into()
}

fn device_json(device_id: &str, device: &crate::users::Device) -> JsonValue {
    json!({
        "device_id": device_id,
        "display_name": device.display_name,
        "last_seen_ts": device.last_seen_ts,
        "last_seen_ip": device.last_seen_ip,
    })
}

async fn devices_handler(State(server): State<AppState>, req: Ruma<get_devices::v3::Request>) -> Result<Json<JsonValue>> {
    let devices = server.users.devices(&req.caller().user_id)?;
    Ok(Json(json!({ "devices": devices.iter().map(|(id, d)| device_json(id.as_str(), d)).collect::<Vec<_>>() })))
}

async fn device_handler(State(server): State<AppState>, req: Ruma<get_device::v3::Request>) -> Result<Json<JsonValue>> {
    let device = server
        .users
        .device(&req.caller().user_id, req.body.device_id.as_str())?
        .ok_or_else(|| Error::not_found("unknown device"))?;
    Ok(Json(device_json(req.body.device_id.as_str(), &device)))
}

async fn update_device_handler(
    State(server): State<AppState>,
    req: Ruma<update_device::v3::Request>,
) -> Result<RumaResponse<update_device::v3::Response>> {
    server.users.update_device(&req.caller().user_id, req.body.device_id.as_str(), req.body.display_name.clone())?;
    Ok(update_device::v3::Response::new().into())
}

async fn delete_device_handler(
    State(server): State<AppState>,
    req: Ruma<delete_device::v3::Request>,
) -> Result<RumaResponse<delete_device::v3::Response>> {
    let caller = req.caller();
    // Deleting a device that is already gone succeeds, as the spec says.
    require_password_auth(&server, caller, &req)?;
    crate::accounts::delete_devices(&*server, &caller.user_id, [req.body.device_id.as_str()])?;
    Ok(delete_device::v3::Response::new().into())
}

async fn delete_devices_handler(
    State(server): State<AppState>,
    req: Ruma<delete_devices::v3::Request>,
) -> Result<RumaResponse<delete_devices::v3::Response>> {
    let caller = req.caller();
    require_password_auth(&server, caller, &req)?;
    crate::accounts::delete_devices(&*server, &caller.user_id, req.body.devices.iter().map(|d| d.as_str()))?;
    Ok(delete_devices::v3::Response::new().into())
}

async fn change_password_handler(
    State(server): State<AppState>,
    req: Ruma<change_password::v3::Request>,
) -> Result<RumaResponse<change_password::v3::Response>> {
    // The token is optional for these endpoints in the spec (for flows Limbic does not offer).
    let caller = req.caller_opt().ok_or_else(super::missing_token)?;
    require_password_auth(&server, caller, &req)?;
    if req.body.new_password.is_empty() {
        return Err(Error::new(ErrorCode::WeakPassword, "the new password must not be empty"));
    }
    server.users.set_password(&caller.user_id, &req.body.new_password)?;
    if req.body.logout_devices {
        crate::accounts::delete_all_devices(&*server, &caller.user_id, Some(caller.device_id.as_str()))?;
    }
    Ok(change_password::v3::Response::new().into())
}

async fn deactivate_handler(
    State(server): State<AppState>,
    req: Ruma<deactivate::v3::Request>,
) -> Result<RumaResponse<deactivate::v3::Response>> {
    // The token is optional for these endpoints in the spec (for flows Limbic does not offer).
    let caller = req.caller_opt().ok_or_else(super::missing_token)?;
    require_password_auth(&server, caller, &req)?;
    crate::accounts::deactivate_account(&*server, &caller.user_id).await?;
    Ok(deactivate::v3::Response::new(ruma::api::client::account::ThirdPartyIdRemovalStatus::NoSupport).into())
}

fn profile_account(server: &AppState, user_id: &UserId) -> Result<crate::users::Account> {
    server
        .users
        .account(user_id)?
        .filter(|a| !a.deactivated)
        .ok_or_else(|| Error::not_found("profile not found"))
}

/// Who asks for a profile. ruma's profile look-ups take no token, but `[privacy]` depends on
/// the asker: with an option on, a token sent is authenticated (a bad one is refused); with
/// both off, tokens are ignored as before.
struct ProfileAsker(Option<Caller>);

impl axum::extract::FromRequestParts<AppState> for ProfileAsker {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, server: &AppState) -> Result<Self> {
        let privacy = &server.config.privacy;
        if !privacy.require_auth_for_profile_requests && !privacy.limit_profile_requests_to_users_who_share_rooms {
            return Ok(Self(None));
        }
        super::authenticate(server, parts).map(Self)
    }
}

/// A user's profile, if `[privacy]` lets `asker` see it: from the account for local users,
/// over federation for others.
async fn profile_fields(server: &AppState, asker: ProfileAsker, user_id: &ruma::UserId) -> Result<serde_json::Map<String, JsonValue>> {
    let asker = asker.0.map(|caller| caller.user_id);
    crate::privacy::check_lookup(&**server, &server.config.privacy, asker.as_deref(), user_id, crate::privacy::Lookup::Profile)?;
    if user_id.server_name() != server.server_name() {
        let federation = server.federation.as_ref().ok_or_else(|| Error::not_found("federation is disabled on this server"))?;
        let request = ruma::api::federation::query::get_profile_information::v1::Request::new(user_id.to_owned());
        let answer = federation.send(user_id.server_name(), request).await?;
        let profile = serde_json::to_value(&answer.data).map_err(Error::internal)?;
        return Ok(profile.as_object().cloned().unwrap_or_default());
    }
    let account = profile_account(server, user_id)?;
    let mut profile = serde_json::Map::new();
    if let Some(name) = account.displayname {
        profile.insert("displayname".into(), name.into());
    }
    if let Some(url) = account.avatar_url {
        profile.insert("avatar_url".into(), url.into());
    }
    Ok(profile)
}

async fn profile_handler(State(server): State<AppState>, asker: ProfileAsker, req: Ruma<get_profile::v3::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(JsonValue::Object(profile_fields(&server, asker, &req.body.user_id).await?)))
}

/// One field of a profile, or `{}`.
fn field_of(profile: serde_json::Map<String, JsonValue>, field: &str) -> JsonValue {
    match profile.get(field) {
        Some(value) => json!({ field: value }),
        None => json!({}),
    }
}

async fn displayname_handler(State(server): State<AppState>, asker: ProfileAsker, req: Ruma<get_display_name::v3::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(field_of(profile_fields(&server, asker, &req.body.user_id).await?, "displayname")))
}

async fn avatar_handler(State(server): State<AppState>, asker: ProfileAsker, req: Ruma<get_avatar_url::v3::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(field_of(profile_fields(&server, asker, &req.body.user_id).await?, "avatar_url")))
}

/// An OpenID token for third parties (the SFU, other servers' `openid/userinfo`).
async fn openid_token_handler(State(server): State<AppState>, req: Ruma<request_openid_token::v3::Request>) -> Result<Json<JsonValue>> {
    if req.body.user_id != req.caller().user_id {
        return Err(Error::forbidden("you may only ask for your own OpenID token"));
    }
    let token = server.users.issue_openid_token(&req.caller().user_id)?;
    Ok(Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "matrix_server_name": server.server_name(),
        "expires_in": crate::users::OPENID_TOKEN_LIFETIME_SECONDS,
    })))
}

async fn set_displayname_handler(
    State(server): State<AppState>,
    req: Ruma<set_display_name::v3::Request>,
) -> Result<RumaResponse<set_display_name::v3::Response>> {
    update_profile(&server, req.caller(), &req.body.user_id, Some(req.body.displayname.clone()), None).await?;
    Ok(set_display_name::v3::Response::new().into())
}

async fn set_avatar_handler(
    State(server): State<AppState>,
    req: Ruma<set_avatar_url::v3::Request>,
) -> Result<RumaResponse<set_avatar_url::v3::Response>> {
    let url = req.body.avatar_url.as_ref().map(|u| u.to_string()).filter(|u| !u.is_empty());
    update_profile(&server, req.caller(), &req.body.user_id, None, Some(url)).await?;
    Ok(set_avatar_url::v3::Response::new().into())
}

async fn update_profile(
    server: &AppState,
    caller: &Caller,
    user_id: &UserId,
    displayname: Option<Option<String>>,
    avatar_url: Option<Option<String>>,
) -> Result<()> {
    if user_id != caller.user_id {
        return Err(Error::forbidden("you can only change your own profile"));
    }
    crate::accounts::set_profile(&**server, &caller.user_id, displayname, avatar_url).await?;
    Ok(())
}

pub(super) fn strip_nulls(content: &mut JsonValue) {
    if let Some(object) = content.as_object_mut() {
        object.retain(|_, v| !v.is_null());
    }
}

// --- shared-secret admin registration (Synapse compatible) ---

async fn admin_register_nonce(State(server): State<AppState>) -> Result<Json<JsonValue>> {
    if server.config.registration.shared_secret.is_empty() {
        return Err(Error::not_found("shared-secret registration is disabled"));
    }
    Ok(Json(json!({ "nonce": server.users.issue_registration_nonce()? })))
}

#[derive(Deserialize)]
struct AdminRegister {
    nonce: String,
    username: String,
    password: String,
    #[serde(default)]
    admin: bool,
    mac: String,
    #[serde(default)]
    displayname: Option<String>,
}

async fn admin_register(
    State(server): State<AppState>,
    body: axum::body::Body,
) -> Result<Json<JsonValue>> {
    let secret = &server.config.registration.shared_secret;
    if secret.is_empty() {
        return Err(Error::not_found("shared-secret registration is disabled"));
    }
    // A stranger's body, capped like the other unauthenticated ones.
    let limit = server.config.limits.max_unauthenticated_body;
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Error::new(ErrorCode::TooLarge, format!("request body is larger than {limit} bytes")))?;
    let body: AdminRegister = serde_json::from_slice(&body).map_err(|e| Error::bad_json(e.to_string()))?;
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).map_err(Error::internal)?;
    mac.update(body.nonce.as_bytes());
    mac.update(b"\0");
    mac.update(body.username.as_bytes());
    mac.update(b"\0");
    mac.update(body.password.as_bytes());
    mac.update(b"\0");
    mac.update(if body.admin { b"admin".as_slice() } else { b"notadmin".as_slice() });
    let expected = hex::decode(&body.mac).map_err(|_| Error::forbidden("HMAC incorrect"))?;
    mac.verify_slice(&expected).map_err(|_| Error::forbidden("HMAC incorrect"))?;
    if !server.users.take_registration_nonce(&body.nonce)? {
        return Err(Error::invalid_param("unrecognised nonce"));
    }

    let user_id = local_user_id(&server, &body.username)?;
    server.users.create(&user_id, Some(&body.password), body.admin)?;
    if let Some(name) = body.displayname {
        server.users.set_profile(&user_id, Some(Some(name)), None)?;
    }
    let (device_id, token) = server.users.create_device(&user_id, None, None, None)?;
    Ok(Json(json!({
        "user_id": user_id,
        "access_token": token,
        "device_id": device_id,
        "home_server": server.server_name(),
    })))
}
