//! End-to-end tests: the browser pages are served from `[web] assets_dir`: the join page at
//! `/join` (and its own routes) with `/join/assets/<file>` for its scripts and styles, the clinic
//! console at `/clinic` with `/clinic/assets/<file>`.

mod common;

use common::TestServer;
use reqwest::StatusCode;

#[tokio::test]
async fn the_join_page_and_its_assets_are_served_from_the_assets_directory() {
    let assets = tempfile::tempdir().unwrap();
    std::fs::write(assets.path().join("index.html"), "<!doctype html><title>Join</title>").unwrap();
    std::fs::write(assets.path().join("join.js"), "console.log('join')").unwrap();
    std::fs::write(assets.path().join("join.css"), "body{}").unwrap();
    let dir = assets.path().display().to_string();
    let server = TestServer::start_with(&[("LIMBIC_WEB__ASSETS_DIR", dir.as_str())]).await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", server.base)).send();

    // The page, at the link's URL with its token, and under its own routes.
    for path in ["/join?token=abc", "/join/", "/join/session/anything"] {
        let answer = get(path).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{path}");
        assert_eq!(answer.headers()["content-type"], "text/html; charset=utf-8");
        assert!(answer.text().await.unwrap().contains("<title>Join</title>"));
    }
    for (path, kind) in [("/join/assets/join.js", "text/javascript; charset=utf-8"), ("/join/assets/join.css", "text/css; charset=utf-8")] {
        let answer = get(path).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{path}");
        assert_eq!(answer.headers()["content-type"], kind);
    }
    // Nothing outside the directory, nothing that is not there.
    for path in ["/join/assets/..%2F..%2Fetc%2Fpasswd", "/join/assets/.hidden", "/join/assets/missing.js"] {
        assert_eq!(get(path).await.unwrap().status(), StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn an_unbuilt_join_page_says_how_to_build_it() {
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().display().to_string();
    let server = TestServer::start_with(&[("LIMBIC_WEB__ASSETS_DIR", dir.as_str())]).await;
    let answer = reqwest::get(format!("{}/join?token=abc", server.base)).await.unwrap();
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.text().await.unwrap().contains("npm run build --prefix web"));
}

/// The console's page gets a fresh style nonce in its Content-Security-Policy on every answer;
/// scripts come from the server only.
#[tokio::test]
async fn the_clinic_console_is_served_with_a_fresh_nonce_each_time() {
    let assets = tempfile::tempdir().unwrap();
    let console = assets.path().join("clinic");
    std::fs::create_dir(&console).unwrap();
    std::fs::write(console.join("index.html"), r#"<!doctype html><meta name="csp-nonce" content="__CSP_NONCE__"><title>Clinic</title>"#).unwrap();
    std::fs::write(console.join("clinic.js"), "console.log('clinic')").unwrap();
    let dir = assets.path().display().to_string();
    let server = TestServer::start_with(&[("LIMBIC_WEB__ASSETS_DIR", dir.as_str())]).await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", server.base)).send();

    let mut nonces = Vec::new();
    for path in ["/clinic", "/clinic/", "/clinic/sessions/anything"] {
        let answer = get(path).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{path}");
        let policy = answer.headers()["content-security-policy"].to_str().unwrap().to_owned();
        assert!(policy.contains("script-src 'self';"), "{policy}");
        assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
        let nonce = policy.split("'nonce-").nth(1).and_then(|rest| rest.split('\'').next()).unwrap().to_owned();
        let html = answer.text().await.unwrap();
        assert!(html.contains(&format!(r#"content="{nonce}""#)), "{html}");
        assert!(!html.contains("__CSP_NONCE__"));
        nonces.push(nonce);
    }
    nonces.dedup();
    assert_eq!(nonces.len(), 3, "a nonce is never reused: {nonces:?}");
    let script = get("/clinic/assets/clinic.js").await.unwrap();
    assert_eq!(script.headers()["content-type"], "text/javascript; charset=utf-8");
    for path in ["/clinic/assets/..%2Findex.html", "/clinic/assets/.hidden", "/clinic/assets/missing.js", "/join/assets/clinic.js"] {
        assert_eq!(get(path).await.unwrap().status(), StatusCode::NOT_FOUND, "{path}");
    }
}
