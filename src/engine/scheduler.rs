//! Which tokens of which sequences go into the next step, who joins, and who is preempted.
//! Pure state in, plan out: the engine applies the plan, and the tests call `plan_step`
//! directly.
//!
//! Every running sequence has pending tokens (its prompt, or after a decode the token it
//! just sampled, or everything again after a preemption): a decode is simply one pending
//! token. Decodes go first so running streams never wait behind a long prompt; prompt
//! chunks take what is left of the token budget, oldest first; waiting requests join in
//! arrival order (never overtaking one another) while sequences, budget and KV blocks
//! allow. When a decode needs a block and none is free, the youngest running sequence is
//! preempted: its blocks are freed and it is recomputed later.

use crate::kv::blocks_for;

/// A running sequence as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// Tokens not yet in the KV cache (1 for a decode).
    pub pending: usize,
    /// Tokens in the KV cache.
    pub kv_len: usize,
    /// Blocks held.
    pub blocks: usize,
}

/// A waiting request: its tokens past a cached prefix are pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    pub pending: usize,
    /// Blocks of its cached prefix that nobody holds: counted free now, taken on admission.
    pub reclaims: usize,
}

impl Waiting {
    pub fn new(pending: usize) -> Self {
        Self { pending, reclaims: 0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_num_seqs: usize,
    /// Most tokens in one step (decodes plus prompt chunks).
    pub token_budget: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Index into the running list.
    Running(usize),
    /// Index into the waiting list (the first `admit` of them join).
    Admitted(usize),
}

/// One sequence's share of a step: its next `len` pending tokens, `blocks` more blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub who: Who,
    pub len: usize,
    pub blocks: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Running indices to preempt, youngest first.
    pub preempt: Vec<usize>,
    /// How many waiting requests join, from the front.
    pub admit: usize,
    pub chunks: Vec<Chunk>,
}

impl Plan {
    pub fn tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.len).sum()
    }
}

pub fn plan_step(running: &[Running], waiting: &[Waiting], free_blocks: usize, limits: Limits) -> Plan {
    let mut plan = Plan::default();
    let mut free = free_blocks;
    let mut budget = limits.token_budget;
    let mut alive = vec![true; running.len()];

    for (i, seq) in running.iter().enumerate() {
        if seq.pending != 1 || !alive[i] {
            continue;
        }
        let need = blocks_for(seq.kv_len + 1).saturating_sub(seq.blocks);
        while need > free {
            let victim = alive
                .iter()
                .rposition(|&a| a)
                .expect("sequence i itself is alive. This is a bug.");
            alive[victim] = false;
            free += running[victim].blocks;
            plan.preempt.push(victim);
            if victim == i {
                break;
            }
        }
        if alive[i] {
            free -= need;
            budget = budget.saturating_sub(1);
            plan.chunks.push(Chunk {
                who: Who::Running(i),
                len: 1,
                blocks: need,
            });
        }
    }

    for (i, seq) in running.iter().enumerate() {
        if seq.pending <= 1 || !alive[i] || budget == 0 {
            continue;
        }
        let fits = (seq.blocks + free) * crate::kv::BLOCK_TOKENS - seq.kv_len;
        let len = seq.pending.min(budget).min(fits);
        if len == 0 {
            continue;
        }
        let need = blocks_for(seq.kv_len + len).saturating_sub(seq.blocks);
        free -= need;
        budget -= len;
        plan.chunks.push(Chunk {
            who: Who::Running(i),
            len,
            blocks: need,
        });
    }

    if plan.preempt.is_empty() {
        let running = alive.iter().filter(|&&a| a).count();
        for (j, seq) in waiting.iter().enumerate() {
            // Admit only what can finish its prompt without evicting anyone.
            // A cached prefix is whole blocks: the rest starts on a fresh block.
            let whole = blocks_for(seq.pending) + seq.reclaims;
            if running + plan.admit >= limits.max_num_seqs || budget == 0 || whole > free {
                break;
            }
            let len = seq.pending.min(budget);
            let need = blocks_for(len) + seq.reclaims;
            free -= need;
            budget -= len;
            plan.admit += 1;
            plan.chunks.push(Chunk {
                who: Who::Admitted(j),
                len,
                blocks: need,
            });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_num_seqs: 4,
        token_budget: 32,
    };

    fn decoding(kv_len: usize) -> Running {
        Running {
            pending: 1,
            kv_len,
            blocks: blocks_for(kv_len + 1),
        }
    }

    #[test]
    fn a_long_prompt_is_chunked_to_the_budget_and_continues_next_step() {
        let plan = plan_step(&[], &[Waiting::new(100)], 100, LIMITS);
        assert_eq!(plan.admit, 1);
        assert_eq!(
            plan.chunks,
            vec![Chunk {
                who: Who::Admitted(0),
                len: 32,
                blocks: 2
            }]
        );
        let running = [Running {
            pending: 68,
            kv_len: 32,
            blocks: 2,
        }];
        let plan = plan_step(&running, &[], 100, LIMITS);
        assert_eq!(
            plan.chunks,
            vec![Chunk {
                who: Who::Running(0),
                len: 32,
                blocks: 2
            }]
        );
    }

    #[test]
    fn decodes_go_first_and_prompts_share_what_is_left() {
        let running = [
            decoding(40),
            Running {
                pending: 50,
                kv_len: 0,
                blocks: 0,
            },
            decoding(7),
        ];
        let plan = plan_step(&running, &[Waiting::new(5)], 100, LIMITS);
        assert_eq!(
            plan.chunks,
            vec![
                Chunk {
                    who: Who::Running(0),
                    len: 1,
                    blocks: 0
                },
                Chunk {
                    who: Who::Running(2),
                    len: 1,
                    blocks: 0
                },
                Chunk {
                    who: Who::Running(1),
                    len: 30,
                    blocks: 2
                },
            ]
        );
        assert_eq!(plan.admit, 0, "no budget left for the waiting request");
    }

    #[test]
    fn admission_is_in_order_and_bounded_by_sequences_and_blocks() {
        let waiting = [Waiting::new(3), Waiting::new(40), Waiting::new(2)];
        // 3 free blocks: the 40-token prompt needs 3 after the first's 1 -> it waits, and
        // the small one behind it does not overtake it.
        let plan = plan_step(&[], &waiting, 3, LIMITS);
        assert_eq!(plan.admit, 1);
        let many = [decoding(3), decoding(3), decoding(3), decoding(3)];
        let plan = plan_step(&many, &waiting, 100, LIMITS);
        assert_eq!(plan.admit, 0, "max_num_seqs reached");
    }

    #[test]
    fn a_cached_prefix_nobody_holds_counts_against_free_blocks() {
        // 20 tokens left after a cached prefix of 2 unheld blocks: 2 blocks + the 2 reclaimed.
        let prefixed = Waiting {
            pending: 20,
            reclaims: 2,
        };
        assert_eq!(plan_step(&[], &[prefixed], 3, LIMITS).admit, 0);
        let plan = plan_step(&[], &[prefixed, Waiting::new(17)], 5, LIMITS);
        assert_eq!(plan.admit, 1, "the second needs a block the first took");
        assert_eq!(plan.chunks[0].blocks, 4);
    }

    #[test]
    fn a_decode_that_needs_a_block_preempts_the_youngest() {
        // Both sequences fill their blocks exactly; no block is free.
        let running = [
            Running {
                pending: 1,
                kv_len: 16,
                blocks: 1,
            },
            Running {
                pending: 1,
                kv_len: 32,
                blocks: 2,
            },
        ];
        let plan = plan_step(&running, &[Waiting::new(1)], 0, LIMITS);
        assert_eq!(plan.preempt, vec![1]);
        assert_eq!(
            plan.chunks,
            vec![Chunk {
                who: Who::Running(0),
                len: 1,
                blocks: 1
            }]
        );
        assert_eq!(plan.admit, 0, "no admission in a step that preempts");
    }

    #[test]
    fn a_lone_sequence_without_room_preempts_itself() {
        let running = [Running {
            pending: 1,
            kv_len: 16,
            blocks: 1,
        }];
        let plan = plan_step(&running, &[], 0, LIMITS);
        assert_eq!(plan.preempt, vec![0]);
        assert!(plan.chunks.is_empty());
    }

    #[test]
    fn a_prompt_chunk_is_cut_to_the_free_blocks() {
        let running = [Running {
            pending: 100,
            kv_len: 10,
            blocks: 1,
        }];
        let plan = plan_step(&running, &[], 1, LIMITS);
        assert_eq!(
            plan.chunks,
            vec![Chunk {
                who: Who::Running(0),
                len: 22,
                blocks: 1
            }]
        );
    }
}
