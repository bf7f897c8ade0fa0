//! POST /v1/embeddings, /v1/score and /v1/rerank, on a contrastive model: parse and
//! validate (`openai::embeddings`), prepare every input (`processor::embed`), embed them in
//! the batching engine (`engine::embed`), then answer: the vectors themselves, a score per
//! pair (the model's logit: `scale · cos`, SigLIP `+ bias`), or the documents ranked by
//! probability (CLIP's softmax over them, SigLIP's sigmoid each).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::Value;

use super::error::ApiError;
use super::respond::Observer;
use super::{AppState, EmbedReady, parse_json};
use crate::engine::embed::EmbedError;
use crate::metrics::Outcome;
use crate::openai::embeddings::{
    self, EmbeddingList, EmbeddingOut, EmbeddingUsage, EmbeddingValue, Located, RerankList, RerankOut, ScoreList,
    ScoreOut,
};
use crate::openai::{ValidationError, unix_now};

pub async fn embeddings(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let answer = async {
        let body = parse_json(body, state.settings.max_body_bytes)?;
        let request = embeddings::embeddings(&body, state.settings.limits.max_embedding_inputs)?;
        let ready = state.accepting_embeddings(request.model.as_deref())?;
        if let Some(dimensions) = request.dimensions.filter(|&d| d != ready.engine.info().dim) {
            return Err(ValidationError::UnsupportedValue {
                param: "dimensions".into(),
                message: format!(
                    "is {dimensions}, but this model's embeddings have {} dimensions and cannot be shortened",
                    ready.engine.info().dim
                ),
            }
            .into());
        }
        let (vectors, tokens) = embed(&state, ready, &request.inputs, request.truncate).await?;
        let data = (vectors.into_iter().enumerate())
            .map(|(index, vector)| EmbeddingOut {
                object: "embedding",
                index,
                embedding: match request.base64 {
                    true => EmbeddingValue::Base64(
                        base64::engine::general_purpose::STANDARD
                            .encode(vector.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()),
                    ),
                    false => EmbeddingValue::Float(vector),
                },
            })
            .collect();
        Ok(axum::Json(EmbeddingList {
            object: "list",
            data,
            model: state.settings.served_model_name.clone(),
            usage: usage(tokens),
        })
        .into_response())
    };
    finish(&state, "embeddings", arrived, answer.await)
}

pub async fn score(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let answer = async {
        let body = parse_json(body, state.settings.max_body_bytes)?;
        let request = embeddings::score(&body, state.settings.limits.max_embedding_inputs)?;
        let ready = state.accepting_embeddings(request.model.as_deref())?;
        let all: Vec<Located> = request.left.iter().chain(&request.right).cloned().collect();
        let (vectors, tokens) = embed(&state, ready, &all, request.truncate).await?;
        let (left, right) = vectors.split_at(request.left.len());
        let scoring = ready.engine.info().scoring;
        let data = (right.iter().enumerate())
            .map(|(index, r)| {
                let l = if left.len() == 1 { &left[0] } else { &left[index] };
                ScoreOut {
                    index,
                    object: "score",
                    score: scoring.logit(cosine(l, r)),
                }
            })
            .collect();
        Ok(axum::Json(ScoreList {
            id: format!("score-{}", uuid::Uuid::new_v4().simple()),
            object: "list",
            created: unix_now(),
            model: state.settings.served_model_name.clone(),
            data,
            usage: usage(tokens),
        })
        .into_response())
    };
    finish(&state, "score", arrived, answer.await)
}

pub async fn rerank(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let answer = async {
        let body = parse_json(body, state.settings.max_body_bytes)?;
        let request = embeddings::rerank(&body, state.settings.limits.max_embedding_inputs)?;
        let ready = state.accepting_embeddings(request.model.as_deref())?;
        let all: Vec<Located> = std::iter::once(&request.query)
            .chain(&request.documents)
            .cloned()
            .collect();
        let (vectors, tokens) = embed(&state, ready, &all, request.truncate).await?;
        let scoring = ready.engine.info().scoring;
        let logits: Vec<f32> = vectors[1..]
            .iter()
            .map(|d| scoring.logit(cosine(&vectors[0], d)))
            .collect();
        let mut results: Vec<RerankOut> = (scoring.probabilities(&logits).into_iter().enumerate())
            .map(|(index, relevance_score)| RerankOut {
                index,
                document: request.echo.as_ref().map(|docs| document(&docs[index])),
                relevance_score,
            })
            .collect();
        results.sort_by(|a, b| b.relevance_score.total_cmp(&a.relevance_score));
        results.truncate(request.top_n.unwrap_or(usize::MAX));
        Ok(axum::Json(RerankList {
            id: format!("rerank-{}", uuid::Uuid::new_v4().simple()),
            model: state.settings.served_model_name.clone(),
            usage: usage(tokens),
            results,
        })
        .into_response())
    };
    finish(&state, "rerank", arrived, answer.await)
}

/// Every input's unit vector, in order, and the text tokens they held.
async fn embed(
    state: &AppState,
    ready: &EmbedReady,
    inputs: &[Located],
    truncate: bool,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let prepared = ready.preparer.prepare(inputs, truncate).await?;
    let tokens = prepared.iter().map(|p| p.tokens).sum();
    let items = prepared.into_iter().map(|p| p.item).collect();
    let deadline = state.settings.request_timeout;
    let vectors = match tokio::time::timeout(deadline, ready.engine.embed(items)).await {
        Ok(result) => result.map_err(|e| match e {
            EmbedError::Submit(e) => ApiError::submit(e, "input"),
            EmbedError::Model(message) => ApiError::Internal(message),
        })?,
        Err(_) => return Err(ApiError::Timeout),
    };
    Ok((vectors, tokens))
}

/// Unit vectors' cosine: their dot product.
fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn usage(tokens: usize) -> EmbeddingUsage {
    EmbeddingUsage {
        prompt_tokens: tokens,
        total_tokens: tokens,
    }
}

/// A document as rerank returns it: a string as `{"text": ...}` (Jina's and Cohere's
/// shape), anything else as given.
fn document(given: &Value) -> Value {
    match given {
        Value::String(text) => serde_json::json!({ "text": text }),
        other => other.clone(),
    }
}

/// The response, with the request counted by route and outcome.
fn finish(state: &AppState, route: &'static str, arrived: Instant, answer: Result<Response, ApiError>) -> Response {
    let mut observer = Observer::new(state.metrics.clone(), route, arrived);
    match answer {
        Ok(response) => {
            observer.finish(Outcome::Success);
            response
        }
        Err(error) => {
            observer.fail(&error);
            error.into_response()
        }
    }
}
