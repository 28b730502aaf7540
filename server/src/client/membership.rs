//! Membership changes: join, invite, leave, forget, kick, ban, unban, knock. Each is an
//! `m.room.member` event; the room version's auth rules decide what is allowed.

use axum::{Router, extract::State};
use ruma::{
    OwnedRoomId, RoomOrAliasId, UserId,
    api::client::{
        knock::knock_room,
        membership::{
            ban_user, forget_room, invite_user, join_room_by_id, join_room_by_id_or_alias, kick_user,
            leave_room, unban_user,
        },
    },
};

use super::{AppState, Ruma, RumaResponse, route};
use crate::{
    error::{Error, ErrorCode, Result},
    ratelimit::{Action, RateKeys},
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<join_room_by_id::v3::Request, _, _>(router, join_by_id);
    let router = route::<join_room_by_id_or_alias::v3::Request, _, _>(router, join_by_id_or_alias);
    let router = route::<invite_user::v3::Request, _, _>(router, invite);
    let router = route::<leave_room::v3::Request, _, _>(router, leave);
    let router = route::<forget_room::v3::Request, _, _>(router, forget);
    let router = route::<kick_user::v3::Request, _, _>(router, kick);
    let router = route::<ban_user::v3::Request, _, _>(router, ban);
    let router = route::<unban_user::v3::Request, _, _>(router, unban);
    route::<knock_room::v3::Request, _, _>(router, knock)
}

fn resolve_room(server: &AppState, room: &RoomOrAliasId) -> Result<OwnedRoomId> {
    match <&ruma::RoomId>::try_from(room.as_str()) {
        Ok(room_id) => Ok(room_id.to_owned()),
        Err(_) => {
            let alias = <&ruma::RoomAliasId>::try_from(room.as_str()).map_err(|_| Error::invalid_param("invalid room id or alias"))?;
            server.rooms.resolve_alias(alias)?.ok_or_else(|| Error::not_found(format!("room alias {alias} not found")))
        }
    }
}

/// The passcode a client sent with a join or knock, if any.
fn passcode<T>(req: &Ruma<T>) -> Option<&str> {
    req.json.as_ref()?.get(crate::clinic::PASSCODE_FIELD)?.as_str()
}

/// Runs the caller's own join or knock `attempt` (through these endpoints or a raw membership
/// event). When the body carries a passcode, a refusal (403) counts against the (user, room)
/// and the client address, so that a session's passcode cannot be guessed; an attempt that is
/// not refused gives its token back.
pub(super) async fn limit_passcode_guesses<T, R>(server: &AppState, req: &Ruma<T>, room_id: &ruma::RoomId, attempt: impl Future<Output = Result<R>>) -> Result<R> {
    if passcode(req).is_none() {
        return attempt.await;
    }
    let keys = RateKeys { subject: Some(format!("{} {room_id}", req.caller().user_id)), address: req.ip };
    server.rate_limiter.check(Action::KnockPasscode, &keys)?;
    let result = attempt.await;
    if !matches!(result, Err(Error::Matrix { code: ErrorCode::Forbidden, .. })) {
        server.rate_limiter.refund(Action::KnockPasscode, &keys);
    }
    result
}

/// Joins a room: with a local join event when this server is in the room, else over federation
/// through `via` (and the server the room id names).
async fn join(server: &AppState, user: &UserId, room_id: &ruma::RoomId, via: &[ruma::OwnedServerName], reason: Option<&str>, passcode: Option<&str>) -> Result<()> {
    if server.rooms.is_joined(room_id, user)? {
        return Ok(());
    }
    if server.rooms.reached_over_federation(room_id)? {
        return crate::federation::membership::join_remote(&**server, user, room_id, via).await;
    }
    crate::membership::set(&**server, user, room_id, user, "join", reason, passcode).await.map(drop)
}

async fn join_by_id(
    State(server): State<AppState>,
    req: Ruma<join_room_by_id::v3::Request>,
) -> Result<RumaResponse<join_room_by_id::v3::Response>> {
    let caller = req.caller();
    let room_id = &req.body.room_id;
    let attempt = join(&server, &caller.user_id, room_id, &[], req.body.reason.as_deref(), passcode(&req));
    limit_passcode_guesses(&server, &req, room_id, attempt).await?;
    Ok(join_room_by_id::v3::Response::new(room_id.clone()).into())
}

async fn join_by_id_or_alias(
    State(server): State<AppState>,
    req: Ruma<join_room_by_id_or_alias::v3::Request>,
) -> Result<RumaResponse<join_room_by_id_or_alias::v3::Response>> {
    let caller = req.caller();
    let room_id = resolve_room(&server, &req.body.room_id_or_alias)?;
    let attempt = join(&server, &caller.user_id, &room_id, &req.body.via, req.body.reason.as_deref(), passcode(&req));
    limit_passcode_guesses(&server, &req, &room_id, attempt).await?;
    Ok(join_room_by_id_or_alias::v3::Response::new(room_id).into())
}

async fn invite(
    State(server): State<AppState>,
    req: Ruma<invite_user::v3::Request>,
) -> Result<RumaResponse<invite_user::v3::Response>> {
    let caller = req.caller();
    let invite_user::v3::InvitationRecipient::UserId(recipient) = &req.body.recipient else {
        return Err(Error::invalid_param("third-party invites are not supported"));
    };
    if !server.rooms.is_joined(&req.body.room_id, &caller.user_id)? {
        return Err(Error::forbidden("you are not joined to this room"));
    }
    crate::membership::set(&*server, &caller.user_id, &req.body.room_id, &recipient.user_id, "invite", recipient.reason.as_deref(), None).await?;
    Ok(invite_user::v3::Response::new().into())
}

async fn leave(
    State(server): State<AppState>,
    req: Ruma<leave_room::v3::Request>,
) -> Result<RumaResponse<leave_room::v3::Response>> {
    let caller = req.caller();
    let room_id = &req.body.room_id;
    // An invite to (or knock on) a room this server is not in is answered over federation.
    if !server.rooms.exists(room_id)? && server.federation.is_some() {
        let pending = server.rooms.user_room(&caller.user_id, room_id)?.filter(|e| matches!(e.membership, crate::rooms::Membership::Invite | crate::rooms::Membership::Knock));
        if let Some(entry) = pending {
            let via: Vec<_> = server.rooms.pdu(&entry.event_id)?.map(|p| p.sender.server_name().to_owned()).into_iter().collect();
            crate::federation::membership::membership_remote(&*server, &caller.user_id, room_id, &via, "leave", req.body.reason.as_deref()).await?;
            return Ok(leave_room::v3::Response::new().into());
        }
    }
    match server.rooms.membership(room_id, &caller.user_id)? {
        Some(crate::rooms::Membership::Join | crate::rooms::Membership::Invite | crate::rooms::Membership::Knock) => {
            crate::membership::set(&*server, &caller.user_id, room_id, &caller.user_id, "leave", req.body.reason.as_deref(), None).await?;
        }
        Some(_) => {}
        None => return Err(Error::not_found("you are not a member of this room")),
    }
    Ok(leave_room::v3::Response::new().into())
}

async fn forget(
    State(server): State<AppState>,
    req: Ruma<forget_room::v3::Request>,
) -> Result<RumaResponse<forget_room::v3::Response>> {
    server.rooms.forget(&req.caller().user_id, &req.body.room_id)?;
    Ok(forget_room::v3::Response::new().into())
}

async fn kick(
    State(server): State<AppState>,
    req: Ruma<kick_user::v3::Request>,
) -> Result<RumaResponse<kick_user::v3::Response>> {
    let caller = req.caller();
    let current = server.rooms.membership(&req.body.room_id, &req.body.user_id)?;
    if !matches!(current, Some(crate::rooms::Membership::Join | crate::rooms::Membership::Invite | crate::rooms::Membership::Knock)) {
        return Err(Error::forbidden("the user is not in the room"));
    }
    crate::membership::set(&*server, &caller.user_id, &req.body.room_id, &req.body.user_id, "leave", req.body.reason.as_deref(), None).await?;
    Ok(kick_user::v3::Response::new().into())
}

async fn ban(
    State(server): State<AppState>,
    req: Ruma<ban_user::v3::Request>,
) -> Result<RumaResponse<ban_user::v3::Response>> {
    let caller = req.caller();
    crate::membership::set(&*server, &caller.user_id, &req.body.room_id, &req.body.user_id, "ban", req.body.reason.as_deref(), None).await?;
    Ok(ban_user::v3::Response::new().into())
}

async fn unban(
    State(server): State<AppState>,
    req: Ruma<unban_user::v3::Request>,
) -> Result<RumaResponse<unban_user::v3::Response>> {
    let caller = req.caller();
    if server.rooms.membership(&req.body.room_id, &req.body.user_id)? != Some(crate::rooms::Membership::Ban) {
        return Err(Error::forbidden("the user is not banned"));
    }
    crate::membership::set(&*server, &caller.user_id, &req.body.room_id, &req.body.user_id, "leave", req.body.reason.as_deref(), None).await?;
    Ok(unban_user::v3::Response::new().into())
}

async fn knock(
    State(server): State<AppState>,
    req: Ruma<knock_room::v3::Request>,
) -> Result<RumaResponse<knock_room::v3::Response>> {
    let caller = req.caller();
    let room_id = resolve_room(&server, &req.body.room_id_or_alias)?;
    if server.rooms.is_joined(&room_id, &caller.user_id)? {
        return Err(Error::forbidden("you are already joined to this room"));
    }
    if server.rooms.reached_over_federation(&room_id)? {
        crate::federation::membership::membership_remote(&*server, &caller.user_id, &room_id, &req.body.via, "knock", req.body.reason.as_deref()).await?;
        return Ok(knock_room::v3::Response::new(room_id).into());
    }
    let attempt = crate::membership::set(&*server, &caller.user_id, &room_id, &caller.user_id, "knock", req.body.reason.as_deref(), passcode(&req));
    limit_passcode_guesses(&server, &req, &room_id, attempt).await?;
    Ok(knock_room::v3::Response::new(room_id).into())
}
