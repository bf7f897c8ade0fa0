//! The layers' measurements as the server's metrics: the engine reports each step to an
//! `EngineObserver` and the preparer its media work to a `PrepareObserver`; these record
//! them in Prometheus' registry.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::{EngineObserver, EngineState, StepReport};
use crate::metrics::{Metrics, VllmGauges};
use crate::processor::PrepareObserver;

/// The engine's measurements as Ocellus's metrics and, for Kubernetes' inference gateway,
/// vLLM's names of the few it routes by.
pub struct EngineMetrics {
    metrics: Arc<Metrics>,
    vllm: VllmGauges,
    max_loras: usize,
    /// The adapters in use last reported, to add a `vllm:lora_requests_info` series only
    /// when they change.
    adapters: Mutex<Option<(Vec<String>, Vec<String>)>>,
}

/// What the vLLM-named metrics say of the served model.
pub struct Served<'a> {
    pub model_name: &'a str,
    pub max_loras: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub kv_cache_dtype: String,
    pub prefix_caching: bool,
}

impl EngineMetrics {
    pub fn new(metrics: Arc<Metrics>, served: &Served) -> Self {
        let cache = [
            ("block_size", served.block_size.to_string()),
            ("num_gpu_blocks", served.num_blocks.to_string()),
            ("cache_dtype", served.kv_cache_dtype.clone()),
            ("enable_prefix_caching", served.prefix_caching.to_string()),
        ];
        let vllm = metrics.vllm(served.model_name, &cache);
        metrics.lora_requests_info(&[], &[], served.max_loras);
        Self {
            metrics,
            vllm,
            max_loras: served.max_loras,
            adapters: Mutex::new(Some((Vec::new(), Vec::new()))),
        }
    }
}

pub struct PrepareMetrics(pub Arc<Metrics>);

impl PrepareObserver for PrepareMetrics {
    fn fetched(&self, took: Duration) {
        Metrics::observe(&self.0.media_fetch, took);
    }

    fn preprocessed(&self, took: Duration) {
        Metrics::observe(&self.0.media_preprocess, took);
    }
}

impl EngineObserver for EngineMetrics {
    fn submitted(&self, prompt_tokens: usize, image_tokens: usize) {
        self.metrics.prompt_tokens.increment(prompt_tokens as u64);
        self.metrics.image_tokens.increment(image_tokens as u64);
    }

    fn stepped(&self, report: &StepReport, state: &EngineState) {
        let metrics = &self.metrics;
        let usage = state.used_blocks as f64 / state.total_blocks.max(1) as f64;
        metrics.kv_cache_total_blocks.set(state.total_blocks as f64);
        metrics.running_sequences.set(state.running as f64);
        metrics.waiting_sequences.set(state.waiting as f64);
        metrics.kv_cache_used_blocks.set(state.used_blocks as f64);
        metrics.kv_cache_usage.set(usage);
        self.vllm.running.set(state.running as f64);
        self.vllm.waiting.set(state.waiting as f64);
        self.vllm.kv_cache_usage.set(usage);
        let (running, waiting) = (&state.running_adapters, &state.waiting_adapters);
        let mut last = self.adapters.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref().is_none_or(|(r, w)| r != running || w != waiting) {
            metrics.lora_requests_info(running, waiting, self.max_loras);
            *last = Some((running.clone(), waiting.clone()));
        }
        if report.did_work() {
            let step = if report.prefill_tokens > 0 {
                &metrics.prefill_step
            } else {
                &metrics.decode_step
            };
            Metrics::observe(step, report.forward);
            metrics.batch_sequences.record(report.batch_sequences as f64);
            (metrics.batch_tokens).record((report.prefill_tokens + report.decode_tokens) as f64);
        }
        metrics.preemptions.increment(report.preempted as u64);
        metrics.vision_cache_hits.increment(report.vision_cache_hits as u64);
        metrics.vision_cache_misses.increment(report.vision_cache_misses as u64);
        (metrics.prefix_cache_queried_tokens).increment(report.prefix_queried_tokens as u64);
        (metrics.prefix_cache_hit_tokens).increment(report.prefix_hit_tokens as u64);
        if let Some(took) = report.masks {
            Metrics::observe(&metrics.grammar_mask, took);
        }
        for took in &report.vision_encodes {
            Metrics::observe(&metrics.vision_encode, *took);
        }
        for wait in &report.queue_times {
            Metrics::observe(&metrics.queue_time, *wait);
        }
    }
}
