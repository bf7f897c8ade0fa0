//! Incremental detokenization: the text each new token adds, never splitting a UTF-8
//! character. Byte-level BPE tokens can end inside a character; decoding a window of recent
//! tokens and holding back output that ends in U+FFFD (as TGI and vLLM do) keeps a
//! character's bytes together until it is complete.

use tokenizers::Tokenizer;

#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// End of the text already returned.
    read_offset: usize,
}

impl Detokenizer {
    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset]);
        let text = decode(tokenizer, &self.ids[self.prefix_offset..]);
        if text.len() > prefix.len()
            && !text.ends_with('\u{FFFD}')
            && let Some(delta) = text.get(prefix.len()..)
        {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return delta.to_string();
        }
        String::new()
    }

    /// Whatever is still held back (an incomplete character at the very end), for the
    /// last event of a sequence.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        let prefix = decode(tokenizer, &self.ids[self.prefix_offset..self.read_offset]);
        let text = decode(tokenizer, &self.ids[self.prefix_offset..]);
        self.read_offset = self.ids.len();
        text.get(prefix.len()..).unwrap_or_default().to_string()
    }
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    // Decoding known ids cannot fail with the byte-level decoders SmolVLM uses; an empty
    // string keeps the stream going should a tokenizer ever refuse.
    tokenizer.decode(ids, true).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/models/tiny-idefics3/tokenizer.json"
        );
        Tokenizer::from_file(path).unwrap()
    }

    #[test]
    fn deltas_concatenate_to_the_full_decode_and_never_split_characters() {
        let tok = tokenizer();
        // Multi-byte characters become several byte tokens in a 1,024-entry BPE.
        let text = "naïve café — 東京 🚀 ok";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert!(ids.len() > text.chars().count() / 2);
        let mut detok = Detokenizer::default();
        let mut out = String::new();
        for &id in &ids {
            let delta = detok.push(&tok, id);
            assert!(!delta.contains('\u{FFFD}'), "delta {delta:?} split a character");
            out.push_str(&delta);
        }
        out.push_str(&detok.flush(&tok));
        assert_eq!(out, tok.decode(&ids, true).unwrap());
        assert_eq!(out, text);
    }

    #[test]
    fn special_tokens_add_no_text() {
        let tok = tokenizer();
        let eou = tok.token_to_id("<end_of_utterance>").unwrap();
        let mut detok = Detokenizer::default();
        assert_eq!(detok.push(&tok, eou), "");
    }
}
