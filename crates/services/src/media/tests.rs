//! Records from before authenticated media stay readable through the legacy endpoints; new
//! media is not (tests/media.rs checks the same over HTTP, and call recordings).

use std::time::Duration;

use ruma::{UInt, server_name};
use serde_json::json;

use super::*;
use crate::{error::ErrorCode, events::ServerSigningKey, rooms::Rooms, users::local_user_id};

const WAIT: Duration = Duration::ZERO;

fn upload_of(bytes: &[u8]) -> Upload {
    Upload { bytes: bytes.to_vec(), content_type: Some("text/plain".to_owned()), filename: None, recording_of: None }
}

/// An upload as a client's body brings it.
fn streamed(bytes: &'static [u8]) -> Upload<http_body_util::Full<bytes::Bytes>> {
    let Upload { content_type, filename, recording_of, .. } = upload_of(bytes);
    Upload { bytes: http_body_util::Full::new(bytes::Bytes::from_static(bytes)), content_type, filename, recording_of }
}

fn media_id(mxc: &OwnedMxcUri) -> String {
    mxc.parts().unwrap().1.to_owned()
}

/// The media repository of `test.local`, with its store and files under `dir`, and the rooms
/// that decide who may read what.
struct TestMedia {
    store: Arc<Store>,
    media: Media,
    rooms: Rooms,
    _shutdown: watch::Sender<bool>,
}

fn open_in(dir: &std::path::Path) -> TestMedia {
    let toml = format!(
        "server_name = \"test.local\"\n[database]\npath = \"{}\"\n[media]\npath = \"{}\"\n",
        dir.join("db").display(),
        dir.join("media").display()
    );
    let config = crate::config::Config::from_toml(&toml, []).expect("test config");
    let store = Arc::new(Store::open(&config.database.path).expect("test store"));
    let key = Arc::new(ServerSigningKey::generate(config.server_name.clone()));
    let audit = Arc::new(crate::audit::Audit::load(&store, &dir.join("audit.key")).expect("test audit chain"));
    let (shutdown, stopping) = watch::channel(false);
    let media = Media::open(&config.media, store.clone(), config.server_name.clone(), stopping).expect("test media");
    TestMedia { rooms: Rooms::new(store.clone(), key, audit, false), media, store, _shutdown: shutdown }
}

async fn read(server: &TestMedia, reader: Reader<'_>, media_id: &str) -> Result<Vec<u8>> {
    let mut file = server.media.download(reader, server_name!("test.local"), media_id, WAIT).await?;
    let mut bytes = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut file.file, &mut bytes).await.unwrap();
    assert_eq!(bytes.len() as u64, file.size);
    Ok(bytes)
}

fn code(result: Result<Vec<u8>>) -> (http::StatusCode, ErrorCode) {
    let error = result.expect_err("refused");
    (error.describe().0, error.code())
}

#[tokio::test(flavor = "multi_thread")]
async fn media_from_before_authenticated_media_stays_readable_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = open_in(dir.path());
    let alice = local_user_id("alice", server_name!("test.local")).unwrap();

    // A record as the server wrote it before: no `authenticated` field.
    let sha256 = server.media.files.put(b"old scan").unwrap();
    let old = json!({
        "uploader": alice, "created_ts": 1,
        "content": { "sha256": sha256, "content_type": "text/plain", "filename": null, "size": 8 },
    });
    let mut batch = server.store.batch();
    batch.put_json(tables::MEDIA, b"oldmedia", &old).unwrap();
    server.store.write(batch).unwrap();
    assert_eq!(read(&server, Reader::Legacy, "oldmedia").await.unwrap(), b"old scan");
    assert_eq!(read(&server, Reader::User(&alice, &server.rooms), "oldmedia").await.unwrap(), b"old scan");

    // New media: only the authenticated endpoints serve it, downloads and thumbnails alike.
    let new = media_id(&server.media.upload(&alice, upload_of(b"new scan")).await.unwrap());
    assert_eq!(code(read(&server, Reader::Legacy, &new).await), (http::StatusCode::NOT_FOUND, ErrorCode::NotFound));
    let size = (UInt::from(32u32), UInt::from(32u32));
    let thumbnail = server.media.thumbnail(Reader::Legacy, server_name!("test.local"), &new, None, size, WAIT).await;
    assert_eq!(thumbnail.err().map(|e| e.code()), Some(ErrorCode::NotFound));
    assert_eq!(read(&server, Reader::User(&alice, &server.rooms), &new).await.unwrap(), b"new scan");
    // An id from `create` is new media too.
    let (created, _) = server.media.create(&alice).unwrap();
    server.media.upload_to(&alice, server_name!("test.local"), &media_id(&created), streamed(b"later")).await.unwrap();
    assert_eq!(code(read(&server, Reader::Legacy, &media_id(&created)).await), (http::StatusCode::NOT_FOUND, ErrorCode::NotFound));
}
