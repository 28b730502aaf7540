//! End-to-end tests: media.

mod common;

use std::{io::Cursor, path::Path, time::Duration};

use common::{Client, TestServer, enc, errcode};
use image::{DynamicImage, ImageFormat, RgbImage, RgbaImage};
use reqwest::{Method, StatusCode, header::{self, HeaderName}};
use serde_json::Value;

const V1: &str = "/_matrix/client/v1/media";
const LEGACY: &str = "/_matrix/media/v3";

/// Uploads `bytes` with `POST /upload`, returning the status and JSON body.
async fn upload(client: &Client, bytes: &[u8], content_type: &str, filename: Option<&str>) -> (StatusCode, Value) {
    let mut path = format!("{}{LEGACY}/upload", client.base);
    if let Some(name) = filename {
        path.push_str(&format!("?filename={}", enc(name)));
    }
    send(client, client.http.post(path), bytes, content_type).await
}

/// Uploads to an id from `create` with `PUT /upload/{server}/{id}`.
async fn upload_to(client: &Client, mxc: &str, bytes: &[u8]) -> (StatusCode, Value) {
    let path = format!("{}{LEGACY}/upload/{}", client.base, mxc.trim_start_matches("mxc://"));
    send(client, client.http.put(path), bytes, "text/plain").await
}

async fn send(client: &Client, request: reqwest::RequestBuilder, bytes: &[u8], content_type: &str) -> (StatusCode, Value) {
    let mut request = request.header(header::CONTENT_TYPE, content_type).body(bytes.to_vec());
    if let Some(token) = &client.token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("upload");
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Uploads and returns the mxc URI.
async fn upload_ok(client: &Client, bytes: &[u8], content_type: &str, filename: Option<&str>) -> String {
    let (status, body) = upload(client, bytes, content_type, filename).await;
    assert_eq!(status, StatusCode::OK, "upload: {body}");
    body["content_uri"].as_str().unwrap().to_owned()
}

/// `GET {prefix}/{endpoint}/{server}/{id}{rest}` with the client's token, if any.
async fn fetch(client: &Client, prefix: &str, endpoint: &str, mxc: &str, rest: &str) -> reqwest::Response {
    let path = format!("{}{prefix}/{endpoint}/{}{rest}", client.base, mxc.trim_start_matches("mxc://"));
    let mut request = client.http.get(path);
    if let Some(token) = &client.token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("fetch")
}

fn header_of(response: &reqwest::Response, name: header::HeaderName) -> &str {
    response.headers().get(name).map_or("", |v| v.to_str().unwrap())
}

async fn error_of(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, errcode(&body).to_owned())
}

/// Every content file of the server's media store.
fn stored_files(server: &TestServer) -> usize {
    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .map(|path| if path.is_dir() { count(&path) } else { 1 })
            .sum()
    }
    // The media store defaults to the database path with "-media" appended.
    count(&server.store_dir().join("db-media"))
}

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
    bytes
}

fn gradient(width: u32, height: u32) -> DynamicImage {
    RgbImage::from_fn(width, height, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])).into()
}

#[tokio::test]
async fn upload_and_download_round_trip() {
    let mut server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bytes = encode(gradient(8, 8), ImageFormat::Png);
    let mxc = upload_ok(&alice, &bytes, "image/png", Some("scan of notes.png")).await;
    assert!(mxc.starts_with("mxc://test.local/"), "{mxc}");

    let response = fetch(&alice, V1, "download", &mxc, "").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header_of(&response, header::CONTENT_TYPE), "image/png");
    assert_eq!(header_of(&response, header::CONTENT_DISPOSITION), "inline; filename=\"scan of notes.png\"");
    assert!(header_of(&response, header::CONTENT_SECURITY_POLICY).starts_with("sandbox; default-src 'none'"));
    assert_eq!(response.bytes().await.unwrap(), bytes);

    // The filename in the path wins.
    let response = fetch(&alice, V1, "download", &mxc, "/other.png").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header_of(&response, header::CONTENT_DISPOSITION), "inline; filename=other.png");
    assert_eq!(response.bytes().await.unwrap(), bytes);

    // Types a browser could run are attachments; non-ASCII names are encoded.
    let html = upload_ok(&alice, b"<script>alert(1)</script>", "text/html", Some("naïve.html")).await;
    let response = fetch(&alice, V1, "download", &html, "").await;
    assert_eq!(header_of(&response, header::CONTENT_TYPE), "text/html");
    assert_eq!(header_of(&response, header::CONTENT_DISPOSITION), "attachment; filename*=utf-8''na%C3%AFve.html");

    // Without a content type or filename.
    let plain = alice
        .http
        .post(format!("{}{LEGACY}/upload", alice.base))
        .bearer_auth(alice.token.as_ref().unwrap())
        .body("raw")
        .send()
        .await
        .unwrap();
    let plain: Value = plain.json().await.unwrap();
    let response = fetch(&alice, V1, "download", plain["content_uri"].as_str().unwrap(), "").await;
    assert_eq!(header_of(&response, header::CONTENT_TYPE), "application/octet-stream");
    assert_eq!(header_of(&response, header::CONTENT_DISPOSITION), "attachment");

    server.restart().await;
    let response = fetch(&alice, V1, "download", &mxc, "").await;
    assert_eq!(response.bytes().await.unwrap(), bytes);
}

#[tokio::test]
async fn identical_content_is_stored_once() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let first = upload_ok(&alice, b"the same report", "text/plain", Some("a.txt")).await;
    let second = upload_ok(&bob, b"the same report", "application/pdf", Some("b.pdf")).await;
    assert_ne!(first, second);
    assert_eq!(stored_files(&server), 1);

    // Each id keeps its own metadata.
    let response = fetch(&alice, V1, "download", &second, "").await;
    assert_eq!(header_of(&response, header::CONTENT_TYPE), "application/pdf");
    assert_eq!(header_of(&response, header::CONTENT_DISPOSITION), "attachment; filename=b.pdf");
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"the same report");

    upload_ok(&alice, b"a different report", "text/plain", None).await;
    assert_eq!(stored_files(&server), 2);
}

#[tokio::test]
async fn create_then_upload_asynchronously() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let created = alice.ok(Method::POST, "/_matrix/media/v1/create", None).await;
    let mxc = created["content_uri"].as_str().unwrap().to_owned();
    assert!(created["unused_expires_at"].as_u64().unwrap() > 0);

    // Not uploaded yet: a download that does not wait gets 504.
    let response = fetch(&alice, V1, "download", &mxc, "?timeout_ms=0").await;
    assert_eq!(error_of(response).await, (StatusCode::GATEWAY_TIMEOUT, "M_NOT_YET_UPLOADED".to_owned()));

    let (status, body) = upload_to(&bob, &mxc, b"not yours").await;
    assert_eq!((status, errcode(&body)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"), "{body}");
    let (status, body) = upload_to(&alice, "mxc://test.local/unknownid", b"x").await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{body}");
    let (status, body) = upload_to(&alice, &mxc.replace("test.local", "elsewhere.example"), b"x").await;
    assert_eq!((status, errcode(&body)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"), "{body}");

    // A download waiting for the content gets it once it lands.
    let waiting = {
        let alice = alice.clone();
        let mxc = mxc.clone();
        tokio::spawn(async move { fetch(&alice, V1, "download", &mxc, "?timeout_ms=20000").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = upload_to(&alice, &mxc, b"late content").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let response = waiting.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"late content");

    let (status, body) = upload_to(&alice, &mxc, b"again").await;
    assert_eq!((status, errcode(&body)), (StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA"), "{body}");
    let response = fetch(&alice, V1, "download", &mxc, "").await;
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"late content");
}

#[tokio::test]
async fn size_limit_quota_and_pending_limit() {
    let server = TestServer::start_with(&[
        ("LIMBIC_MEDIA__MAX_UPLOAD_SIZE", "2000"),
        ("LIMBIC_MEDIA__USER_QUOTA", "5000"),
        ("LIMBIC_MEDIA__MAX_PENDING_UPLOADS", "2"),
        ("LIMBIC_LIMITS__MAX_REQUEST_BODY", "1024"),
    ])
    .await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;

    for path in [format!("{V1}/config"), format!("{LEGACY}/config")] {
        let config = alice.ok(Method::GET, &path, None).await;
        assert_eq!(config["m.upload.size"], 2000, "{path}");
    }

    let (status, body) = upload(&alice, &[7; 2001], "application/octet-stream", None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"), "{body}");
    // Uploads are held to the media limit, not the (smaller) JSON body limit.
    upload_ok(&alice, &[1; 2000], "application/octet-stream", None).await;
    upload_ok(&alice, &[2; 2000], "application/octet-stream", None).await;
    // Identical content still counts against the quota.
    let (status, body) = upload(&alice, &[2; 2000], "application/octet-stream", None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_RESOURCE_LIMIT_EXCEEDED"), "{body}");
    upload_ok(&alice, &[3; 1000], "application/octet-stream", None).await;
    let (status, body) = upload(&alice, b"x", "text/plain", None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_RESOURCE_LIMIT_EXCEEDED"), "{body}");
    // The quota is per user.
    upload_ok(&bob, &[4; 2000], "application/octet-stream", None).await;

    // Uploading to a reserved id is charged too.
    let created = alice.ok(Method::POST, "/_matrix/media/v1/create", None).await;
    let (status, body) = upload_to(&alice, created["content_uri"].as_str().unwrap(), b"x").await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_RESOURCE_LIMIT_EXCEEDED"), "{body}");

    alice.ok(Method::POST, "/_matrix/media/v1/create", None).await;
    let (status, body) = alice.post("/_matrix/media/v1/create", serde_json::json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"), "{body}");
    assert!(body["retry_after_ms"].as_u64().unwrap() > 0);
    bob.ok(Method::POST, "/_matrix/media/v1/create", None).await;
}

/// (format, content type of its thumbnails)
const FORMATS: [(ImageFormat, &str); 3] =
    [(ImageFormat::Png, "image/png"), (ImageFormat::Jpeg, "image/jpeg"), (ImageFormat::WebP, "image/jpeg")];

async fn thumbnail_of(client: &Client, prefix: &str, mxc: &str, query: &str) -> (String, DynamicImage) {
    let response = fetch(client, prefix, "thumbnail", mxc, &format!("?{query}")).await;
    assert_eq!(response.status(), StatusCode::OK, "{query}");
    let content_type = header_of(&response, header::CONTENT_TYPE).to_owned();
    let image = image::load_from_memory(&response.bytes().await.unwrap()).unwrap();
    (content_type, image)
}

#[tokio::test]
async fn thumbnails_crop_and_scale_png_jpeg_and_webp() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    for (format, thumbnail_type) in FORMATS {
        let mxc = upload_ok(&alice, &encode(gradient(640, 480), format), format.to_mime_type(), None).await;
        for (query, size) in [
            ("width=32&height=32&method=crop", (32, 32)),
            ("width=96&height=96&method=crop", (96, 96)),
            // The smallest fixed size that covers the request.
            ("width=50&height=20&method=crop", (96, 96)),
            ("width=320&height=240&method=scale", (320, 240)),
            ("width=300&height=300&method=scale", (640, 480)),
            ("width=100&height=100", (320, 240)),
        ] {
            let (content_type, image) = thumbnail_of(&alice, V1, &mxc, query).await;
            assert_eq!(content_type, thumbnail_type, "{format:?} {query}");
            assert_eq!((image.width(), image.height()), size, "{format:?} {query}");
        }
    }

    // Scaling keeps the aspect ratio and never enlarges; cropping fills the box.
    let tall = upload_ok(&alice, &encode(gradient(300, 900), ImageFormat::Png), "image/png", None).await;
    let (_, image) = thumbnail_of(&alice, V1, &tall, "width=800&height=600&method=scale").await;
    assert_eq!((image.width(), image.height()), (200, 600));
    let (_, image) = thumbnail_of(&alice, V1, &tall, "width=96&height=96&method=crop").await;
    assert_eq!((image.width(), image.height()), (96, 96));
    let small = upload_ok(&alice, &encode(gradient(40, 20), ImageFormat::Jpeg), "image/jpeg", None).await;
    let (_, image) = thumbnail_of(&alice, V1, &small, "width=800&height=600&method=scale").await;
    assert_eq!((image.width(), image.height()), (40, 20));

    // WebP with transparency keeps it as PNG.
    let clear = RgbaImage::from_fn(64, 64, |x, _| image::Rgba([0, 0, 0, (x * 4) as u8]));
    let webp = upload_ok(&alice, &encode(clear.into(), ImageFormat::WebP), "image/webp", None).await;
    let (content_type, image) = thumbnail_of(&alice, V1, &webp, "width=32&height=32&method=crop").await;
    assert_eq!(content_type, "image/png");
    assert!(image.color().has_alpha());

    // Thumbnails are made once and cached.
    let files = stored_files(&server);
    let (_, image) = thumbnail_of(&alice, V1, &tall, "width=96&height=96&method=crop").await;
    assert_eq!((image.width(), image.height()), (96, 96));
    assert_eq!(stored_files(&server), files);
}

#[tokio::test]
async fn thumbnail_errors() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let text = upload_ok(&alice, b"not an image", "image/png", None).await;
    let response = fetch(&alice, V1, "thumbnail", &text, "?width=32&height=32&method=crop").await;
    assert_eq!(error_of(response).await, (StatusCode::BAD_REQUEST, "M_UNKNOWN".to_owned()));

    let png = upload_ok(&alice, &encode(gradient(10, 10), ImageFormat::Png), "image/png", None).await;
    for query in ["?width=0&height=32", "?width=32&height=32&method=stretch"] {
        let response = fetch(&alice, V1, "thumbnail", &png, query).await;
        assert_eq!(error_of(response).await, (StatusCode::BAD_REQUEST, "M_INVALID_PARAM".to_owned()), "{query}");
    }
    let response = fetch(&alice, V1, "thumbnail", &png, "?width=32").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unknown_and_remote_media_are_not_found() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let anonymous = server.client();
    for mxc in ["mxc://test.local/doesnotexist", "mxc://elsewhere.example/someid"] {
        for (client, prefix) in [(&alice, V1), (&anonymous, LEGACY)] {
            let response = fetch(client, prefix, "download", mxc, "").await;
            assert_eq!(error_of(response).await, (StatusCode::NOT_FOUND, "M_NOT_FOUND".to_owned()), "{prefix} {mxc}");
            let response = fetch(client, prefix, "thumbnail", mxc, "?width=32&height=32").await;
            assert_eq!(error_of(response).await, (StatusCode::NOT_FOUND, "M_NOT_FOUND".to_owned()), "{prefix} {mxc}");
        }
    }
}

#[tokio::test]
async fn authenticated_endpoints_need_a_token() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let mxc = upload_ok(&alice, b"private", "text/plain", None).await;
    let anonymous = server.client();

    let (status, body) = anonymous.get(&format!("{V1}/config")).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"));
    for (endpoint, rest) in [("download", ""), ("download", "/name.txt"), ("thumbnail", "?width=32&height=32")] {
        let response = fetch(&anonymous, V1, endpoint, &mxc, rest).await;
        assert_eq!(error_of(response).await, (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN".to_owned()), "{endpoint}{rest}");
    }
    let (status, body) = upload(&anonymous, b"x", "text/plain", None).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"));
    let (status, body) = anonymous.post("/_matrix/media/v1/create", serde_json::json!({})).await;
    assert_eq!((status, errcode(&body)), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"));
}

#[tokio::test]
async fn new_media_is_served_only_by_the_authenticated_endpoints() {
    let mut server = TestServer::start().await;
    let alice = server.register("alice").await;
    let image = encode(gradient(64, 64), ImageFormat::Png);
    let uploaded = upload_ok(&alice, &image, "image/png", Some("scan.png")).await;
    let created = alice.ok(Method::POST, "/_matrix/media/v1/create", None).await["content_uri"].as_str().unwrap().to_owned();
    let (status, body) = upload_to(&alice, &created, &image).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let anonymous = server.client();
    for _ in 0..2 {
        for mxc in [&uploaded, &created] {
            // With or without a token, under any legacy prefix, the legacy endpoints answer as
            // for unknown media, as Synapse does with `enable_authenticated_media`.
            for client in [&anonymous, &alice] {
                for (prefix, endpoint, rest) in [
                    (LEGACY, "download", ""),
                    (LEGACY, "download", "/scan.png"),
                    ("/_matrix/media/r0", "download", ""),
                    (LEGACY, "thumbnail", "?width=32&height=32"),
                    ("/_matrix/media/r0", "thumbnail", "?width=32&height=32"),
                ] {
                    let response = fetch(client, prefix, endpoint, mxc, rest).await;
                    let what = format!("{prefix}/{endpoint}{rest} with token {:?}", client.token.is_some());
                    assert_eq!(error_of(response).await, (StatusCode::NOT_FOUND, "M_NOT_FOUND".to_owned()), "{what}");
                }
            }
            let response = fetch(&alice, V1, "download", mxc, "").await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.bytes().await.unwrap(), image);
            let (_, thumbnail) = thumbnail_of(&alice, V1, mxc, "width=32&height=32&method=crop").await;
            assert_eq!((thumbnail.width(), thumbnail.height()), (32, 32));
        }
        // The restriction is stored with the media.
        server.restart().await;
    }
}

/// Rewrites the store record of a media id while the server is stopped.
async fn edit_record(server: &mut TestServer, mxc: &str, edit: impl FnOnce(&mut Value)) {
    use limbic_server::store::tables;
    let media_id = mxc.rsplit('/').next().unwrap();
    server.stop().await;
    {
        let store = server.open_store();
        let mut record: Value = store.get_json(tables::MEDIA, media_id.as_bytes()).unwrap().expect("a media record");
        edit(&mut record);
        let mut batch = store.batch();
        batch.put_json(tables::MEDIA, media_id.as_bytes(), &record).unwrap();
        store.write(batch).unwrap();
    }
    server.start_again().await;
}

#[tokio::test]
async fn media_from_before_authenticated_media_stays_on_the_legacy_endpoints() {
    let mut server = TestServer::start().await;
    let alice = server.register("alice").await;
    let image = encode(gradient(64, 64), ImageFormat::Png);
    let old = upload_ok(&alice, &image, "image/png", Some("old.png")).await;
    // A record as the server wrote it before authenticated media: without the flag.
    edit_record(&mut server, &old, |record| {
        assert_eq!(record["authenticated"], true, "{record}");
        record.as_object_mut().unwrap().remove("authenticated");
    })
    .await;

    let anonymous = server.client();
    for prefix in [LEGACY, "/_matrix/media/r0"] {
        let response = fetch(&anonymous, prefix, "download", &old, "/other.png").await;
        assert_eq!(response.status(), StatusCode::OK, "{prefix}");
        assert_eq!(header_of(&response, header::CONTENT_DISPOSITION), "inline; filename=other.png");
        assert_eq!(response.bytes().await.unwrap(), image);
        let (_, thumbnail) = thumbnail_of(&anonymous, prefix, &old, "width=96&height=96&method=crop").await;
        assert_eq!((thumbnail.width(), thumbnail.height()), (96, 96));
    }
    let response = fetch(&alice, V1, "download", &old, "").await;
    assert_eq!(response.bytes().await.unwrap(), image);
    // Media uploaded since is not served there.
    let new = upload_ok(&alice, &image, "image/png", None).await;
    let response = fetch(&anonymous, LEGACY, "download", &new, "").await;
    assert_eq!(error_of(response).await, (StatusCode::NOT_FOUND, "M_NOT_FOUND".to_owned()));
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A call recording is media the server stores for a session room (`calls/recording.rs`); making
/// one takes a call with live media (tests/interop/test_calls.py), so here the recording flag is
/// set in the store on an upload, and every read path is tried over HTTP.
#[tokio::test]
async fn recordings_are_served_only_to_their_sessions_therapists() {
    let mut server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let therapist = server.register("therapist").await;
    admin.ok(Method::PUT, &format!("/_limbic/admin/v1/therapists/{}", enc(&therapist.user_id)), Some(serde_json::json!({ "verified": true }))).await;
    let [co, client, demoted, removed, departed, stranger] = [
        server.register("co").await,
        server.register("client").await,
        server.register("demoted").await,
        server.register("removed").await,
        server.register("departed").await,
        server.register("stranger").await,
    ];
    let participants: Vec<Value> = [(&co, "co_therapist"), (&client, "client"), (&demoted, "co_therapist"), (&removed, "co_therapist"), (&departed, "co_therapist")]
        .iter()
        .map(|(who, role)| serde_json::json!({ "user_id": who.user_id, "role": role }))
        .collect();
    let start = now_ms();
    let session = serde_json::json!({
        "kind": "group", "title": "Group", "starts_at": start, "ends_at": start + 3_600_000,
        "timezone": "Europe/Berlin", "participants": participants, "recording_policy": "with_consent",
    });
    let room = therapist.ok(Method::POST, "/_limbic/client/v1/sessions", Some(session)).await["room_id"].as_str().unwrap().to_owned();
    for who in [&co, &client, &demoted, &removed, &departed] {
        assert_eq!(who.join(&room).await.0, StatusCode::OK, "{}", who.user_id);
    }
    let recording = upload_ok(&therapist, b"OggS the session's audio", "audio/ogg", Some("recording.ogg")).await;
    edit_record(&mut server, &recording, |record| record["recording_of"] = Value::String(room.clone())).await;

    let reads = |who: &Client| {
        let (who, recording) = (who.clone(), recording.clone());
        async move { fetch(&who, V1, "download", &recording, "").await }
    };
    for who in [&therapist, &co, &demoted, &removed, &departed] {
        assert_eq!(reads(who).await.status(), StatusCode::OK, "{}", who.user_id);
    }
    // Therapists no more: demoted to client, removed from the session, left its room.
    let participant = |user: &str| format!("/_limbic/client/v1/sessions/{}/participants/{}", enc(&room), enc(user));
    therapist.ok(Method::PUT, &participant(&demoted.user_id), Some(serde_json::json!({ "role": "client" }))).await;
    therapist.ok(Method::DELETE, &participant(&removed.user_id), None).await;
    departed.ok(Method::POST, &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(serde_json::json!({}))).await;

    for who in [&therapist, &co] {
        let response = reads(who).await;
        assert_eq!(response.status(), StatusCode::OK, "{}", who.user_id);
        assert_eq!(response.bytes().await.unwrap().as_ref(), b"OggS the session's audio");
    }
    for who in [&client, &demoted, &removed, &departed, &stranger] {
        for (endpoint, rest) in [("download", ""), ("download", "/recording.ogg"), ("thumbnail", "?width=32&height=32")] {
            let response = fetch(who, V1, endpoint, &recording, rest).await;
            assert_eq!(error_of(response).await, (StatusCode::FORBIDDEN, "M_FORBIDDEN".to_owned()), "{} {endpoint}{rest}", who.user_id);
        }
    }
    // Nor do the legacy endpoints serve it, to anyone.
    for who in [&server.client(), &therapist] {
        let response = fetch(who, LEGACY, "download", &recording, "").await;
        assert_eq!(error_of(response).await, (StatusCode::NOT_FOUND, "M_NOT_FOUND".to_owned()));
    }
}

#[tokio::test]
async fn an_admin_deleting_media_removes_its_file_unless_other_media_share_it() {
    let server = TestServer::start().await;
    let admin = server.register_admin("admin").await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let shared_a = upload_ok(&alice, b"a shared leaflet", "text/plain", None).await;
    let shared_b = upload_ok(&bob, b"a shared leaflet", "text/plain", None).await;
    let private = upload_ok(&alice, b"a private letter", "text/plain", None).await;
    assert_eq!(stored_files(&server), 2);
    let delete = |mxc: &str| {
        let media_id = mxc.rsplit('/').next().unwrap().to_owned();
        let admin = &admin;
        let path = format!("/_synapse/admin/v1/media/{}/{media_id}", server_name_of(mxc));
        async move { admin.request(Method::DELETE, &path, None).await }
    };

    // A stranger and a plain user may not delete media.
    let path = format!("/_synapse/admin/v1/media/{}/{}", server_name_of(&private), private.rsplit('/').next().unwrap());
    let (status, _) = alice.request(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, body) = delete(&private).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(error_of(fetch(&alice, V1, "download", &private, "").await).await, (StatusCode::NOT_FOUND, "M_NOT_FOUND".to_owned()));
    assert_eq!(stored_files(&server), 1, "the private letter's file is gone");

    // The leaflet's file stays while another id still uses it.
    let (status, _) = delete(&shared_a).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored_files(&server), 1);
    assert_eq!(fetch(&bob, V1, "download", &shared_b, "").await.bytes().await.unwrap().as_ref(), b"a shared leaflet");
    let (status, _) = delete(&shared_b).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored_files(&server), 0);
    let (status, _) = delete(&shared_b).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

fn server_name_of(mxc: &str) -> &str {
    mxc.trim_start_matches("mxc://").split('/').next().unwrap()
}

// Streaming: uploads go to disk as they arrive and downloads are read as they are sent, so that
// large media never sits whole in the server's memory.

const MIB: usize = 1024 * 1024;

/// `n` bytes that differ from those of another `seed`, so that a mix-up shows.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The server's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status.lines().find_map(|line| line.strip_prefix("VmRSS:")).expect("VmRSS in /proc/<pid>/status");
    kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

/// Runs `work`, sampling the server's resident memory meanwhile; returns its result and the
/// largest growth over the level before, in MiB.
async fn peak_growth<T>(server: &TestServer, work: impl std::future::Future<Output = T>) -> (T, u64) {
    let pid = server.pid();
    let before = rss(pid);
    let mut peak = before;
    tokio::pin!(work);
    let out = loop {
        tokio::select! {
            out = &mut work => break out,
            () = tokio::time::sleep(Duration::from_millis(5)) => peak = peak.max(rss(pid)),
        }
    };
    (out, peak.max(rss(pid)).saturating_sub(before) / MIB as u64)
}

/// A `POST /upload` sent by hand with a chunked body: no Content-Length, so that the server
/// learns the size only as the bytes arrive (reqwest here cannot stream a body).
struct ChunkedUpload {
    reader: tokio::net::tcp::OwnedReadHalf,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl ChunkedUpload {
    async fn start(client: &Client) -> Self {
        use tokio::io::AsyncWriteExt;
        let address = client.base.trim_start_matches("http://");
        let (reader, mut writer) = tokio::net::TcpStream::connect(address).await.unwrap().into_split();
        let head = format!(
            "POST {LEGACY}/upload HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            client.token.as_ref().unwrap(),
        );
        writer.write_all(head.as_bytes()).await.unwrap();
        Self { reader, writer }
    }

    /// Sends `bytes` in 64 KiB chunks; fails once the server has closed the connection.
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        for chunk in bytes.chunks(64 * 1024) {
            self.writer.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
            self.writer.write_all(chunk).await?;
            self.writer.write_all(b"\r\n").await?;
        }
        Ok(())
    }

    /// Ends the body and reads the answer, whenever the server gave it.
    async fn finish(mut self) -> (StatusCode, Value) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = self.writer.write_all(b"0\r\n\r\n").await;
        let mut answer = Vec::new();
        let _ = self.reader.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        let status = answer.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok()).expect("an HTTP answer");
        let body = answer.find('{').and_then(|start| serde_json::from_str(answer[start..].trim_end()).ok()).unwrap_or(Value::Null);
        (StatusCode::from_u16(status).unwrap(), body)
    }
}

async fn upload_chunked(client: &Client, bytes: &[u8]) -> (StatusCode, Value) {
    let mut upload = ChunkedUpload::start(client).await;
    // A refusal may come, and the connection close, before the end.
    let _ = upload.send(bytes).await;
    upload.finish().await
}

/// Temporary files of uploads in progress, at the root of the media store.
fn temp_files(server: &TestServer) -> usize {
    std::fs::read_dir(server.store_dir().join("db-media"))
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp-"))
        .count()
}

#[tokio::test]
async fn an_oversize_upload_without_length_is_refused_as_it_streams() {
    let limit = 24 * MIB;
    let server = TestServer::start_with(&[("LIMBIC_MEDIA__MAX_UPLOAD_SIZE", &limit.to_string())]).await;
    let alice = server.register("alice").await;

    let ((status, body), growth) = peak_growth(&server, upload_chunked(&alice, &vec![7; limit + 6 * MIB])).await;
    assert_eq!((status, errcode(&body)), (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"), "{body}");
    // Nothing stays, not even the part received before the limit.
    assert_eq!(stored_files(&server), 0);
    // The body was never held in memory (buffering it held the whole limit, and more).
    assert!(growth < 12, "the server grew by {growth} MiB while refusing an upload");

    // Exactly the limit is fine, with or without a length.
    let exact = noise(1, limit);
    let (status, body) = upload_chunked(&alice, &exact).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let response = fetch(&alice, V1, "download", body["content_uri"].as_str().unwrap(), "").await;
    assert!(response.bytes().await.unwrap() == exact);
}

#[tokio::test]
async fn an_upload_passing_the_quota_is_refused_as_it_streams() {
    let server = TestServer::start_with(&[("LIMBIC_MEDIA__USER_QUOTA", &(30 * MIB).to_string())]).await;
    let alice = server.register("alice").await;
    upload_ok(&alice, &noise(2, 10 * MIB), "application/octet-stream", None).await;

    let ((status, body), growth) = peak_growth(&server, upload_chunked(&alice, &noise(3, 30 * MIB))).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_RESOURCE_LIMIT_EXCEEDED"), "{body}");
    assert_eq!(stored_files(&server), 1, "only the first upload is stored");
    assert!(growth < 12, "the server grew by {growth} MiB while refusing an upload");
    // With a length, and to an id from `create`, alike.
    let created = alice.ok(Method::POST, "/_matrix/media/v1/create", None).await;
    let mxc = created["content_uri"].as_str().unwrap();
    let (status, body) = upload_to(&alice, mxc, &noise(4, 25 * MIB)).await;
    assert_eq!((status, errcode(&body)), (StatusCode::BAD_REQUEST, "M_RESOURCE_LIMIT_EXCEEDED"), "{body}");
    assert_eq!(stored_files(&server), 1);

    // A refused upload is not charged: the rest of the quota is still there.
    let (status, body) = upload_to(&alice, mxc, &noise(5, 20 * MIB)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(stored_files(&server), 2);
}

#[tokio::test]
async fn large_uploads_and_downloads_stream_in_bounded_memory() {
    const SIZE: usize = 20 * MIB;
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let contents: Vec<Vec<u8>> = (0..4).map(|i| noise(10 + i, SIZE)).collect();
    // Warm up: the first request of a kind sets up what every later one reuses.
    let warm = upload_ok(&alice, &noise(9, MIB), "application/octet-stream", None).await;
    fetch(&alice, V1, "download", &warm, "").await.bytes().await.unwrap();

    let uploads = futures_util::future::join_all(contents.iter().map(|bytes| upload_ok(&alice, bytes, "video/mp4", Some("session.mp4"))));
    let (mxcs, growth) = peak_growth(&server, uploads).await;
    assert!(growth < 40, "four concurrent {} MiB uploads grew the server by {growth} MiB", SIZE / MIB);

    let downloads = futures_util::future::join_all(mxcs.iter().map(|mxc| async {
        let response = fetch(&alice, V1, "download", mxc, "").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header_of(&response, header::CONTENT_LENGTH), SIZE.to_string());
        assert_eq!(header_of(&response, header::CONTENT_TYPE), "video/mp4");
        assert_eq!(header_of(&response, header::CONTENT_DISPOSITION), "inline; filename=session.mp4");
        assert_eq!(header_of(&response, HeaderName::from_static("cross-origin-resource-policy")), "cross-origin");
        response.bytes().await.unwrap()
    }));
    let (downloaded, growth) = peak_growth(&server, downloads).await;
    assert!(growth < 40, "four concurrent {} MiB downloads grew the server by {growth} MiB", SIZE / MIB);
    for (got, sent) in downloaded.iter().zip(&contents) {
        assert!(got == sent, "a download differs from its upload");
    }
    assert_eq!(stored_files(&server), 5);
    assert_eq!(temp_files(&server), 0);
}

#[tokio::test]
async fn an_upload_cut_by_a_crash_leaves_nothing() {
    let mut server = TestServer::start().await;
    let alice = server.register("alice").await;
    let mut upload = ChunkedUpload::start(&alice).await;
    upload.send(&noise(6, 4 * MIB)).await.unwrap();
    // The bytes so far are on disk, in a temporary file, not in memory.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while temp_files(&server) == 0 {
        assert!(std::time::Instant::now() < deadline, "no temporary file while an upload streams");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();
    drop(upload);
    assert_eq!(temp_files(&server), 1);
    server.start_again().await;
    assert_eq!(stored_files(&server), 0, "the interrupted upload's temporary file is removed at start");
}
