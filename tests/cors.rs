//! CORS (spec/cors.md): the Matrix client, media and well-known APIs answer every origin, on
//! every response and preflight; `/_limbic` answers only the configured origins; federation and
//! the server's own pages answer none.

mod common;

use common::TestServer;
use reqwest::{Method, Response, StatusCode, header::HeaderMap};

const FOREIGN: &str = "https://app.element.example";
const CONSOLE: &str = "https://console.clinic.example";

async fn send(server: &TestServer, method: Method, path: &str, origin: &str, token: Option<&str>) -> Response {
    let mut request = reqwest::Client::new().request(method, format!("{}{path}", server.base)).header("Origin", origin);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// A browser's preflight for a request with a JSON body and an access token.
async fn preflight(server: &TestServer, path: &str, origin: &str) -> Response {
    reqwest::Client::new()
        .request(Method::OPTIONS, format!("{}{path}", server.base))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization,content-type")
        .send()
        .await
        .unwrap()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

fn allow_origin(response: &Response) -> Option<&str> {
    header(response.headers(), "access-control-allow-origin")
}

/// A preflight answer that lets the browser send the request, from `origin`.
fn assert_preflight_allows(response: &Response, origin: &str) {
    assert!(response.status().is_success(), "{} {}", response.url(), response.status());
    let headers = response.headers();
    assert_eq!(header(headers, "access-control-allow-origin"), Some(origin), "{}", response.url());
    let methods = header(headers, "access-control-allow-methods").unwrap_or_default();
    for method in ["GET", "POST", "PUT", "DELETE", "OPTIONS"] {
        assert!(methods.split(',').any(|m| m.trim() == method), "{method} not in {methods:?}");
    }
    let allowed = header(headers, "access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
    for name in ["x-requested-with", "content-type", "authorization"] {
        assert!(allowed.split(',').any(|h| h.trim() == name), "{name} not in {allowed:?}");
    }
}

#[tokio::test]
async fn matrix_apis_answer_every_origin() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let token = alice.token.as_deref();

    // Preflights, on an endpoint that has no OPTIONS handler and on an unknown one.
    for path in [
        "/_matrix/client/v3/login",
        "/_matrix/client/v3/rooms/!r:test.local/send/m.room.message/1",
        "/_matrix/client/v3/no/such/endpoint",
        "/_matrix/media/v3/upload",
        "/_matrix/client/v1/media/download/test.local/abc",
        "/.well-known/matrix/client",
        "/_limbic/calls/get_token",
    ] {
        assert_preflight_allows(&preflight(&server, path, FOREIGN).await, "*");
    }

    // Answers, successful or not, carry the header too.
    let cases: [(Method, &str, Option<&str>, StatusCode); 8] = [
        (Method::GET, "/_matrix/client/versions", None, StatusCode::OK),
        (Method::GET, "/_matrix/client/v3/account/whoami", None, StatusCode::UNAUTHORIZED),
        (Method::GET, "/_matrix/client/v3/account/whoami", token, StatusCode::OK),
        (Method::GET, "/_matrix/client/v3/no/such/endpoint", token, StatusCode::NOT_FOUND),
        (Method::GET, "/_matrix/client/v1/media/config", token, StatusCode::OK),
        (Method::GET, "/_matrix/client/v1/media/download/test.local/nothing", token, StatusCode::NOT_FOUND),
        (Method::GET, "/.well-known/matrix/client", None, StatusCode::OK),
        (Method::POST, "/_limbic/calls/get_token", None, StatusCode::BAD_REQUEST),
    ];
    for (method, path, token, status) in cases {
        let response = send(&server, method.clone(), path, FOREIGN, token).await;
        assert_eq!(response.status(), status, "{method} {path}");
        assert_eq!(allow_origin(&response), Some("*"), "{method} {path} ({status})");
    }
    let response = send(&server, Method::GET, "/_matrix/client/v3/no/such/endpoint", FOREIGN, None).await;
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["errcode"], "M_UNRECOGNIZED");

    // An upload and its download, as a browser client shows an image.
    let upload = reqwest::Client::new()
        .post(format!("{}/_matrix/media/v3/upload?filename=a.png", server.base))
        .header("Origin", FOREIGN)
        .bearer_auth(token.unwrap())
        .header("Content-Type", "image/png")
        .body(vec![0u8; 16])
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), StatusCode::OK);
    assert_eq!(allow_origin(&upload), Some("*"));
    let mxc: serde_json::Value = upload.json().await.unwrap();
    let media_id = mxc["content_uri"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let download = send(&server, Method::GET, &format!("/_matrix/client/v1/media/download/test.local/{media_id}"), FOREIGN, token).await;
    assert_eq!(download.status(), StatusCode::OK);
    assert_eq!(allow_origin(&download), Some("*"));
}

#[tokio::test]
async fn limbic_apis_are_same_origin_by_default() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let token = alice.token.as_deref();

    for path in ["/_limbic/health", "/_limbic/client/v1/sessions"] {
        let response = send(&server, Method::GET, path, FOREIGN, token).await;
        assert!(response.status().is_success(), "{path}: {}", response.status());
        assert_eq!(allow_origin(&response), None, "{path}");
        let response = preflight(&server, path, FOREIGN).await;
        assert_eq!(allow_origin(&response), None, "preflight {path}");
        assert_eq!(header(response.headers(), "access-control-allow-headers"), None, "preflight {path}");
    }
}

#[tokio::test]
async fn limbic_apis_answer_configured_origins_only() {
    let server = TestServer::start_with_toml(&format!("[web]\ncors_origins = [\"{CONSOLE}\"]\n"), &[]).await;
    let alice = server.register("alice").await;
    let token = alice.token.as_deref();

    let path = "/_limbic/client/v1/sessions";
    assert_preflight_allows(&preflight(&server, path, CONSOLE).await, CONSOLE);
    let response = send(&server, Method::GET, path, CONSOLE, token).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(allow_origin(&response), Some(CONSOLE));
    // The answer depends on the origin: caches must keep one per origin.
    let vary = header(response.headers(), "vary").unwrap_or_default().to_ascii_lowercase();
    assert!(vary.contains("origin"), "vary: {vary:?}");
    // A refusal (no token) too, so the console can read why.
    let response = send(&server, Method::GET, path, CONSOLE, None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(allow_origin(&response), Some(CONSOLE));

    // Any other origin is refused: the browser keeps the answer from the page.
    assert_eq!(allow_origin(&preflight(&server, path, FOREIGN).await), None);
    assert_eq!(allow_origin(&send(&server, Method::GET, path, FOREIGN, token).await), None);
    // The Matrix APIs are unchanged.
    assert_eq!(allow_origin(&send(&server, Method::GET, "/_matrix/client/versions", CONSOLE, None).await), Some("*"));
}

#[tokio::test]
async fn federation_and_pages_send_no_cors() {
    let server = TestServer::start_with_toml(&format!("[web]\ncors_origins = [\"{CONSOLE}\"]\n"), &[]).await;
    for path in ["/_matrix/federation/v1/version", "/_matrix/key/v2/server", "/join", "/metrics", "/health"] {
        let response = send(&server, Method::GET, path, CONSOLE, None).await;
        assert_eq!(allow_origin(&response), None, "{path} ({})", response.status());
        let response = preflight(&server, path, CONSOLE).await;
        assert_eq!(allow_origin(&response), None, "preflight {path}");
        assert!(!response.status().is_success(), "preflight {path}: {}", response.status());
    }
}

#[test]
fn a_bad_origin_stops_the_server_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("limbic.toml");
    let toml = format!(
        "server_name = \"test.local\"\n[database]\npath = \"{}\"\n[web]\ncors_origins = [\"https://clinic.example/\"]\n",
        dir.path().join("db").display()
    );
    std::fs::write(&config, toml).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_limbic")).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("web.cors_origins") && stderr.contains("https://clinic.example/"), "{stderr}");
}
