//! The media repository: uploads, downloads and thumbnails of this server's `mxc://` content.
//! Bytes live in content-addressed files on disk; metadata, quota usage and the thumbnail cache
//! live in the store, committed only once the file they point to is durable.

mod files;
mod thumbnail;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use ruma::{MilliSecondsSinceUnixEpoch, OwnedMxcUri, OwnedServerName, OwnedUserId, ServerName, UInt, UserId};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use self::{
    files::Files,
    thumbnail::{Method, Thumbnail},
};
use crate::{
    config::MediaConfig,
    error::{Error, ErrorCode, Result},
    store::{Key, Store, tables},
};

/// Length of the random part of media ids, as Synapse.
const MEDIA_ID_LEN: usize = 24;
/// How long an id from `create` waits for its upload before it is forgotten, as Synapse.
const UNUSED_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest a download waits for an upload to an id from `create`, as Synapse.
const MAX_WAIT: Duration = Duration::from_secs(60);
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

#[derive(Serialize, Deserialize)]
struct MediaRecord {
    uploader: OwnedUserId,
    created_ts: u64,
    /// `None` until content is uploaded to an id made with `create`.
    content: Option<Content>,
}

#[derive(Serialize, Deserialize)]
struct Content {
    sha256: String,
    content_type: String,
    filename: Option<String>,
    size: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct Usage {
    /// Bytes uploaded, each upload counted even when its content was already stored.
    bytes: u64,
    /// Ids made with `create` and not uploaded to yet, with their creation time.
    pending: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize)]
struct CachedThumbnail {
    sha256: String,
    content_type: String,
}

/// Content as a client uploads it.
pub struct Upload {
    pub bytes: Vec<u8>,
    pub content_type: Option<String>,
    pub filename: Option<String>,
}

/// Content to serve.
pub struct MediaFile {
    pub bytes: Vec<u8>,
    pub content_type: String,
    pub filename: Option<String>,
}

pub struct Media {
    store: Arc<Store>,
    files: Files,
    server_name: OwnedServerName,
    max_upload_size: usize,
    user_quota: u64,
    max_pending_uploads: usize,
    /// Serialises the check-then-write of metadata: quota, pending ids, overwrites.
    commit: Mutex<()>,
    /// Woken when content lands on an id from `create`, for the downloads waiting on it.
    uploaded: Notify,
    /// Set at shutdown, so that waiting downloads answer at once.
    shutdown: watch::Receiver<bool>,
}

fn now_ms() -> u64 {
    MilliSecondsSinceUnixEpoch::now().0.into()
}

fn expired(created_ts: u64, now: u64) -> bool {
    created_ts + UNUSED_EXPIRY.as_millis() as u64 <= now
}

fn storage_error(e: std::io::Error) -> Error {
    Error::internal(format!("media storage: {e}"))
}

/// Runs blocking file or image work off the async threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(Error::internal)?
}

impl Media {
    pub fn open(config: &MediaConfig, store: Arc<Store>, server_name: OwnedServerName, shutdown: watch::Receiver<bool>) -> Result<Self> {
        let files = Files::open(&config.path)
            .map_err(|e| Error::internal(format!("cannot open media store {}: {e}", config.path.display())))?;
        Ok(Self {
            store,
            files,
            server_name,
            max_upload_size: config.max_upload_size,
            user_quota: config.user_quota,
            max_pending_uploads: config.max_pending_uploads,
            commit: Mutex::new(()),
            uploaded: Notify::new(),
            shutdown,
        })
    }

    /// The largest upload accepted, as `m.upload.size`.
    pub fn upload_size(&self) -> UInt {
        UInt::new_saturating(self.max_upload_size as u64)
    }

    fn mxc(&self, media_id: &str) -> OwnedMxcUri {
        format!("mxc://{}/{media_id}", self.server_name).into()
    }

    fn record(&self, media_id: &str) -> Result<Option<MediaRecord>> {
        Ok(self.store.get_json(tables::MEDIA, media_id.as_bytes())?)
    }

    fn usage(&self, user_id: &UserId) -> Result<Usage> {
        Ok(self.store.get_json(tables::MEDIA_USAGE, user_id.as_bytes())?.unwrap_or_default())
    }

    /// The new total of the user's uploads with `size` more bytes, unless over the quota.
    fn charge(&self, usage: &Usage, size: u64) -> Result<u64> {
        let total = usage.bytes.saturating_add(size);
        if self.user_quota > 0 && total > self.user_quota {
            // Synapse answers its upload limits with 400 M_RESOURCE_LIMIT_EXCEEDED.
            return Err(Error::new(
                ErrorCode::ResourceLimitExceeded,
                format!("media upload quota of {} bytes exceeded", self.user_quota),
            ));
        }
        Ok(total)
    }

    fn check_local(&self, server_name: &ServerName) -> Result<()> {
        if server_name != self.server_name {
            return Err(Error::not_found("remote media is not available on this server"));
        }
        Ok(())
    }

    /// Stores a new upload under a fresh media id.
    pub async fn upload(&self, uploader: &UserId, upload: Upload) -> Result<OwnedMxcUri> {
        // Fail before writing anything when the quota is already spent.
        self.charge(&self.usage(uploader)?, upload.bytes.len() as u64)?;
        let content = self.write_content(upload).await?;
        let media_id = crate::users::random_string(MEDIA_ID_LEN);
        self.commit(uploader, &media_id, content, || Ok(now_ms()))?;
        Ok(self.mxc(&media_id))
    }

    /// Reserves a media id for a later upload (`create`), returning it and when it expires.
    pub fn create(&self, uploader: &UserId) -> Result<(OwnedMxcUri, MilliSecondsSinceUnixEpoch)> {
        let _serial = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let now = now_ms();
        let mut usage = self.usage(uploader)?;
        let mut batch = self.store.batch();
        // Ids that expired unused free their slot.
        usage.pending.retain(|media_id, created_ts| {
            let live = !expired(*created_ts, now);
            if !live {
                batch.delete(&self.store, tables::MEDIA, media_id.as_bytes());
            }
            live
        });
        if usage.pending.len() >= self.max_pending_uploads {
            let first_expiry = usage.pending.values().min().map_or(now, |created| created + UNUSED_EXPIRY.as_millis() as u64);
            return Err(Error::LimitExceeded { retry_after_ms: first_expiry.saturating_sub(now) });
        }
        let media_id = crate::users::random_string(MEDIA_ID_LEN);
        usage.pending.insert(media_id.clone(), now);
        let record = MediaRecord { uploader: uploader.to_owned(), created_ts: now, content: None };
        batch.put_json(&self.store, tables::MEDIA, media_id.as_bytes(), &record)?;
        batch.put_json(&self.store, tables::MEDIA_USAGE, uploader.as_bytes(), &usage)?;
        tokio::task::block_in_place(|| self.store.write(batch))?;
        let expires_at = UInt::new_saturating(now + UNUSED_EXPIRY.as_millis() as u64);
        Ok((self.mxc(&media_id), MilliSecondsSinceUnixEpoch(expires_at)))
    }

    /// Uploads content to an id reserved with `create`.
    pub async fn upload_to(&self, uploader: &UserId, server_name: &ServerName, media_id: &str, upload: Upload) -> Result<()> {
        self.check_local(server_name)?;
        // Fail before writing anything; the checks are repeated under the commit lock.
        self.pending_created_ts(uploader, media_id)?;
        self.charge(&self.usage(uploader)?, upload.bytes.len() as u64)?;
        let content = self.write_content(upload).await?;
        self.commit(uploader, media_id, content, || self.pending_created_ts(uploader, media_id))?;
        self.uploaded.notify_waiters();
        Ok(())
    }

    /// The creation time of an id from `create` that `uploader` may still upload to.
    fn pending_created_ts(&self, uploader: &UserId, media_id: &str) -> Result<u64> {
        let record = self.record(media_id)?.ok_or_else(|| Error::not_found("unknown media id"))?;
        if record.uploader != uploader {
            return Err(Error::forbidden("only the creator of a media id can upload to it"));
        }
        if record.content.is_some() {
            return Err(Error::new(ErrorCode::CannotOverwriteMedia, "media id already has content"));
        }
        if expired(record.created_ts, now_ms()) {
            return Err(Error::not_found("media id has expired"));
        }
        Ok(record.created_ts)
    }

    /// Writes the bytes to their content-addressed file, which is durable when this returns.
    async fn write_content(&self, upload: Upload) -> Result<Content> {
        let Upload { bytes, content_type, filename } = upload;
        let size = bytes.len() as u64;
        let files = self.files.clone();
        let sha256 = blocking(move || files.put(&bytes).map_err(storage_error)).await?;
        Ok(Content {
            sha256,
            content_type: content_type.filter(|t| !t.is_empty()).unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_owned()),
            filename: filename.filter(|f| !f.is_empty()),
            size,
        })
    }

    /// Records `content` under `media_id` and charges it to the uploader, in one batch.
    /// `created_ts` checks, under the commit lock, that the id may take the content.
    fn commit(&self, uploader: &UserId, media_id: &str, content: Content, created_ts: impl FnOnce() -> Result<u64>) -> Result<()> {
        let _serial = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let created_ts = created_ts()?;
        let mut usage = self.usage(uploader)?;
        usage.bytes = self.charge(&usage, content.size)?;
        usage.pending.remove(media_id);
        let record = MediaRecord { uploader: uploader.to_owned(), created_ts, content: Some(content) };
        let mut batch = self.store.batch();
        batch.put_json(&self.store, tables::MEDIA, media_id.as_bytes(), &record)?;
        batch.put_json(&self.store, tables::MEDIA_USAGE, uploader.as_bytes(), &usage)?;
        tokio::task::block_in_place(|| self.store.write(batch))?;
        Ok(())
    }

    /// Deletes a local media id (for server admins): it is no longer served and its size no
    /// longer counts against the uploader's quota. The content file stays, as other ids may
    /// share it.
    pub fn delete(&self, media_id: &str) -> Result<()> {
        let _serial = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let record = self.record(media_id)?.ok_or_else(|| Error::not_found("unknown media"))?;
        let mut usage = self.usage(&record.uploader)?;
        usage.pending.remove(media_id);
        usage.bytes = usage.bytes.saturating_sub(record.content.map_or(0, |c| c.size));
        let mut batch = self.store.batch();
        batch.delete(&self.store, tables::MEDIA, media_id.as_bytes());
        batch.put_json(&self.store, tables::MEDIA_USAGE, record.uploader.as_bytes(), &usage)?;
        tokio::task::block_in_place(|| self.store.write(batch))?;
        Ok(())
    }

    /// The content of a local media id, waiting up to `timeout` for an upload to an id from
    /// `create`.
    async fn content(&self, server_name: &ServerName, media_id: &str, timeout: Duration) -> Result<Content> {
        self.check_local(server_name)?;
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_WAIT);
        let mut shutdown = self.shutdown.clone();
        loop {
            // Registered before the lookup, so that an upload right after it still wakes us.
            let uploaded = self.uploaded.notified();
            tokio::pin!(uploaded);
            uploaded.as_mut().enable();
            let record = self.record(media_id)?.ok_or_else(|| Error::not_found("unknown media"))?;
            match record.content {
                Some(content) => return Ok(content),
                None if expired(record.created_ts, now_ms()) => return Err(Error::not_found("unknown media")),
                None => {}
            }
            tokio::select! {
                () = &mut uploaded => {}
                () = tokio::time::sleep_until(deadline) => break,
                _ = shutdown.wait_for(|stopping| *stopping) => break,
            }
        }
        Err(Error::new(ErrorCode::NotYetUploaded, "media has not been uploaded yet"))
    }

    async fn read(&self, sha256: String) -> Result<Vec<u8>> {
        let files = self.files.clone();
        blocking(move || files.read(&sha256).map_err(storage_error)).await
    }

    pub async fn download(&self, server_name: &ServerName, media_id: &str, timeout: Duration) -> Result<MediaFile> {
        let content = self.content(server_name, media_id, timeout).await?;
        Ok(MediaFile {
            bytes: self.read(content.sha256).await?,
            content_type: content.content_type,
            filename: content.filename,
        })
    }

    /// A thumbnail of an image at one of the fixed sizes, made once per content and size.
    pub async fn thumbnail(
        &self,
        server_name: &ServerName,
        media_id: &str,
        method: Option<&ruma::media::Method>,
        width: UInt,
        height: UInt,
        timeout: Duration,
    ) -> Result<MediaFile> {
        let method = match method {
            None | Some(ruma::media::Method::Scale) => Method::Scale,
            Some(ruma::media::Method::Crop) => Method::Crop,
            Some(other) => return Err(Error::invalid_param(format!("unknown thumbnail method {other}"))),
        };
        if u64::from(width) == 0 || u64::from(height) == 0 {
            return Err(Error::invalid_param("width and height must be positive"));
        }
        let content = self.content(server_name, media_id, timeout).await?;
        let (width, height) = thumbnail::size_for(method, width.into(), height.into());
        let key = Key::new().str(&content.sha256).str(method.as_str()).u64(width.into()).u64(height.into()).into_vec();
        if let Some(cached) = self.store.get_json::<CachedThumbnail>(tables::MEDIA_THUMBNAILS, &key)? {
            let bytes = self.read(cached.sha256).await?;
            return Ok(MediaFile { bytes, content_type: cached.content_type, filename: None });
        }

        let source = self.read(content.sha256).await?;
        let files = self.files.clone();
        let (thumbnail, sha256) = blocking(move || {
            let thumbnail = thumbnail::make(&source, method, width, height).map_err(|reason| {
                Error::with_status(ErrorCode::Unknown, http::StatusCode::BAD_REQUEST, format!("cannot thumbnail this media: {reason}"))
            })?;
            let sha256 = files.put(&thumbnail.bytes).map_err(storage_error)?;
            Ok((thumbnail, sha256))
        })
        .await?;
        let Thumbnail { bytes, content_type } = thumbnail;
        let cached = CachedThumbnail { sha256, content_type: content_type.to_owned() };
        let mut batch = self.store.batch();
        batch.put_json(&self.store, tables::MEDIA_THUMBNAILS, &key, &cached)?;
        tokio::task::block_in_place(|| self.store.write(batch))?;
        Ok(MediaFile { bytes, content_type: cached.content_type, filename: None })
    }
}
