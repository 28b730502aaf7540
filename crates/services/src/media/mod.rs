//! The media repository: uploads, downloads and thumbnails of this server's `mxc://` content.
//! Bytes live in content-addressed files on disk; metadata, quota usage and the thumbnail cache
//! live in the store, committed only once the file they point to is durable. Who may read what
//! is decided here, for every endpoint: the legacy unauthenticated endpoints serve only media
//! stored before they were closed to new media, and a call recording is served only to its
//! session's therapists.

mod files;
mod references;
mod thumbnail;

use limbic_core::now_ms;
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use axum::body::HttpBody;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use ruma::{MilliSecondsSinceUnixEpoch, OwnedMxcUri, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, ServerName, UInt, UserId};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, RwLock, watch};

pub use self::references::MediaReferences;
use self::{
    files::{Files, TempFile},
    thumbnail::{Method, Thumbnail},
};
use crate::{
    clinic::{Role, session_role},
    config::MediaConfig,
    error::{Error, ErrorCode, Result},
    rooms::Rooms,
    store::{Hold, Key, Store, tables},
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
    /// Stored since new media stopped being served without a token: only the authenticated
    /// endpoints serve it (Synapse's `authenticated` with `enable_authenticated_media`).
    /// Records from before lack the field and stay readable as they were. Every event that
    /// references such media is indexed (`references`), so retention may delete it.
    #[serde(default)]
    authenticated: bool,
    /// The session room whose call this media is a recording of: only its therapists read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    recording_of: Option<OwnedRoomId>,
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

/// The hold that keeps media commits of the nodes sharing the store apart.
const MEDIA_HOLD: &str = "media commits";
/// The hold on the content files, shared by uploads and taken alone by removals.
const FILES_HOLD: &str = "media files";

/// Content as a client uploads it: `bytes` in memory (a call recording) or, for a client's
/// upload, its request body, read as it arrives.
pub struct Upload<B = Vec<u8>> {
    pub bytes: B,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    /// Set for the recording of a session's call: only the room's therapists may read it.
    pub recording_of: Option<OwnedRoomId>,
}

/// Who asks to read media.
#[derive(Clone, Copy)]
pub enum Reader<'a> {
    /// A request to a legacy unauthenticated endpoint (`/_matrix/media/*/download`,
    /// `…/thumbnail`), with or without a token.
    Legacy,
    /// A local user on an authenticated endpoint; `rooms` tells their session roles.
    User(&'a UserId, &'a Rooms),
}

/// Content to serve: its file, open, to be read as it is sent.
pub struct MediaFile {
    pub file: tokio::fs::File,
    pub size: u64,
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
    /// Serialises the check-then-write of metadata: quota, pending ids, overwrites (with the
    /// other nodes sharing the store, by the hold [`MEDIA_HOLD`] taken with it).
    commit: Mutex<()>,
    /// Held shared by whatever names a content file and then records it (uploads,
    /// thumbnails), and exclusively by `collect` while it removes files: a file about to be
    /// removed is never the one a new record points to.
    files_in_use: RwLock<()>,
    /// Woken when content lands on an id from `create`, for the downloads waiting on it.
    uploaded: Notify,
    /// Set at shutdown, so that waiting downloads answer at once.
    shutdown: watch::Receiver<bool>,
}


fn expired(created_ts: u64, now: u64) -> bool {
    created_ts + UNUSED_EXPIRY.as_millis() as u64 <= now
}

/// Whether `reader` may read the media: the legacy endpoints answer for media stored since they
/// were closed to new media as for unknown media (as Synapse does); a recording is for its
/// session's therapists, who must still be joined to its room.
fn may_read(record: &MediaRecord, reader: Reader<'_>) -> Result<()> {
    match (reader, &record.recording_of) {
        (Reader::Legacy, recording_of) if record.authenticated || recording_of.is_some() => {
            Err(Error::not_found("this media is only served by the authenticated endpoints, /_matrix/client/v1/media/*"))
        }
        (Reader::User(user_id, rooms), Some(room_id)) if !is_session_therapist(rooms, room_id, user_id)? => {
            Err(Error::forbidden("only the session's therapists may read its recordings"))
        }
        _ => Ok(()),
    }
}

fn is_session_therapist(rooms: &Rooms, room_id: &RoomId, user_id: &UserId) -> Result<bool> {
    Ok(rooms.is_joined(room_id, user_id)? && session_role(rooms, room_id, user_id.as_str())?.is_some_and(Role::is_therapist))
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
            files_in_use: RwLock::new(()),
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

    /// Stores content already in memory under a fresh media id.
    pub async fn upload(&self, uploader: &UserId, upload: Upload) -> Result<OwnedMxcUri> {
        let Upload { bytes, content_type, filename, recording_of } = upload;
        self.upload_stream(uploader, Upload { bytes: Full::new(Bytes::from(bytes)), content_type, filename, recording_of }).await
    }

    /// Stores a new upload under a fresh media id, reading its body as it arrives.
    pub async fn upload_stream<B>(&self, uploader: &UserId, upload: Upload<B>) -> Result<OwnedMxcUri>
    where
        B: HttpBody<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let media_id = crate::users::random_string(MEDIA_ID_LEN);
        self.store(uploader, &media_id, upload, || Ok(now_ms())).await?;
        Ok(self.mxc(&media_id))
    }

    /// The content files for naming one and recording it: beside other uploads, apart from
    /// removals, on this node and on every node sharing the store (and the media directory).
    async fn files_shared(&self) -> Result<(tokio::sync::RwLockReadGuard<'_, ()>, Hold)> {
        let guard = self.files_in_use.read().await;
        Ok((guard, self.store.hold_shared(FILES_HOLD).await?))
    }

    /// The content files for removing some: apart from everything else that uses them.
    async fn files_exclusive(&self) -> Result<(tokio::sync::RwLockWriteGuard<'_, ()>, Hold)> {
        let guard = self.files_in_use.write().await;
        Ok((guard, self.store.hold(FILES_HOLD).await?))
    }

    /// Reserves a media id for a later upload (`create`), returning it and when it expires.
    pub fn create(&self, uploader: &UserId) -> Result<(OwnedMxcUri, MilliSecondsSinceUnixEpoch)> {
        let _serial = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let _shared = self.store.hold_blocking(MEDIA_HOLD)?;
        let now = now_ms();
        let mut usage = self.usage(uploader)?;
        let mut batch = self.store.batch();
        // Ids that expired unused free their slot.
        usage.pending.retain(|media_id, created_ts| {
            let live = !expired(*created_ts, now);
            if !live {
                batch.delete(tables::MEDIA, media_id.as_bytes());
            }
            live
        });
        if usage.pending.len() >= self.max_pending_uploads {
            let first_expiry = usage.pending.values().min().map_or(now, |created| created + UNUSED_EXPIRY.as_millis() as u64);
            return Err(Error::LimitExceeded { retry_after_ms: first_expiry.saturating_sub(now) });
        }
        let media_id = crate::users::random_string(MEDIA_ID_LEN);
        usage.pending.insert(media_id.clone(), now);
        let record = MediaRecord { uploader: uploader.to_owned(), created_ts: now, content: None, authenticated: true, recording_of: None };
        batch.put_json(tables::MEDIA, media_id.as_bytes(), &record)?;
        batch.put_json(tables::MEDIA_USAGE, uploader.as_bytes(), &usage)?;
        tokio::task::block_in_place(|| self.store.write(batch))?;
        let expires_at = UInt::new_saturating(now + UNUSED_EXPIRY.as_millis() as u64);
        Ok((self.mxc(&media_id), MilliSecondsSinceUnixEpoch(expires_at)))
    }

    /// Uploads content to an id reserved with `create`, reading its body as it arrives.
    pub async fn upload_to<B>(&self, uploader: &UserId, server_name: &ServerName, media_id: &str, upload: Upload<B>) -> Result<()>
    where
        B: HttpBody<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        self.check_local(server_name)?;
        // Fail before reading anything; the checks are repeated under the commit lock.
        self.pending_created_ts(uploader, media_id)?;
        self.store(uploader, media_id, upload, || self.pending_created_ts(uploader, media_id)).await?;
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

    /// Receives an upload into its content-addressed file, durable before the record that
    /// points to it is committed under `media_id` (see `commit` for `created_ts`).
    async fn store<B>(&self, uploader: &UserId, media_id: &str, upload: Upload<B>, created_ts: impl FnOnce() -> Result<u64>) -> Result<()>
    where
        B: HttpBody<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let Upload { bytes, content_type, filename, recording_of } = upload;
        let (temp, size) = self.receive(uploader, bytes).await?;
        // Held from naming the content to its record, not while a client sends it at its pace.
        let _files = self.files_shared().await?;
        let sha256 = blocking(move || temp.persist().map_err(storage_error)).await?;
        let content = Content {
            sha256,
            content_type: content_type.filter(|t| !t.is_empty()).unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_owned()),
            filename: filename.filter(|f| !f.is_empty()),
            size,
        };
        self.commit(uploader, media_id, content, recording_of, created_ts)
    }

    /// Writes the body to a temporary file chunk by chunk as it arrives, holding no more than a
    /// chunk in memory, and stops reading as soon as it passes `max_upload_size` or what is
    /// left of the uploader's quota: the refusal drops the file. Returns the file and its size.
    async fn receive<B>(&self, uploader: &UserId, mut body: B) -> Result<(TempFile, u64)>
    where
        B: HttpBody<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let usage = self.usage(uploader)?;
        // Fail before writing anything when the quota is already spent.
        self.charge(&usage, 0)?;
        let files = self.files.clone();
        let mut temp = blocking(move || files.create().map_err(storage_error)).await?;
        let mut size = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Error::with_status(ErrorCode::Unknown, http::StatusCode::BAD_REQUEST, format!("the upload was interrupted: {e}"))
            })?;
            // Trailers carry no content.
            let Ok(chunk) = frame.into_data() else { continue };
            size = size.saturating_add(chunk.len() as u64);
            if size > self.max_upload_size as u64 {
                return Err(Error::new(ErrorCode::TooLarge, format!("uploads are limited to {} bytes", self.max_upload_size)));
            }
            self.charge(&usage, size)?;
            tokio::task::block_in_place(|| temp.write(&chunk)).map_err(storage_error)?;
        }
        Ok((temp, size))
    }

    /// Records `content` under `media_id` and charges it to the uploader, in one batch.
    /// `created_ts` checks, under the commit lock, that the id may take the content.
    fn commit(
        &self,
        uploader: &UserId,
        media_id: &str,
        content: Content,
        recording_of: Option<OwnedRoomId>,
        created_ts: impl FnOnce() -> Result<u64>,
    ) -> Result<()> {
        let _serial = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let _shared = self.store.hold_blocking(MEDIA_HOLD)?;
        let created_ts = created_ts()?;
        let mut usage = self.usage(uploader)?;
        usage.bytes = self.charge(&usage, content.size)?;
        usage.pending.remove(media_id);
        let record = MediaRecord { uploader: uploader.to_owned(), created_ts, content: Some(content), authenticated: true, recording_of };
        let mut batch = self.store.batch();
        batch.put_json(tables::MEDIA, media_id.as_bytes(), &record)?;
        batch.put_json(tables::MEDIA_USAGE, uploader.as_bytes(), &usage)?;
        tokio::task::block_in_place(|| self.store.write(batch))?;
        Ok(())
    }

    /// Deletes a local media id (for server admins): it is no longer served, its size no
    /// longer counts against the uploader's quota, and its content file and thumbnails go
    /// unless other media share them (records first, then files: a crash in between leaves an
    /// unreferenced file, never a record without its file).
    pub async fn delete(&self, media_id: &str) -> Result<()> {
        let _files = self.files_exclusive().await?;
        tokio::task::block_in_place(|| {
            let _serial = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
            let _shared = self.store.hold_blocking(MEDIA_HOLD)?;
            let record = self.record(media_id)?.ok_or_else(|| Error::not_found("unknown media"))?;
            let doomed = BTreeMap::from([(media_id.to_owned(), record)]);
            let mut batch = self.store.batch();
            let files = self.stage_deletion(&mut batch, &doomed)?;
            self.store.write(batch)?;
            for sha256 in files {
                self.files.remove(&sha256).map_err(storage_error)?;
            }
            Ok(())
        })
    }

    /// Deletes the media whose references retention purged (queued by [`MediaReferences`]) when no
    /// event references them any more, with their content files and thumbnails unless other
    /// media share them. Only media stored since references are kept (`authenticated`) is
    /// deleted: older media may be named by events that were never indexed. Returns how many
    /// media were deleted.
    ///
    /// Files go first and the records after, so that a crash in between leaves the queue as it
    /// was and the next run finishes the work.
    pub async fn collect(&self) -> Result<usize> {
        let queued = self
            .store
            .scan_prefix(tables::MEDIA_UNREFERENCED, Vec::new(), false)
            .map(|item| Ok(String::from_utf8_lossy(&item?.0).into_owned()))
            .collect::<Result<Vec<String>>>()?;
        if queued.is_empty() {
            return Ok(0);
        }
        let _files = self.files_exclusive().await?;
        tokio::task::block_in_place(|| {
            let _serial = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
            let _shared = self.store.hold_blocking(MEDIA_HOLD)?;
            let mut doomed = BTreeMap::new();
            for media_id in &queued {
                if let Some(record) = self.record(media_id)?
                    && record.authenticated
                    && record.content.is_some()
                    && !references::is_referenced(&self.store, media_id)?
                {
                    doomed.insert(media_id.clone(), record);
                }
            }
            let mut batch = self.store.batch();
            if !doomed.is_empty() {
                for sha256 in self.stage_deletion(&mut batch, &doomed)? {
                    self.files.remove(&sha256).map_err(storage_error)?;
                }
                tracing::info!(media = doomed.len(), "deleting the media of purged events");
            }
            for media_id in &queued {
                batch.delete(tables::MEDIA_UNREFERENCED, media_id.as_bytes());
            }
            self.store.write(batch)?;
            Ok(doomed.len())
        })
    }

    /// Stages the removal of the `doomed` records, their sizes from their uploaders' quota and
    /// the thumbnails of content no other media has; returns the files to remove with them.
    fn stage_deletion(&self, batch: &mut crate::store::Batch, doomed: &BTreeMap<String, MediaRecord>) -> Result<Vec<String>> {
        // Content files other media still use stay, and so do thumbnails that are such files.
        let mut in_use = std::collections::HashSet::new();
        for item in self.store.scan_prefix(tables::MEDIA, Vec::new(), false) {
            let (key, value) = item?;
            if !doomed.contains_key(String::from_utf8_lossy(&key).as_ref())
                && let Some(content) = crate::store::decode::<MediaRecord>(tables::MEDIA, &value)?.content
            {
                in_use.insert(content.sha256);
            }
        }
        let mut files = Vec::new();
        let mut usages: BTreeMap<&UserId, Usage> = BTreeMap::new();
        for (media_id, record) in doomed {
            batch.delete(tables::MEDIA, media_id.as_bytes());
            if !usages.contains_key(&*record.uploader) {
                usages.insert(&record.uploader, self.usage(&record.uploader)?);
            }
            let Some(usage) = usages.get_mut(&*record.uploader) else { continue };
            // An id from `create` that never got its upload holds a pending slot, no bytes.
            usage.pending.remove(media_id);
            let Some(content) = &record.content else { continue };
            usage.bytes = usage.bytes.saturating_sub(content.size);
            if in_use.contains(&content.sha256) || files.contains(&content.sha256) {
                continue;
            }
            for item in self.store.scan_prefix(tables::MEDIA_THUMBNAILS, Key::new().str(&content.sha256).into_vec(), false) {
                let (key, value) = item?;
                batch.delete(tables::MEDIA_THUMBNAILS, &key);
                let cached: CachedThumbnail = crate::store::decode(tables::MEDIA_THUMBNAILS, &value)?;
                if !in_use.contains(&cached.sha256) {
                    files.push(cached.sha256);
                }
            }
            files.push(content.sha256.clone());
        }
        for (uploader, usage) in &usages {
            batch.put_json(tables::MEDIA_USAGE, uploader.as_bytes(), usage)?;
        }
        Ok(files)
    }

    /// The content of a local media id that `reader` may read, waiting up to `timeout` for an
    /// upload to an id from `create`.
    async fn content(&self, reader: Reader<'_>, server_name: &ServerName, media_id: &str, timeout: Duration) -> Result<Content> {
        self.check_local(server_name)?;
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_WAIT);
        let mut shutdown = self.shutdown.clone();
        loop {
            // Registered before the lookup, so that an upload right after it still wakes us.
            let uploaded = self.uploaded.notified();
            tokio::pin!(uploaded);
            uploaded.as_mut().enable();
            let record = self.record(media_id)?.ok_or_else(|| Error::not_found("unknown media"))?;
            may_read(&record, reader)?;
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

    /// A content file, open, with its size; `None` when it is gone (its media was just
    /// deleted). Nothing is read yet: the file is sent as it is read.
    async fn open_file(&self, sha256: String) -> Result<Option<(tokio::fs::File, u64)>> {
        let files = self.files.clone();
        blocking(move || match files.open_file(&sha256).and_then(|file| Ok((file.metadata()?.len(), file))) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            opened => opened.map(|(size, file)| Some((tokio::fs::File::from_std(file), size))).map_err(storage_error),
        })
        .await
    }

    async fn serve(&self, sha256: String, content_type: String, filename: Option<String>) -> Result<MediaFile> {
        let (file, size) = self.open_file(sha256).await?.ok_or_else(|| Error::not_found("unknown media"))?;
        Ok(MediaFile { file, size, content_type, filename })
    }

    pub async fn download(&self, reader: Reader<'_>, server_name: &ServerName, media_id: &str, timeout: Duration) -> Result<MediaFile> {
        let content = self.content(reader, server_name, media_id, timeout).await?;
        self.serve(content.sha256, content.content_type, content.filename).await
    }

    /// A thumbnail of an image at one of the fixed sizes (`width`, `height`), made once per
    /// content and size.
    pub async fn thumbnail(
        &self,
        reader: Reader<'_>,
        server_name: &ServerName,
        media_id: &str,
        method: Option<&ruma::media::Method>,
        (width, height): (UInt, UInt),
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
        let content = self.content(reader, server_name, media_id, timeout).await?;
        let (width, height) = thumbnail::size_for(method, width.into(), height.into());
        let key = Key::new().str(&content.sha256).str(method.as_str()).u64(width.into()).u64(height.into()).into_vec();
        // A cached thumbnail whose file went with other deleted media is made again.
        if let Some(cached) = self.store.get_json::<CachedThumbnail>(tables::MEDIA_THUMBNAILS, &key)?
            && let Some((file, size)) = self.open_file(cached.sha256).await?
        {
            return Ok(MediaFile { file, size, content_type: cached.content_type, filename: None });
        }

        let cannot = |reason: String| {
            Error::with_status(ErrorCode::Unknown, http::StatusCode::BAD_REQUEST, format!("cannot thumbnail this media: {reason}"))
        };
        // Decoding needs the whole source in memory: only sources of bounded size are read.
        if content.size > thumbnail::MAX_SOURCE_BYTES {
            return Err(cannot(format!("images over {} bytes are not thumbnailed", thumbnail::MAX_SOURCE_BYTES)));
        }
        let _files = self.files_shared().await?;
        let files = self.files.clone();
        let cached = blocking(move || {
            let source = match files.read(&content.sha256) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::not_found("unknown media")),
                read => read.map_err(storage_error)?,
            };
            let Thumbnail { bytes, content_type } = thumbnail::make(&source, method, width, height).map_err(cannot)?;
            let sha256 = files.put(&bytes).map_err(storage_error)?;
            Ok(CachedThumbnail { sha256, content_type: content_type.to_owned() })
        })
        .await?;
        let mut batch = self.store.batch();
        batch.put_json(tables::MEDIA_THUMBNAILS, &key, &cached)?;
        tokio::task::block_in_place(|| self.store.write(batch))?;
        // The file stays: `collect` waits for `_files`.
        self.serve(cached.sha256, cached.content_type, None).await
    }
}

#[cfg(test)]
mod tests;
