//! Videos over HTTP on the SmolVLM2 fixture: by URL, inline and from an allowed folder they
//! give transformers' greedy answer; other containers and codecs decode to the same frames;
//! broken or hostile videos and every video limit get a clear 400 naming the part.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::http::*;
use common::*;
use serde_json::{Value, json};

const VIDEO_MODEL: &str = "tiny-smolvlm2";

fn video(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("videos").join(name)).unwrap()
}

fn typed(content_type: &'static str, bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, content_type)], bytes).into_response()
}

/// Requests for the segment an HLS playlist names: FFmpeg must never make one.
static SEGMENT_FETCHES: AtomicUsize = AtomicUsize::new(0);

async fn video_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let playlist =
        format!("#EXTM3U\n#EXT-X-TARGETDURATION:3\n#EXTINF:3.0,\nhttp://{addr}/segment.ts\n#EXT-X-ENDLIST\n");
    let file =
        |name: &'static str, content_type: &'static str| get(move || async move { typed(content_type, video(name)) });
    let app = Router::new()
        .route("/clip.mp4", file("clip.mp4", "video/mp4"))
        .route("/clip-yuv420.mp4", file("clip-yuv420.mp4", "video/mp4"))
        .route("/clip.webm", file("clip.webm", "video/webm"))
        .route("/clip.gif", file("clip.gif", "image/gif"))
        .route("/clip.ts", file("clip.ts", "video/mp2t"))
        .route(
            "/segment.ts",
            get(|| async {
                SEGMENT_FETCHES.fetch_add(1, Ordering::SeqCst);
                typed("video/mp2t", video("clip.ts"))
            }),
        )
        .route("/untyped", get(|| async { video("clip.mp4").into_response() }))
        .route(
            "/truncated.mp4",
            get(|| async {
                let bytes = video("clip.mp4");
                typed("video/mp4", bytes[..bytes.len() / 3].to_vec())
            }),
        )
        .route(
            "/corrupt.mp4",
            get(|| async {
                let mut bytes = video("clip.mp4");
                for b in bytes.iter_mut().skip(64) {
                    *b = b.wrapping_mul(31).wrapping_add(7);
                }
                typed("video/mp4", bytes)
            }),
        )
        .route(
            "/frames-zeroed.mp4",
            get(|| async {
                // The header (moov, at the end) intact, every frame's data zeroed: a video
                // that opens and cannot be decoded.
                let mut bytes = video("clip.mp4");
                let moov = bytes.windows(4).rposition(|w| w == b"moov").unwrap() - 4;
                bytes[48..moov].fill(0);
                typed("video/mp4", bytes)
            }),
        )
        .route("/empty.mp4", get(|| async { typed("video/mp4", Vec::new()) }))
        .route("/image.png", get(|| async { typed("image/png", png(8, 8, [1, 2, 3])) }))
        .route("/image-untyped", get(|| async { png(8, 8, [1, 2, 3]).into_response() }))
        .route(
            "/playlist",
            get(move || async move { typed("application/octet-stream", playlist.into_bytes()) }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn video_model_server(
    configure: impl FnOnce(&mut ocellus::config::ServeArgs),
) -> ocellus::api::server::ServerHandle {
    server(|args| {
        args.model.model = fixtures()
            .join("models")
            .join(VIDEO_MODEL)
            .to_str()
            .unwrap()
            .to_string();
        // The test's media server is on loopback.
        args.media.allow_private_media_addresses = true;
        configure(args);
    })
    .await
}

fn ask(model: &str, parts: Vec<Value>) -> Value {
    let mut content = parts;
    content.push(json!({"type": "text", "text": "What happens in this video?"}));
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0, "max_tokens": 24, "min_tokens": 24,
    })
}

fn video_part(url: &str) -> Value {
    json!({"type": "video_url", "video_url": {"url": url}})
}

fn assert_error(name: &str, (status, body): (u16, Value), code: &str, param: &str) {
    assert_eq!(status, 400, "{name}: {body}");
    assert_eq!(body["error"]["code"], code, "{name}: {body}");
    assert_eq!(body["error"]["param"], param, "{name}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn videos_from_anywhere_answer_as_transformers_and_bad_ones_get_a_clear_400() {
    let media = video_server().await;
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(folder.path().join("clip.mp4"), video("clip.mp4")).unwrap();
    let allowed = folder.path().to_path_buf();
    let server = video_model_server(move |args| args.media.allowed_local_media_path = Some(allowed)).await;
    let client = reqwest::Client::new();
    let chat = url(&server, "/v1/chat/completions");
    let reference = Reference::load(&fixtures(), VIDEO_MODEL);
    let processor = load_fixture_model(VIDEO_MODEL).processor;
    let answer = |case: &str| processor.decode(&reference.cases[case].greedy_tokens).unwrap();
    let prompt_tokens = reference.cases["video"].input_ids.len();

    let local = format!("file://{}", folder.path().join("clip.mp4").display());
    for source in [
        format!("{media}/clip.mp4"),
        format!("{media}/untyped"),
        data_uri(&video("clip.mp4"), "video/mp4"),
        local,
    ] {
        let (status, body) = post(&client, &chat, &ask(VIDEO_MODEL, vec![video_part(&source)])).await;
        assert_eq!(status, 200, "{source}: {body}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            answer("video").as_str(),
            "{source}"
        );
        assert_eq!(body["usage"]["prompt_tokens"], prompt_tokens, "{source}");
    }
    // The request's own sampling: transformers' case with fps 4 and six frames.
    let dense = json!({
        "model": VIDEO_MODEL,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Watch:"},
            {"type": "video_url", "video_url": {"url": format!("{media}/clip.mp4"), "fps": 4, "max_frames": 6}},
            {"type": "text", "text": "Where does the ball go?"}
        ]}],
        "temperature": 0, "max_tokens": 24, "min_tokens": 24,
    });
    let (status, body) = post(&client, &chat, &dense).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], answer("video_dense").as_str());

    // Other codecs and containers: the same three frames at the same times (lossy, so the
    // answer may differ); the GIF is 15 frames of 200 ms, also three seconds.
    for name in ["clip-yuv420.mp4", "clip.webm", "clip.ts", "clip.gif"] {
        let (status, body) = post(
            &client,
            &chat,
            &ask(VIDEO_MODEL, vec![video_part(&format!("{media}/{name}"))]),
        )
        .await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(body["usage"]["prompt_tokens"], prompt_tokens, "{name}");
    }

    let param = "messages[0].content[0].video_url";
    for (name, path, code) in [
        ("truncated", "truncated.mp4", "invalid_video"),
        ("corrupt", "corrupt.mp4", "invalid_video"),
        ("frames zeroed", "frames-zeroed.mp4", "invalid_video"),
        ("empty", "empty.mp4", "invalid_video"),
        ("an image declared as one", "image.png", "content_type_mismatch"),
        ("an image, untyped", "image-untyped", "invalid_video"),
        ("an HLS playlist pointing elsewhere", "playlist", "invalid_video"),
    ] {
        let result = post(
            &client,
            &chat,
            &ask(VIDEO_MODEL, vec![video_part(&format!("{media}/{path}"))]),
        )
        .await;
        assert_error(name, result, code, param);
    }
    assert_eq!(
        SEGMENT_FETCHES.load(Ordering::SeqCst),
        0,
        "FFmpeg followed the playlist"
    );
    let (status, body) = post(
        &client,
        &chat,
        &ask(VIDEO_MODEL, vec![video_part(&format!("{media}/clip.mp4"))]),
    )
    .await;
    assert_eq!(
        (status, body["choices"][0]["message"]["content"].as_str()),
        (200, Some(answer("video").as_str()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_video_limit_has_its_error() {
    let media = video_server().await;
    let server = video_model_server(|args| {
        args.limits.max_video_seconds = 2.0;
        args.limits.max_videos_per_request = 1;
        args.limits.max_video_frames = 4;
    })
    .await;
    let client = reqwest::Client::new();
    let chat = url(&server, "/v1/chat/completions");
    let clip = format!("{media}/clip.mp4");
    let param = "messages[0].content[0].video_url";
    let result = post(&client, &chat, &ask(VIDEO_MODEL, vec![video_part(&clip)])).await;
    assert_error("3 s past a 2 s limit", result, "video_too_long", param);
    let two = ask(VIDEO_MODEL, vec![video_part(&clip), video_part(&clip)]);
    assert_error(
        "two videos",
        post(&client, &chat, &two).await,
        "too_many_videos",
        "messages",
    );
    let many_frames = ask(
        VIDEO_MODEL,
        vec![json!({"type": "video_url", "video_url": {"url": clip, "max_frames": 5}})],
    );
    let result = post(&client, &chat, &many_frames).await;
    assert_error(
        "5 frames past 4",
        result,
        "too_many_video_frames",
        &format!("{param}.max_frames"),
    );

    let small = video_model_server(|args| {
        args.limits.max_image_pixels = 96 * 72 - 1;
        args.limits.max_image_tokens_per_request = 40;
    })
    .await;
    let chat = url(&small, "/v1/chat/completions");
    let result = post(&client, &chat, &ask(VIDEO_MODEL, vec![video_part(&clip)])).await;
    assert_error("frames past the pixel limit", result, "image_too_large", param);
    let tokens = url(
        &video_model_server(|args| args.limits.max_image_tokens_per_request = 40).await,
        "/v1/chat/completions",
    );
    // Three frames of 16 tokens: 48 > 40.
    let result = post(&client, &tokens, &ask(VIDEO_MODEL, vec![video_part(&clip)])).await;
    assert_error("frame tokens past the budget", result, "image_tokens_exceeded", param);
    // The budget is checked from the header, before any frame is decoded: a video whose
    // frames cannot be decoded (invalid_video within the budget) is refused for its tokens.
    let undecodable = format!("{media}/frames-zeroed.mp4");
    let result = post(&client, &tokens, &ask(VIDEO_MODEL, vec![video_part(&undecodable)])).await;
    assert_error(
        "undecodable frames past the budget",
        result,
        "image_tokens_exceeded",
        param,
    );

    // A model whose processor takes no videos (SmolVLM v1) says so.
    let v1 = common::http::server(|_| {}).await;
    let result = post(
        &client,
        &url(&v1, "/v1/chat/completions"),
        &ask(MODEL, vec![video_part(&clip)]),
    )
    .await;
    assert_error("no video processor", result, "videos_not_supported", param);
}
