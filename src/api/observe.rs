//! The layers' measurements as the server's metrics: the engine reports each step to an
//! `EngineObserver` and the preparer its media work to a `PrepareObserver`; these record
//! them in Prometheus' registry.

use std::sync::Arc;
use std::time::Duration;

use crate::engine::{EngineObserver, EngineState, StepReport};
use crate::metrics::Metrics;
use crate::processor::PrepareObserver;

pub struct EngineMetrics(pub Arc<Metrics>);

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
        self.0.prompt_tokens.increment(prompt_tokens as u64);
        self.0.image_tokens.increment(image_tokens as u64);
    }

    fn stepped(&self, report: &StepReport, state: &EngineState) {
        let metrics = &self.0;
        metrics.kv_cache_total_blocks.set(state.total_blocks as f64);
        metrics.running_sequences.set(state.running as f64);
        metrics.waiting_sequences.set(state.waiting as f64);
        metrics.kv_cache_used_blocks.set(state.used_blocks as f64);
        (metrics.kv_cache_usage).set(state.used_blocks as f64 / state.total_blocks.max(1) as f64);
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
