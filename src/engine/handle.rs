//! The engine thread and the handle the API holds. One thread owns the engine core (model,
//! KV pool, sequences): commands come in over a channel, events go out per request. The
//! handle checks requests (`admit`) and bounds the waiting queue (a full queue is refused at
//! once, for a 429), publishes the engine's state for health checks, tells an
//! `EngineObserver` what each step did (the server's metrics), and holds the LoRA adapters
//! requests may name.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crossbeam_channel::{Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::core::{EngineCore, StepReport};
use super::request::{AddError, EngineFailure, EventReceiver, GenerationRequest, SequenceEvent, admit};
use crate::model::ModelInfo;
pub use crate::model::lora::{Adapter, AdapterRegistry, RegistryError};

/// Where the engine stands after a step.
#[derive(Debug, Clone, Default)]
pub struct EngineState {
    pub waiting: usize,
    pub running: usize,
    pub used_blocks: usize,
    pub total_blocks: usize,
    /// The LoRA adapters of running and of waiting sequences, by name (each once, sorted).
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
}

/// Told what the engine thread does; the server records it as metrics.
pub trait EngineObserver: Send + Sync {
    /// A request's choice entered the engine with a prompt of this many tokens, this many
    /// of them image placeholders.
    fn submitted(&self, prompt_tokens: usize, image_tokens: usize);
    /// After every step: what it did and where the engine stands.
    fn stepped(&self, report: &StepReport, state: &EngineState);
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server's queue is full ({limit} sequences waiting); retry later")]
    QueueFull { limit: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Invalid(#[from] AddError),
}

enum Command {
    /// The `n` choices of one request, sharing one event channel.
    Submit {
        choices: Vec<GenerationRequest>,
        events: super::request::EventSender,
    },
    /// Finish accepted work until the deadline, then fail what is left and stop.
    Shutdown { deadline: Instant },
}

/// State the engine thread publishes after every step.
#[derive(Debug, Default)]
struct Published {
    waiting: AtomicUsize,
    running: AtomicUsize,
    used_blocks: AtomicUsize,
    /// Sequences submitted but not yet taken in by the engine thread.
    in_flight: AtomicUsize,
    stopped: AtomicBool,
}

#[derive(Clone)]
pub struct EngineHandle {
    commands: Sender<Command>,
    published: Arc<Published>,
    max_queue: usize,
    total_blocks: usize,
    max_model_len: usize,
    info: Arc<ModelInfo>,
    adapters: Arc<AdapterRegistry>,
}

impl EngineHandle {
    /// Starts the engine thread. `max_queue`: most sequences waiting for admission.
    pub fn spawn(
        core: EngineCore,
        max_queue: usize,
        adapters: Arc<AdapterRegistry>,
        observer: Arc<dyn EngineObserver>,
    ) -> (Self, JoinHandle<()>) {
        let (commands, inbox) = crossbeam_channel::unbounded();
        let published = Arc::new(Published::default());
        let total_blocks = core.pool().num_blocks();
        let max_model_len = core.max_model_len();
        let info = Arc::new(core.info().clone());
        let thread_published = published.clone();
        let thread = std::thread::Builder::new()
            .name("ocellus-engine".into())
            .spawn(move || run(core, inbox, thread_published, observer))
            .expect("the OS can start a thread at startup. This is a bug.");
        (
            Self {
                commands,
                published,
                max_queue,
                total_blocks,
                max_model_len,
                info,
                adapters,
            },
            thread,
        )
    }

    /// Queues a request's choices; their events arrive on the returned receiver. Dropping
    /// the receiver cancels them at the next step.
    pub fn submit(&self, choices: Vec<GenerationRequest>) -> Result<EventReceiver, SubmitError> {
        if self.published.stopped.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        for choice in &choices {
            admit(&choice.prompt, &choice.params, &self.info, self.max_model_len)?;
        }
        let n = choices.len();
        let queued = self.published.waiting.load(Ordering::Acquire) + self.published.in_flight.load(Ordering::Acquire);
        if queued + n > self.max_queue {
            return Err(SubmitError::QueueFull { limit: self.max_queue });
        }
        self.published.in_flight.fetch_add(n, Ordering::AcqRel);
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        if self.commands.send(Command::Submit { choices, events }).is_err() {
            self.published.in_flight.fetch_sub(n, Ordering::AcqRel);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(receiver)
    }

    /// Asks the engine to finish accepted work by `deadline` and stop.
    pub fn shutdown(&self, deadline: Instant) {
        let _ = self.commands.send(Command::Shutdown { deadline });
    }

    /// Whether the engine thread has stopped (after a shutdown).
    pub fn is_stopped(&self) -> bool {
        self.published.stopped.load(Ordering::Acquire)
    }

    /// Sequences running or waiting, plus those on their way in.
    pub fn active_sequences(&self) -> usize {
        let p = &self.published;
        p.running.load(Ordering::Acquire) + p.waiting.load(Ordering::Acquire) + p.in_flight.load(Ordering::Acquire)
    }

    pub fn kv_usage(&self) -> f64 {
        self.published.used_blocks.load(Ordering::Acquire) as f64 / self.total_blocks.max(1) as f64
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The LoRA adapters requests may name, loaded and unloaded while serving.
    pub fn adapters(&self) -> &Arc<AdapterRegistry> {
        &self.adapters
    }
}

/// How often an engine that waits only on the vision thread looks at the clock.
const DEADLINE_CHECK: Duration = Duration::from_millis(100);

fn run(mut core: EngineCore, inbox: Receiver<Command>, published: Arc<Published>, observer: Arc<dyn EngineObserver>) {
    // The pool's size (and an idle engine) is known before any request.
    record(&core, &StepReport::default(), &published, observer.as_ref());
    let mut deadline: Option<Instant> = None;
    loop {
        // Block only when there is nothing to compute: for a command, or for the vision
        // thread when all that is left waits on it.
        let first = if core.has_runnable_work() {
            inbox.try_recv().ok()
        } else if core.vision_in_flight() > 0 && deadline.is_none_or(|d| Instant::now() < d) {
            let mut select = crossbeam_channel::Select::new();
            let commands = select.recv(&inbox);
            select.recv(core.vision_results());
            // Woken now and then besides: a waiting request's timeout and the shutdown's
            // deadline pass while an image encodes, and the step that acts on them must run.
            match select.ready_timeout(DEADLINE_CHECK) {
                Ok(ready) if ready == commands => inbox.try_recv().ok(),
                _ => None,
            }
        } else if deadline.is_some() {
            // Past the deadline (everything was aborted) or nothing left: the vision thread
            // skips the abandoned jobs still queued.
            break;
        } else if core.has_work() {
            // Waiting sequences no step can start yet: look for commands, then plan again.
            inbox.try_recv().ok()
        } else {
            match inbox.recv() {
                Ok(command) => Some(command),
                Err(_) => break, // every handle is gone
            }
        };
        for command in first.into_iter().chain(std::iter::from_fn(|| inbox.try_recv().ok())) {
            match command {
                Command::Submit { choices, events } => {
                    published.in_flight.fetch_sub(choices.len(), Ordering::AcqRel);
                    for (index, request) in choices.into_iter().enumerate() {
                        let prompt = &request.prompt;
                        observer.submitted(prompt.token_ids.len(), prompt.image_tokens());
                        if let Err(err) = core.add(request, index, events.clone()) {
                            // The handle validated this already; a refusal here is a bug.
                            tracing::error!(%err, "the engine refused a submitted request");
                            let failure = EngineFailure::Model(err.to_string());
                            let _ = events.send(super::request::ChoiceEvent {
                                choice: index,
                                event: SequenceEvent::Failed(failure),
                            });
                        }
                    }
                }
                Command::Shutdown { deadline: d } => deadline = Some(d),
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            core.abort_all(EngineFailure::Shutdown);
        }
        let report = core.step();
        record(&core, &report, &published, observer.as_ref());
    }
    published.stopped.store(true, Ordering::Release);
    core.abort_all(EngineFailure::Shutdown);
    record(&core, &StepReport::default(), &published, observer.as_ref());
    tracing::info!("engine stopped");
}

fn record(core: &EngineCore, report: &StepReport, published: &Published, observer: &dyn EngineObserver) {
    let (running_adapters, waiting_adapters) = core.adapters_in_use();
    let state = EngineState {
        waiting: core.num_waiting(),
        running: core.num_running(),
        used_blocks: core.pool().used_blocks(),
        total_blocks: core.pool().num_blocks(),
        running_adapters,
        waiting_adapters,
    };
    published.waiting.store(state.waiting, Ordering::Release);
    published.running.store(state.running, Ordering::Release);
    published.used_blocks.store(state.used_blocks, Ordering::Release);
    observer.stepped(report, &state);
}
