//! Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, and a
//! seeded random generator per request, so that a seed reproduces a completion. The order
//! is transformers' (penalties, temperature, top-k, top-p, min-p); temperature 0 is greedy.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// 1 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 0 disables min-p.
    pub min_p: f32,
    /// CTRL-style penalty over prompt and output tokens; 1 disables it.
    pub repetition_penalty: f32,
    /// OpenAI's penalties over output tokens; 0 disables them.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// Added to these tokens' logits first (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Scratch: output-token counts for the OpenAI penalties.
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    /// `fallback_seed` seeds requests that gave none, so that each differs.
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed.unwrap_or(fallback_seed));
        Self {
            params,
            rng,
            counts: Default::default(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks a token. `banned` tokens (an end-of-sequence before `min_tokens`) are never
    /// chosen; `prompt` and `output` feed the penalties.
    pub fn sample(&mut self, logits: &[f32], prompt: &[u32], output: &[u32], banned: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        for &(id, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        for &id in banned {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        self.apply_penalties(&mut logits, prompt, output);
        if self.params.is_greedy() {
            return argmax(&logits);
        }
        let mut candidates = self.filtered_probabilities(&logits);
        let total: f64 = candidates.iter().map(|&(_, p)| p).sum();
        let target = self.rng.random::<f64>() * total;
        walk(&mut candidates, target).unwrap_or_else(|| argmax(&logits))
    }

    fn apply_penalties(&mut self, logits: &mut [f32], prompt: &[u32], output: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &id in prompt.iter().chain(output) {
                let Some(slot) = seen.get_mut(id as usize) else {
                    continue;
                };
                if !*slot {
                    *slot = true;
                    let l = &mut logits[id as usize];
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            self.counts.clear();
            for &id in output {
                *self.counts.entry(id).or_default() += 1;
            }
            for (&id, &count) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
                }
            }
        }
    }

    /// Probabilities (unnormalised is fine) of the tokens that survive temperature, top-k,
    /// top-p and min-p, in no particular order. Sorting the whole vocabulary for every
    /// sequence and step cost ~2.5 ms each (49k tokens): as much as a decode step at
    /// OpenAI's default temperature of 1, so only what top-p needs is sorted.
    fn filtered_probabilities(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let p = &self.params;
        let t = p.temperature as f64;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
            .collect();
        if p.top_k > 0 && p.top_k < probs.len() {
            probs.select_nth_unstable_by(p.top_k - 1, likelier);
            probs.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            let total: f64 = probs.iter().map(|&(_, q)| q).sum();
            let keep = nucleus(&mut probs, total * p.top_p as f64);
            probs.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let best = probs.iter().map(|&(_, q)| q).fold(0.0, f64::max);
            let threshold = best * p.min_p as f64;
            probs.retain(|&(_, q)| q >= threshold);
        }
        probs
    }
}

/// The log-probability of the chosen token and of the `top` most likely ones, under the
/// model's own distribution (raw logits, before penalties and temperature, as vLLM
/// reports them).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Descending probability, ties to the lower id: the order the sampling walk follows.
fn likelier(a: &(u32, f64), b: &(u32, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The candidate at which `target` runs out, walking them from the likeliest down: what
/// sorting them and walking picks. The last one when `target` outlasts them all (rounding),
/// as a sorted walk would; None when there are none.
fn walk(candidates: &mut [(u32, f64)], target: f64) -> Option<u32> {
    let spent = likeliest_spending(candidates, target, |left| left < 0.0);
    spent.checked_sub(1).map(|last| candidates[last].0)
}

/// Rearranges `candidates` so that the fewest likeliest whose probabilities reach `mass`
/// come first, and returns how many they are (top-p's nucleus).
fn nucleus(candidates: &mut [(u32, f64)], mass: f64) -> usize {
    likeliest_spending(candidates, mass, |left| left <= 0.0)
}

/// Spends `budget` on the candidates from the likeliest down until `spent(what is left)`;
/// rearranges them so that those come first, the last of them being where it ran out, and
/// returns how many (all when the budget outlasts them). Found by partitioning around the
/// median (linear time on average) rather than by sorting every candidate.
fn likeliest_spending(candidates: &mut [(u32, f64)], mut budget: f64, spent: impl Fn(f64) -> bool) -> usize {
    const SORT_BELOW: usize = 64;
    let (mut lo, mut hi) = (0, candidates.len());
    loop {
        let part = &mut candidates[lo..hi];
        if part.len() <= SORT_BELOW {
            part.sort_unstable_by(likelier);
            for (i, &(_, p)) in part.iter().enumerate() {
                budget -= p;
                if spent(budget) {
                    return lo + i + 1;
                }
            }
            return hi;
        }
        let middle = part.len() / 2;
        let (likelier_half, &mut (_, p), _) = part.select_nth_unstable_by(middle, likelier);
        let half_mass: f64 = likelier_half.iter().map(|&(_, q)| q).sum();
        if spent(budget - half_mass) {
            hi = lo + middle;
            continue;
        }
        budget -= half_mass + p;
        if spent(budget) {
            return lo + middle + 1;
        }
        lo += middle + 1;
    }
}

pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let log_sum = crate::model::ops::kernels::log_sum_exp(logits);
    let logprob = |id: u32| logits[id as usize] - log_sum;
    let top = top.min(logits.len());
    let mut order: Vec<u32> = Vec::new();
    if top > 0 {
        order = (0..logits.len() as u32).collect();
        order.select_nth_unstable_by(top - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        order.truncate(top);
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    }
    TokenLogprobs {
        token,
        logprob: logprob(token),
        // Tokens a grammar forbids (at minus infinity) are no alternatives.
        top: (order.into_iter().take(top))
            .map(|id| (id, logprob(id)))
            .filter(|(_, l)| l.is_finite())
            .collect(),
    }
}

/// The first index of the largest value, as torch.argmax picks it.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params, 7)
    }

    #[test]
    fn logprobs_are_a_normalised_log_softmax_with_the_top_tokens_first() {
        let lp = logprobs(&[1.0, 3.0, 2.0, 0.0], 2, 2);
        let total: f32 = [1.0f32, 3.0, 2.0, 0.0].iter().map(|l| l.exp()).sum();
        assert!((lp.logprob - (2.0f32.exp() / total).ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|&(id, _)| id).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.top[1].1 - lp.logprob).abs() < 1e-7);
        assert!(logprobs(&[1.0, 2.0], 0, 0).top.is_empty());
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[], &[], &[]), 1);
    }

    #[test]
    fn banned_tokens_are_never_chosen() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[], &[], &[1]), 2);
    }

    #[test]
    fn logit_bias_is_added_before_choosing() {
        let biased = |bias| {
            let params = SamplingParams {
                logit_bias: bias,
                ..Default::default()
            };
            sampler(params).sample(&[0.1, 3.0, 2.0], &[], &[], &[])
        };
        assert_eq!(biased(vec![]), 1);
        assert_eq!(biased(vec![(0, 5.0)]), 0);
        assert_eq!(biased(vec![(1, -100.0)]), 2);
        assert_eq!(biased(vec![(7, 100.0)]), 1, "ids past the logits are ignored");
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = sampler(params);
        let mut logits = vec![4.0, -1.0, 3.0];
        s.apply_penalties(&mut logits, &[0], &[1, 1]);
        assert_eq!(logits, vec![2.0, -2.0, 3.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_output_tokens_only() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 1.0,
            ..Default::default()
        };
        let mut s = sampler(params);
        let mut logits = vec![4.0, 4.0, 4.0];
        s.apply_penalties(&mut logits, &[2, 2], &[0, 0, 1]);
        assert_eq!(logits, vec![4.0 - 2.0 - 0.5, 4.0 - 1.0 - 0.5, 4.0]);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let params = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        };
        let mut s = sampler(params);
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.5], &[], &[], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let s = sampler(params);
        // probabilities ~ 0.665, 0.245, 0.09: 0.665 alone reaches 0.5
        let kept = s.filtered_probabilities(&[2.0, 1.0, 0.0]);
        assert_eq!(kept.iter().map(|&(i, _)| i).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn min_p_drops_tokens_far_below_the_best() {
        let params = SamplingParams {
            temperature: 1.0,
            min_p: 0.2,
            ..Default::default()
        };
        let s = sampler(params);
        // relative probabilities 1, e^-1 = 0.37, e^-3 = 0.05
        let mut kept = s.filtered_probabilities(&[3.0, 2.0, 0.0]);
        kept.sort_unstable_by(likelier);
        assert_eq!(kept.iter().map(|&(i, _)| i).collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn the_partitioned_walk_picks_what_the_sorted_walk_picks() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for n in [1usize, 3, 64, 65, 1000, 49_152] {
            // Ties included: every value appears about four times.
            let candidates: Vec<(u32, f64)> = (0..n as u32)
                .map(|id| (id, (rng.random::<u32>() % (n as u32 / 4 + 1)) as f64 + 0.5))
                .collect();
            let total: f64 = candidates.iter().map(|&(_, p)| p).sum();
            let mut sorted = candidates.clone();
            sorted.sort_unstable_by(likelier);
            for k in 0..200 {
                let target = total * (k as f64 + 0.37) / 200.0;
                let mut left = target;
                let expected = sorted.iter().find(|&&(_, p)| {
                    left -= p;
                    left < 0.0
                });
                let mut shuffled = candidates.clone();
                assert_eq!(
                    walk(&mut shuffled, target),
                    expected.map(|&(id, _)| id),
                    "n {n}, target {target}"
                );
            }
        }
        assert_eq!(walk(&mut [], 0.5), None);
    }

    #[test]
    fn the_nucleus_is_the_fewest_likeliest_reaching_the_mass() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for n in [1usize, 5, 64, 200, 49_152] {
            let candidates: Vec<(u32, f64)> = (0..n as u32)
                .map(|id| (id, (rng.random::<u32>() % (n as u32 / 4 + 1)) as f64 + 0.5))
                .collect();
            let total: f64 = candidates.iter().map(|&(_, p)| p).sum();
            let mut sorted = candidates.clone();
            sorted.sort_unstable_by(likelier);
            for top_p in [0.01, 0.3, 0.9, 0.999] {
                let mut cumulative = 0.0;
                let expected = sorted
                    .iter()
                    .position(|&(_, p)| {
                        cumulative += p;
                        cumulative >= total * top_p
                    })
                    .map_or(n, |i| i + 1);
                let mut got = candidates.clone();
                let keep = nucleus(&mut got, total * top_p);
                assert_eq!(keep, expected, "n {n}, top_p {top_p}");
                let mut kept: Vec<u32> = got[..keep].iter().map(|&(id, _)| id).collect();
                kept.sort_unstable();
                let mut want: Vec<u32> = sorted[..keep].iter().map(|&(id, _)| id).collect();
                want.sort_unstable();
                assert_eq!(kept, want, "n {n}, top_p {top_p}");
            }
        }
    }

    #[test]
    fn a_seed_reproduces_the_samples_and_samples_follow_the_distribution() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        };
        let logits = [0.0, (3.0f32).ln()]; // p = 0.25, 0.75
        let draw = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone(), 0);
            (0..2000).map(|_| s.sample(&logits, &[], &[], &[])).collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.04, "{ones}");
        let other = draw(&SamplingParams {
            seed: Some(43),
            ..params
        });
        assert_ne!(a, other);
    }
}
