//! The serving load benchmark (like vLLM's benchmark_serving): a sweep of concurrency
//! levels, each running a number of streaming requests with a fixed output length
//! (`ignore_eos`), reporting requests/s, output tokens/s, TTFT and inter-token latency
//! percentiles as JSON.
//!
//!   cargo bench --bench serving -- [--url http://host:port] [--model DIR] \
//!       [--concurrency 1,4,16,64] [--requests N] [--prompt text|image] [--image FILE] \
//!       [--detail low|auto] [--max-tokens 64] [--output FILE]
//!
//! Without --url it starts a server in this process on --model (default: the tiny fixture).
//! Tokens are timed through their logprobs chunks, one per token, so that a token that
//! adds no visible text (part of a character) is still counted and timed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    /// A running server; without it one is started in-process on --model.
    #[arg(long)]
    url: Option<String>,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-idefics3"))]
    model: String,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Requests per level (default: twice the concurrency, at least 4).
    #[arg(long)]
    requests: Option<usize>,
    #[arg(long, default_value = "text")]
    prompt: String,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/images/photo.png"))]
    image: PathBuf,
    #[arg(long, default_value = "auto")]
    detail: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// KV memory of the in-process server.
    #[arg(long, default_value = "2GiB")]
    kv_cache_memory: String,
    #[arg(long)]
    output: Option<PathBuf>,
    /// `sweep` (the concurrency levels) or `interference`: 8 text streams run while one
    /// request with a large image (--big-image, default a generated 4000x3000 JPEG) arrives;
    /// reports the streams' inter-token latency before and while it is handled.
    #[arg(long, default_value = "sweep")]
    scenario: String,
    #[arg(long)]
    big_image: Option<PathBuf>,
    /// A `response_format` for every request (JSON), e.g. a `json_schema`: the cost of
    /// constrained decoding. The report then gives the grammar masks' time per step.
    #[arg(long)]
    response_format: Option<String>,
    /// Extra flags for the in-process server, e.g. --server-flag=--media-inline.
    #[arg(long = "server-flag", allow_hyphen_values = true)]
    server_flags: Vec<String>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Default)]
struct RequestTiming {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // reqwest is built without a TLS crypto provider of its own (as the server's fetcher,
    // which installs ring; with --url no server runs here to do it).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (base, _server) = match &args.url {
        Some(url) => (url.trim_end_matches('/').to_string(), None),
        None => {
            let mut serve = ocellus::config::ServeArgs::for_model(&args.model, &args.server_flags);
            serve.kv_cache_memory = args.kv_cache_memory.parse().map_err(anyhow::Error::msg)?;
            serve.max_queue = 4096;
            let server = ocellus::runtime::start(serve).await?;
            server.ready().await?;
            (format!("http://{}", server.addr), Some(server))
        }
    };
    let client = reqwest::Client::new();
    let model: Value = client.get(format!("{base}/v1/models")).send().await?.json().await?;
    let model = model["data"][0]["id"].as_str().unwrap_or_default().to_string();
    let body = Arc::new(request_body(&args, &model)?);
    if args.scenario == "interference" {
        let report = interference(&client, &base, &args, &model).await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut levels = Vec::new();
    for &concurrency in &args.concurrency {
        let requests = args.requests.unwrap_or((2 * concurrency).max(4));
        let level = run_level(&client, &base, body.clone(), concurrency, requests, args.max_tokens).await?;
        eprintln!("{}", serde_json::to_string(&level)?);
        levels.push(level);
    }
    let metrics = client.get(format!("{base}/metrics")).send().await?.text().await?;
    let report = json!({
        "model": model,
        "prompt": args.prompt,
        "detail": args.detail,
        "max_tokens": args.max_tokens,
        "response_format": args.response_format.is_some(),
        "levels": levels,
        "grammar_mask_seconds": {
            "p50": histogram_quantile(&metrics, "ocellus_grammar_mask_duration_seconds", 0.5),
            "p99": histogram_quantile(&metrics, "ocellus_grammar_mask_duration_seconds", 0.99),
        },
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = args.output {
        std::fs::write(path, text)?;
    }
    Ok(())
}

/// The `q` quantile of a Prometheus histogram in `metrics` (its text format), interpolated
/// within its bucket as Prometheus's `histogram_quantile` does; None without observations.
fn histogram_quantile(metrics: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = (metrics.lines())
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            return Some(lower + (le - lower) * (rank - below) / (count - below).max(f64::MIN_POSITIVE));
        }
        (lower, below) = (le, count);
    }
    None
}

/// A 4000x3000 JPEG with photo-like gradients and noise.
fn big_jpeg() -> Vec<u8> {
    let mut state = 12345u32;
    let img = image::RgbImage::from_fn(4000, 3000, |x, y| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let noise = (state >> 27) as u8;
        image::Rgb([(x / 16) as u8 ^ noise, (y / 12) as u8, ((x + y) / 28) as u8 ^ noise])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Jpeg)
        .expect("JPEG encoding");
    out
}

async fn interference(client: &reqwest::Client, base: &str, args: &Args, model: &str) -> anyhow::Result<Value> {
    let url = format!("{base}/v1/chat/completions");
    let text = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}],
        "max_tokens": args.max_tokens, "ignore_eos": true, "temperature": 0, "stream": true, "logprobs": true,
    });
    let (bytes, mime) = match &args.big_image {
        Some(path) => (std::fs::read(path)?, "image/png"),
        None => (big_jpeg(), "image/jpeg"),
    };
    let image_url = format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    );
    let image = json!({
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url, "detail": args.detail}},
            {"type": "text", "text": "Describe this image."}]}],
        "max_tokens": 1, "temperature": 0, "stream": true, "logprobs": true,
    });
    let streams: Vec<_> = (0..8)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), text.clone());
            tokio::spawn(async move { token_times(&client, &url, &body).await })
        })
        .collect();
    // Let the streams settle into decoding, then send the image.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sent = Instant::now();
    let image_times = token_times(client, &url, &image).await?;
    let answered = image_times.first().copied().unwrap_or(sent);
    let (mut before, mut during) = (Vec::new(), Vec::new());
    for stream in streams {
        let times = stream.await??;
        for pair in times.windows(2) {
            let gap = (pair[1] - pair[0]).as_secs_f64();
            if pair[1] < sent {
                before.push(gap);
            } else if pair[1] <= answered + Duration::from_millis(500) {
                during.push(gap);
            }
        }
    }
    Ok(json!({
        "model": model,
        "image_bytes": bytes.len(),
        "detail": args.detail,
        "image_ttft_s": (answered - sent).as_secs_f64(),
        "itl_before_p50_s": percentile(&mut before, 0.50),
        "itl_before_p99_s": percentile(&mut before, 0.99),
        "itl_during_p50_s": percentile(&mut during, 0.50),
        "itl_during_p99_s": percentile(&mut during, 0.99),
        "itl_during_max_s": during.iter().copied().fold(0.0, f64::max),
    }))
}

/// When each token of a streamed request arrived.
async fn token_times(client: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Vec<Instant>> {
    let response = client.post(url).json(body).send().await?;
    anyhow::ensure!(response.status().is_success(), "status {}", response.status());
    let mut times = Vec::new();
    let mut buffer = String::new();
    let mut stream = response.bytes_stream();
    while let Some(bytes) = stream.next().await {
        buffer.push_str(&String::from_utf8_lossy(&bytes?));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            if data == "[DONE]" {
                return Ok(times);
            }
            let chunk: Value = serde_json::from_str(data)?;
            let tokens = chunk["choices"][0]["logprobs"]["content"]
                .as_array()
                .map_or(0, Vec::len);
            times.extend(std::iter::repeat_n(Instant::now(), tokens));
        }
    }
    Ok(times)
}

fn request_body(args: &Args, model: &str) -> anyhow::Result<Value> {
    let content = match args.prompt.as_str() {
        "text" => json!("Write a long story about a lighthouse keeper and a storm."),
        "image" => {
            let bytes = std::fs::read(&args.image)?;
            let url = format!(
                "data:image/png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(bytes)
            );
            json!([
                {"type": "image_url", "image_url": {"url": url, "detail": args.detail}},
                {"type": "text", "text": "Can you describe this image?"}
            ])
        }
        other => anyhow::bail!("--prompt must be text or image, got {other}"),
    };
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": args.max_tokens,
        "ignore_eos": true,
        "temperature": 0,
        "stream": true,
        "logprobs": true,
    });
    if let Some(format) = &args.response_format {
        body["response_format"] = serde_json::from_str(format)?;
    }
    Ok(body)
}

async fn run_level(
    client: &reqwest::Client,
    base: &str,
    body: Arc<Value>,
    concurrency: usize,
    requests: usize,
    max_tokens: usize,
) -> anyhow::Result<Value> {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let tasks: Vec<_> = (0..requests)
        .map(|_| {
            let (client, url, body, permits) = (
                client.clone(),
                format!("{base}/v1/chat/completions"),
                body.clone(),
                permits.clone(),
            );
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await?;
                one_request(&client, &url, &body).await
            })
        })
        .collect();
    let mut timings = Vec::with_capacity(requests);
    for task in tasks {
        timings.push(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tokens: usize = timings.iter().map(|t| t.tokens).sum();
    anyhow::ensure!(
        timings.iter().all(|t| t.tokens == max_tokens),
        "a request did not get {max_tokens} tokens"
    );
    let each: Vec<f64> = timings.iter().map(|t| t.ttft.as_secs_f64()).collect();
    let mut ttft = each.clone();
    let mut itl: Vec<f64> = timings
        .iter()
        .flat_map(|t| t.gaps.iter().map(Duration::as_secs_f64))
        .collect();
    Ok(json!({
        "concurrency": concurrency,
        "requests": requests,
        "duration_s": elapsed,
        "requests_per_s": requests as f64 / elapsed,
        "output_tokens_per_s": tokens as f64 / elapsed,
        "ttft_p50_s": percentile(&mut ttft, 0.50),
        "ttft_p99_s": percentile(&mut ttft, 0.99),
        "ttft_each_s": each,
        "itl_p50_s": percentile(&mut itl, 0.50),
        "itl_p99_s": percentile(&mut itl, 0.99),
    }))
}

async fn one_request(client: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<RequestTiming> {
    let sent = Instant::now();
    let times = token_times(client, url, body).await?;
    let ttft = times.first().map_or(Duration::ZERO, |&t| t - sent);
    let gaps = times.windows(2).map(|pair| pair[1] - pair[0]).collect();
    Ok(RequestTiming {
        ttft,
        gaps,
        tokens: times.len(),
    })
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * q).round() as usize]
}
