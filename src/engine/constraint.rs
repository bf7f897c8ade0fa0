//! Constrained decoding: a grammar (a JSON schema, a regular expression, a Lark grammar)
//! turned into the set of tokens allowed at each step, through llguidance (what mistral.rs,
//! llama.cpp and vLLM use). `Grammars` is built once per model from its tokenizer: it
//! compiles a request's grammar (off the engine thread, cached by content) into a
//! `Grammar`, whose `Constraint`s follow one sequence each.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use llguidance::api::{GrammarWithLexer, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use lru::LruCache;

/// Compiled grammars kept by content: a client sends the same schema with every request.
const CACHED_GRAMMARS: usize = 256;
/// Grammars whose text is longer are compiled for their request and not kept: the cache
/// holds at most 256 of 64 KiB (a hostile client's large schemas cannot fill memory).
const MAX_CACHED_TEXT: usize = 64 << 10;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GrammarSpec {
    /// A JSON value valid under this JSON schema (`{"type": "object"}`: any object).
    JsonSchema(String),
    /// A string matching this regular expression, in full.
    Regex(String),
    /// A Lark grammar (llguidance's dialect: `start: ...`, regexes in `/.../`).
    Lark(String),
}

impl GrammarSpec {
    fn text(&self) -> &str {
        match self {
            Self::JsonSchema(text) | Self::Regex(text) | Self::Lark(text) => text,
        }
    }
}

/// A grammar the compiler refused, with its reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

/// The model's tokenizer as llguidance sees it: every token's bytes in a trie, and
/// tokenization for the grammar's forced strings.
struct TokenizerBytes {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for TokenizerBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Forced text the tokenizer cannot take (not UTF-8) falls back to the trie's greedy
        // tokenization, as llguidance's own adapters do.
        match std::str::from_utf8(s)
            .ok()
            .and_then(|text| self.tokenizer.encode(text, false).ok())
        {
            Some(encoding) => encoding.get_ids().to_vec(),
            None => self.trie.greedy_tokenize(s),
        }
    }
}

/// The compiler of one model's grammars, and their cache.
pub struct Grammars {
    factory: ParserFactory,
    cache: Mutex<LruCache<GrammarSpec, Arc<Grammar>>>,
}

impl Grammars {
    /// From the model's `tokenizer.json` text, its vocabulary size (the logits' width, which
    /// may exceed the tokenizer's) and its end-of-sequence tokens (the first is llguidance's
    /// EOS; a grammar that is complete allows them all).
    pub fn new(
        tokenizer_json: &str,
        tokenizer: tokenizers::Tokenizer,
        vocab_size: usize,
        eos: &[u32],
    ) -> anyhow::Result<Self> {
        let json: serde_json::Value = serde_json::from_str(tokenizer_json)?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)?;
        let vocab_size = vocab_size.max(words.len());
        words.resize(vocab_size, Vec::new());
        let first_eos = *eos
            .first()
            .ok_or_else(|| anyhow::anyhow!("the model has no end-of-sequence token"))?;
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(TokenizerBytes { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(Self {
            factory,
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(CACHED_GRAMMARS).expect("non-zero"))),
        })
    }

    /// The grammar compiled (or found in the cache). Compiling a large schema takes
    /// milliseconds: call it off the engine thread.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Arc<Grammar>, GrammarError> {
        if let Some(found) = self.cache.lock().expect("grammar cache").get(spec) {
            return Ok(found.clone());
        }
        let grammar = match spec {
            GrammarSpec::JsonSchema(schema) => {
                let value = serde_json::from_str(schema).map_err(|e| GrammarError(format!("not JSON: {e}")))?;
                TopLevelGrammar::from_grammar(GrammarWithLexer::from_json_schema(compact(value)))
            }
            GrammarSpec::Regex(regex) => TopLevelGrammar::from_regex(regex),
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(GrammarError(error));
        }
        let compiled = Arc::new(Grammar { start: matcher });
        if spec.text().len() <= MAX_CACHED_TEXT {
            self.cache
                .lock()
                .expect("grammar cache")
                .put(spec.clone(), compiled.clone());
        }
        Ok(compiled)
    }
}

/// `schema` with JSON written one way: `{"a": 1, "b": [2, 3]}`, as Python's `json.dumps`
/// and OpenAI's answers write it. llguidance's default lets whitespace go anywhere, and a
/// weak model can spend its whole budget on it. A schema's own `x-guidance` options win.
fn compact(schema: serde_json::Value) -> serde_json::Value {
    let mut schema = match schema {
        serde_json::Value::Bool(true) => serde_json::json!({}),
        other => other,
    };
    if let Some(map) = schema.as_object_mut().filter(|m| !m.contains_key("x-guidance")) {
        let options = JsonCompileOptions {
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            whitespace_flexible: false,
            ..Default::default()
        };
        let options = serde_json::to_value(options).expect("the options serialize");
        map.insert("x-guidance".into(), options);
    }
    schema
}

/// A compiled grammar, at its start: each sequence constrained by it takes a copy.
pub struct Grammar {
    start: Matcher,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar")
    }
}

impl Grammar {
    pub fn constraint(&self) -> Constraint {
        Constraint {
            matcher: self.start.deep_clone(),
            taken: None,
        }
    }
}

/// One sequence's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
    /// The last sampled token, not yet fed to the grammar: `allowed` does it, on the mask
    /// thread, alongside the next forward pass instead of after the last.
    taken: Option<u32>,
}

/// The tokens a constraint allows next.
pub struct Allowed(SimpleVob);

impl Allowed {
    /// Sets every token it does not allow to minus infinity, 32 at a time.
    pub fn apply(&self, logits: &mut [f32]) {
        let words = self.0.as_slice();
        for (i, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(i).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (bit, logit) in chunk.iter_mut().enumerate() {
                if bits & (1 << bit) == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
    }
}

impl Constraint {
    /// The tokens allowed next (after the last one `take`n): end-of-sequence alone once the
    /// grammar is complete.
    pub fn allowed(&mut self) -> Result<Allowed, GrammarError> {
        if let Some(token) = self.taken.take() {
            self.advance(token)?;
        }
        self.matcher
            .compute_mask_or_eos()
            .map(Allowed)
            .map_err(|e| GrammarError(e.to_string()))
    }

    /// Records the token sampled from the last `allowed` (the grammar moves past it in the
    /// next `allowed`).
    pub fn take(&mut self, token: u32) {
        self.taken = Some(token);
    }

    fn advance(&mut self, token: u32) -> Result<(), GrammarError> {
        if self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError(e.to_string()))
    }
}
