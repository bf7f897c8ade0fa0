//! From engine events to what the client reads: one JSON body, or an SSE stream of chunks
//! (a role chunk per choice for chat, content deltas, a chunk with the finish reason, a
//! usage chunk when asked, then `data: [DONE]`). Chat and completions share this; the
//! endpoint decides the JSON shapes. Timing metrics are taken here, as the client sees
//! them; a response dropped before its end (client gone) counts as cancelled.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::calls::{self, StreamedCalls};
use super::error::ApiError;
use crate::engine::request::{ChoiceEvent, EventReceiver};
use crate::engine::{SequenceEvent, TokenLogprobs};
use crate::metrics::{Metrics, Outcome};
use crate::openai::tool_calls::CallReader;
use crate::openai::{
    ChatChoice, ChatCompletion, ChatLogprobs, ChatTokenLogprob, Completion, CompletionChoice, CompletionLogprobs,
    TopLogprob, UsageOut, unix_now,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    /// OpenAI's Responses API: a chat request answered in its own shapes (`responses`).
    Responses,
}

impl Endpoint {
    pub fn route(self) -> &'static str {
        match self {
            Self::Chat => "chat_completions",
            Self::Completions => "completions",
            Self::Responses => "responses",
        }
    }

    pub fn id_prefix(self) -> &'static str {
        match self {
            Self::Chat => "chatcmpl",
            Self::Completions => "cmpl",
            Self::Responses => "resp",
        }
    }

    /// The request field that holds the prompt, for errors about it.
    pub fn prompt_param(self) -> &'static str {
        match self {
            Self::Chat | Self::Responses => "messages",
            Self::Completions => "prompt",
        }
    }

    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Self::Chat, false) => "chat.completion",
            (Self::Chat, true) => "chat.completion.chunk",
            (Self::Completions, _) => "text_completion",
            (Self::Responses, _) => "response",
        }
    }
}

/// A submitted request, ready to be answered.
pub struct Job {
    pub endpoint: Endpoint,
    pub id: String,
    pub model: String,
    pub n: usize,
    pub prompt_tokens: usize,
    pub events: EventReceiver,
    pub stream: bool,
    pub include_usage: bool,
    pub tokenizer: Arc<Tokenizer>,
    /// Chat answers are read for calls of these tools.
    pub calls: Option<CallReader>,
}

/// Records a request's latencies and outcome; dropped unfinished, it counts a cancellation.
pub struct Observer {
    metrics: Arc<Metrics>,
    route: &'static str,
    arrived: Instant,
    first_token: bool,
    last_token: Vec<Option<Instant>>,
    done: bool,
}

impl Observer {
    pub fn new(metrics: Arc<Metrics>, route: &'static str, arrived: Instant) -> Self {
        Self {
            metrics,
            route,
            arrived,
            first_token: false,
            last_token: Vec::new(),
            done: false,
        }
    }

    pub(super) fn token(&mut self, choice: usize) {
        let now = Instant::now();
        if !self.first_token {
            self.first_token = true;
            Metrics::observe(&self.metrics.time_to_first_token, now - self.arrived);
        }
        if self.last_token.len() <= choice {
            self.last_token.resize(choice + 1, None);
        }
        if let Some(previous) = self.last_token[choice].replace(now) {
            Metrics::observe(&self.metrics.inter_token_latency, now - previous);
        }
        self.metrics.generation_tokens.increment(1);
    }

    pub(super) fn finish(&mut self, outcome: Outcome) {
        if !self.done {
            self.done = true;
            if outcome == Outcome::Success {
                Metrics::observe(&self.metrics.request_duration, self.arrived.elapsed());
            }
            self.metrics.count_request(self.route, outcome);
        }
    }

    pub fn fail(&mut self, error: &ApiError) {
        let outcome = match error {
            ApiError::QueueFull(_) => Outcome::Rejected,
            ApiError::Timeout => Outcome::Timeout,
            e if e.is_client_error() => Outcome::ClientError,
            _ => Outcome::ServerError,
        };
        if matches!(outcome, Outcome::Rejected | Outcome::ClientError) || matches!(error, ApiError::Unavailable(_)) {
            self.metrics.count_rejection(error.code());
        }
        self.finish(outcome);
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.finish(Outcome::Cancelled);
    }
}

/// One choice's progress.
#[derive(Default)]
struct Choice {
    text: String,
    chars: usize,
    logprobs: Vec<TokenLogprobs>,
    /// Where each token's text starts, in characters (completions' `text_offset`).
    offsets: Vec<usize>,
    finish: Option<&'static str>,
    completion_tokens: usize,
}

impl Choice {
    fn push_text(&mut self, text: &str) {
        self.text.push_str(text);
        self.chars += text.chars().count();
    }
}

pub async fn respond(job: Job, observer: Observer) -> Response {
    if job.stream {
        stream(job, observer).into_response()
    } else {
        collect(job, observer).await
    }
}

async fn collect(mut job: Job, mut observer: Observer) -> Response {
    let mut choices: Vec<Choice> = (0..job.n).map(|_| Choice::default()).collect();
    let mut done = 0;
    while done < job.n {
        let Some(ChoiceEvent { choice, event }) = job.events.recv().await else {
            let error = ApiError::Internal("the engine stopped before the answer was complete".into());
            observer.fail(&error);
            return error.into_response();
        };
        let c = &mut choices[choice];
        match event {
            SequenceEvent::Token { text, logprobs, .. } => {
                observer.token(choice);
                c.offsets.push(c.chars);
                c.push_text(&text);
                c.logprobs.extend(logprobs);
            }
            SequenceEvent::Finished { text, reason, usage } => {
                c.push_text(&text);
                c.finish = Some(reason.as_str());
                c.completion_tokens = usage.completion_tokens;
                done += 1;
            }
            SequenceEvent::Failed(failure) => {
                let error = ApiError::from(failure);
                observer.fail(&error);
                return error.into_response();
            }
        }
    }
    observer.finish(Outcome::Success);
    let usage = UsageOut::new(job.prompt_tokens, choices.iter().map(|c| c.completion_tokens).sum());
    let (created, object) = (unix_now(), job.endpoint.object(false));
    let with_logprobs = |c: &Choice| !c.logprobs.is_empty();
    match job.endpoint {
        Endpoint::Chat | Endpoint::Responses => Json(ChatCompletion {
            id: job.id.clone(),
            object,
            created,
            model: job.model.clone(),
            choices: choices
                .iter()
                .enumerate()
                .map(|(index, c)| {
                    let (message, finish_reason) = calls::message(job.calls.as_ref(), &c.text, c.finish);
                    ChatChoice {
                        index,
                        message,
                        logprobs: with_logprobs(c).then(|| chat_logprobs(&job.tokenizer, &c.logprobs)),
                        finish_reason,
                    }
                })
                .collect(),
            usage,
        })
        .into_response(),
        Endpoint::Completions => Json(Completion {
            id: job.id.clone(),
            object,
            created,
            model: job.model.clone(),
            choices: choices
                .iter()
                .enumerate()
                .map(|(index, c)| CompletionChoice {
                    index,
                    text: c.text.clone(),
                    logprobs: with_logprobs(c).then(|| completion_logprobs(&job.tokenizer, &c.logprobs, &c.offsets)),
                    finish_reason: c.finish,
                })
                .collect(),
            usage: Some(usage),
        })
        .into_response(),
    }
}

/// The state of a stream between events.
struct Streaming {
    job: Job,
    observer: Observer,
    choices: Vec<Choice>,
    /// Each chat choice's reading for calls, when the request has tools.
    calls: Vec<Option<StreamedCalls>>,
    done: usize,
    created: u64,
}

fn stream(job: Job, observer: Observer) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let created = unix_now();
    let choices = (0..job.n).map(|_| Choice::default()).collect();
    let calls = (0..job.n).map(|_| job.calls.clone().map(StreamedCalls::new)).collect();
    let state = Streaming {
        job,
        observer,
        choices,
        calls,
        done: 0,
        created,
    };
    let first: Vec<Event> = match state.job.endpoint {
        Endpoint::Chat | Endpoint::Responses => (0..state.job.n)
            .map(|index| state.chunk(json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})))
            .collect(),
        Endpoint::Completions => Vec::new(),
    };
    let rest = futures::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        if state.done == state.job.n {
            let mut events = Vec::new();
            if state.job.include_usage {
                events.push(state.usage_chunk());
            }
            events.push(Event::default().data("[DONE]"));
            state.observer.finish(Outcome::Success);
            return Some((events, None));
        }
        match state.job.events.recv().await {
            None => {
                let error = ApiError::Internal("the engine stopped before the answer was complete".into());
                Some((state.error(error), None))
            }
            Some(ChoiceEvent {
                choice,
                event: SequenceEvent::Failed(failure),
            }) => {
                let _ = choice;
                Some((state.error(failure.into()), None))
            }
            Some(event) => {
                let events = state.on_event(event);
                Some((events, Some(state)))
            }
        }
    });
    let events = futures::stream::iter(first)
        .chain(rest.flat_map(futures::stream::iter))
        .map(Ok);
    Sse::new(events).keep_alive(KeepAlive::default())
}

impl Streaming {
    fn on_event(&mut self, ChoiceEvent { choice, event }: ChoiceEvent) -> Vec<Event> {
        let endpoint = self.job.endpoint;
        match event {
            SequenceEvent::Token { text, logprobs, .. } => {
                self.observer.token(choice);
                let c = &mut self.choices[choice];
                let offset = c.chars;
                c.push_text(&text);
                if text.is_empty() && logprobs.is_none() {
                    return Vec::new();
                }
                let logprobs: Vec<TokenLogprobs> = logprobs.into_iter().collect();
                let tokenizer = &self.job.tokenizer;
                let lp = match (logprobs.is_empty(), endpoint) {
                    (true, _) => Value::Null,
                    (false, Endpoint::Chat | Endpoint::Responses) => json!(chat_logprobs(tokenizer, &logprobs)),
                    (false, Endpoint::Completions) => json!(completion_logprobs(tokenizer, &logprobs, &[offset])),
                };
                if let Some(calls) = &mut self.calls[choice] {
                    let mut deltas = calls.deltas(&text, false);
                    if deltas.is_empty() && !lp.is_null() {
                        deltas.push(json!({}));
                    }
                    let mut lp = Some(lp);
                    return (deltas.into_iter())
                        .map(|delta| self.delta_chunk(choice, delta, lp.take().unwrap_or(Value::Null), None))
                        .collect();
                }
                vec![self.choice_chunk(choice, &text, lp, None)]
            }
            SequenceEvent::Finished { text, reason, usage } => {
                let c = &mut self.choices[choice];
                c.completion_tokens = usage.completion_tokens;
                c.push_text(&text);
                self.done += 1;
                if let Some(calls) = &mut self.calls[choice] {
                    let deltas = calls.deltas(&text, true);
                    let reason = calls.finish_reason(reason.as_str());
                    let mut events: Vec<Event> = (deltas.into_iter())
                        .map(|delta| self.delta_chunk(choice, delta, Value::Null, None))
                        .collect();
                    events.push(self.delta_chunk(choice, json!({}), Value::Null, Some(reason)));
                    return events;
                }
                let mut events = Vec::new();
                if endpoint == Endpoint::Chat && !text.is_empty() {
                    events.push(self.choice_chunk(choice, &text, Value::Null, None));
                }
                let last_text = if endpoint == Endpoint::Chat { "" } else { text.as_str() };
                events.push(self.choice_chunk(choice, last_text, Value::Null, Some(reason.as_str())));
                events
            }
            SequenceEvent::Failed(_) => unreachable!("handled by the stream loop. This is a bug."),
        }
    }

    /// A chunk for one choice: a content delta (chat) or a text piece (completions).
    fn choice_chunk(&self, index: usize, text: &str, logprobs: Value, finish: Option<&str>) -> Event {
        let choice = match self.job.endpoint {
            Endpoint::Chat | Endpoint::Responses => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                return self.delta_chunk(index, delta, logprobs, finish);
            }
            Endpoint::Completions => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        self.chunk(choice)
    }

    /// A chat chunk for one choice.
    fn delta_chunk(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Event {
        self.chunk(json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}))
    }

    fn chunk(&self, choice: Value) -> Event {
        let mut chunk = json!({
            "id": self.job.id,
            "object": self.job.endpoint.object(true),
            "created": self.created,
            "model": self.job.model,
            "choices": [choice],
        });
        if self.job.include_usage {
            chunk["usage"] = Value::Null;
        }
        Event::default().data(chunk.to_string())
    }

    fn usage_chunk(&self) -> Event {
        let completion: usize = self.choices.iter().map(|c| c.completion_tokens).sum();
        let chunk = json!({
            "id": self.job.id,
            "object": self.job.endpoint.object(true),
            "created": self.created,
            "model": self.job.model,
            "choices": [],
            "usage": UsageOut::new(self.job.prompt_tokens, completion),
        });
        Event::default().data(chunk.to_string())
    }

    fn error(&mut self, error: ApiError) -> Vec<Event> {
        self.observer.fail(&error);
        vec![Event::default().data(error.body()), Event::default().data("[DONE]")]
    }
}

fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

fn chat_logprobs(tokenizer: &Tokenizer, items: &[TokenLogprobs]) -> ChatLogprobs {
    let entry = |id: u32| {
        let token = token_text(tokenizer, id);
        (token.as_bytes().to_vec(), token)
    };
    let content = items
        .iter()
        .map(|lp| {
            let (bytes, token) = entry(lp.token);
            let top_logprobs = lp
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let (bytes, token) = entry(id);
                    TopLogprob { token, logprob, bytes }
                })
                .collect();
            ChatTokenLogprob {
                token,
                logprob: lp.logprob,
                bytes,
                top_logprobs,
            }
        })
        .collect();
    ChatLogprobs { content }
}

fn completion_logprobs(tokenizer: &Tokenizer, items: &[TokenLogprobs], offsets: &[usize]) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for (lp, &offset) in items.iter().zip(offsets) {
        out.tokens.push(token_text(tokenizer, lp.token));
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs
            .push(lp.top.iter().map(|&(id, l)| (token_text(tokenizer, id), l)).collect());
        out.text_offset.push(offset);
    }
    out
}
