//! What happens to an account across the services: signing devices out (their tokens, keys,
//! pending messages and pushers go in one batch, and other servers sharing a room learn of it),
//! a profile change sent into every joined room, deactivation.

use serde_json::json;
use ruma::UserId;

use crate::{
    error::{Error, Result},
    events::PduBuilder,
    federation::FederationHost,
    host::LocalServer,
    rooms::Membership,
    users::Account,
};

/// Removes devices with their access tokens, keys, pending messages and pushers, in one batch.
pub fn delete_devices<'d>(server: &dyn FederationHost, user_id: &UserId, device_ids: impl IntoIterator<Item = &'d str>) -> Result<()> {
    remove_devices(server, user_id, device_ids, false)
}

/// Signs the user out of every session but `except` (password changes, logout/all,
/// deactivation); pushers whose token is unknown go too.
pub fn delete_all_devices(server: &dyn FederationHost, user_id: &UserId, except: Option<&str>) -> Result<()> {
    let devices = server.users().devices(user_id)?;
    remove_devices(server, user_id, devices.iter().map(|(id, _)| id.as_str()).filter(|id| Some(*id) != except), true)
}

fn remove_devices<'d>(server: &dyn FederationHost, user_id: &UserId, device_ids: impl IntoIterator<Item = &'d str>, everywhere_else: bool) -> Result<()> {
    let ticket = server.store().streams().allocate(server.store())?;
    let mut batch = server.store().batch();
    let mut removed = Vec::new();
    for device_id in device_ids {
        if server.users().stage_device_removal(&mut batch, user_id, device_id)? {
            server.e2ee().stage_device_removal(&mut batch, user_id, device_id, ticket.pos())?;
            removed.push(device_id.to_owned());
        }
    }
    if everywhere_else {
        server.users().stage_unowned_pushers_removal(&mut batch, user_id)?;
    }
    tokio::task::block_in_place(|| server.store().write(batch))?;
    drop(ticket);
    // Other servers sharing a room with the user learn of the removal.
    for device_id in removed {
        crate::federation::sender::device_list_changed(server, user_id, &device_id, true)?;
    }
    Ok(())
}

/// Sets profile fields and sends the new member event into every room the user has joined.
pub async fn set_profile(
    server: &dyn LocalServer,
    user_id: &UserId,
    displayname: Option<Option<String>>,
    avatar_url: Option<Option<String>>,
) -> Result<Account> {
    let account = server.users().set_profile(user_id, displayname, avatar_url)?;
    for (room_id, entry) in server.rooms().user_rooms(user_id)? {
        if entry.membership != Membership::Join {
            continue;
        }
        let mut writer = server.rooms().writer(&room_id).await?;
        let mut content = writer
            .state_event("m.room.member", user_id.as_str())?
            .map(|p| p.content_json())
            .unwrap_or_else(|| json!({ "membership": "join" }));
        if let Some(content) = content.as_object_mut() {
            for (field, value) in [("displayname", &account.displayname), ("avatar_url", &account.avatar_url)] {
                match value {
                    Some(value) => content.insert(field.to_owned(), json!(value)),
                    None => content.remove(field),
                };
            }
        }
        writer.append(user_id, PduBuilder::state("m.room.member", user_id.as_str(), content), None)?;
        writer.commit()?;
    }
    Ok(account)
}

/// Deactivates an account: leaves every room, then locks the account, clears its profile
/// and revokes every token.
pub async fn deactivate_account(server: &dyn FederationHost, user_id: &UserId) -> Result<()> {
    let mut account = server.users().account(user_id)?.ok_or_else(|| Error::not_found("unknown user"))?;
    for (room_id, entry) in server.rooms().user_rooms(user_id)? {
        if matches!(entry.membership, Membership::Join | Membership::Invite | Membership::Knock) {
            let mut writer = server.rooms().writer(&room_id).await?;
            let leave = PduBuilder::state("m.room.member", user_id.as_str(), json!({ "membership": "leave" }));
            if writer.append(user_id, leave, None).is_ok() {
                writer.commit()?;
            }
        }
    }
    account.deactivated = true;
    account.password_hash = None;
    account.displayname = None;
    account.avatar_url = None;
    server.users().put_account(user_id, &account)?;
    delete_all_devices(server, user_id, None)?;
    tracing::info!(%user_id, "deactivated account");
    Ok(())
}
