//! Starting servers on port 0 with the fixture model, and talking to them over real HTTP.

use base64::Engine;
use ocellus::api::server::ServerHandle;
use ocellus::config::ServeArgs;
use ocellus::runtime::start;
use serde_json::Value;

use super::fixtures;

pub const MODEL: &str = "tiny-idefics3";

/// A ready server on the tiny fixture; `configure` adjusts its flags.
pub async fn server(configure: impl FnOnce(&mut ServeArgs)) -> ServerHandle {
    server_on(MODEL, configure).await
}

/// A ready server on a fixture model (`tests/fixtures/models/<model>`).
pub async fn server_on(model: &str, configure: impl FnOnce(&mut ServeArgs)) -> ServerHandle {
    let path = fixtures().join("models").join(model);
    let mut args = ServeArgs::for_model(path.to_str().unwrap(), &[]);
    args.kv_cache_memory = "64MiB".parse().unwrap();
    configure(&mut args);
    let server = start(args).await.expect("the server starts");
    server.ready().await.expect("the model loads");
    server
}

pub fn url(server: &ServerHandle, path: &str) -> String {
    format!("http://{}{path}", server.addr)
}

pub fn data_uri(bytes: &[u8], mime: &str) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

pub fn fixture_image_uri(name: &str) -> String {
    data_uri(
        &std::fs::read(fixtures().join("images").join(format!("{name}.png"))).unwrap(),
        "image/png",
    )
}

/// A PNG of `width`x`height` filled with one colour.
pub fn png(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(width, height, image::Rgb(rgb));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// A 1x1 PNG whose header claims `width`x`height` (checksum fixed): a decompression bomb
/// for anything that trusts the header.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = png(1, 1, [0, 0, 0]);
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32fast::hash(&bytes[12..29]); // IHDR's type and data
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

pub async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = client.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The `data:` payloads of an SSE response, in order, `[DONE]` included.
pub async fn sse(response: reqwest::Response) -> Vec<String> {
    let body = response.text().await.unwrap();
    super::sse::parse(&body).into_iter().map(|e| e.data).collect()
}

/// Concatenated content of a chat stream's chunks, and its chunks as JSON.
pub fn stream_content(events: &[String]) -> (String, Vec<Value>) {
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
        .filter_map(|choice| choice["delta"]["content"].as_str().map(str::to_string))
        .collect();
    (content, chunks)
}

/// A sample's value in a Prometheus text exposition (`name{labels}` exactly as written).
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
}

pub async fn scrape(client: &reqwest::Client, server: &ServerHandle) -> String {
    client
        .get(url(server, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `/metrics` until `done` holds (the engine works on its own thread; there is no
/// event to wait for from outside). Panics after ten seconds.
pub async fn wait_for_metrics(client: &reqwest::Client, server: &ServerHandle, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = scrape(client, server).await;
        if done(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never reached the expected state:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
