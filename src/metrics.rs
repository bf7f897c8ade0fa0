//! Metric names (constants, `ocellus_` prefix, unit suffixes), their buckets, and the
//! handles the server updates. Each server owns its recorder rather than installing a
//! global one, so that several servers in one process (tests) keep separate counts.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

pub const REQUESTS_TOTAL: &str = "ocellus_requests_total";
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "ocellus_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY_SECONDS: &str = "ocellus_inter_token_latency_seconds";
pub const REQUEST_DURATION_SECONDS: &str = "ocellus_request_duration_seconds";
pub const QUEUE_TIME_SECONDS: &str = "ocellus_queue_time_seconds";
pub const RUNNING_SEQUENCES: &str = "ocellus_running_sequences";
pub const WAITING_SEQUENCES: &str = "ocellus_waiting_sequences";
pub const KV_CACHE_USAGE_RATIO: &str = "ocellus_kv_cache_usage_ratio";
pub const KV_CACHE_USED_BLOCKS: &str = "ocellus_kv_cache_used_blocks";
pub const KV_CACHE_TOTAL_BLOCKS: &str = "ocellus_kv_cache_total_blocks";
pub const PROMPT_TOKENS_TOTAL: &str = "ocellus_prompt_tokens_total";
pub const GENERATION_TOKENS_TOTAL: &str = "ocellus_generation_tokens_total";
pub const BATCH_SIZE_SEQUENCES: &str = "ocellus_batch_size_sequences";
pub const BATCH_SIZE_TOKENS: &str = "ocellus_batch_size_tokens";
pub const PREEMPTIONS_TOTAL: &str = "ocellus_preemptions_total";
pub const VISION_CACHE_HITS_TOTAL: &str = "ocellus_vision_cache_hits_total";
pub const VISION_CACHE_MISSES_TOTAL: &str = "ocellus_vision_cache_misses_total";
pub const PREFIX_CACHE_QUERIED_TOKENS_TOTAL: &str = "ocellus_prefix_cache_queried_tokens_total";
pub const PREFIX_CACHE_HIT_TOKENS_TOTAL: &str = "ocellus_prefix_cache_hit_tokens_total";
pub const PREFILL_STEP_DURATION_SECONDS: &str = "ocellus_prefill_step_duration_seconds";
pub const DECODE_STEP_DURATION_SECONDS: &str = "ocellus_decode_step_duration_seconds";
pub const IMAGE_TOKENS_TOTAL: &str = "ocellus_image_tokens_total";
pub const MEDIA_FETCH_DURATION_SECONDS: &str = "ocellus_media_fetch_duration_seconds";
pub const MEDIA_PREPROCESS_DURATION_SECONDS: &str = "ocellus_media_preprocess_duration_seconds";
pub const VISION_ENCODE_DURATION_SECONDS: &str = "ocellus_vision_encode_duration_seconds";
pub const REJECTED_REQUESTS_TOTAL: &str = "ocellus_rejected_requests_total";
pub const GRAMMAR_MASK_DURATION_SECONDS: &str = "ocellus_grammar_mask_duration_seconds";

/// vLLM's names for what Kubernetes' Gateway API Inference Extension (its endpoint picker,
/// as llm-d and KServe run it) reads to route among model servers: aliases of ours, with
/// vLLM's `model_name` label, so that an InferencePool of Ocellus pods needs no new metric
/// names.
pub const VLLM_NUM_REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
pub const VLLM_NUM_REQUESTS_RUNNING: &str = "vllm:num_requests_running";
pub const VLLM_KV_CACHE_USAGE_PERC: &str = "vllm:kv_cache_usage_perc";
/// Labels `running_lora_adapters`, `waiting_lora_adapters` (comma-separated names) and
/// `max_lora`; its value the Unix time they were last true, as vLLM sets it: the picker reads
/// the series of the largest value.
pub const VLLM_LORA_REQUESTS_INFO: &str = "vllm:lora_requests_info";
/// The KV cache's configuration as labels (`block_size`, `num_gpu_blocks`, ...), value 1.
pub const VLLM_CACHE_CONFIG_INFO: &str = "vllm:cache_config_info";

/// Latencies from a millisecond to ten minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// A step's grammar masks: tens of microseconds to tens of milliseconds.
const MASK_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];
const BATCH_SEQUENCE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const BATCH_TOKEN_BUCKETS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];

/// How a request ended, for `ocellus_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    ClientError,
    Rejected,
    Timeout,
    Cancelled,
    ServerError,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::ClientError => "client_error",
            Self::Rejected => "rejected",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::ServerError => "server_error",
        }
    }
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub request_duration: Histogram,
    pub queue_time: Histogram,
    pub running_sequences: Gauge,
    pub waiting_sequences: Gauge,
    pub kv_cache_usage: Gauge,
    pub kv_cache_used_blocks: Gauge,
    pub kv_cache_total_blocks: Gauge,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub batch_sequences: Histogram,
    pub batch_tokens: Histogram,
    pub preemptions: Counter,
    pub vision_cache_hits: Counter,
    pub vision_cache_misses: Counter,
    pub prefix_cache_queried_tokens: Counter,
    pub prefix_cache_hit_tokens: Counter,
    pub prefill_step: Histogram,
    pub decode_step: Histogram,
    pub image_tokens: Counter,
    pub media_fetch: Histogram,
    pub media_preprocess: Histogram,
    pub vision_encode: Histogram,
    pub grammar_mask: Histogram,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut builder = PrometheusBuilder::new();
        for (names, buckets) in [
            (
                &[
                    TIME_TO_FIRST_TOKEN_SECONDS,
                    INTER_TOKEN_LATENCY_SECONDS,
                    REQUEST_DURATION_SECONDS,
                    QUEUE_TIME_SECONDS,
                    PREFILL_STEP_DURATION_SECONDS,
                    DECODE_STEP_DURATION_SECONDS,
                    MEDIA_FETCH_DURATION_SECONDS,
                    MEDIA_PREPROCESS_DURATION_SECONDS,
                    VISION_ENCODE_DURATION_SECONDS,
                ][..],
                LATENCY_BUCKETS,
            ),
            (&[GRAMMAR_MASK_DURATION_SECONDS][..], MASK_BUCKETS),
            (&[BATCH_SIZE_SEQUENCES][..], BATCH_SEQUENCE_BUCKETS),
            (&[BATCH_SIZE_TOKENS][..], BATCH_TOKEN_BUCKETS),
        ] {
            for name in names {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
                    .expect("bucket lists are non-empty. This is a bug.");
            }
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_histogram(KeyName::from_const_str(name), unit, SharedString::const_str(help));
        };
        describe(REQUESTS_TOTAL, None, "Requests by route and outcome.");
        describe(
            TIME_TO_FIRST_TOKEN_SECONDS,
            Some(Unit::Seconds),
            "From arrival to the first generated token.",
        );
        describe(
            INTER_TOKEN_LATENCY_SECONDS,
            Some(Unit::Seconds),
            "Between consecutive tokens of a sequence.",
        );
        describe(
            REQUEST_DURATION_SECONDS,
            Some(Unit::Seconds),
            "From arrival to the last token.",
        );
        describe(
            QUEUE_TIME_SECONDS,
            Some(Unit::Seconds),
            "From arrival to joining the running batch.",
        );
        describe(RUNNING_SEQUENCES, None, "Sequences in the running batch.");
        describe(WAITING_SEQUENCES, None, "Sequences waiting to be admitted.");
        describe(KV_CACHE_USAGE_RATIO, None, "Share of KV cache blocks in use.");
        describe(KV_CACHE_USED_BLOCKS, None, "KV cache blocks in use.");
        describe(KV_CACHE_TOTAL_BLOCKS, None, "KV cache blocks in the pool.");
        describe(
            PROMPT_TOKENS_TOTAL,
            None,
            "Prompt tokens of admitted requests, image tokens included.",
        );
        describe(GENERATION_TOKENS_TOTAL, None, "Generated tokens.");
        describe(BATCH_SIZE_SEQUENCES, None, "Sequences per forward pass.");
        describe(BATCH_SIZE_TOKENS, None, "Tokens per forward pass.");
        describe(PREEMPTIONS_TOTAL, None, "Sequences preempted for lack of KV blocks.");
        describe(
            VISION_CACHE_HITS_TOTAL,
            None,
            "Images whose vision features came from the cache.",
        );
        describe(
            VISION_CACHE_MISSES_TOTAL,
            None,
            "Images run through the vision encoder.",
        );
        describe(
            PREFIX_CACHE_QUERIED_TOKENS_TOTAL,
            None,
            "Prompt tokens of admitted requests looked up in the prefix cache.",
        );
        describe(
            PREFIX_CACHE_HIT_TOKENS_TOTAL,
            None,
            "Prompt tokens whose KV blocks came from the prefix cache.",
        );
        describe(
            PREFILL_STEP_DURATION_SECONDS,
            Some(Unit::Seconds),
            "Forward passes that prefill prompt tokens (decodes may ride along).",
        );
        describe(
            DECODE_STEP_DURATION_SECONDS,
            Some(Unit::Seconds),
            "Forward passes of decode tokens only.",
        );
        describe(
            IMAGE_TOKENS_TOTAL,
            None,
            "Image tokens of admitted prompts (video frames included).",
        );
        describe(
            MEDIA_FETCH_DURATION_SECONDS,
            Some(Unit::Seconds),
            "Fetching one image or video (data URI, URL or file).",
        );
        describe(
            MEDIA_PREPROCESS_DURATION_SECONDS,
            Some(Unit::Seconds),
            "Decoding and preprocessing a request's media and tokenizing its prompt.",
        );
        describe(
            VISION_ENCODE_DURATION_SECONDS,
            Some(Unit::Seconds),
            "Encoding one prompt's images on the vision thread.",
        );
        describe(
            GRAMMAR_MASK_DURATION_SECONDS,
            Some(Unit::Seconds),
            "Computing a step's token masks for its constrained sequences (alongside the forward pass).",
        );
        describe(
            REJECTED_REQUESTS_TOTAL,
            None,
            "Requests refused, by reason (the error code).",
        );
        describe(
            VLLM_NUM_REQUESTS_WAITING,
            None,
            "As ocellus_waiting_sequences, by vLLM's name.",
        );
        describe(
            VLLM_NUM_REQUESTS_RUNNING,
            None,
            "As ocellus_running_sequences, by vLLM's name.",
        );
        describe(
            VLLM_KV_CACHE_USAGE_PERC,
            None,
            "As ocellus_kv_cache_usage_ratio, by vLLM's name.",
        );
        describe(
            VLLM_LORA_REQUESTS_INFO,
            None,
            "The LoRA adapters of running and waiting requests; the value is when (Unix seconds).",
        );
        describe(VLLM_CACHE_CONFIG_INFO, None, "The KV cache's configuration, as labels.");
        let histogram = |name: &'static str| recorder.register_histogram(&Key::from_static_name(name), &metadata());
        let gauge = |name: &'static str| recorder.register_gauge(&Key::from_static_name(name), &metadata());
        let counter = |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &metadata());
        Arc::new(Self {
            time_to_first_token: histogram(TIME_TO_FIRST_TOKEN_SECONDS),
            inter_token_latency: histogram(INTER_TOKEN_LATENCY_SECONDS),
            request_duration: histogram(REQUEST_DURATION_SECONDS),
            queue_time: histogram(QUEUE_TIME_SECONDS),
            running_sequences: gauge(RUNNING_SEQUENCES),
            waiting_sequences: gauge(WAITING_SEQUENCES),
            kv_cache_usage: gauge(KV_CACHE_USAGE_RATIO),
            kv_cache_used_blocks: gauge(KV_CACHE_USED_BLOCKS),
            kv_cache_total_blocks: gauge(KV_CACHE_TOTAL_BLOCKS),
            prompt_tokens: counter(PROMPT_TOKENS_TOTAL),
            generation_tokens: counter(GENERATION_TOKENS_TOTAL),
            batch_sequences: histogram(BATCH_SIZE_SEQUENCES),
            batch_tokens: histogram(BATCH_SIZE_TOKENS),
            preemptions: counter(PREEMPTIONS_TOTAL),
            vision_cache_hits: counter(VISION_CACHE_HITS_TOTAL),
            vision_cache_misses: counter(VISION_CACHE_MISSES_TOTAL),
            prefix_cache_queried_tokens: counter(PREFIX_CACHE_QUERIED_TOKENS_TOTAL),
            prefix_cache_hit_tokens: counter(PREFIX_CACHE_HIT_TOKENS_TOTAL),
            prefill_step: histogram(PREFILL_STEP_DURATION_SECONDS),
            decode_step: histogram(DECODE_STEP_DURATION_SECONDS),
            image_tokens: counter(IMAGE_TOKENS_TOTAL),
            media_fetch: histogram(MEDIA_FETCH_DURATION_SECONDS),
            media_preprocess: histogram(MEDIA_PREPROCESS_DURATION_SECONDS),
            vision_encode: histogram(VISION_ENCODE_DURATION_SECONDS),
            grammar_mask: histogram(GRAMMAR_MASK_DURATION_SECONDS),
            recorder,
            handle,
        })
    }

    /// `ocellus_requests_total{route, outcome}` += 1.
    pub fn count_request(&self, route: &'static str, outcome: Outcome) {
        let labels = vec![
            Label::from_static_parts("route", route),
            Label::from_static_parts("outcome", outcome.as_str()),
        ];
        self.recorder
            .register_counter(&Key::from_parts(REQUESTS_TOTAL, labels), &metadata())
            .increment(1);
    }

    /// `ocellus_rejected_requests_total{reason}` += 1; the reason is an error code, a fixed set.
    pub fn count_rejection(&self, reason: &'static str) {
        let labels = vec![Label::from_static_parts("reason", reason)];
        self.recorder
            .register_counter(&Key::from_parts(REJECTED_REQUESTS_TOTAL, labels), &metadata())
            .increment(1);
    }

    /// The vLLM-named gauges of a served model (`VLLM_*`), its cache configuration set.
    pub fn vllm(&self, model_name: &str, cache: &[(&'static str, String)]) -> VllmGauges {
        let gauge = |name: &'static str, labels: Vec<Label>| {
            self.recorder
                .register_gauge(&Key::from_parts(name, labels), &metadata())
        };
        let model = || vec![Label::new("model_name", model_name.to_string())];
        let config: Vec<Label> = (cache.iter()).map(|(k, v)| Label::new(*k, v.clone())).collect();
        gauge(VLLM_CACHE_CONFIG_INFO, config).set(1.0);
        VllmGauges {
            waiting: gauge(VLLM_NUM_REQUESTS_WAITING, model()),
            running: gauge(VLLM_NUM_REQUESTS_RUNNING, model()),
            kv_cache_usage: gauge(VLLM_KV_CACHE_USAGE_PERC, model()),
        }
    }

    /// `vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}` set to
    /// now: a new series whenever the adapters in use change (as vLLM's).
    pub fn lora_requests_info(&self, running: &[String], waiting: &[String], max_lora: usize) {
        let labels = vec![
            Label::new("running_lora_adapters", running.join(",")),
            Label::new("waiting_lora_adapters", waiting.join(",")),
            Label::new("max_lora", max_lora.to_string()),
        ];
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        (self.recorder)
            .register_gauge(&Key::from_parts(VLLM_LORA_REQUESTS_INFO, labels), &metadata())
            .set(now);
    }

    /// Records the time until the returned guard drops into `histogram`.
    pub fn time<'a>(&self, histogram: &'a Histogram) -> Timer<'a> {
        Timer {
            histogram,
            started: std::time::Instant::now(),
        }
    }

    pub fn observe(histogram: &Histogram, duration: Duration) {
        histogram.record(duration.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// The gauges the endpoint picker reads, under vLLM's names (`Metrics::vllm`).
pub struct VllmGauges {
    pub waiting: Gauge,
    pub running: Gauge,
    /// In use, 0 to 1 (vLLM's `_perc` is a fraction).
    pub kv_cache_usage: Gauge,
}

/// Observes its lifetime into a histogram when dropped, however the scope ends.
pub struct Timer<'a> {
    histogram: &'a Histogram,
    started: std::time::Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        Metrics::observe(self.histogram, self.started.elapsed());
    }
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, None)
}
