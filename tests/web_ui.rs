//! The chat page: served at `/` (and not with `--no-web-ui`), and driven in a real browser
//! (tests/web_ui.py: Debian's Chromium through Selenium, which scripts/test.sh installs): an
//! image question streamed to the API's greedy answer, a stop mid-stream that frees the
//! sequence server-side, a broken image's 400 shown as sent.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::http::*;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_with_a_strict_policy_unless_turned_off() {
    let server = server(|args| args.api_key = Some("sk-page".into())).await;
    let client = reqwest::Client::new();
    for (path, kind) in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let response = client.get(url(&server, path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path} needs no key");
        let headers = response.headers();
        assert!(headers["content-type"].to_str().unwrap().starts_with(kind), "{path}");
        assert!(
            headers["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("script-src 'self'")
        );
    }
    let page = client
        .get(url(&server, "/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<script src=\"/ui/app.js\""), "{page}");
    let off = common::http::server(|args| args.no_web_ui = true).await;
    let (status, body) = get(&client, &url(&off, "/")).await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let response = client.get(url).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_answers_stops_and_shows_errors_in_a_browser() {
    let key = "sk-page";
    let server = server(|args| args.api_key = Some(key.into())).await;
    let client = reqwest::Client::new();
    let image = fixtures().join("images/wide.png");
    // What the page sends: the image as a data URI, then the text; greedy, 12 tokens.
    let request = json!({
        "model": MODEL, "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": fixture_image_uri("wide")}},
            {"type": "text", "text": "What is in this picture?"},
        ]}],
    });
    let response = client
        .post(url(&server, "/v1/chat/completions"))
        .bearer_auth(key)
        .json(&request)
        .send();
    let body: serde_json::Value = response.await.unwrap().json().await.unwrap();
    let expected = body["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let broken = tempfile::Builder::new().suffix(".png").tempfile().unwrap();
    std::fs::write(broken.path(), b"these bytes are no image").unwrap();

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/web_ui.py");
    let mut args = vec![
        format!("http://{}", server.addr),
        key.to_string(),
        image.display().to_string(),
        expected,
        broken.path().display().to_string(),
    ];
    // OCELLUS_SCREENSHOT=docs/chat-page.png: the picture in the README.
    args.extend(std::env::var("OCELLUS_SCREENSHOT").ok());
    let python = python();
    let output = tokio::task::spawn_blocking(move || Command::new(python).arg(script).args(&args).output())
        .await
        .unwrap()
        .expect("python runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "the browser test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("web ui ok"), "{stdout}");
}
