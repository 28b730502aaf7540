//! The media repository: authenticated `/_matrix/client/v1/media/*` and the legacy
//! `/_matrix/media/*` endpoints, which clients still call and Synapse still serves. The legacy
//! downloads serve only media stored before authenticated media (`media::Reader::Legacy`).

// The legacy endpoints are deprecated in the spec, not gone.
#![allow(deprecated)]

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    response::{IntoResponse, Response},
};
use tokio::io::AsyncReadExt;
use http::{HeaderName, HeaderValue, header};
use ruma::{
    api::client::{
        authenticated_media,
        media::{create_content, create_content_async, create_mxc_uri, get_content, get_content_as_filename, get_content_thumbnail, get_media_config},
    },
    http_headers::{ContentDisposition, ContentDispositionType},
};

use super::{AppState, BodyKind, Ruma, RumaResponse, route};
use crate::{
    error::Result,
    media::{MediaFile, Reader, Upload},
    server::Server,
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_media_config::v3::Request, _, _>(router, config_legacy);
    let router = route::<authenticated_media::get_media_config::v1::Request, _, _>(router, config);
    let router = route::<create_content::v3::Request, _, _>(router, upload);
    let router = route::<create_mxc_uri::v1::Request, _, _>(router, create);
    let router = route::<create_content_async::v3::Request, _, _>(router, upload_to);
    let router = route::<get_content::v3::Request, _, _>(router, download_legacy);
    let router = route::<get_content_as_filename::v3::Request, _, _>(router, download_named_legacy);
    let router = route::<get_content_thumbnail::v3::Request, _, _>(router, thumbnail_legacy);
    let router = route::<authenticated_media::get_content::v1::Request, _, _>(router, download);
    let router = route::<authenticated_media::get_content_as_filename::v1::Request, _, _>(router, download_named);
    route::<authenticated_media::get_content_thumbnail::v1::Request, _, _>(router, thumbnail)
}

/// Upload bodies are raw bytes, limited by the media size limit rather than the JSON one, and
/// streamed to disk by the media service, which keeps to that limit and the quota as they arrive.
struct UploadBody;

impl BodyKind for UploadBody {
    const JSON: bool = false;
    const STREAMED: bool = true;
    fn limit(server: &Server) -> usize {
        server.config.media.max_upload_size
    }
}

async fn config_legacy(State(server): State<AppState>, _req: Ruma<get_media_config::v3::Request>) -> RumaResponse<get_media_config::v3::Response> {
    get_media_config::v3::Response::new(server.media.upload_size()).into()
}

async fn config(
    State(server): State<AppState>,
    _req: Ruma<authenticated_media::get_media_config::v1::Request>,
) -> RumaResponse<authenticated_media::get_media_config::v1::Response> {
    authenticated_media::get_media_config::v1::Response::new(server.media.upload_size()).into()
}

async fn upload(
    State(server): State<AppState>,
    mut req: Ruma<create_content::v3::Request, UploadBody>,
) -> Result<RumaResponse<create_content::v3::Response>> {
    let uploader = req.caller().user_id.clone();
    let mut stream = req.take_stream();
    let body = req.body;
    let upload = Upload { bytes: &mut stream, content_type: body.content_type, filename: body.filename, recording_of: None };
    let stored = server.media.upload_stream(&uploader, upload).await;
    Ok(create_content::v3::Response::new(drained(&server, stream, stored).await?).into())
}

async fn create(State(server): State<AppState>, req: Ruma<create_mxc_uri::v1::Request>) -> Result<RumaResponse<create_mxc_uri::v1::Response>> {
    let (content_uri, expires_at) = server.media.create(&req.caller().user_id)?;
    let mut response = create_mxc_uri::v1::Response::new(content_uri);
    response.unused_expires_at = Some(expires_at);
    Ok(response.into())
}

async fn upload_to(
    State(server): State<AppState>,
    mut req: Ruma<create_content_async::v3::Request, UploadBody>,
) -> Result<Json<serde_json::Value>> {
    let uploader = req.caller().user_id.clone();
    let mut stream = req.take_stream();
    let body = req.body;
    let upload = Upload { bytes: &mut stream, content_type: body.content_type, filename: body.filename, recording_of: None };
    let stored = server.media.upload_to(&uploader, &body.server_name, &body.media_id, upload).await;
    drained(&server, stream, stored).await?;
    // ruma's response type has no constructor; its body is an empty object.
    Ok(Json(serde_json::json!({})))
}

/// The rest of a refused upload is read and dropped (bounded, as the extractor does), so that
/// the client, still sending, gets the refusal rather than a reset connection.
async fn drained<T>(server: &Server, rest: Body, stored: Result<T>) -> Result<T> {
    if stored.is_err() {
        super::discard(rest, server.config.limits.max_request_body).await;
    }
    stored
}

async fn download(State(server): State<AppState>, req: Ruma<authenticated_media::get_content::v1::Request>) -> Result<Served> {
    let reader = Reader::User(&req.caller().user_id, &server.rooms);
    let r = &req.body;
    Ok(Served::new(server.media.download(reader, &r.server_name, &r.media_id, r.timeout_ms).await?, None))
}

async fn download_named(
    State(server): State<AppState>,
    req: Ruma<authenticated_media::get_content_as_filename::v1::Request>,
) -> Result<Served> {
    let reader = Reader::User(&req.caller().user_id, &server.rooms);
    let r = &req.body;
    Ok(Served::new(server.media.download(reader, &r.server_name, &r.media_id, r.timeout_ms).await?, Some(r.filename.clone())))
}

async fn download_legacy(State(server): State<AppState>, req: Ruma<get_content::v3::Request>) -> Result<Served> {
    let r = req.body;
    Ok(Served::new(server.media.download(Reader::Legacy, &r.server_name, &r.media_id, r.timeout_ms).await?, None))
}

async fn download_named_legacy(State(server): State<AppState>, req: Ruma<get_content_as_filename::v3::Request>) -> Result<Served> {
    let r = req.body;
    Ok(Served::new(server.media.download(Reader::Legacy, &r.server_name, &r.media_id, r.timeout_ms).await?, Some(r.filename)))
}

async fn thumbnail(State(server): State<AppState>, req: Ruma<authenticated_media::get_content_thumbnail::v1::Request>) -> Result<Served> {
    let reader = Reader::User(&req.caller().user_id, &server.rooms);
    let r = &req.body;
    let file = server.media.thumbnail(reader, &r.server_name, &r.media_id, r.method.as_ref(), (r.width, r.height), r.timeout_ms).await?;
    Ok(Served::new(file, None))
}

async fn thumbnail_legacy(State(server): State<AppState>, req: Ruma<get_content_thumbnail::v3::Request>) -> Result<Served> {
    let r = req.body;
    let file = server.media.thumbnail(Reader::Legacy, &r.server_name, &r.media_id, r.method.as_ref(), (r.width, r.height), r.timeout_ms).await?;
    Ok(Served::new(file, None))
}

/// Types browsers may render in place; anything else is served as an attachment (Synapse's list).
const INLINE_CONTENT_TYPES: &[&str] = &[
    "text/css", "text/plain", "text/csv", "application/json", "application/ld+json", "image/jpeg",
    "image/gif", "image/png", "image/apng", "image/webp", "image/avif", "video/mp4", "video/webm",
    "video/ogg", "video/quicktime", "audio/mp4", "audio/webm", "audio/aac", "audio/mpeg", "audio/ogg",
    "audio/wave", "audio/wav", "audio/x-wav", "audio/x-pn-wav", "audio/flac", "audio/x-flac",
];

/// Keeps uploaded content from running scripts in the server's origin, as Synapse does.
const CONTENT_SECURITY_POLICY: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; object-src 'self';";

/// Media served to a client, with the headers that make it safe to open in a browser.
struct Served {
    file: MediaFile,
    /// The filename of the download path, which wins over the uploaded one.
    filename: Option<String>,
}

impl Served {
    fn new(file: MediaFile, filename: Option<String>) -> Self {
        Self { file, filename }
    }
}

/// How much of a file is read at a time while it is sent.
const READ_CHUNK: usize = 64 * 1024;

/// The file's bytes as they are read, never the whole file in memory.
fn file_body(file: tokio::fs::File) -> Body {
    Body::from_stream(futures_util::stream::try_unfold(file, |mut file| async move {
        let mut chunk = bytes::BytesMut::with_capacity(READ_CHUNK);
        let read = file.read_buf(&mut chunk).await?;
        Ok::<_, std::io::Error>((read > 0).then(|| (chunk.freeze(), file)))
    }))
}

impl IntoResponse for Served {
    fn into_response(self) -> Response {
        let MediaFile { file, size, content_type, filename } = self.file;
        let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        let disposition_type = if INLINE_CONTENT_TYPES.contains(&essence.as_str()) {
            ContentDispositionType::Inline
        } else {
            ContentDispositionType::Attachment
        };
        // ruma's header value drops control characters and encodes non-ASCII names (RFC 8187).
        let disposition = ContentDisposition::new(disposition_type).with_filename(self.filename.or(filename));
        let header = |value: String| HeaderValue::try_from(value).ok();
        let headers: [(HeaderName, HeaderValue); 5] = [
            (header::CONTENT_LENGTH, HeaderValue::from(size)),
            (
                header::CONTENT_TYPE,
                header(content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
            ),
            (
                header::CONTENT_DISPOSITION,
                header(disposition.to_string()).unwrap_or(HeaderValue::from_static("attachment")),
            ),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)),
            (HeaderName::from_static("cross-origin-resource-policy"), HeaderValue::from_static("cross-origin")),
        ];
        (headers, file_body(file)).into_response()
    }
}
