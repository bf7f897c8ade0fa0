//! KV storage of the text decoder. The engine owns it and lends one sequence's cache to
//! the model for each step; the model never keeps state between calls. Capacity is counted
//! in fixed-size blocks of tokens, so a memory budget translates into a block count.

use candle_core::{DType, Device, Result, Tensor};

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

    pub fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(BLOCK_TOKENS)
    }
}

/// One sequence's keys and values, layer by layer, stored token-major
/// (`[capacity, kv_heads, head_dim]`) so that appending a chunk is one contiguous copy.
#[derive(Debug)]
pub struct SequenceKv {
    spec: KvSpec,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl SequenceKv {
    /// A cache with room for `tokens` (rounded up to whole blocks).
    pub fn new(spec: &KvSpec, tokens: usize) -> Result<Self> {
        let capacity = KvSpec::blocks_for(tokens.max(1)) * BLOCK_TOKENS;
        let alloc = || Tensor::zeros((capacity, spec.num_kv_heads, spec.head_dim), spec.dtype, &spec.device);
        let keys = (0..spec.num_layers).map(|_| alloc()).collect::<Result<_>>()?;
        let values = (0..spec.num_layers).map(|_| alloc()).collect::<Result<_>>()?;
        Ok(Self {
            spec: spec.clone(),
            keys,
            values,
            len: 0,
            capacity,
        })
    }

    /// Tokens whose keys and values are stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks this sequence holds (its capacity, not its length).
    pub fn blocks(&self) -> usize {
        self.capacity / BLOCK_TOKENS
    }

    /// Makes room for `additional` tokens past `len`, growing to whole blocks. Growing
    /// copies the stored tokens: callers that know the final length reserve it up front.
    pub fn reserve(&mut self, additional: usize) -> Result<()> {
        let needed = self.len + additional;
        if needed <= self.capacity {
            return Ok(());
        }
        let capacity = KvSpec::blocks_for(needed.max(2 * self.capacity)) * BLOCK_TOKENS;
        let spec = &self.spec;
        for buffer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let grown = Tensor::zeros((capacity, spec.num_kv_heads, spec.head_dim), spec.dtype, &spec.device)?;
            if self.len > 0 {
                grown.slice_set(&buffer.narrow(0, 0, self.len)?.contiguous()?, 0, 0)?;
            }
            *buffer = grown;
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Writes a chunk's keys and values (`[n, kv_heads, head_dim]`) for one layer after the
    /// stored tokens and returns that layer's keys and values including the chunk
    /// (`[len + n, kv_heads, head_dim]` views). `commit` makes the chunk part of `len`.
    pub fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(0)?;
        if self.len + n > self.capacity {
            candle_core::bail!(
                "kv write of {n} tokens past capacity {} (len {}). This is a bug.",
                self.capacity,
                self.len
            )
        }
        self.keys[layer].slice_set(&k.contiguous()?, 0, self.len)?;
        self.values[layer].slice_set(&v.contiguous()?, 0, self.len)?;
        Ok((
            self.keys[layer].narrow(0, 0, self.len + n)?,
            self.values[layer].narrow(0, 0, self.len + n)?,
        ))
    }

    /// Forgets the tokens past `len` (their storage is kept and will be overwritten).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Counts the last written chunk of `n` tokens as stored.
    pub fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.capacity);
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

    #[test]
    fn capacity_is_whole_blocks_and_growth_keeps_contents() -> Result<()> {
        let mut kv = SequenceKv::new(&spec(), 5)?;
        assert_eq!(kv.blocks(), 1);
        let chunk = Tensor::arange(0f32, 3.0 * 8.0, &Device::Cpu)?.reshape((3, 2, 4))?;
        kv.reserve(3)?;
        for layer in 0..2 {
            kv.write(layer, &chunk, &chunk)?;
        }
        kv.commit(3);
        kv.reserve(BLOCK_TOKENS)?;
        assert_eq!(kv.blocks(), 2);
        let more = Tensor::ones((BLOCK_TOKENS, 2, 4), DType::F32, &Device::Cpu)?;
        let (k, _) = kv.write(0, &more, &more)?;
        assert_eq!(k.dims(), &[3 + BLOCK_TOKENS, 2, 4]);
        assert_eq!(
            k.narrow(0, 0, 3)?.flatten_all()?.to_vec1::<f32>()?,
            chunk.flatten_all()?.to_vec1::<f32>()?
        );
        assert_eq!(k.narrow(0, 3, 1)?.flatten_all()?.to_vec1::<f32>()?, vec![1.0; 8]);
        Ok(())
    }

    #[test]
    fn bytes_per_token_counts_keys_and_values_of_every_layer() {
        assert_eq!(spec().bytes_per_token(), 2 * 2 * 2 * 4 * 4);
    }
}
