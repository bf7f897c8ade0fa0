//! Qwen3-VL beyond parity: what its files may say and what is refused by name, the pixel
//! budget a request may set (and the server bounds), and images its processor refuses.

mod common;

use std::path::Path;

use common::http::*;
use common::*;
use serde_json::{Value, json};

const QWEN: &str = "tiny-qwen3vl";

#[test]
fn rope_settings_it_cannot_honour_are_refused_by_field() {
    let cases: [(&str, Value, &[&str]); 3] = [
        (
            "rope_type",
            json!({"rope_type": "yarn", "factor": 4.0, "mrope_section": [4, 2, 2], "mrope_interleaved": true}),
            &["text_config.rope_scaling", "yarn"],
        ),
        (
            "not interleaved",
            json!({"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": false}),
            &["text_config.rope_scaling", "mrope_interleaved"],
        ),
        (
            "sections",
            json!({"rope_type": "default", "mrope_section": [4, 4, 4], "mrope_interleaved": true}),
            &["text_config.rope_scaling", "mrope_section"],
        ),
    ];
    for (name, rope, mentions) in cases {
        let dir = copy_fixture(QWEN);
        edit_json(&dir.path().join("config.json"), |c| {
            c["text_config"]["rope_scaling"] = rope
        });
        let message = load_error(dir.path());
        for part in mentions {
            assert!(message.contains(part), "{name}: {message}");
        }
    }
}

#[test]
fn the_mixture_of_experts_variant_is_refused_by_name() {
    let dir = copy_fixture(QWEN);
    edit_json(&dir.path().join("config.json"), |c| {
        c["architectures"] = json!(["Qwen3VLMoeForConditionalGeneration"])
    });
    let message = load_error(dir.path());
    assert!(
        message.contains("Qwen3VLMoeForConditionalGeneration") && message.contains("not supported"),
        "{message}"
    );
}

fn ask(parts: Value) -> Value {
    json!({"model": QWEN, "messages": [{"role": "user", "content": parts}], "max_tokens": 2})
}

fn image_part(url: &str, extra: Value) -> Value {
    let mut image_url = json!({"url": url});
    for (k, v) in extra.as_object().unwrap() {
        image_url[k] = v.clone();
    }
    json!({"type": "image_url", "image_url": image_url})
}

async fn qwen_server(dir: Option<&Path>, max_pixels_per_image: usize) -> ocellus::api::server::ServerHandle {
    let configure = |args: &mut ocellus::config::ServeArgs| {
        args.max_model_len = Some(4096);
        args.limits.max_pixels_per_image = max_pixels_per_image;
    };
    match dir {
        None => server_on(QWEN, configure).await,
        Some(dir) => {
            let mut args = ocellus::config::ServeArgs::for_model(dir.to_str().unwrap(), &[]);
            args.kv_cache_memory = "64MiB".parse().unwrap();
            args.served_model_name = Some(QWEN.into());
            configure(&mut args);
            let server = ocellus::runtime::start(args).await.unwrap();
            server.ready().await.unwrap();
            server
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sets_the_pixel_budget_within_the_servers_bound() {
    let server = qwen_server(None, 1 << 20).await;
    let client = reqwest::Client::new();
    let chat = url(&server, "/v1/chat/completions");
    let photo = fixture_image_uri("photo");
    let tokens = |body: &Value| body["usage"]["prompt_tokens"].as_u64().unwrap();
    // The photo at the model's budget (at most 64 tokens here), with its own, and with the
    // request's: 12 blocks of 32x32 pixels, as transformers' fixture case.
    let (status, full) = post(&client, &chat, &ask(json!([image_part(&photo, json!({}))]))).await;
    assert_eq!(status, 200, "{full}");
    let own = ask(json!([image_part(&photo, json!({"max_pixels": 32 * 32 * 12}))]));
    let (status, small) = post(&client, &chat, &own).await;
    assert_eq!(status, 200, "{small}");
    let mut kwargs = ask(json!([image_part(&photo, json!({}))]));
    kwargs["mm_processor_kwargs"] = json!({"max_pixels": 32 * 32 * 12});
    let (status, by_request) = post(&client, &chat, &kwargs).await;
    assert_eq!(status, 200, "{by_request}");
    // 640x480 within 65536 pixels: 192x288, 6x9 blocks; within 12 blocks: 3x4.
    assert_eq!(tokens(&full) - tokens(&small), 54 - 12, "{full} {small}");
    assert_eq!(tokens(&by_request), tokens(&small));
    // A larger budget shows all 20x15 blocks; `detail: "low"` caps any budget at 64 tokens.
    let large = ask(json!([image_part(&photo, json!({"max_pixels": 1 << 20}))]));
    assert_eq!(tokens(&post(&client, &chat, &large).await.1), tokens(&full) + 300 - 54);
    let low = ask(json!([image_part(
        &photo,
        json!({"max_pixels": 1 << 20, "detail": "low"})
    )]));
    assert_eq!(tokens(&post(&client, &chat, &low).await.1), tokens(&full));

    let refused = [
        (
            ask(json!([image_part(&photo, json!({"max_pixels": (1 << 20) + 1}))])),
            "too_many_pixels",
            "messages[0].content[0].image_url.max_pixels",
        ),
        (
            ask(json!([image_part(
                &photo,
                json!({"min_pixels": 8192, "max_pixels": 4096})
            )])),
            "invalid_value",
            "messages[0].content[0].image_url.min_pixels",
        ),
        (
            ask(json!([image_part(&photo, json!({"max_pixels": 0}))])),
            "invalid_value",
            "messages[0].content[0].image_url.max_pixels",
        ),
        (
            {
                let mut body = ask(json!([image_part(&photo, json!({}))]));
                body["mm_processor_kwargs"] = json!({"max_pixels": 1 << 21});
                body
            },
            "too_many_pixels",
            "mm_processor_kwargs.max_pixels",
        ),
        (
            {
                let mut body = ask(json!([image_part(&photo, json!({}))]));
                body["mm_processor_kwargs"] = json!({"do_resize": false});
                body
            },
            "invalid_json",
            "mm_processor_kwargs",
        ),
    ];
    for (body, code, param) in refused {
        let (status, error) = post(&client, &chat, &body).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["code"], code, "{error}");
        assert!(
            error["error"]["param"].as_str().unwrap_or("").starts_with(param),
            "{param}: {error}"
        );
    }
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_and_videos_the_processor_cannot_take_are_refused_by_name() {
    // Without video_preprocessor_config.json the model takes images only.
    let dir = copy_fixture(QWEN);
    std::fs::remove_file(dir.path().join("video_preprocessor_config.json")).unwrap();
    let server = qwen_server(Some(dir.path()), 1 << 24).await;
    let client = reqwest::Client::new();
    let chat = url(&server, "/v1/chat/completions");
    let video = data_uri(&std::fs::read(fixtures().join("videos/clip.mp4")).unwrap(), "video/mp4");
    let (status, error) = post(
        &client,
        &chat,
        &ask(json!([{"type": "video_url", "video_url": {"url": video}}])),
    )
    .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("videos_not_supported")),
        "{error}"
    );
    // An aspect ratio over 200 (transformers' rule), and one at 200, which it takes.
    let (status, error) = post(
        &client,
        &chat,
        &ask(json!([image_part(
            &data_uri(&png(201, 1, [9, 9, 9]), "image/png"),
            json!({})
        )])),
    )
    .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("invalid_image")),
        "{error}"
    );
    assert!(
        error["error"]["message"].as_str().unwrap().contains("aspect ratio"),
        "{error}"
    );
    let (status, body) = post(
        &client,
        &chat,
        &ask(json!([image_part(
            &data_uri(&png(200, 1, [9, 9, 9]), "image/png"),
            json!({})
        )])),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pixel_budget_for_a_model_without_one_is_refused_by_name() {
    let server = server(|_| {}).await;
    let client = reqwest::Client::new();
    let image = fixture_image_uri("small");
    let body = json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [image_part(&image, json!({"max_pixels": 4096}))]}]});
    let (status, error) = post(&client, &url(&server, "/v1/chat/completions"), &body).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("unsupported_parameter")),
        "{error}"
    );
    server.shutdown();
}

/// A one-frame animated GIF of `width`x`height`.
fn one_frame_gif(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut out);
        let frame = image::RgbaImage::from_pixel(width, height, image::Rgba([200, 40, 40, 255]));
        encoder.encode_frame(image::Frame::new(frame)).unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degenerate_media_is_answered_not_a_panic() {
    let server = qwen_server(None, 1 << 24).await;
    let client = reqwest::Client::new();
    let chat = url(&server, "/v1/chat/completions");
    let tokens = |body: &Value| body["usage"]["prompt_tokens"].as_u64();
    // A 1x1 image is scaled up to the smallest budget (64x64 here: 4 tokens), as
    // transformers does; a budget below one block still gives one block.
    let pixel = data_uri(&png(1, 1, [1, 2, 3]), "image/png");
    let (status, one) = post(&client, &chat, &ask(json!([image_part(&pixel, json!({}))]))).await;
    assert_eq!(status, 200, "{one}");
    let (status, tiny) = post(
        &client,
        &chat,
        &ask(json!([image_part(&pixel, json!({"max_pixels": 1}))])),
    )
    .await;
    assert_eq!(status, 200, "{tiny}");
    assert_eq!(tokens(&one).unwrap() - tokens(&tiny).unwrap(), 4 - 1);
    // A video of one frame (transformers' video processor refuses fewer frames than a
    // temporal patch; here the frame is repeated, as for any odd count).
    let gif = data_uri(&one_frame_gif(40, 30), "image/gif");
    let (status, body) = post(
        &client,
        &chat,
        &ask(json!([{"type": "video_url", "video_url": {"url": gif}}])),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = post(&client, &chat, &ask(json!([{"type": "text", "text": "still there?"}]))).await;
    assert_eq!(status, 200, "the server still serves");
    server.shutdown();
}
