//! POST /v1/responses: OpenAI's Responses API, stateless. The request is read as a chat
//! request (`openai::responses`) and runs as one; the answer is one `message` output item
//! holding one `output_text` part, sent whole or as the stream of events OpenAI's clients
//! parse (`response.created` … `response.output_text.delta` … `response.completed`, or
//! `response.incomplete` when `max_output_tokens` cut it short, `response.failed` when the
//! engine did). A dropped stream drops its sequence, as chat's does.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::respond::{Endpoint, Job, Observer};
use super::{AppState, chat, parse_json};
use crate::engine::request::ChoiceEvent;
use crate::engine::{FinishReason, SequenceEvent, Usage};
use crate::metrics::Outcome;
use crate::openai::{self, ChatCompletionRequest, SamplingFields, unix_now};

pub async fn responses(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let mut observer = Observer::new(state.metrics.clone(), Endpoint::Responses.route(), arrived);
    match start(&state, body, arrived).await {
        Ok((job, echo)) => {
            let answer = Answer::new(job, echo, observer);
            if answer.job.stream {
                stream(answer).into_response()
            } else {
                answer.collect().await
            }
        }
        Err(error) => {
            observer.fail(&error);
            error.into_response()
        }
    }
}

/// The request translated, validated, prepared and submitted as a chat request; errors name
/// the fields as this request spelled them.
async fn start(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    arrived: Instant,
) -> Result<(Job, Map<String, Value>), ApiError> {
    let body = parse_json(body, state.settings.max_body_bytes)?;
    let translated = openai::responses::translate(&body)?;
    let rename = |error: ApiError| error.renamed(|text| translated.names.rename(text));
    let request: ChatCompletionRequest = openai::from_json(&translated.chat).map_err(|e| rename(e.into()))?;
    let fields: SamplingFields = openai::from_json(&translated.chat).map_err(|e| rename(e.into()))?;
    let job = (chat::start_as(state, &request, &fields, arrived, Endpoint::Responses).await).map_err(rename)?;
    Ok((job, echo(&body)))
}

/// The request's settings as a response object repeats them, OpenAI's defaults for those
/// not sent.
fn echo(body: &Value) -> Map<String, Value> {
    let defaults = json!({
        "instructions": null, "max_output_tokens": null, "metadata": {}, "parallel_tool_calls": true,
        "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
        "tools": [], "truncation": "disabled", "user": null, "previous_response_id": null,
        "reasoning": null, "store": false, "background": false,
    });
    let mut echo = defaults.as_object().cloned().unwrap_or_default();
    for (name, value) in echo.iter_mut() {
        if let Some(sent) = body.get(name).filter(|v| !v.is_null()) {
            *value = sent.clone();
        }
    }
    echo
}

/// A response being answered: the text so far, and what the response object repeats.
struct Answer {
    job: Job,
    echo: Map<String, Value>,
    observer: Observer,
    created: u64,
    item_id: String,
    text: String,
    /// Events sent on the stream, each event's `sequence_number`.
    sequence: u64,
}

impl Answer {
    fn new(job: Job, echo: Map<String, Value>, observer: Observer) -> Self {
        Self {
            job,
            echo,
            observer,
            created: unix_now(),
            item_id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            text: String::new(),
            sequence: 0,
        }
    }

    async fn collect(mut self) -> Response {
        loop {
            let Some(ChoiceEvent { event, .. }) = self.job.events.recv().await else {
                return self.fail_whole(ApiError::Internal(
                    "the engine stopped before the answer was complete".into(),
                ));
            };
            match event {
                SequenceEvent::Token { text, .. } => {
                    self.observer.token(0);
                    self.text.push_str(&text);
                }
                SequenceEvent::Finished { text, reason, usage } => {
                    self.text.push_str(&text);
                    self.observer.finish(Outcome::Success);
                    return Json(self.response(Some((reason, usage)), None)).into_response();
                }
                SequenceEvent::Failed(failure) => return self.fail_whole(failure.into()),
            }
        }
    }

    fn fail_whole(mut self, error: ApiError) -> Response {
        self.observer.fail(&error);
        error.into_response()
    }

    /// The message output item: in progress until the reason is known.
    fn item(&self, reason: Option<FinishReason>) -> Value {
        let status = match reason {
            None => "in_progress",
            Some(FinishReason::Stop) => "completed",
            Some(FinishReason::Length) => "incomplete",
        };
        let content = match reason {
            None => json!([]),
            Some(_) => json!([self.part(&self.text)]),
        };
        json!({"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content})
    }

    fn part(&self, text: &str) -> Value {
        json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    }

    /// The response object: in progress (no end yet), finished, or failed.
    fn response(&self, end: Option<(FinishReason, Usage)>, error: Option<&ApiError>) -> Value {
        let (status, incomplete) = match (end, error) {
            (_, Some(_)) => ("failed", Value::Null),
            (None, None) => ("in_progress", Value::Null),
            (Some((FinishReason::Stop, _)), None) => ("completed", Value::Null),
            (Some((FinishReason::Length, _)), None) => ("incomplete", json!({"reason": "max_output_tokens"})),
        };
        let output = match end {
            Some((reason, _)) => json!([self.item(Some(reason))]),
            None => json!([]),
        };
        let usage = end.map(|(_, usage)| {
            json!({
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            })
        });
        let mut response = json!({
            "id": self.job.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.job.model, "output": output, "usage": usage,
            "error": error.map(|e| json!({"code": e.code(), "message": e.to_string()})),
            "incomplete_details": incomplete,
        });
        if let Some(fields) = response.as_object_mut() {
            fields.extend(self.echo.clone());
        }
        response
    }

    /// One stream event: its type, its sequence number, and `fields`.
    fn event(&mut self, kind: &str, mut fields: Value) -> Event {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        Event::default().event(kind).data(fields.to_string())
    }

    /// A text event of the one part: `response.output_text.delta` or `.done`.
    fn text_event(&mut self, kind: &str, field: &str, text: &str) -> Event {
        let fields =
            json!({"item_id": self.item_id, "output_index": 0, "content_index": 0, field: text, "logprobs": []});
        self.event(kind, fields)
    }

    fn opening(&mut self) -> Vec<Event> {
        let response = self.response(None, None);
        let item = self.item(None);
        let part = self.part("");
        let item_id = self.item_id.clone();
        vec![
            self.event("response.created", json!({"response": response})),
            self.event("response.in_progress", json!({"response": response})),
            self.event("response.output_item.added", json!({"output_index": 0, "item": item})),
            self.event(
                "response.content_part.added",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
            ),
        ]
    }

    fn on_event(&mut self, event: SequenceEvent) -> (Vec<Event>, bool) {
        match event {
            SequenceEvent::Token { text, .. } => {
                self.observer.token(0);
                self.text.push_str(&text);
                let events = if text.is_empty() {
                    Vec::new()
                } else {
                    vec![self.text_event("response.output_text.delta", "delta", &text)]
                };
                (events, false)
            }
            SequenceEvent::Finished { text, reason, usage } => {
                let mut events = Vec::new();
                if !text.is_empty() {
                    self.text.push_str(&text);
                    events.push(self.text_event("response.output_text.delta", "delta", &text));
                }
                let whole = self.text.clone();
                let (part, item, item_id) = (self.part(&whole), self.item(Some(reason)), self.item_id.clone());
                let response = self.response(Some((reason, usage)), None);
                let last = match reason {
                    FinishReason::Stop => "response.completed",
                    FinishReason::Length => "response.incomplete",
                };
                events.extend([
                    self.text_event("response.output_text.done", "text", &whole),
                    self.event(
                        "response.content_part.done",
                        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
                    ),
                    self.event("response.output_item.done", json!({"output_index": 0, "item": item})),
                    self.event(last, json!({"response": response})),
                ]);
                self.observer.finish(Outcome::Success);
                (events, true)
            }
            SequenceEvent::Failed(failure) => (self.failed(failure.into()), true),
        }
    }

    fn failed(&mut self, error: ApiError) -> Vec<Event> {
        self.observer.fail(&error);
        let response = self.response(None, Some(&error));
        vec![self.event("response.failed", json!({"response": response}))]
    }
}

fn stream(mut answer: Answer) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let opening = answer.opening();
    let rest = futures::stream::unfold(Some(answer), |answer| async move {
        let mut answer = answer?;
        let Some(ChoiceEvent { event, .. }) = answer.job.events.recv().await else {
            let error = ApiError::Internal("the engine stopped before the answer was complete".into());
            return Some((answer.failed(error), None));
        };
        let (events, done) = answer.on_event(event);
        Some((events, (!done).then_some(answer)))
    });
    let events = futures::stream::iter(opening)
        .chain(rest.flat_map(futures::stream::iter))
        .map(Ok);
    Sse::new(events).keep_alive(KeepAlive::default())
}
