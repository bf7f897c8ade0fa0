//! POST /v1/embeddings, /v1/score and /v1/rerank, on a contrastive model: parse and
//! validate (`openai::embeddings`), prepare every input (`processor::embed`), embed them in
//! the batching engine (`engine::embed`), then answer: the vectors themselves, a score per
//! pair (the model's logit: `scale · cos`, SigLIP `+ bias`), or the documents ranked by
//! probability (CLIP's softmax over them, SigLIP's sigmoid each). On a model with a
//! matching head (BLIP's ITM) a score and a relevance are the pair's match probability.

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
use crate::engine::embed::{EmbedError, EmbedItem};
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
        let (n_left, n_right) = (request.left.len(), request.right.len());
        let pairs: Vec<(usize, usize)> = (0..n_right)
            .map(|i| (if n_left == 1 { 0 } else { i }, n_left + i))
            .collect();
        let (scores, tokens) = match ready.engine.info().matching {
            true => match_probabilities(&state, ready, &all, &pairs, request.truncate).await?,
            false => {
                let (vectors, tokens) = embed(&state, ready, &all, request.truncate).await?;
                let scoring = ready.engine.info().scoring;
                let scores = pairs
                    .iter()
                    .map(|&(l, r)| scoring.logit(cosine(&vectors[l], &vectors[r])));
                (scores.collect(), tokens)
            }
        };
        let data = (scores.into_iter().enumerate())
            .map(|(index, score)| ScoreOut {
                index,
                object: "score",
                score,
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
        let (probabilities, tokens) = match ready.engine.info().matching {
            // Each document's own match probability with the query.
            true => {
                let pairs: Vec<(usize, usize)> = (1..all.len()).map(|d| (0, d)).collect();
                match_probabilities(&state, ready, &all, &pairs, request.truncate).await?
            }
            false => {
                let (vectors, tokens) = embed(&state, ready, &all, request.truncate).await?;
                let scoring = ready.engine.info().scoring;
                let logits: Vec<f32> = vectors[1..]
                    .iter()
                    .map(|d| scoring.logit(cosine(&vectors[0], d)))
                    .collect();
                (scoring.probabilities(&logits), tokens)
            }
        };
        let mut results: Vec<RerankOut> = (probabilities.into_iter().enumerate())
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
    let (items, tokens) = prepare(ready, inputs, truncate).await?;
    Ok((run(state, ready, items).await?, tokens))
}

/// Every input ready for the engine, and the text tokens they hold.
async fn prepare(ready: &EmbedReady, inputs: &[Located], truncate: bool) -> Result<(Vec<EmbedItem>, usize), ApiError> {
    let prepared = ready.preparer.prepare(inputs, truncate).await?;
    let tokens = prepared.iter().map(|p| p.tokens).sum();
    Ok((prepared.into_iter().map(|p| p.item).collect(), tokens))
}

/// The engine's answer for `items`, within the request timeout.
async fn run(state: &AppState, ready: &EmbedReady, items: Vec<EmbedItem>) -> Result<Vec<Vec<f32>>, ApiError> {
    match tokio::time::timeout(state.settings.request_timeout, ready.engine.embed(items)).await {
        Ok(result) => result.map_err(|e| match e {
            EmbedError::Submit(e) => ApiError::submit(e, "input"),
            EmbedError::Model(message) => ApiError::Internal(message),
        }),
        Err(_) => Err(ApiError::Timeout),
    }
}

/// Match probabilities of pairs of inputs (a model with a matching head): `pairs` index
/// `inputs`; each pair must be a text and an image, in either order.
async fn match_probabilities(
    state: &AppState,
    ready: &EmbedReady,
    inputs: &[Located],
    pairs: &[(usize, usize)],
    truncate: bool,
) -> Result<(Vec<f32>, usize), ApiError> {
    let (items, tokens) = prepare(ready, inputs, truncate).await?;
    let matched = (pairs.iter())
        .map(|&(a, b)| match (&items[a], &items[b]) {
            (EmbedItem::Text(ids), EmbedItem::Image(pixels, key))
            | (EmbedItem::Image(pixels, key), EmbedItem::Text(ids)) => {
                Ok(EmbedItem::Pair(ids.clone(), pixels.clone(), *key))
            }
            _ => Err(ValidationError::UnsupportedValue {
                param: inputs[b].param.clone(),
                message: "and its counterpart must be a text and an image: this model's matching head scores an \
                          image against a text"
                    .into(),
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let probs = run(state, ready, matched).await?.into_iter().map(|v| v[0]).collect();
    Ok((probs, tokens))
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
