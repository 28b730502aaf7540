//! Server administration, shared by the Synapse-compatible admin API (`client::admin`) and the
//! `limbic user …` subcommands: accounts, and (in `rooms`) rooms and their deletion.

mod rooms;

use ruma::{OwnedUserId, UserId};

pub use rooms::{DeleteRoom, Deletion, Deletions, ShutdownReport, audit_notes_read, delete_room, list_rooms, room_summary};

use crate::{
    error::{Error, ErrorCode, Result},
    users::{Account, local_user_id},
};

/// What administration reaches of the server: everything the clinic and federation do (the
/// audit log, device sign-outs that other servers learn of), and its own state.
pub trait AdminHost: crate::clinic::ClinicHost + crate::federation::FederationHost {
    fn admin(&self) -> &Admin;
}

/// Admin state kept in memory: the room deletions of this process, for `delete_status`.
#[derive(Default)]
pub struct Admin {
    pub deletions: Deletions,
}

/// A local user id from a full user id or a bare localpart, held to the rules of registration.
pub fn local_user(server: &dyn AdminHost, user: &str) -> Result<OwnedUserId> {
    if !user.starts_with('@') {
        return local_user_id(user, server.server_name());
    }
    let user_id = UserId::parse(user).map_err(|e| Error::invalid_param(format!("invalid user id {user}: {e}")))?;
    if user_id.server_name() != server.server_name() {
        return Err(Error::invalid_param("only local users can be managed on this server"));
    }
    if local_user_id(user_id.localpart(), server.server_name())? != user_id {
        return Err(Error::new(ErrorCode::InvalidUsername, "user ids are lower case"));
    }
    Ok(user_id)
}

/// The account of an existing user.
pub fn account(server: &dyn AdminHost, user_id: &UserId) -> Result<Account> {
    server.users().account(user_id)?.ok_or_else(|| Error::not_found(format!("unknown user {user_id}")))
}

fn check_password(password: &str) -> Result<()> {
    if password.is_empty() {
        return Err(Error::new(ErrorCode::WeakPassword, "the password must not be empty"));
    }
    Ok(())
}

/// Creates an account; `None` as the password makes one that cannot log in with a password.
pub fn create_user(server: &dyn AdminHost, user_id: &UserId, password: Option<&str>, admin: bool) -> Result<()> {
    password.map(check_password).transpose()?;
    server.users().create(user_id, password, admin)?;
    tracing::info!(%user_id, admin, "admin created user");
    Ok(())
}

pub fn set_admin(server: &dyn AdminHost, user_id: &UserId, admin: bool) -> Result<()> {
    let mut account = account(server, user_id)?;
    account.admin = admin;
    server.users().put_account(user_id, &account)?;
    tracing::info!(%user_id, admin, "admin changed server admin status");
    Ok(())
}

/// Sets a new password; with `logout_devices`, every device and access token is removed too.
pub fn reset_password(server: &dyn AdminHost, user_id: &UserId, password: &str, logout_devices: bool) -> Result<()> {
    check_password(password)?;
    server.users().set_password(user_id, password)?;
    if logout_devices {
        crate::accounts::delete_all_devices(server, user_id, None)?;
    }
    tracing::info!(%user_id, logout_devices, "admin reset password");
    Ok(())
}

/// What `PUT /_synapse/admin/v2/users/{userId}` may change; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct AccountChanges {
    pub password: Option<String>,
    /// Whether a new password of an existing account logs out all its devices.
    pub logout_devices: bool,
    pub displayname: Option<Option<String>>,
    pub avatar_url: Option<Option<String>>,
    pub admin: Option<bool>,
    pub deactivated: Option<bool>,
}

/// Creates the account if it does not exist, then applies the changes, as Synapse does.
/// Returns whether the account was created.
pub async fn put_user(server: &dyn AdminHost, user_id: &UserId, changes: AccountChanges) -> Result<bool> {
    let existing = server.users().account(user_id)?;
    if let Some(password) = &changes.password {
        check_password(password)?;
    }
    let was_deactivated = existing.as_ref().is_some_and(|a| a.deactivated);
    let reactivate = was_deactivated && changes.deactivated == Some(false);
    // A deactivated account has lost its password; it needs a new one to be usable again.
    if reactivate && changes.password.is_none() {
        return Err(Error::new(ErrorCode::MissingParam, "a password is needed to reactivate an account"));
    }
    match &existing {
        None => create_user(server, user_id, changes.password.as_deref(), changes.admin.unwrap_or(false))?,
        Some(account) => {
            if reactivate {
                server.users().put_account(user_id, &Account { deactivated: false, ..account.clone() })?;
            }
            if let Some(admin) = changes.admin {
                set_admin(server, user_id, admin)?;
            }
            if let Some(password) = &changes.password {
                reset_password(server, user_id, password, changes.logout_devices)?;
            }
        }
    }
    if changes.displayname.is_some() || changes.avatar_url.is_some() {
        crate::accounts::set_profile(server, user_id, changes.displayname, changes.avatar_url).await?;
    }
    if changes.deactivated == Some(true) && !was_deactivated {
        crate::accounts::deactivate_account(server, user_id).await?;
    }
    Ok(existing.is_none())
}

/// Which accounts the user list shows.
#[derive(Debug, Default)]
pub struct UserFilter {
    /// Part of the user id or of the display name, in any case.
    pub name: Option<String>,
    /// Part of the user id, in any case.
    pub user_id: Option<String>,
    pub include_deactivated: bool,
    /// Only admins (`Some(true)`) or only other users (`Some(false)`).
    pub admins: Option<bool>,
}

/// The accounts that pass the filter, in user id order.
pub fn list_users(server: &dyn AdminHost, filter: &UserFilter) -> Result<Vec<(OwnedUserId, Account)>> {
    let contains = |hay: &str, part: &str| hay.to_lowercase().contains(&part.to_lowercase());
    let mut accounts = server.users().accounts()?;
    accounts.retain(|(user_id, account)| {
        (filter.include_deactivated || !account.deactivated)
            && filter.admins.is_none_or(|admin| admin == account.admin)
            && filter.user_id.as_deref().is_none_or(|part| contains(user_id.as_str(), part))
            && filter.name.as_deref().is_none_or(|part| {
                contains(user_id.as_str(), part) || account.displayname.as_deref().is_some_and(|name| contains(name, part))
            })
    });
    Ok(accounts)
}

/// One page of a list, paged by offset as the admin API does.
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: usize,
    /// The offset of the next page, when there is one.
    pub next: Option<usize>,
}

pub fn page<T>(all: Vec<T>, from: usize, limit: usize) -> Page<T> {
    let total = all.len();
    let items: Vec<T> = all.into_iter().skip(from).take(limit).collect();
    let next = (from.saturating_add(items.len()) < total && !items.is_empty()).then(|| from + items.len());
    Page { items, total, next }
}
