//! POST /v1/chat/completions.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::Response;

use super::error::ApiError;
use super::respond::Endpoint;
use super::types::{ChatCompletionRequest, SamplingFields};
use super::validate::{Settings, VideoRef};
use super::{AppState, answer, from_json, parse_json, validate};
use crate::media::{Fetched, MediaLimits, decode_image, decode_video, probe_image};
use crate::metrics::Metrics;
use crate::processor::video::sample_frames;
use crate::processor::{FrameSampling, ImageInput, Processor, ProcessorError, Prompt, VideoInput};

pub async fn chat_completions(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let prepared = match parse_json(body, state.settings.max_body_bytes) {
        Ok(body) => prepare(&state, &body).await,
        Err(error) => Err(error),
    };
    answer(&state, Endpoint::Chat, arrived, prepared).await
}

/// Validates a chat request (OpenAI's JSON; gRPC requests are mapped onto it) and builds its
/// prompt: template, images, videos, tokens.
pub(super) async fn prepare(state: &AppState, body: &serde_json::Value) -> Result<(Prompt, Settings), ApiError> {
    let ready = state.accepting()?;
    let settings = &state.settings;
    let request: ChatCompletionRequest = from_json(body)?;
    let sampling: SamplingFields = from_json(body)?;
    let adapter = state.resolve_model(ready, request.model.as_deref())?;
    let logprobs = validate::chat_logprobs(request.logprobs, request.top_logprobs)?;
    let max_tokens = request.max_completion_tokens.or(sampling.max_tokens);
    let mut generation = validate::settings(&sampling, max_tokens, logprobs, &settings.limits, ready.vocab_size)?;
    generation.adapter = adapter;
    let (messages, media) = validate::messages(&request.messages, &settings.limits)?;
    let fetch = |url: &str, param: &str| {
        let (url, param) = (url.to_string(), param.to_string());
        async move {
            let started = Instant::now();
            let fetched = state.fetcher.fetch(&url).await;
            Metrics::observe(&state.metrics.media_fetch, started.elapsed());
            fetched.map_err(|e| ApiError::from(e).with_param(&param))
        }
    };
    let image_bytes = futures::future::try_join_all(media.images.iter().map(|i| fetch(&i.url, &i.param)));
    let video_bytes = futures::future::try_join_all(media.videos.iter().map(|v| fetch(&v.url, &v.param)));
    let (image_bytes, video_bytes) = futures::future::try_join(image_bytes, video_bytes).await?;
    // Decoding, resizing and tokenizing take milliseconds to seconds: the bounded media
    // pool runs them, off the async workers and the engine thread.
    let processor = ready.processor.clone();
    let (limits, max_image_tokens) = (settings.media, settings.max_image_tokens_per_request);
    let max_video_frames = settings.limits.max_video_frames;
    let metrics = state.metrics.clone();
    let prompt = state
        .media_pool
        .run(move || {
            let _timer = metrics.time(&metrics.media_preprocess);
            let mut image_tokens = 0;
            let mut over_budget = |tokens: usize, param: &str| {
                image_tokens += tokens;
                if image_tokens <= max_image_tokens {
                    return Ok(());
                }
                let message = format!(
                    "the images and video frames need {image_tokens} or more tokens, more than the limit of {max_image_tokens} per request"
                );
                Err(ApiError::InvalidRequest { message, param: Some(param.to_string()), code: "image_tokens_exceeded" })
            };
            let mut headers = Vec::with_capacity(media.images.len());
            for (image, bytes) in media.images.iter().zip(&image_bytes) {
                let header = probe_image(bytes, &limits).map_err(|e| ApiError::from(e).with_param(&image.param))?;
                over_budget(processor.image_tokens(header.width, header.height, image.split), &image.param)?;
                headers.push(header);
            }
            let mut videos = Vec::with_capacity(media.videos.len());
            for (video, bytes) in media.videos.iter().zip(&video_bytes) {
                let decoded = decode_request_video(&processor, video, bytes, &limits, max_video_frames)?;
                over_budget(decoded.tiles.len() * processor.frame_tokens(), &video.param)?;
                videos.push(decoded);
            }
            let inputs = media
                .images
                .iter()
                .zip(&image_bytes)
                .zip(&headers)
                .map(|((image, bytes), header)| {
                    let decoded = decode_image(bytes, header).map_err(|e| ApiError::from(e).with_param(&image.param))?;
                    Ok(ImageInput { image: decoded, split: image.split })
                })
                .collect::<Result<Vec<_>, ApiError>>()?;
            processor.process_media(&messages, &inputs, videos).map_err(ApiError::from)
        })
        .await?;
    Ok((prompt, generation))
}

/// Decodes the frames SmolVLM2's sampling picks, at the request's rate and count or the
/// model's, never more than the server allows, and preprocesses them as they come.
fn decode_request_video(
    processor: &Processor,
    video: &VideoRef,
    bytes: &Fetched,
    limits: &MediaLimits,
    max_video_frames: usize,
) -> Result<VideoInput, ApiError> {
    let videos = processor
        .video_processor()
        .ok_or_else(|| ApiError::from(ProcessorError::VideosNotSupported).with_param(&video.param))?;
    let defaults = videos.default_sampling();
    let sampling = FrameSampling {
        fps: video.fps.unwrap_or(defaults.fps),
        max_frames: video.max_frames.unwrap_or(defaults.max_frames.min(max_video_frames)),
    };
    videos
        .preprocess_streaming(|sink| decode_video(bytes, limits, |meta| sample_frames(meta, &sampling), sink))
        .map_err(|e| ApiError::from(e).with_param(&video.param))
}
