//! Running requests to completion without a server: the CLI, the tests and the benchmarks
//! drive the engine core directly, step by step, and collect each request's events.

use std::time::Duration;

use super::core::{EngineCore, StepReport};
use super::request::{AddError, ChoiceEvent, EngineFailure, FinishReason, GenerationRequest, SequenceEvent, Usage};

/// One finished request.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

/// Where the time of a run went (for one request: its own timings).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub vision: Duration,
    /// Steps that carried prompt tokens.
    pub prefill: Duration,
    /// Steps that carried only decodes.
    pub decode: Duration,
    pub decode_steps: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error(transparent)]
    Add(#[from] AddError),
    #[error(transparent)]
    Failed(#[from] EngineFailure),
}

/// Adds the requests, steps until all are done, and returns their generations in order.
/// `on_step` sees each step's report (tests check how steps were batched).
pub fn generate(
    core: &mut EngineCore,
    requests: Vec<GenerationRequest>,
    mut on_step: impl FnMut(&StepReport),
) -> Result<(Vec<Generation>, Timings), OfflineError> {
    let mut receivers = Vec::with_capacity(requests.len());
    for request in requests {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        core.add(request, 0, tx)?;
        receivers.push(rx);
    }
    let mut timings = Timings::default();
    while core.has_work() {
        if !core.has_runnable_work() && core.vision_in_flight() > 0 {
            core.wait_for_vision(std::time::Duration::from_secs(3600));
        }
        let report = core.step();
        timings.vision += report.vision;
        if report.prefill_tokens > 0 {
            timings.prefill += report.forward;
        } else if report.decode_tokens > 0 {
            timings.decode += report.forward;
            timings.decode_steps += 1;
        }
        on_step(&report);
    }
    let generations = receivers
        .into_iter()
        .map(|mut rx| {
            let mut generation = Generation {
                tokens: Vec::new(),
                text: String::new(),
                finish_reason: FinishReason::Length,
                usage: Usage::default(),
            };
            while let Ok(ChoiceEvent { event, .. }) = rx.try_recv() {
                match event {
                    SequenceEvent::Token { token, text, .. } => {
                        generation.tokens.push(token);
                        generation.text.push_str(&text);
                    }
                    SequenceEvent::Finished { text, reason, usage } => {
                        generation.text.push_str(&text);
                        generation.finish_reason = reason;
                        generation.usage = usage;
                    }
                    SequenceEvent::Failed(failure) => return Err(OfflineError::Failed(failure)),
                }
            }
            Ok(generation)
        })
        .collect::<Result<_, _>>()?;
    Ok((generations, timings))
}
