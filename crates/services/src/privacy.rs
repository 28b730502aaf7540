//! Who may look other users up — profiles, presence, the user directory — under `[privacy]`
//! (Synapse's `require_auth_for_profile_requests` and
//! `limit_profile_requests_to_users_who_share_rooms`; spec/behaviour.md, "Looking users up").
//! Only client requests are checked: other servers' profile queries are answered, as Synapse
//! does, since the asking server applies its own options to its users.

use std::collections::BTreeMap;

use ruma::{OwnedRoomId, UserId};
use serde_json::{Value as JsonValue, json};

use crate::{
    error::{Error, ErrorCode, Result},
    clinic::ClinicHost,
    config::PrivacyConfig,
    rooms::Membership,
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Profile,
    Presence,
}

/// Refuses a look-up of `target` by `asker` (`None`: no access token) that `[privacy]` forbids.
/// One's own is always allowed. With the sharing rule, a user nobody shares a room with is
/// refused alike whether they exist or not, so refusals tell nobody who is registered. A
/// verified therapist's profile stays readable by every user: it is the clinic's public face,
/// and a client in a session's waiting room sees who will admit them before sharing its room.
pub fn check_lookup(server: &dyn ClinicHost, privacy: &PrivacyConfig, asker: Option<&UserId>, target: &UserId, lookup: Lookup) -> Result<()> {
    let share = privacy.limit_profile_requests_to_users_who_share_rooms;
    let Some(asker) = asker else {
        // Nobody shares a room with an anonymous asker.
        return if privacy.require_auth_for_profile_requests || share {
            Err(Error::new(ErrorCode::MissingToken, "an access token is required to look users up"))
        } else {
            Ok(())
        };
    };
    if !share || asker == target || server.rooms().share_a_room(asker, target)? {
        return Ok(());
    }
    if lookup == Lookup::Profile && server.clinic().is_verified_therapist(target)? {
        return Ok(());
    }
    Err(Error::forbidden(match lookup {
        Lookup::Profile => "Profile isn't available",
        Lookup::Presence => "You are not allowed to see their presence",
    }))
}

/// The user directory as `asker` sees it: users whose id or display name contains `term`
/// (case-insensitively), among the members of the rooms `asker` joined and — unless look-ups
/// are limited to users who share a room — of public rooms (Synapse's scope with
/// `search_all_users: false`). At most `limit` results, and whether there were more.
pub fn search_directory(server: &dyn ClinicHost, privacy: &PrivacyConfig, asker: &UserId, term: &str, limit: usize) -> Result<(Vec<JsonValue>, bool)> {
    let term = term.to_lowercase();
    let mut rooms: Vec<OwnedRoomId> = server
        .rooms()
        .user_rooms(asker)?
        .into_iter()
        .filter(|(_, entry)| entry.membership == Membership::Join)
        .map(|(room, _)| room)
        .collect();
    if !privacy.limit_profile_requests_to_users_who_share_rooms {
        rooms.extend(server.rooms().public_rooms()?);
    }
    let mut found = BTreeMap::new();
    for room_id in rooms {
        for user in server.rooms().joined_members(&room_id)? {
            if found.contains_key(&user) {
                continue;
            }
            let account = server.users().account(&user)?;
            let name = account.as_ref().and_then(|a| a.displayname.clone());
            let matches = user.as_str().to_lowercase().contains(&term)
                || name.as_ref().is_some_and(|n| n.to_lowercase().contains(&term));
            if matches {
                found.insert(user.clone(), json!({
                    "user_id": user,
                    "display_name": name,
                    "avatar_url": account.and_then(|a| a.avatar_url),
                }));
            }
        }
    }
    let limited = found.len() > limit;
    Ok((found.into_values().take(limit).collect(), limited))
}
