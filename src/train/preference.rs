//! Preference data for `--method dpo`: one pair per row (a JSONL line, a Parquet row) in
//! TRL's preference columns, `{"prompt": [...messages...], "chosen": [...], "rejected":
//! [...]}`; each of the three may be a plain string instead (a user message, an assistant
//! message). Images sit in the prompt's messages as in SFT data, or in an `images` column
//! that the prompt's `{"type": "image"}` parts stand for (`columns`). Other columns (a hub
//! dataset's ids and sources) are not read. A pair becomes two conversations, prompt +
//! chosen and prompt + rejected, tokenized as the server would, their targets the
//! completion's tokens only (TRL's conversational DPO: from where the prompt with its
//! generation prompt ends).

use serde_json::Value;

use super::columns;
use super::data::{DataError, DataLimits, Example, conversation};
use super::dataset::{Dataset, Location, Row};
use crate::openai::ChatMessageIn;
use crate::processor::Processor;

/// A prompt with a preferred and a dispreferred completion.
pub struct Pair {
    /// Where it is in its file.
    pub at: Location,
    pub chosen: Example,
    pub rejected: Example,
    /// The reference model's log-probabilities of the two completions (chosen, rejected),
    /// computed once before training.
    pub reference: [f32; 2],
}

impl Pair {
    pub fn tokens(&self) -> usize {
        self.chosen.token_ids.len() + self.rejected.token_ids.len()
    }
}

/// Reads and tokenizes every pair of `dataset`.
pub fn load(dataset: &Dataset, processor: &Processor, limits: &DataLimits) -> Result<Vec<Pair>, DataError> {
    dataset.rows(|row| parse_row(row, processor, limits))
}

fn parse_row(row: Row, processor: &Processor, limits: &DataLimits) -> Result<Pair, String> {
    let mut row_columns = row.columns;
    let prompt = columns::with_images(&mut row_columns, "prompt")?;
    let side = |field: &str| -> Result<Example, String> {
        let completion = columns::turns(&row_columns, field, "assistant")?;
        if let Some(i) = completion.iter().position(|m| m["role"] != "assistant") {
            return Err(format!("`{field}[{i}]`: a completion holds assistant messages only"));
        }
        let messages: Vec<Value> = prompt.iter().chain(&completion).cloned().collect();
        let messages: Vec<ChatMessageIn> =
            serde_json::from_value(Value::Array(messages)).map_err(|e| format!("`{field}`: {e}"))?;
        conversation(&messages, prompt.len(), row.at, row.folder, processor, limits)
            .map_err(|e| format!("`{field}`: {e}"))
    };
    Ok(Pair {
        at: row.at,
        chosen: side("chosen")?,
        rejected: side("rejected")?,
        reference: [0.0; 2],
    })
}
