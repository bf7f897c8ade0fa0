//! KV storage of the text decoder: one pool of fixed-size blocks per layer, allocated once
//! from the configured memory budget and owned by the engine. A sequence holds a list of
//! blocks (its block table); the model writes a step's keys and values into them and
//! gathers them back for attention. Memory never grows past the budget: when blocks run
//! out the scheduler waits or preempts.
//!
//! Prefix caching: a full block of a prompt is registered under its content hash
//! (`prefix::block_hashes`) once written. A later prompt that starts with the same blocks
//! takes them (a block may have many holders) and prefills only the rest. A block nobody
//! holds keeps its contents while it waits, least recently released first, to be taken over
//! when the free list runs out.

mod prefix;

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use lru::LruCache;

pub use prefix::{BlockHash, ImageSlots, block_hashes};

/// Tokens per block: the unit of KV accounting.
pub const BLOCK_TOKENS: usize = 16;

/// The shape of a model's KV cache.
#[derive(Debug, Clone)]
pub struct KvSpec {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub device: Device,
}

impl KvSpec {
    /// Keys and values of all layers for one token.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }

    pub fn bytes_per_block(&self) -> usize {
        self.bytes_per_token() * BLOCK_TOKENS
    }

    /// Whole blocks that fit in `bytes`.
    pub fn blocks_in(&self, bytes: usize) -> usize {
        bytes / self.bytes_per_block()
    }
}

/// Blocks that hold `tokens` tokens.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_TOKENS)
}

/// One sequence's share of the pool: its blocks, in order, and how many tokens they hold.
#[derive(Debug, Default)]
pub struct SequenceKv {
    blocks: Vec<u32>,
    len: usize,
    /// The blocks as a tensor, for gathering; rebuilt when blocks change.
    block_ids: Option<Tensor>,
}

impl SequenceKv {
    /// Tokens whose keys and values are stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Its blocks, in order.
    pub fn block_table(&self) -> &[u32] {
        &self.blocks
    }

    /// Tokens the held blocks can store.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * BLOCK_TOKENS
    }

    /// More blocks needed to store `additional` tokens past `len`.
    pub fn blocks_needed(&self, additional: usize) -> usize {
        blocks_for(self.len + additional).saturating_sub(self.blocks.len())
    }

    /// Counts `n` tokens written by the last forward pass as stored.
    pub fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.capacity());
    }

    /// Forgets the tokens past `len`; their blocks stay held.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn block_ids(&mut self, device: &Device) -> Result<Tensor> {
        if self
            .block_ids
            .as_ref()
            .is_none_or(|t| t.dim(0).ok() != Some(self.blocks.len()))
        {
            self.block_ids = Some(Tensor::new(self.blocks.as_slice(), device)?);
        }
        Ok(self.block_ids.clone().expect("set just above. This is a bug."))
    }
}

/// Keys and values of every layer, `[blocks * BLOCK_TOKENS, kv_heads, head_dim]` each.
pub struct KvPool {
    spec: KvSpec,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// Blocks with no holder and no cached contents.
    free: Vec<u32>,
    num_blocks: usize,
    /// Holders of each block.
    refs: Vec<u32>,
    /// The content hash a block is registered under.
    hashes: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, u32>,
    /// Registered blocks with no holder, least recently released first.
    evictable: LruCache<u32, ()>,
}

impl KvPool {
    /// A pool of `num_blocks` blocks. The memory is reserved now; the OS backs it as it is
    /// written.
    pub fn new(spec: &KvSpec, num_blocks: usize) -> Result<Self> {
        let rows = num_blocks * BLOCK_TOKENS;
        let alloc = || Tensor::zeros((rows, spec.num_kv_heads, spec.head_dim), spec.dtype, &spec.device);
        let keys = (0..spec.num_layers).map(|_| alloc()).collect::<Result<_>>()?;
        let values = (0..spec.num_layers).map(|_| alloc()).collect::<Result<_>>()?;
        // Hand out low block numbers first: easier to read in logs and tests.
        let free = (0..num_blocks as u32).rev().collect();
        Ok(Self {
            spec: spec.clone(),
            keys,
            values,
            free,
            num_blocks,
            refs: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            cached: HashMap::new(),
            evictable: LruCache::unbounded(),
        })
    }

    /// As many blocks as fit in `bytes`.
    pub fn with_memory(spec: &KvSpec, bytes: usize) -> Result<Self> {
        Self::new(spec, spec.blocks_in(bytes))
    }

    pub fn spec(&self) -> &KvSpec {
        &self.spec
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks a sequence can take: free ones and cached ones nobody holds.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks nobody holds whose contents are kept for prefix hits.
    pub fn cached_blocks(&self) -> usize {
        self.evictable.len()
    }

    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free_blocks()
    }

    /// Tokens the whole pool can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * BLOCK_TOKENS
    }

    /// Gives `seq` room for `additional` more tokens; false (and nothing taken) if the pool
    /// has too few free blocks.
    pub fn grow(&mut self, seq: &mut SequenceKv, additional: usize) -> bool {
        let needed = seq.blocks_needed(additional);
        if needed > self.free_blocks() {
            return false;
        }
        for _ in 0..needed {
            let block = match self.free.pop() {
                Some(block) => block,
                None => self.evict(),
            };
            self.refs[block as usize] = 1;
            seq.blocks.push(block);
        }
        true
    }

    /// Takes back the least recently released cached block.
    fn evict(&mut self) -> u32 {
        let (block, ()) = self
            .evictable
            .pop_lru()
            .expect("grow counted the evictable blocks. This is a bug.");
        if let Some(hash) = self.hashes[block as usize].take() {
            self.cached.remove(&hash);
        }
        block
    }

    /// Returns all of `seq`'s blocks to the pool and empties it. Registered blocks keep
    /// their contents; the last ones go first to be evicted, so that shared prefixes last.
    pub fn release(&mut self, seq: &mut SequenceKv) {
        for block in seq.blocks.drain(..).rev() {
            let refs = &mut self.refs[block as usize];
            *refs -= 1;
            if *refs > 0 {
                continue;
            }
            if self.hashes[block as usize].is_some() {
                self.evictable.put(block, ());
            } else {
                self.free.push(block);
            }
        }
        seq.len = 0;
        seq.block_ids = None;
    }

    /// How many of the blocks `hashes` begin with are cached, and how many of those nobody
    /// holds (sharing them takes them off the free count).
    pub fn peek_prefix(&self, hashes: &[BlockHash]) -> (usize, usize) {
        let mut found = 0;
        let mut unheld = 0;
        for hash in hashes {
            let Some(&block) = self.cached.get(hash) else {
                break;
            };
            found += 1;
            unheld += usize::from(self.refs[block as usize] == 0);
        }
        (found, unheld)
    }

    /// Gives an empty `seq` the cached blocks that begin with `hashes` (a prompt's full
    /// blocks, as many as may be reused) and counts their tokens as stored. Returns the
    /// number of tokens reused.
    pub fn share_prefix(&mut self, seq: &mut SequenceKv, hashes: &[BlockHash]) -> usize {
        debug_assert!(seq.blocks.is_empty(), "prefixes are shared into empty sequences");
        for hash in hashes {
            let Some(&block) = self.cached.get(hash) else {
                break;
            };
            if self.refs[block as usize] == 0 {
                self.evictable.pop(&block);
            }
            self.refs[block as usize] += 1;
            seq.blocks.push(block);
        }
        seq.len = seq.blocks.len() * BLOCK_TOKENS;
        seq.block_ids = None;
        seq.len
    }

    /// Registers `seq`'s stored full blocks under `hashes` (its prompt's), for later
    /// prompts to share. A hash already registered to another block (two prompts computed
    /// the same prefix at once) keeps that block.
    pub fn register(&mut self, seq: &SequenceKv, hashes: &[BlockHash]) {
        let full = seq.len / BLOCK_TOKENS;
        for (&block, hash) in seq.blocks.iter().zip(hashes).take(full) {
            if self.hashes[block as usize].is_none() && !self.cached.contains_key(hash) {
                self.hashes[block as usize] = Some(*hash);
                self.cached.insert(*hash, block);
            }
        }
    }

    /// Writes a chunk's keys and values (`[n, kv_heads, head_dim]`, converted to the pool's
    /// dtype) for one layer at the sequence's positions `len..len + n`, which its blocks
    /// must already cover.
    pub fn write(&mut self, layer: usize, seq: &SequenceKv, k: &Tensor, v: &Tensor) -> Result<()> {
        let n = k.dim(0)?;
        if seq.len + n > seq.capacity() {
            candle_core::bail!(
                "kv write of {n} tokens past capacity {} (len {}). This is a bug.",
                seq.capacity(),
                seq.len
            )
        }
        let dtype = self.spec.dtype;
        let (k, v) = (k.to_dtype(dtype)?.contiguous()?, v.to_dtype(dtype)?.contiguous()?);
        let mut written = 0;
        while written < n {
            let position = seq.len + written;
            let slot = position % BLOCK_TOKENS;
            let run = (BLOCK_TOKENS - slot).min(n - written);
            let row = seq.blocks[position / BLOCK_TOKENS] as usize * BLOCK_TOKENS + slot;
            self.keys[layer].slice_set(&k.narrow(0, written, run)?, 0, row)?;
            self.values[layer].slice_set(&v.narrow(0, written, run)?, 0, row)?;
            written += run;
        }
        Ok(())
    }

    /// One layer's whole key and value pools, `[blocks * BLOCK_TOKENS, kv_heads, head_dim]`,
    /// for kernels that read a sequence's blocks in place.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }

    /// One layer's keys and values of the first `len` tokens of `seq`, gathered into
    /// `[len, kv_heads, head_dim]` tensors of the pool's dtype.
    pub fn gather(&self, layer: usize, seq: &mut SequenceKv, len: usize) -> Result<(Tensor, Tensor)> {
        let ids = seq.block_ids(&self.spec.device)?;
        let (h, d) = (self.spec.num_kv_heads, self.spec.head_dim);
        let gather = |pool: &Tensor| -> Result<Tensor> {
            pool.reshape((self.num_blocks, BLOCK_TOKENS * h * d))?
                .index_select(&ids, 0)?
                .reshape((ids.dim(0)? * BLOCK_TOKENS, h, d))?
                .narrow(0, 0, len)
        };
        Ok((gather(&self.keys[layer])?, gather(&self.values[layer])?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> KvSpec {
        KvSpec {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 4,
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }

    fn rows(n: usize, first: f32) -> Tensor {
        Tensor::arange(first, first + (n * 8) as f32, &Device::Cpu)
            .unwrap()
            .reshape((n, 2, 4))
            .unwrap()
    }

    #[test]
    fn blocks_are_taken_and_returned_whole() {
        let mut pool = KvPool::new(&spec(), 4).unwrap();
        let mut a = SequenceKv::default();
        assert!(pool.grow(&mut a, 17));
        assert_eq!((a.blocks(), pool.free_blocks()), (2, 2));
        let mut b = SequenceKv::default();
        assert!(!pool.grow(&mut b, 3 * BLOCK_TOKENS), "three blocks do not fit in two");
        assert_eq!((b.blocks(), pool.free_blocks()), (0, 2));
        pool.release(&mut a);
        assert_eq!((a.blocks(), pool.free_blocks(), pool.used_blocks()), (0, 4, 0));
    }

    #[test]
    fn writes_across_block_boundaries_gather_back_in_order() -> Result<()> {
        let mut pool = KvPool::new(&spec(), 8)?;
        // Interleave two sequences so that their blocks are not adjacent.
        let (mut a, mut b) = (SequenceKv::default(), SequenceKv::default());
        let chunk_a1 = rows(10, 0.0);
        let chunk_b = rows(20, 1000.0);
        let chunk_a2 = rows(13, 500.0);
        let mut append = |seq: &mut SequenceKv, chunk: &Tensor| -> Result<()> {
            let n = chunk.dim(0)?;
            assert!(pool.grow(seq, n));
            for layer in 0..2 {
                pool.write(layer, seq, chunk, &(chunk + 1.0)?)?;
            }
            seq.commit(n);
            Ok(())
        };
        append(&mut a, &chunk_a1)?;
        append(&mut b, &chunk_b)?;
        append(&mut a, &chunk_a2)?;
        let (k, v) = pool.gather(1, &mut a, 23)?;
        let expected = Tensor::cat(&[&chunk_a1, &chunk_a2], 0)?;
        assert_eq!(
            k.flatten_all()?.to_vec1::<f32>()?,
            expected.flatten_all()?.to_vec1::<f32>()?
        );
        assert_eq!(
            v.flatten_all()?.to_vec1::<f32>()?,
            (expected + 1.0)?.flatten_all()?.to_vec1::<f32>()?
        );
        let (k, _) = pool.gather(0, &mut b, 20)?;
        assert_eq!(
            k.flatten_all()?.to_vec1::<f32>()?,
            chunk_b.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn a_registered_prefix_is_shared_then_kept_until_its_blocks_are_needed() -> Result<()> {
        let mut pool = KvPool::new(&spec(), 4)?;
        let hashes = [[1u8; 32], [2u8; 32]];
        let mut a = SequenceKv::default();
        assert!(pool.grow(&mut a, 40));
        let chunk = rows(40, 0.0);
        for layer in 0..2 {
            pool.write(layer, &a, &chunk, &chunk)?;
        }
        a.commit(40);
        pool.register(&a, &hashes);
        pool.release(&mut a);
        // Its two full blocks keep their contents; the partial one is simply free.
        assert_eq!(
            (pool.free_blocks(), pool.cached_blocks(), pool.used_blocks()),
            (4, 2, 0)
        );

        let (mut b, mut c) = (SequenceKv::default(), SequenceKv::default());
        assert_eq!(pool.peek_prefix(&[hashes[0], [3u8; 32], hashes[1]]), (1, 1));
        assert_eq!(pool.share_prefix(&mut b, &[hashes[0], hashes[1], [3u8; 32]]), 32);
        assert_eq!(pool.peek_prefix(&hashes), (2, 0), "now held");
        assert_eq!(pool.share_prefix(&mut c, &hashes[..1]), 16);
        assert_eq!((pool.free_blocks(), pool.used_blocks()), (2, 2));
        let (k, _) = pool.gather(1, &mut b, 32)?;
        assert_eq!(
            k.flatten_all()?.to_vec1::<f32>()?,
            chunk.narrow(0, 0, 32)?.flatten_all()?.to_vec1::<f32>()?
        );
        // b grows past the shared blocks into a block of its own.
        assert!(pool.grow(&mut b, 1));
        pool.release(&mut b);
        assert_eq!(
            (pool.cached_blocks(), pool.used_blocks()),
            (1, 1),
            "c still holds the first block"
        );
        pool.release(&mut c);

        // A sequence that needs every block takes the cached ones over.
        let mut d = SequenceKv::default();
        assert!(pool.grow(&mut d, 4 * BLOCK_TOKENS));
        assert_eq!((pool.free_blocks(), pool.cached_blocks()), (0, 0));
        pool.release(&mut d);
        assert_eq!(pool.share_prefix(&mut SequenceKv::default(), &hashes), 0, "evicted");
        Ok(())
    }

    #[test]
    fn a_half_precision_pool_stores_what_it_is_given_rounded() -> Result<()> {
        let spec = KvSpec {
            dtype: DType::F16,
            ..spec()
        };
        let mut pool = KvPool::new(&spec, 2)?;
        let mut seq = SequenceKv::default();
        assert!(pool.grow(&mut seq, 3));
        let chunk = (rows(3, 0.0) / 3.0)?;
        pool.write(0, &seq, &chunk, &chunk)?;
        seq.commit(3);
        let (k, _) = pool.gather(0, &mut seq, 3)?;
        assert_eq!(k.dtype(), DType::F16);
        let expected = chunk.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
        assert_eq!(
            k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            expected.flatten_all()?.to_vec1::<f32>()?
        );
        assert_eq!(spec.bytes_per_token() * 2, self::spec().bytes_per_token());
        Ok(())
    }

    #[test]
    fn a_budget_in_bytes_becomes_whole_blocks() {
        let pool = KvPool::with_memory(&spec(), 3 * spec().bytes_per_block() + 5).unwrap();
        assert_eq!(pool.num_blocks(), 3);
        assert_eq!(spec().bytes_per_token(), 2 * 2 * 2 * 4 * 4);
    }
}
