//! Which tokens of which sequences go into the next step. Pure state, no threads: the
//! engine (and its tests) call `plan_step` directly.

/// What the planner needs to know of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceState {
    pub prompt_len: usize,
    /// Prompt tokens already in the KV cache.
    pub prefilled: usize,
    pub finished: bool,
}

/// One sequence's share of a step: prompt tokens `start..start + len`, or one decode token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub index: usize,
    pub start: usize,
    pub len: usize,
    pub decode: bool,
}

/// Every sequence whose prompt is in the cache decodes one token; what is left of
/// `token_budget` goes to unfinished prompts in arrival order, the last one cut to fit.
/// Decodes come first so that running streams never wait behind a long prompt.
pub fn plan_step(seqs: &[SequenceState], token_budget: usize) -> Vec<Chunk> {
    let mut plan: Vec<Chunk> = seqs
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.finished && s.prefilled == s.prompt_len)
        .map(|(index, s)| Chunk {
            index,
            start: s.prefilled,
            len: 1,
            decode: true,
        })
        .collect();
    let mut budget = token_budget.saturating_sub(plan.len());
    for (index, s) in seqs.iter().enumerate() {
        if budget == 0 {
            break;
        }
        if s.finished || s.prefilled == s.prompt_len {
            continue;
        }
        let len = (s.prompt_len - s.prefilled).min(budget);
        plan.push(Chunk {
            index,
            start: s.prefilled,
            len,
            decode: false,
        });
        budget -= len;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefilling(prompt_len: usize, prefilled: usize) -> SequenceState {
        SequenceState {
            prompt_len,
            prefilled,
            finished: false,
        }
    }

    #[test]
    fn a_long_prompt_is_chunked_to_the_budget() {
        let plan = plan_step(&[prefilling(100, 0)], 32);
        assert_eq!(
            plan,
            vec![Chunk {
                index: 0,
                start: 0,
                len: 32,
                decode: false
            }]
        );
        let plan = plan_step(&[prefilling(100, 96)], 32);
        assert_eq!(
            plan,
            vec![Chunk {
                index: 0,
                start: 96,
                len: 4,
                decode: false
            }]
        );
    }

    #[test]
    fn decodes_go_first_and_prefill_takes_what_is_left() {
        let seqs = [
            prefilling(10, 10),
            prefilling(50, 0),
            prefilling(5, 5),
            prefilling(8, 0),
        ];
        let plan = plan_step(&seqs, 20);
        assert_eq!(
            plan,
            vec![
                Chunk {
                    index: 0,
                    start: 10,
                    len: 1,
                    decode: true
                },
                Chunk {
                    index: 2,
                    start: 5,
                    len: 1,
                    decode: true
                },
                Chunk {
                    index: 1,
                    start: 0,
                    len: 18,
                    decode: false
                },
            ]
        );
    }

    #[test]
    fn finished_sequences_take_no_tokens() {
        let seqs = [
            SequenceState {
                prompt_len: 4,
                prefilled: 4,
                finished: true,
            },
            prefilling(3, 0),
        ];
        assert_eq!(
            plan_step(&seqs, 8),
            vec![Chunk {
                index: 1,
                start: 0,
                len: 3,
                decode: false
            }]
        );
        assert!(plan_step(&seqs[..1], 8).is_empty());
    }
}
