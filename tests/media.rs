//! End-to-end tests: media.

mod common;

use std::{io::Cursor, path::Path, time::Duration};

use common::{Client, TestServer, enc, errcode};
use image::{DynamicImage, ImageFormat, RgbImage, RgbaImage};
use reqwest::{Method, StatusCode, header};
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

    // The filename in the path wins; the legacy endpoint needs no token.
    let anonymous = server.client();
    let response = fetch(&anonymous, LEGACY, "download", &mxc, "/other.png").await;
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

    // The legacy endpoint needs no token; thumbnails are made once and cached.
    let files = stored_files(&server);
    let anonymous = server.client();
    let (_, image) = thumbnail_of(&anonymous, LEGACY, &tall, "width=96&height=96&method=crop").await;
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
