//! `Preparer`: a validated OpenAI request to the engine's input. Media are fetched
//! concurrently; then, on the bounded media pool (off the async workers and the engine
//! thread), every image header and video header is read and the request's image-token
//! budget checked before anything is decoded; then images and the frames the family picks
//! are decoded and preprocessed, the chat template rendered, placeholders expanded and the
//! text tokenized.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::video::preprocess_frames;
use super::{
    ChatMessage, ContentPart, ImageInput, PrepareError, Processor, ProcessorError, TemplateFunction, TemplateToolCall,
};
use crate::engine::{GenerationParams, Prompt, SamplingParams};
use crate::media::{Fetched, MediaFetcher, MediaLimits, MediaPool, decode_image, open_video, probe_image};
use crate::model::{Detail, FrameSampling, ImageOptions, ProcessedMedia, VideoInfo};
use crate::openai::{self, ImagePart, Message, Part, VideoPart};

/// Bounds on a request's media (server flags).
#[derive(Debug, Clone, Copy)]
pub struct PrepareLimits {
    pub media: MediaLimits,
    /// Most placeholder tokens the images and video frames of one request may fill.
    pub max_image_tokens: usize,
    /// Most frames sampled from one video (the model's own default is capped by it).
    pub max_video_frames: usize,
}

/// A request ready to submit.
pub struct Prepared {
    pub prompt: Prompt,
    pub params: GenerationParams,
}

/// Told how long media work took, whether it succeeded or not (the server records it as
/// metrics).
pub trait PrepareObserver: Send + Sync {
    /// One media URL fetched (or failed to).
    fn fetched(&self, took: Duration);
    /// A chat request's decoding, preprocessing, rendering and tokenizing.
    fn preprocessed(&self, took: Duration);
}

pub struct Preparer {
    processor: Arc<Processor>,
    fetcher: MediaFetcher,
    pool: MediaPool,
    limits: PrepareLimits,
    observer: Arc<dyn PrepareObserver>,
}

impl Preparer {
    pub fn new(
        processor: Arc<Processor>,
        fetcher: MediaFetcher,
        pool: MediaPool,
        limits: PrepareLimits,
        observer: Arc<dyn PrepareObserver>,
    ) -> Self {
        Self {
            processor,
            fetcher,
            pool,
            limits,
            observer,
        }
    }

    pub fn processor(&self) -> &Arc<Processor> {
        &self.processor
    }

    /// A chat request: its media fetched, decoded within the limits, and the conversation
    /// rendered and tokenized around them.
    pub async fn chat(&self, chat: &openai::ValidChat) -> Result<Prepared, PrepareError> {
        let images: Vec<ImagePart> = chat.messages.iter().flat_map(Message::images).cloned().collect();
        let videos: Vec<VideoPart> = chat.messages.iter().flat_map(Message::videos).cloned().collect();
        // Nothing is fetched for a video the model cannot take.
        if let (Some(video), None) = (videos.first(), self.processor.video()) {
            return Err(PrepareError::VideosNotSupported {
                param: video.param.clone(),
            });
        }
        let (image_bytes, video_bytes) = self.fetch(&images, &videos).await?;
        let messages = template_messages(&chat.messages);
        let tools: Vec<serde_json::Value> = (chat.tools.iter())
            .flat_map(|t| &t.tools)
            .map(|t| t.as_json())
            .collect();
        let (processor, limits, observer) = (self.processor.clone(), self.limits, self.observer.clone());
        let constraint = chat.options.constraint.clone();
        let prompt = self
            .pool
            .run(move || {
                let started = Instant::now();
                let media = Media {
                    processor: &processor,
                    limits: &limits,
                };
                let conversation = Conversation {
                    messages: &messages,
                    tools: &tools,
                };
                let prompt = media.prompt(conversation, &images, &image_bytes, &videos, &video_bytes);
                observer.preprocessed(started.elapsed());
                Ok::<_, PrepareError>((prompt?, processor.grammar(constraint.as_ref())?))
            })
            .await
            .map_err(|e| PrepareError::Failed(e.to_string()))??;
        let (prompt, grammar) = prompt;
        Ok(Prepared {
            prompt,
            params: GenerationParams {
                grammar,
                ..params(&chat.options)
            },
        })
    }

    /// A completion request: its prompt tokenized as given (no chat template).
    pub async fn completion(&self, completion: &openai::ValidCompletion) -> Result<Prepared, PrepareError> {
        let (processor, text) = (self.processor.clone(), completion.prompt.clone());
        let constraint = completion.options.constraint.clone();
        let run = move || Ok::<_, PrepareError>((processor.tokenize(&text)?, processor.grammar(constraint.as_ref())?));
        let (token_ids, grammar) = (self.pool.run(run).await).map_err(|e| PrepareError::Failed(e.to_string()))??;
        Ok(Prepared {
            prompt: Prompt::text(token_ids),
            params: GenerationParams {
                grammar,
                ..params(&completion.options)
            },
        })
    }

    /// Every image's and video's bytes, fetched at once.
    async fn fetch(
        &self,
        images: &[ImagePart],
        videos: &[VideoPart],
    ) -> Result<(Vec<Fetched>, Vec<Fetched>), PrepareError> {
        let fetch = |url: &str, param: &str| {
            let (url, param) = (url.to_string(), param.to_string());
            async move {
                let started = Instant::now();
                let fetched = self.fetcher.fetch(&url).await;
                self.observer.fetched(started.elapsed());
                fetched.map_err(|error| PrepareError::Media { error, param })
            }
        };
        let image_bytes = futures::future::try_join_all(images.iter().map(|i| fetch(&i.url, &i.param)));
        let video_bytes = futures::future::try_join_all(videos.iter().map(|v| fetch(&v.url, &v.param)));
        futures::future::try_join(image_bytes, video_bytes).await
    }
}

/// The one mapping from a request's validated options to the engine's parameters.
pub fn params(options: &openai::Options) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams {
            temperature: options.temperature,
            top_p: options.top_p,
            top_k: options.top_k,
            min_p: options.min_p,
            repetition_penalty: options.repetition_penalty,
            presence_penalty: options.presence_penalty,
            frequency_penalty: options.frequency_penalty,
            seed: options.seed,
            logit_bias: options.logit_bias.clone(),
        },
        max_tokens: options.max_tokens,
        min_tokens: options.min_tokens,
        ignore_eos: options.ignore_eos,
        stop: options.stop.clone(),
        stop_token_ids: options.stop_token_ids.clone(),
        logprobs: options.logprobs,
        grammar: None,
    }
}

/// Validated messages in the shape chat templates take (media as placeholders).
pub fn template_messages(messages: &[Message]) -> Vec<ChatMessage> {
    (messages.iter())
        .map(|m| ChatMessage {
            role: m.role.as_str().to_string(),
            content: (m.content.iter())
                .map(|part| match part {
                    Part::Text(text) => ContentPart::Text { text: text.clone() },
                    Part::Image(_) => ContentPart::Image,
                    Part::Video(_) => ContentPart::Video,
                })
                .collect(),
            tool_calls: (m.tool_calls.iter())
                .map(|call| TemplateToolCall {
                    id: call.id.clone(),
                    kind: "function",
                    function: TemplateFunction {
                        name: call.name.clone(),
                        arguments: call.arguments.clone(),
                    },
                })
                .collect(),
            tool_call_id: m.tool_call_id.clone(),
            name: m.name.clone(),
        })
        .collect()
}

/// A chat request's messages and the tools it offers (OpenAI's shape).
#[derive(Clone, Copy)]
struct Conversation<'a> {
    messages: &'a [ChatMessage],
    tools: &'a [serde_json::Value],
}

/// How the family's processor is to show an image part: its `detail` and pixel budget.
pub fn image_options(part: &ImagePart) -> ImageOptions {
    let detail = match part.detail {
        openai::Detail::Low => Detail::Low,
        openai::Detail::Auto | openai::Detail::High => Detail::Auto,
    };
    ImageOptions {
        detail,
        min_pixels: part.budget.min_pixels,
        max_pixels: part.budget.max_pixels,
    }
}

/// A request's media work, on a media worker.
struct Media<'a> {
    processor: &'a Processor,
    limits: &'a PrepareLimits,
}

impl Media<'_> {
    fn prompt(
        &self,
        conversation: Conversation<'_>,
        images: &[ImagePart],
        image_bytes: &[Fetched],
        videos: &[VideoPart],
        video_bytes: &[Fetched],
    ) -> Result<Prompt, PrepareError> {
        let mut budget = Budget {
            used: 0,
            limit: self.limits.max_image_tokens,
        };
        let mut headers = Vec::with_capacity(images.len());
        for (image, bytes) in images.iter().zip(image_bytes) {
            let media = |error| PrepareError::Media {
                error,
                param: image.param.clone(),
            };
            let header = probe_image(bytes, &self.limits.media).map_err(media)?;
            if let Some(message) = self.processor.input().refuses_image(header.width, header.height) {
                return Err(PrepareError::ImageRefused {
                    message,
                    param: image.param.clone(),
                });
            }
            if image.budget.is_set() && !self.processor.input().takes_pixel_budget() {
                return Err(PrepareError::PixelBudgetNotSupported {
                    param: image.param.clone(),
                });
            }
            let tokens = (self.processor.input()).image_tokens(header.width, header.height, &image_options(image));
            budget.spend(tokens, &image.param)?;
            headers.push(header);
        }
        let mut sources = Vec::with_capacity(videos.len());
        for (video, bytes) in videos.iter().zip(video_bytes) {
            sources.push(self.open_video(video, bytes, &mut budget)?);
        }
        let inputs = (images.iter().zip(image_bytes).zip(&headers))
            .map(|((image, bytes), header)| {
                let decoded = decode_image(bytes, header).map_err(|error| PrepareError::Media {
                    error,
                    param: image.param.clone(),
                })?;
                Ok(ImageInput {
                    image: decoded,
                    options: image_options(image),
                })
            })
            .collect::<Result<Vec<_>, PrepareError>>()?;
        let videos = (sources.into_iter())
            .map(|source| self.decode_video(source))
            .collect::<Result<Vec<_>, _>>()?;
        let text = (self.processor).render_conversation(conversation.messages, conversation.tools, true)?;
        Ok(self.processor.process_rendered(&text, &inputs, videos)?)
    }

    /// A video's header read, its frames picked by the family's rule (at the request's rate
    /// and count or the model's, never more than the server allows) and counted against the
    /// budget, before any frame is decoded.
    fn open_video<'b>(
        &self,
        video: &'b VideoPart,
        bytes: &'b Fetched,
        budget: &mut Budget,
    ) -> Result<OpenVideo<'b>, PrepareError> {
        let Some(family) = self.processor.video() else {
            return Err(PrepareError::VideosNotSupported {
                param: video.param.clone(),
            });
        };
        let media = |error| PrepareError::Media {
            error,
            param: video.param.clone(),
        };
        let source = open_video(bytes, &self.limits.media).map_err(media)?;
        let meta = source.meta;
        let info = VideoInfo {
            total_frames: meta.total_frames,
            fps: meta.fps,
            duration: meta.duration,
            width: meta.width,
            height: meta.height,
        };
        let defaults = family.default_sampling();
        let sampling = FrameSampling {
            fps: video.fps.unwrap_or(defaults.fps),
            max_frames: (video.max_frames).unwrap_or(defaults.max_frames.min(self.limits.max_video_frames)),
        };
        let indices = family.sample_frames(&info, &sampling);
        budget.spend(
            family.video_tokens(meta.width, meta.height, indices.len()),
            &video.param,
        )?;
        Ok(OpenVideo {
            source,
            info,
            indices,
            param: &video.param,
        })
    }

    /// The picked frames decoded and preprocessed as they come.
    fn decode_video(&self, video: OpenVideo<'_>) -> Result<ProcessedMedia, PrepareError> {
        let family = self
            .processor
            .video()
            .expect("opened only for a family that takes videos. This is a bug.");
        let media = |error| PrepareError::Media {
            error,
            param: video.param.to_string(),
        };
        let count = video.indices.len();
        let frames = preprocess_frames(family, video.source.frames(video.indices.clone()), count).map_err(media)?;
        // A header that promised more frames than the stream holds: those that exist.
        let indices = &video.indices[..frames.len()];
        (family.finish(frames, &video.info, indices))
            .map_err(|e| PrepareError::Processor(ProcessorError::Pixels { message: e.to_string() }))
    }
}

struct OpenVideo<'a> {
    source: crate::media::VideoSource<'a>,
    info: VideoInfo,
    indices: Vec<usize>,
    param: &'a str,
}

/// A request's image-token budget, spent image by image and video by video.
struct Budget {
    used: usize,
    limit: usize,
}

impl Budget {
    fn spend(&mut self, tokens: usize, param: &str) -> Result<(), PrepareError> {
        self.used += tokens;
        if self.used <= self.limit {
            return Ok(());
        }
        Err(PrepareError::ImageTokens {
            tokens: self.used,
            limit: self.limit,
            param: param.to_string(),
        })
    }
}
