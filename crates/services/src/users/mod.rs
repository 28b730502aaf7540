//! Accounts, devices, access tokens, profiles, account data, filters and presence.

mod password;

use limbic_core::now_ms;
use std::sync::Arc;

use ruma::{OwnedDeviceId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;
use sha2::{Digest, Sha256};

pub use password::{hash_password, verify_password};

use crate::{
    error::{Error, ErrorCode, Result},
    store::{Key, KeyReader, Store, StreamPos, tables},
};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Account {
    /// argon2 PHC string; `None` for accounts that cannot log in with a password.
    pub password_hash: Option<String>,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub deactivated: bool,
    pub created_ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub displayname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Device {
    pub display_name: Option<String>,
    pub last_seen_ts: Option<u64>,
    pub last_seen_ip: Option<String>,
    /// sha256 of the device's current access token, to revoke it with the device.
    pub token_hash: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TokenRecord {
    user_id: OwnedUserId,
    device_id: OwnedDeviceId,
}

/// At most this many tokens are kept; beyond it, all are forgotten and read again as used.
const KNOWN_TOKENS_MAX: usize = 10_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccountDataEntry {
    pub content: JsonValue,
    pub pos: StreamPos,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Presence {
    pub presence: String,
    pub status_msg: Option<String>,
    pub last_active_ts: u64,
    pub pos: StreamPos,
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    /// sha256 of the access token the request carried (what pushers it sets belong to).
    pub token_hash: String,
}

/// Something set through an access token that must end with it (a pusher, which would otherwise
/// keep sending message content to whoever set it).
pub trait TokenBound: Send + Sync {
    /// Stages the removal of what the token with `token_hash` set; `None`: of what no known
    /// token set.
    fn stage_token_ended(&self, batch: &mut crate::store::Batch, user_id: &UserId, token_hash: Option<&str>) -> Result<()>;
}

pub struct Users {
    store: Arc<Store>,
    /// What ends with an access token, given at start-up.
    token_bound: Vec<Arc<dyn TokenBound>>,
    /// Stream position of the latest presence change (the watermark at start after a restart).
    presence_pos: std::sync::atomic::AtomicU64,
    /// Keeps this process's takes of one registration nonce apart (the store's condition keeps
    /// other nodes' apart).
    taking_nonce: std::sync::Mutex<()>,
    /// Access tokens read valid, by hash, each kept until its removal is announced
    /// ([`tables::ACCESS_TOKENS`]): to this process as the removal commits, to the other nodes
    /// sharing the store a moment after. On a shared store every request would otherwise read
    /// its token from the database.
    known_tokens: Arc<crate::store::Kept<String, TokenRecord>>,
}

/// How long a nonce handed out for shared-secret registration may be used (once).
const NONCE_LIFETIME_MS: u64 = 60_000;


/// When a stored nonce was issued.
fn issued_at(stored: &[u8]) -> Option<u64> {
    stored.try_into().ok().map(u64::from_be_bytes)
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether the access token with this hash is still valid.
pub fn token_is_live(store: &Store, token_hash: &str) -> Result<bool> {
    Ok(store.contains(tables::ACCESS_TOKENS, token_hash.as_bytes())?)
}

/// The local user id for a localpart (case-folded), refusing characters the spec disallows.
pub fn local_user_id(localpart: &str, server_name: &ruma::ServerName) -> Result<OwnedUserId> {
    let localpart = localpart.to_lowercase();
    if localpart.is_empty()
        || !localpart.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
    {
        return Err(Error::new(ErrorCode::InvalidUsername, "user ids may only contain a-z, 0-9, . _ = - / +"));
    }
    // The spec caps a whole user id at 255 bytes; ruma does not check it when building one.
    if localpart.len() + server_name.as_str().len() + 2 > MAX_USER_ID_BYTES {
        return Err(Error::new(ErrorCode::InvalidUsername, format!("user ids are at most {MAX_USER_ID_BYTES} bytes long")));
    }
    UserId::parse_with_server_name(localpart, server_name).map_err(|e| Error::new(ErrorCode::InvalidUsername, e.to_string()))
}

const MAX_USER_ID_BYTES: usize = 255;

pub fn random_string(len: usize) -> String {
    use rand::RngExt;
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(len).map(char::from).collect()
}

impl Users {
    pub fn new(store: Arc<Store>, token_bound: Vec<Arc<dyn TokenBound>>) -> Self {
        let presence_pos = store.streams().current().into();
        let known_tokens = crate::store::Kept::watching(&store, tables::ACCESS_TOKENS, KNOWN_TOKENS_MAX, |hash| {
            crate::store::Announced::One(String::from_utf8_lossy(hash).into_owned())
        });
        Self { store, token_bound, presence_pos, taking_nonce: std::sync::Mutex::default(), known_tokens }
    }

    /// A nonce for shared-secret registration, kept in the store (so that any node takes it),
    /// with those that ran out removed.
    pub fn issue_registration_nonce(&self) -> Result<String> {
        let nonce = random_string(32);
        let now = now_ms();
        let mut batch = self.store.batch();
        for item in self.store.scan_prefix(tables::REGISTRATION_NONCES, Vec::new(), false) {
            let (key, issued) = item?;
            if issued_at(&issued).is_none_or(|issued| now.saturating_sub(issued) >= NONCE_LIFETIME_MS) {
                batch.delete(tables::REGISTRATION_NONCES, &key);
            }
        }
        batch.put(tables::REGISTRATION_NONCES, nonce.as_bytes(), &now.to_be_bytes());
        self.store.write(batch)?;
        Ok(nonce)
    }

    /// Consumes a nonce; false if it was never issued, already used or expired. Of two nodes
    /// taking the same nonce at once, one does.
    pub fn take_registration_nonce(&self, nonce: &str) -> Result<bool> {
        let _taking = self.taking_nonce.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(issued) = self.store.get(tables::REGISTRATION_NONCES, nonce.as_bytes())? else { return Ok(false) };
        let mut batch = self.store.batch();
        batch.expect(tables::REGISTRATION_NONCES, nonce.as_bytes(), Some(&issued));
        batch.delete(tables::REGISTRATION_NONCES, nonce.as_bytes());
        match self.store.write(batch) {
            Ok(()) => Ok(issued_at(&issued).is_some_and(|issued| now_ms().saturating_sub(issued) < NONCE_LIFETIME_MS)),
            Err(crate::store::StoreError::Conflict { .. }) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Whether presence changed after `pos`. Another node sharing the store does not tell this
    /// one of its changes: there, maybe.
    pub fn presence_changed_after(&self, pos: StreamPos) -> bool {
        self.store.is_shared() || self.presence_pos.load(std::sync::atomic::Ordering::Acquire) > pos
    }

    pub fn account(&self, user_id: &UserId) -> Result<Option<Account>> {
        Ok(self.store.get_json(tables::USERS, user_id.as_bytes())?)
    }

    pub fn exists(&self, user_id: &UserId) -> Result<bool> {
        Ok(self.store.contains(tables::USERS, user_id.as_bytes())?)
    }

    /// Every account, in user id order.
    /// Whether the user is a server administrator.
    pub fn is_admin(&self, user_id: &UserId) -> Result<bool> {
        Ok(self.account(user_id)?.is_some_and(|a| a.admin))
    }

    pub fn accounts(&self) -> Result<Vec<(OwnedUserId, Account)>> {
        self.store
            .scan_prefix(tables::USERS, Vec::new(), false)
            .map(|item| {
                let (key, value) = item?;
                let user_id = OwnedUserId::try_from(String::from_utf8_lossy(&key).into_owned())
                    .map_err(|_| Error::internal("corrupt user id in key"))?;
                Ok((user_id, crate::store::decode(tables::USERS, &value)?))
            })
            .collect()
    }

    pub fn create(&self, user_id: &UserId, password: Option<&str>, admin: bool) -> Result<()> {
        if self.exists(user_id)? {
            return Err(Error::new(ErrorCode::UserInUse, "user id already taken"));
        }
        let account = Account {
            password_hash: password.map(hash_password).transpose()?,
            admin,
            deactivated: false,
            created_ts: ruma::MilliSecondsSinceUnixEpoch::now().0.into(),
            displayname: Some(user_id.localpart().to_owned()),
            avatar_url: None,
        };
        self.put_account(user_id, &account)
    }

    pub fn put_account(&self, user_id: &UserId, account: &Account) -> Result<()> {
        let mut batch = self.store.batch();
        batch.put_json(tables::USERS, user_id.as_bytes(), account)?;
        self.store.write(batch)?;
        Ok(())
    }

    /// Checks a password; deactivated accounts and wrong passwords are both refused.
    pub fn check_password(&self, user_id: &UserId, password: &str) -> Result<Account> {
        let refuse = || Error::forbidden("invalid username or password");
        let account = self.account(user_id)?.ok_or_else(refuse)?;
        if account.deactivated {
            return Err(Error::new(ErrorCode::UserDeactivated, "this account has been deactivated"));
        }
        let hash = account.password_hash.as_deref().ok_or_else(refuse)?;
        if !verify_password(password, hash) {
            return Err(refuse());
        }
        Ok(account)
    }

    pub fn set_password(&self, user_id: &UserId, password: &str) -> Result<()> {
        let mut account = self.account(user_id)?.ok_or_else(|| Error::not_found("unknown user"))?;
        account.password_hash = Some(hash_password(password)?);
        self.put_account(user_id, &account)
    }

    /// Creates (or replaces the token of) a device and returns a fresh access token.
    pub fn create_device(
        &self,
        user_id: &UserId,
        device_id: Option<OwnedDeviceId>,
        display_name: Option<String>,
        ip: Option<String>,
    ) -> Result<(OwnedDeviceId, String)> {
        let mut batch = self.store.batch();
        let created = self.stage_device(&mut batch, user_id, device_id, display_name, ip)?;
        self.store.write(batch)?;
        Ok(created)
    }

    /// Stages a device (or a new token for an existing one) and returns its fresh access token.
    pub fn stage_device(
        &self,
        batch: &mut crate::store::Batch,
        user_id: &UserId,
        device_id: Option<OwnedDeviceId>,
        display_name: Option<String>,
        ip: Option<String>,
    ) -> Result<(OwnedDeviceId, String)> {
        let device_id = device_id.unwrap_or_else(|| OwnedDeviceId::from(random_string(10).to_uppercase()));
        let token = format!("lmb_{}", random_string(40));
        let hash = token_hash(&token);
        let device_key = Key::new().str(user_id.as_str()).str(device_id.as_str()).into_vec();
        if let Some(old) = self.store.get_json::<Device>(tables::DEVICES, &device_key)? {
            self.stage_token_removal(batch, user_id, &old.token_hash)?;
        }
        let now: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
        let device = Device { display_name, last_seen_ts: Some(now), last_seen_ip: ip, token_hash: hash.clone() };
        batch.put_json(tables::DEVICES, &device_key, &device)?;
        batch.put_json(tables::ACCESS_TOKENS,
            hash.as_bytes(),
            &TokenRecord { user_id: user_id.to_owned(), device_id: device_id.clone() },
        )?;
        Ok((device_id, token))
    }

    pub fn authenticate(&self, token: &str) -> Result<Option<Caller>> {
        let hash = token_hash(token);
        let caller = |record: &TokenRecord| Caller { user_id: record.user_id.clone(), device_id: record.device_id.clone(), token_hash: hash.clone() };
        let record = self.known_tokens.get(&hash, |hash| self.store.get_json::<TokenRecord>(tables::ACCESS_TOKENS, hash.as_bytes()))?;
        Ok(record.as_ref().map(caller))
    }

    pub fn device(&self, user_id: &UserId, device_id: &str) -> Result<Option<Device>> {
        let key = Key::new().str(user_id.as_str()).str(device_id).into_vec();
        Ok(self.store.get_json(tables::DEVICES, &key)?)
    }

    pub fn devices(&self, user_id: &UserId) -> Result<Vec<(OwnedDeviceId, Device)>> {
        Ok(self
            .store
            .children(tables::DEVICES, &[user_id.as_str()])?
            .into_iter()
            .map(|(id, device)| (OwnedDeviceId::from(id), device))
            .collect())
    }

    pub fn update_device(&self, user_id: &UserId, device_id: &str, display_name: Option<String>) -> Result<()> {
        let key = Key::new().str(user_id.as_str()).str(device_id).into_vec();
        let mut device: Device =
            self.store.get_json(tables::DEVICES, &key)?.ok_or_else(|| Error::not_found("unknown device"))?;
        device.display_name = display_name;
        let mut batch = self.store.batch();
        batch.put_json(tables::DEVICES, &key, &device)?;
        self.store.write(batch)?;
        Ok(())
    }

    /// Stages the removal of a device and its access token; false if there is no such device.
    pub fn stage_device_removal(&self, batch: &mut crate::store::Batch, user_id: &UserId, device_id: &str) -> Result<bool> {
        let key = Key::new().str(user_id.as_str()).str(device_id).into_vec();
        let Some(device) = self.store.get_json::<Device>(tables::DEVICES, &key)? else {
            return Ok(false);
        };
        self.stage_token_removal(batch, user_id, &device.token_hash)?;
        batch.delete(tables::DEVICES, &key);
        Ok(true)
    }

    /// Every access token ends here, and what was set through it ends with it.
    fn stage_token_removal(&self, batch: &mut crate::store::Batch, user_id: &UserId, token_hash: &str) -> Result<()> {
        batch.delete(tables::ACCESS_TOKENS, token_hash.as_bytes());
        // Every node forgets it: none accepts it once the removal has committed.
        batch.announce(tables::ACCESS_TOKENS, token_hash.as_bytes());
        self.token_bound.iter().try_for_each(|bound| bound.stage_token_ended(batch, user_id, Some(token_hash)))
    }

    /// When a user is signed out of every other session: what no known token set (pushers set
    /// before pushers recorded their token) goes as well, since any of it may be an intruder's.
    pub fn stage_unowned_pushers_removal(&self, batch: &mut crate::store::Batch, user_id: &UserId) -> Result<()> {
        self.token_bound.iter().try_for_each(|bound| bound.stage_token_ended(batch, user_id, None))
    }

    // --- profile ---

    pub fn set_profile(&self, user_id: &UserId, displayname: Option<Option<String>>, avatar_url: Option<Option<String>>) -> Result<Account> {
        let mut account = self.account(user_id)?.ok_or_else(|| Error::not_found("unknown user"))?;
        if let Some(name) = displayname {
            account.displayname = name;
        }
        if let Some(url) = avatar_url {
            account.avatar_url = url;
        }
        self.put_account(user_id, &account)?;
        Ok(account)
    }

    // --- account data ---

    /// Sets one account data entry, within the per-user quotas: [`MAX_ACCOUNT_DATA_BYTES`] a
    /// value and [`MAX_ACCOUNT_DATA_KEYS`] entries (global and per room together).
    pub fn set_account_data(&self, user_id: &UserId, room_id: Option<&RoomId>, kind: &str, content: JsonValue) -> Result<()> {
        let store = &self.store;
        let size = serde_json::to_vec(&content).map_err(Error::internal)?.len();
        if size > MAX_ACCOUNT_DATA_BYTES {
            return Err(Error::new(ErrorCode::TooLarge, format!("an account data value is at most {MAX_ACCOUNT_DATA_BYTES} bytes")));
        }
        let key = Key::new().str(user_id.as_str()).str(room_id.map_or("", |r| r.as_str())).str(kind).into_vec();
        let prefix = Key::new().str(user_id.as_str()).into_vec();
        if !store.contains(tables::ACCOUNT_DATA, &key)? && count_at_most(store, tables::ACCOUNT_DATA, prefix, MAX_ACCOUNT_DATA_KEYS)? >= MAX_ACCOUNT_DATA_KEYS {
            return Err(Error::new(ErrorCode::ResourceLimitExceeded, format!("an account holds at most {MAX_ACCOUNT_DATA_KEYS} account data entries")));
        }
        let ticket = store.streams().allocate(store)?;
        let mut batch = store.batch();
        batch.put_json(tables::ACCOUNT_DATA, &key, &AccountDataEntry { content, pos: ticket.pos() })?;
        // Every node, this one included, keeps some of a user's global account data (their push
        // rules) until a change is announced.
        if room_id.is_none() {
            batch.announce(tables::ACCOUNT_DATA, &key);
        }
        tokio::task::block_in_place(|| store.write(batch))?;
        drop(ticket);
        Ok(())
    }

    pub fn account_data(&self, user_id: &UserId, room_id: Option<&RoomId>, kind: &str) -> Result<Option<JsonValue>> {
        let key = Key::new().str(user_id.as_str()).str(room_id.map_or("", |r| r.as_str())).str(kind).into_vec();
        Ok(self.store.get_json::<AccountDataEntry>(tables::ACCOUNT_DATA, &key)?.map(|e| e.content))
    }

    /// Account data changed after `since`, as (room id or "" for global, type, content).
    pub fn account_data_since(&self, user_id: &UserId, since: StreamPos) -> Result<Vec<(String, String, JsonValue)>> {
        let prefix = Key::new().str(user_id.as_str()).into_vec();
        let mut out = Vec::new();
        for item in self.store.scan_prefix(tables::ACCOUNT_DATA, prefix, false) {
            let (key, value) = item?;
            let entry: AccountDataEntry = crate::store::decode(tables::ACCOUNT_DATA, &value)?;
            if entry.pos <= since {
                continue;
            }
            let mut reader = KeyReader::new(&key);
            reader.str();
            if let (Some(room), Some(kind)) = (reader.str(), reader.str()) {
                out.push((room.to_owned(), kind.to_owned(), entry.content));
            }
        }
        Ok(out)
    }

    // --- filters ---

    /// Stores a filter. Identical filters share one id (clients upload theirs at every start),
    /// and an account keeps at most [`MAX_FILTERS`].
    pub fn create_filter(&self, user_id: &UserId, filter: &JsonValue) -> Result<String> {
        let digest = Sha256::digest(serde_json::to_vec(filter).map_err(Error::internal)?);
        let id = hex::encode(&digest[..8]);
        let key = Key::new().str(user_id.as_str()).str(&id).into_vec();
        if self.store.contains(tables::FILTERS, &key)? {
            return Ok(id);
        }
        if count_at_most(&self.store, tables::FILTERS, Key::new().str(user_id.as_str()).into_vec(), MAX_FILTERS)? >= MAX_FILTERS {
            return Err(Error::new(ErrorCode::ResourceLimitExceeded, format!("an account holds at most {MAX_FILTERS} filters")));
        }
        let mut batch = self.store.batch();
        batch.put_json(tables::FILTERS, &key, filter)?;
        self.store.write(batch)?;
        Ok(id)
    }

    pub fn filter(&self, user_id: &UserId, filter_id: &str) -> Result<Option<JsonValue>> {
        let key = Key::new().str(user_id.as_str()).str(filter_id).into_vec();
        Ok(self.store.get_json(tables::FILTERS, &key)?)
    }

    // --- presence ---

    pub fn set_presence(&self, user_id: &UserId, presence: &str, status_msg: Option<String>) -> Result<()> {
        let store = &self.store;
        let ticket = store.streams().allocate(store)?;
        let record = Presence {
            presence: presence.to_owned(),
            status_msg,
            last_active_ts: ruma::MilliSecondsSinceUnixEpoch::now().0.into(),
            pos: ticket.pos(),
        };
        let mut batch = store.batch();
        batch.put_json(tables::PRESENCE, user_id.as_bytes(), &record)?;
        tokio::task::block_in_place(|| store.write(batch))?;
        self.presence_pos.fetch_max(ticket.pos(), std::sync::atomic::Ordering::AcqRel);
        drop(ticket);
        Ok(())
    }

    pub fn presence(&self, user_id: &UserId) -> Result<Option<Presence>> {
        Ok(self.store.get_json(tables::PRESENCE, user_id.as_bytes())?)
    }
}

/// How long an OpenID token (for third parties such as the SFU) stays valid.
pub const OPENID_TOKEN_LIFETIME_SECONDS: u64 = 3600;
/// Unexpired OpenID tokens an account holds at most; a new one replaces the oldest.
pub const MAX_OPENID_TOKENS: usize = 10;
/// Filters an account holds at most.
pub const MAX_FILTERS: usize = 100;
/// Account data entries an account holds at most, and the largest value.
pub const MAX_ACCOUNT_DATA_KEYS: usize = 1000;
pub const MAX_ACCOUNT_DATA_BYTES: usize = 64 * 1024;

/// The number of entries under `prefix`, counting no further than `limit`.
fn count_at_most(store: &Store, table: crate::store::Table, prefix: Vec<u8>, limit: usize) -> Result<usize> {
    let mut count = 0;
    for item in store.scan_prefix(table, prefix, false).take(limit) {
        item?;
        count += 1;
    }
    Ok(count)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct OpenIdToken {
    user_id: OwnedUserId,
    expires_at_ms: u64,
}

/// `expiry`, or one millisecond after the last one handed out if that is not earlier: tokens
/// are ordered by expiry, so two issued in the same millisecond must not tie.
fn strictly_later_expiry(expiry: u64) -> u64 {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let previous = LAST
        .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |last| Some(expiry.max(last + 1)))
        .unwrap_or_else(|last| last);
    expiry.max(previous + 1)
}

impl Users {
    /// Issues an OpenID token for `user_id` (only its hash is kept). The account's expired
    /// tokens go, and so do its oldest beyond [`MAX_OPENID_TOKENS`], in the same write.
    pub fn issue_openid_token(&self, user_id: &UserId) -> Result<String> {
        let token = random_string(32);
        let now: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
        let expires_at_ms = strictly_later_expiry(now + OPENID_TOKEN_LIFETIME_SECONDS * 1000);
        let record = OpenIdToken { user_id: user_id.to_owned(), expires_at_ms };
        let mut batch = self.store.batch();
        // The account's tokens, oldest (soonest to expire) first.
        let mut held = Vec::new();
        for item in self.store.scan_prefix(tables::OPENID_TOKENS_BY_USER, Key::new().str(user_id.as_str()).into_vec(), false) {
            let (key, _) = item?;
            let mut reader = KeyReader::new(&key).skip_str();
            if let (Some(expires), Some(hash)) = (reader.u64(), reader.str()) {
                held.push((key.clone(), expires, hash.to_owned()));
            }
        }
        let live = held.iter().filter(|(_, expires, _)| *expires > now).count();
        let excess = (live + 1).saturating_sub(MAX_OPENID_TOKENS);
        let expired = held.len() - live;
        for (key, _, hash) in held.iter().take(expired + excess) {
            batch.delete(tables::OPENID_TOKENS_BY_USER, key);
            batch.delete(tables::OPENID_TOKENS, hash.as_bytes());
        }
        let hash = token_hash(&token);
        batch.put_json(tables::OPENID_TOKENS, hash.as_bytes(), &record)?;
        batch.put(tables::OPENID_TOKENS_BY_USER, &Key::new().str(user_id.as_str()).u64(expires_at_ms).str(&hash).into_vec(), &[]);
        self.store.write(batch)?;
        Ok(token)
    }

    /// The user an unexpired OpenID token was issued to.
    pub fn openid_user(&self, token: &str) -> Result<Option<OwnedUserId>> {
        let now: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
        let record: Option<OpenIdToken> = self.store.get_json(tables::OPENID_TOKENS, token_hash(token).as_bytes())?;
        Ok(record.filter(|r| r.expires_at_ms > now).map(|r| r.user_id))
    }
}
