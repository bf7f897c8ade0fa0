//! vLLM's POST /tokenize and /detokenize: what the model would be prompted with, counted
//! (a conversation's images as the image tokens they expand to, fetched and preprocessed as
//! chat's), and tokens back to text.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{AppState, parse_json};
use crate::openai::tokenize::{self, DetokenizeResponse, Tokenize, TokenizeResponse};
use crate::openai::{self, SamplingFields};

pub async fn tokenize(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let job = async {
        let ready = state.accepting()?;
        let body = parse_json(body, state.settings.max_body_bytes)?;
        let (model, form, with_strs) = tokenize::tokenize(&body)?;
        state.resolve_model(ready, model.as_deref())?;
        let tokenizer = ready.preparer.processor().tokenizer().clone();
        let tokens = match form {
            Tokenize::Prompt {
                text,
                add_special_tokens,
            } => {
                let encoding = tokenizer.encode(text, add_special_tokens);
                encoding
                    .map_err(|e| ApiError::Internal(format!("tokenizing: {e}")))?
                    .get_ids()
                    .to_vec()
            }
            Tokenize::Chat(request) => {
                let (limits, vocab_size) = (&state.settings.limits, ready.engine.info().vocab_size);
                let chat = openai::chat(&request, &SamplingFields::default(), limits, vocab_size)?;
                ready.preparer.chat(&chat).await?.prompt.token_ids
            }
        };
        let token_strs = with_strs.then(|| {
            (tokens.iter())
                .map(|&id| tokenizer.id_to_token(id).unwrap_or_default())
                .collect()
        });
        Ok::<_, ApiError>(TokenizeResponse {
            count: tokens.len(),
            max_model_len: ready.engine.max_model_len(),
            tokens,
            token_strs,
        })
    };
    match job.await {
        Ok(answer) => Json(answer).into_response(),
        Err(error) => error.into_response(),
    }
}

pub async fn detokenize(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let job = || {
        let ready = state.accepting()?;
        let body = parse_json(body, state.settings.max_body_bytes)?;
        let request: tokenize::DetokenizeRequest = openai::from_json(&body)?;
        state.resolve_model(ready, request.model.as_deref())?;
        let ids = tokenize::token_ids(&request.tokens, ready.engine.info().vocab_size)?;
        let tokenizer = ready.preparer.processor().tokenizer();
        let prompt = (tokenizer.decode(&ids, false)).map_err(|e| ApiError::Internal(format!("detokenizing: {e}")))?;
        Ok::<_, ApiError>(DetokenizeResponse { prompt })
    };
    match job() {
        Ok(answer) => Json(answer).into_response(),
        Err(error) => error.into_response(),
    }
}
