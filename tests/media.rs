//! Images from URLs and local files, served by a little HTTP server on loopback: each
//! hostile or broken source gets a clear 4xx and the server keeps serving; an image by URL
//! gives the same answer as the same image inline.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use common::http::*;
use common::*;
use serde_json::{Value, json};

const MAX_MEDIA: usize = 200_000;

fn with_type(content_type: &'static str, bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, content_type)], bytes).into_response()
}

/// The hostile and the honest, on a loopback port.
async fn media_server() -> String {
    media_server_on("127.0.0.1").await
}

/// `media_server` on one loopback address (Linux routes all of 127/8 to loopback).
async fn media_server_on(address: &str) -> String {
    let wide = std::fs::read(fixtures().join("images/wide.png")).unwrap();
    let (wide_a, wide_b) = (wide.clone(), wide.clone());
    let app = Router::new()
        .route("/wide.png", get(move || async move { with_type("image/png", wide_a) }))
        .route("/untyped", get(move || async move { wide_b.into_response() }))
        .route(
            "/one.png",
            get(|| async { with_type("image/png", png(1, 1, [200, 100, 50])) }),
        )
        .route(
            "/lying.png",
            get(|| async { with_type("image/jpeg", png(8, 8, [1, 2, 3])) }),
        )
        .route(
            "/page.html",
            get(|| async { with_type("text/html", b"<html>not an image</html>".to_vec()) }),
        )
        .route("/empty.png", get(|| async { with_type("image/png", Vec::new()) }))
        .route(
            "/truncated.png",
            get(|| async { with_type("image/png", png(64, 64, [9, 9, 9])[..80].to_vec()) }),
        )
        .route(
            "/corrupt.png",
            get(|| async {
                let mut bytes = png(64, 64, [9, 9, 9]);
                for b in bytes.iter_mut().skip(40) {
                    *b = b.wrapping_mul(31).wrapping_add(7);
                }
                with_type("image/png", bytes)
            }),
        )
        .route(
            "/bomb.png",
            get(|| async { with_type("image/png", png_claiming(50000, 50000)) }),
        )
        .route(
            "/huge.png",
            get(|| async { with_type("image/png", vec![0x89; MAX_MEDIA * 5]) }),
        )
        .route(
            "/huge-unsized",
            get(|| async {
                let chunks = futures::stream::iter((0..50).map(|_| Ok::<_, std::io::Error>(vec![0u8; 20_000])));
                Body::from_stream(chunks).into_response()
            }),
        )
        .route(
            "/trickle.png",
            get(|| async {
                // One byte every 100 ms: each read is quick, the whole is not.
                let chunks = futures::stream::unfold(0u32, |i| async move {
                    if i >= 100 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((Ok::<_, std::io::Error>(vec![0x89u8]), i + 1))
                });
                Body::from_stream(chunks).into_response()
            }),
        )
        .route("/missing.png", get(|| async { StatusCode::NOT_FOUND }));
    let listener = tokio::net::TcpListener::bind((address, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = with_redirects(app);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// A redirect loop, chains of redirects ending at /wide.png, and a redirect to any URL.
fn with_redirects(app: Router) -> Router {
    app.route("/loop", get(|| async { Redirect::temporary("/loop") }))
        .route(
            "/redirect",
            get(|Query(to): Query<HashMap<String, String>>| async move { Redirect::temporary(&to["to"]) }),
        )
        .route(
            "/chain/{n}",
            get(|Path(n): Path<u32>| async move {
                if n == 0 {
                    Redirect::temporary("/wide.png")
                } else {
                    Redirect::temporary(&format!("/chain/{}", n - 1))
                }
            }),
        )
}

fn ask(image_url: &str) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": "What is in this picture?"}
        ]}],
        "temperature": 0, "max_tokens": 24, "min_tokens": 24,
    })
}

fn assert_error(name: &str, status: u16, body: &Value, code: &str) {
    assert_eq!(status, 400, "{name}: {body}");
    assert_eq!(body["error"]["code"], code, "{name}: {body}");
    assert_eq!(
        body["error"]["param"], "messages[0].content[0].image_url",
        "{name}: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_and_local_files_work_and_every_bad_source_gets_a_clear_400() {
    let media = media_server().await;
    let folder = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("images/wide.png"), folder.path().join("wide.png")).unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.png"), png(4, 4, [0, 0, 0])).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.png"), folder.path().join("link.png")).unwrap();
    let allowed = folder.path().to_path_buf();
    let server = server(move |args| {
        args.media.allow_private_media_addresses = true;
        args.media.allowed_local_media_path = Some(allowed);
        args.media.media_fetch_timeout = Duration::from_millis(1500);
        args.media.max_media_redirects = 3;
        args.limits.max_media_size = bytesize::ByteSize::b(MAX_MEDIA as u64);
    })
    .await;
    let client = reqwest::Client::new();
    let chat = url(&server, "/v1/chat/completions");

    // The same image inline, by URL (typed or not), and from the allowed folder: one answer,
    // transformers' greedy answer.
    let reference = Reference::load(&fixtures(), MODEL);
    let expected = load_fixture_model(MODEL)
        .processor
        .decode(&reference.cases["wide"].greedy_tokens)
        .unwrap();
    let local = format!("file://{}", folder.path().join("wide.png").display());
    for source in [
        fixture_image_uri("wide"),
        format!("{media}/wide.png"),
        format!("{media}/untyped"),
        format!("{media}/chain/2"),
        local,
    ] {
        let (status, body) = post(&client, &chat, &ask(&source)).await;
        assert_eq!(status, 200, "{source}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], expected.as_str(), "{source}");
    }
    let (status, _) = post(&client, &chat, &ask(&format!("{media}/one.png"))).await;
    assert_eq!(status, 200, "a 1x1 image is an image");

    let secret = outside.path().join("secret.png");
    let cases = [
        ("redirect loop", format!("{media}/loop"), "too_many_redirects"),
        (
            "redirect chain past the cap",
            format!("{media}/chain/5"),
            "too_many_redirects",
        ),
        (
            "body trickling past the timeout",
            format!("{media}/trickle.png"),
            "media_timeout",
        ),
        ("oversized body", format!("{media}/huge.png"), "media_too_large"),
        (
            "oversized body without a length",
            format!("{media}/huge-unsized"),
            "media_too_large",
        ),
        (
            "lying content type",
            format!("{media}/lying.png"),
            "content_type_mismatch",
        ),
        ("HTML page", format!("{media}/page.html"), "invalid_image"),
        ("truncated file", format!("{media}/truncated.png"), "invalid_image"),
        ("corrupt file", format!("{media}/corrupt.png"), "invalid_image"),
        ("empty file", format!("{media}/empty.png"), "invalid_image"),
        ("50000x50000 PNG header", format!("{media}/bomb.png"), "image_too_large"),
        ("404", format!("{media}/missing.png"), "media_fetch_failed"),
        (
            "nobody listening",
            "http://127.0.0.1:9/x.png".into(),
            "media_fetch_failed",
        ),
        (
            "path outside the folder",
            format!("file://{}", secret.display()),
            "local_media_not_allowed",
        ),
        (
            "symlink out of the folder",
            format!("file://{}", folder.path().join("link.png").display()),
            "local_media_not_allowed",
        ),
        (
            "../ out of the folder",
            format!(
                "file://{}/../{}/secret.png",
                folder.path().display(),
                outside.path().file_name().unwrap().to_str().unwrap()
            ),
            "local_media_not_allowed",
        ),
        (
            "missing local file",
            format!("file://{}", folder.path().join("nope.png").display()),
            "media_not_found",
        ),
    ];
    for (name, source, code) in cases {
        let (status, body) = post(&client, &chat, &ask(&source)).await;
        assert_error(name, status, &body, code);
    }
    let (status, body) = post(&client, &chat, &ask(&format!("{media}/wide.png"))).await;
    assert_eq!(
        (status, body["choices"][0]["message"]["content"].as_str()),
        (200, Some(expected.as_str()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_local_files_and_image_tokens_are_bounded_by_flags() {
    let media = media_server().await;
    let port = media.rsplit(':').next().unwrap().to_string();
    let server = server(|args| {
        args.media.allow_private_media_addresses = true;
        args.media.allowed_media_domains = vec!["localhost".into()];
        args.limits.max_image_tokens_per_request = 150;
    })
    .await;
    let client = reqwest::Client::new();
    let chat = url(&server, "/v1/chat/completions");
    let low = |source: String| {
        let mut request = ask(&source);
        request["messages"][0]["content"][0]["image_url"]["detail"] = json!("low");
        request
    };
    // localhost is allowed; 127.0.0.1 is another host, on the first hop or after a redirect.
    let (status, body) = post(&client, &chat, &low(format!("http://127.0.0.1:{port}/one.png"))).await;
    assert_error("disallowed domain", status, &body, "media_domain_not_allowed");
    let (status, body) = post(&client, &chat, &low(format!("http://localhost:{port}/one.png"))).await;
    assert_eq!(status, 200, "{body}");
    // Local files are refused when no folder is allowed.
    let (status, body) = post(&client, &chat, &low("file:///etc/hostname".into())).await;
    assert_error("local files disabled", status, &body, "local_media_not_allowed");
    // A 1x1 image is upscaled and tiled like any other: 17 tiles of 16 tokens = 272 > 150.
    // wide.png is 9 tiles (144 tokens) and fits.
    let (status, body) = post(&client, &chat, &ask(&format!("http://localhost:{port}/one.png"))).await;
    assert_error("image tokens", status, &body, "image_tokens_exceeded");
    let (status, body) = post(&client, &chat, &ask(&format!("http://localhost:{port}/wide.png"))).await;
    assert_eq!(status, 200, "{body}");
    let text = scrape(&client, &server).await;
    assert_eq!(
        metric(&text, "ocellus_vision_cache_misses_total"),
        Some(2.0),
        "one.png (low) and wide.png"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_unless_allowed_on_every_hop() {
    let (first, second) = (media_server_on("127.0.0.1").await, media_server_on("127.0.0.2").await);
    let port = |media: &str| media.rsplit(':').next().unwrap().to_string();
    let (first_port, second_port) = (port(&first), port(&second));
    let by_name = format!("http://localhost:{first_port}");
    let low = |source: String| {
        let mut request = ask(&source);
        request["messages"][0]["content"][0]["image_url"]["detail"] = json!("low");
        request
    };
    let refused = "media_address_not_allowed";

    // By default: loopback by address (in any spelling) and by a name resolving to it.
    let strict = server(|_| {}).await;
    let client = reqwest::Client::new();
    let chat = url(&strict, "/v1/chat/completions");
    for source in [
        format!("{first}/one.png"),
        format!("{by_name}/one.png"),
        format!("http://2130706433:{first_port}/one.png"),
        format!("http://[::1]:{first_port}/one.png"),
        format!("http://[::ffff:127.0.0.1]:{first_port}/one.png"),
    ] {
        let (status, body) = post(&client, &chat, &low(source.clone())).await;
        assert_error(&source, status, &body, refused);
    }
    let (status, body) = post(&client, &chat, &low(fixture_image_uri("wide"))).await;
    assert_eq!(status, 200, "inline images are not fetched: {body}");

    // --allow-private-media-addresses: both fetched.
    let open = server(|args| args.media.allow_private_media_addresses = true).await;
    let chat = url(&open, "/v1/chat/completions");
    for source in [format!("{first}/one.png"), format!("{by_name}/one.png")] {
        let (status, body) = post(&client, &chat, &low(source.clone())).await;
        assert_eq!(status, 200, "{source}: {body}");
    }

    // Only 127.0.0.1 allowed: the name's first hop is fetched, a redirect to another loopback
    // address is refused on the hop.
    let one = server(|args| args.media.allowed_media_networks = vec!["127.0.0.1/32".parse().unwrap()]).await;
    let chat = url(&one, "/v1/chat/completions");
    for source in [format!("{first}/one.png"), format!("{by_name}/one.png")] {
        let (status, body) = post(&client, &chat, &low(source.clone())).await;
        assert_eq!(status, 200, "{source}: {body}");
    }
    let hop = format!("{by_name}/redirect?to=http://127.0.0.2:{second_port}/one.png");
    let (status, body) = post(&client, &chat, &low(hop.clone())).await;
    assert_error(&hop, status, &body, refused);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("127.0.0.2"),
        "{body}"
    );

    // Only 127.0.0.2 allowed: a redirect to a name that resolves to loopback is refused when
    // the name is resolved for the hop.
    let two = server(|args| args.media.allowed_media_networks = vec!["127.0.0.2/32".parse().unwrap()]).await;
    let chat = url(&two, "/v1/chat/completions");
    let (status, body) = post(&client, &chat, &low(format!("{second}/one.png"))).await;
    assert_eq!(status, 200, "{body}");
    let hop = format!("{second}/redirect?to=http://localhost:{second_port}/one.png");
    let (status, body) = post(&client, &chat, &low(hop.clone())).await;
    assert_error(&hop, status, &body, refused);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("localhost"),
        "{body}"
    );
}
