//! The gRPC API (proto/ocellus/v1/ocellus.proto): requests are mapped onto the chat API's
//! request types (`openai`), so they get the same validation, limits, media handling and
//! engine; errors map to gRPC status codes. Health (grpc.health.v1) and server reflection
//! ride on the same port.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};

use super::error::ApiError;
use super::respond::{Job, Observer};
use super::{AppState, chat};
use crate::engine::SequenceEvent;
use crate::engine::request::ChoiceEvent;
use crate::metrics::Outcome;
use crate::openai::{
    ChatCompletionRequest, ChatMessageIn, ContentPartIn, ImageUrl, MessageContent, SamplingFields, StopField,
    StructuredOutputs, ValidationError, VideoUrl,
};

pub mod pb {
    tonic::include_proto!("ocellus.v1");
}

/// The encoded descriptors of proto/, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ocellus_descriptor.bin"));

use pb::content_part::Part;
use pb::ocellus_server::{Ocellus, OcellusServer};

pub struct GrpcApi {
    state: Arc<AppState>,
}

/// The Ocellus service, behind the API key when one is set (`authorization: Bearer KEY`).
pub fn service(
    state: Arc<AppState>,
) -> tonic::service::interceptor::InterceptedService<OcellusServer<GrpcApi>, impl tonic::service::Interceptor + Clone> {
    let key = state.settings.api_key.clone();
    let check = move |request: Request<()>| -> Result<Request<()>, Status> {
        let Some(expected) = &key else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(ApiError::Unauthorized.to_string()))
        }
    };
    OcellusServer::with_interceptor(GrpcApi { state }, check)
}

/// The gRPC status of an API error; the message carries the OpenAI code and field.
pub fn status(error: &ApiError) -> Status {
    let message = match error.param() {
        Some(p) if !matches!(error, ApiError::ModelNotFound { .. }) => {
            format!("{error} (code {}, param {p})", error.code())
        }
        _ => format!("{error} (code {})", error.code()),
    };
    Status::new(code(error), message)
}

fn code(error: &ApiError) -> tonic::Code {
    match error {
        ApiError::Renamed { error, .. } => code(error),
        ApiError::Invalid(_) | ApiError::Admission { .. } | ApiError::Adapter(_) | ApiError::PayloadTooLarge { .. } => {
            tonic::Code::InvalidArgument
        }
        ApiError::Prepare(e) if e.is_client_error() => tonic::Code::InvalidArgument,
        ApiError::Prepare(_) | ApiError::Internal(_) => tonic::Code::Internal,
        ApiError::Unauthorized => tonic::Code::Unauthenticated,
        ApiError::Forbidden(_) => tonic::Code::PermissionDenied,
        ApiError::ModelNotFound { .. } | ApiError::RouteNotFound { .. } => tonic::Code::NotFound,
        ApiError::MethodNotAllowed { .. } | ApiError::WrongTask(_) => tonic::Code::Unimplemented,
        ApiError::QueueFull(_) => tonic::Code::ResourceExhausted,
        ApiError::Unavailable(_) => tonic::Code::Unavailable,
        ApiError::Timeout => tonic::Code::DeadlineExceeded,
    }
}

/// A gRPC request as the chat API's request and sampling fields. A content part that sets
/// none of its kinds is refused by name.
fn to_openai(request: &pb::GenerateRequest) -> Result<(ChatCompletionRequest, SamplingFields), ValidationError> {
    let messages = (request.messages.iter().enumerate())
        .map(|(i, m)| {
            let content = (m.content.iter().enumerate())
                .map(|(j, p)| match &p.part {
                    Some(Part::Text(text)) => Ok(ContentPartIn::Text { text: text.clone() }),
                    Some(Part::ImageUrl(image)) => Ok(ContentPartIn::ImageUrl {
                        image_url: ImageUrl {
                            url: image.url.clone(),
                            detail: (!image.detail.is_empty()).then(|| image.detail.clone()),
                            min_pixels: None,
                            max_pixels: None,
                        },
                    }),
                    Some(Part::VideoUrl(video)) => Ok(ContentPartIn::VideoUrl {
                        video_url: VideoUrl {
                            url: video.url.clone(),
                            fps: video.fps,
                            max_frames: video.max_frames,
                        },
                    }),
                    None => Err(ValidationError::EmptyPart {
                        param: format!("messages[{i}].content[{j}]"),
                    }),
                })
                .collect::<Result<_, _>>()?;
            Ok(ChatMessageIn {
                role: m.role.clone(),
                content: Some(MessageContent::Parts(content)),
                ..ChatMessageIn::default()
            })
        })
        .collect::<Result<_, _>>()?;
    let fields = sampling(request.sampling.clone().unwrap_or_default());
    let request = ChatCompletionRequest {
        model: (!request.model.is_empty()).then(|| request.model.clone()),
        messages,
        ..Default::default()
    };
    Ok((request, fields))
}

/// gRPC's sampling options as the chat API's fields (unset ones unset); its output
/// constraint as `structured_outputs`.
fn sampling(s: pb::SamplingOptions) -> SamplingFields {
    use pb::sampling_options::Constraint;
    let structured = s.constraint.map(|c| {
        let mut structured = StructuredOutputs::default();
        match c {
            Constraint::JsonSchema(schema) => structured.json = Some(serde_json::Value::String(schema)),
            Constraint::Regex(regex) => structured.regex = Some(regex),
            Constraint::Choice(choices) => structured.choice = Some(choices.choices),
            Constraint::Grammar(grammar) => structured.grammar = Some(grammar),
            Constraint::JsonObject(on) => structured.json_object = Some(on),
        }
        structured
    });
    let logit_bias = (!s.logit_bias.is_empty()).then(|| {
        (s.logit_bias.iter())
            .map(|(id, bias)| (id.to_string(), serde_json::json!(bias)))
            .collect()
    });
    SamplingFields {
        structured_outputs: structured,
        logit_bias,
        max_tokens: s.max_tokens,
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        min_p: s.min_p,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed,
        ignore_eos: s.ignore_eos,
        min_tokens: s.min_tokens,
        n: s.n,
        stop: (!s.stop.is_empty()).then_some(StopField::Many(s.stop)),
        stop_token_ids: (!s.stop_token_ids.is_empty()).then_some(s.stop_token_ids),
        ..Default::default()
    }
}

impl GrpcApi {
    /// Validates, prepares and submits, as POST /v1/chat/completions does.
    async fn start(&self, request: &pb::GenerateRequest, observer: &mut Observer) -> Result<Job, Status> {
        let arrived = Instant::now();
        let submitted = match to_openai(request) {
            Ok((request, fields)) => chat::start(&self.state, &request, &fields, arrived).await,
            Err(error) => Err(error.into()),
        };
        submitted.map_err(|error| {
            observer.fail(&error);
            status(&error)
        })
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> pb::Usage {
    pb::Usage {
        prompt_tokens: prompt_tokens as u32,
        completion_tokens: completion_tokens as u32,
        total_tokens: (prompt_tokens + completion_tokens) as u32,
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Ocellus for GrpcApi {
    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let mut observer = Observer::new(self.state.metrics.clone(), "grpc_generate", Instant::now());
        let mut job = self.start(request.get_ref(), &mut observer).await?;
        let mut choices: Vec<pb::Choice> = (0..job.n)
            .map(|i| pb::Choice {
                index: i as u32,
                ..Default::default()
            })
            .collect();
        let (mut done, mut completion_tokens) = (0, 0);
        while done < job.n {
            let Some(ChoiceEvent { choice, event }) = job.events.recv().await else {
                let error = ApiError::Internal("the engine stopped before the answer was complete".into());
                observer.fail(&error);
                return Err(status(&error));
            };
            match event {
                SequenceEvent::Token { text, .. } => {
                    observer.token(choice);
                    choices[choice].text.push_str(&text);
                }
                SequenceEvent::Finished { text, reason, usage } => {
                    choices[choice].text.push_str(&text);
                    choices[choice].finish_reason = reason.as_str().to_string();
                    completion_tokens += usage.completion_tokens;
                    done += 1;
                }
                SequenceEvent::Failed(failure) => {
                    let error = ApiError::from(failure);
                    observer.fail(&error);
                    return Err(status(&error));
                }
            }
        }
        observer.finish(Outcome::Success);
        Ok(Response::new(pb::GenerateResponse {
            id: job.id,
            model: job.model,
            choices,
            usage: Some(usage(job.prompt_tokens, completion_tokens)),
        }))
    }

    type GenerateStreamStream = ResponseStream;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let mut observer = Observer::new(self.state.metrics.clone(), "grpc_generate_stream", Instant::now());
        let job = self.start(request.get_ref(), &mut observer).await?;
        // Dropped by a client that leaves: the events' receiver goes with it (the engine
        // cancels the sequence) and the observer counts a cancellation.
        struct Progress {
            job: Job,
            observer: Observer,
            done: usize,
            completion_tokens: usize,
            ended: bool,
        }
        let progress = Progress {
            job,
            observer,
            done: 0,
            completion_tokens: 0,
            ended: false,
        };
        let stream = futures::stream::unfold(progress, |mut p| async move {
            if p.ended {
                return None;
            }
            let id = p.job.id.clone();
            if p.done == p.job.n {
                p.ended = true;
                p.observer.finish(Outcome::Success);
                let usage = Some(usage(p.job.prompt_tokens, p.completion_tokens));
                return Some((
                    Ok(pb::GenerateStreamResponse {
                        id,
                        usage,
                        ..Default::default()
                    }),
                    p,
                ));
            }
            let Some(ChoiceEvent { choice, event }) = p.job.events.recv().await else {
                p.ended = true;
                let error = ApiError::Internal("the engine stopped before the answer was complete".into());
                p.observer.fail(&error);
                return Some((Err(status(&error)), p));
            };
            let index = choice as u32;
            let message = match event {
                SequenceEvent::Token { text, .. } => {
                    p.observer.token(choice);
                    Ok(pb::GenerateStreamResponse {
                        id,
                        index,
                        text,
                        ..Default::default()
                    })
                }
                SequenceEvent::Finished { text, reason, usage } => {
                    p.done += 1;
                    p.completion_tokens += usage.completion_tokens;
                    let finish_reason = reason.as_str().to_string();
                    Ok(pb::GenerateStreamResponse {
                        id,
                        index,
                        text,
                        finish_reason,
                        usage: None,
                    })
                }
                SequenceEvent::Failed(failure) => {
                    p.ended = true;
                    let error = ApiError::from(failure);
                    p.observer.fail(&error);
                    Err(status(&error))
                }
            };
            Some((message, p))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let ready = self.state.ready.get();
        let max_model_len = ready.map_or(0, |r| r.engine.max_model_len()) as u32;
        let model = |id: &str| pb::Model {
            id: id.to_string(),
            max_model_len,
            owned_by: "ocellus".into(),
        };
        let mut models = vec![model(&self.state.settings.served_model_name)];
        if let Some(ready) = ready {
            models.extend(ready.engine.adapters().list().iter().map(|l| model(l.adapter.name())));
        }
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(part: Option<Part>) -> pb::ContentPart {
        pb::ContentPart { part }
    }

    #[test]
    fn messages_and_sampling_map_onto_the_chat_types() {
        let request = pb::GenerateRequest {
            model: String::new(),
            messages: vec![pb::Message {
                role: "user".into(),
                content: vec![
                    part(Some(Part::ImageUrl(pb::ImageUrl {
                        url: "data:x".into(),
                        detail: "low".into(),
                    }))),
                    part(Some(Part::Text("hi".into()))),
                ],
            }],
            sampling: Some(pb::SamplingOptions {
                temperature: Some(0.5),
                stop: vec!["\n".into()],
                ..Default::default()
            }),
        };
        let (chat, fields) = to_openai(&request).unwrap();
        assert_eq!(chat.model, None, "an empty model is the served one");
        let Some(MessageContent::Parts(parts)) = &chat.messages[0].content else {
            panic!("parts")
        };
        assert!(
            matches!(&parts[0], ContentPartIn::ImageUrl { image_url } if image_url.detail.as_deref() == Some("low"))
        );
        assert_eq!(fields.temperature, Some(0.5));
        assert!(matches!(&fields.stop, Some(StopField::Many(stop)) if stop == &["\n"]));
        assert_eq!((fields.stop_token_ids, fields.n), (None, None));
    }

    #[test]
    fn a_part_with_nothing_set_is_refused_by_its_place() {
        let request = pb::GenerateRequest {
            messages: vec![pb::Message {
                role: "user".into(),
                content: vec![part(Some(Part::Text("hi".into()))), part(None)],
            }],
            ..Default::default()
        };
        let err = to_openai(&request).unwrap_err();
        assert_eq!(err.param().as_deref(), Some("messages[0].content[1]"));
        assert_eq!(err.code(), "invalid_value");
    }
}
