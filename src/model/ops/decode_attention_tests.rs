//! Tests of `decode_attention`, beside it to keep each file short.

use super::*;
use crate::model::ops::few_rows::tests::max_difference;

/// Blocks gathered in table order, grouped query heads as matmuls, candle's softmax.
fn reference(q: &Tensor, keys: &Tensor, values: &Tensor, tables: &[(&[u32], usize)], scale: f32) -> Result<Tensor> {
    let (_, heads, hd) = q.dims3()?;
    let kv_heads = keys.dim(1)?;
    let rows: Vec<Tensor> = (tables.iter().enumerate())
        .map(|(i, (blocks, len))| {
            let gather = |pool: &Tensor| -> Result<Tensor> {
                let parts: Vec<Tensor> = (blocks.iter())
                    .map(|&b| pool.narrow(0, b as usize * BLOCK_TOKENS, BLOCK_TOKENS))
                    .collect::<Result<_>>()?;
                Tensor::cat(&parts, 0)?
                    .narrow(0, 0, *len)?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let (k, v) = (gather(keys)?, gather(values)?);
            let q = q.get(i)?.reshape((kv_heads, heads / kv_heads, hd))?;
            let probs = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale as f64)?)?;
            probs.matmul(&v)?.reshape((1, heads * hd))
        })
        .collect::<Result<_>>()?;
    Tensor::cat(&rows, 0)
}

#[test]
fn reads_the_blocks_in_table_order() -> Result<()> {
    let dev = &Device::Cpu;
    let (heads, kv_heads, hd, bt) = (6, 2, 64, BLOCK_TOKENS);
    let keys = Tensor::randn(0f32, 1.0, (4 * bt, kv_heads, hd), dev)?;
    let values = Tensor::randn(0f32, 1.0, (4 * bt, kv_heads, hd), dev)?;
    let q = Tensor::randn(0f32, 1.0, (2, heads, hd), dev)?;
    // Two sequences of a pool of 4 blocks: blocks 3 then 1 (20 tokens), and block 2 (5).
    let tables: [(&[u32], usize); 2] = [(&[3, 1], 20), (&[2], 5)];
    let got = decode_attention(&q, &keys, &values, &tables, 0.125)?;
    assert!(max_difference(&got, &reference(&q, &keys, &values, &tables, 0.125)?) < 1e-5);
    Ok(())
}

#[test]
fn every_group_size_weighs_its_own_values() -> Result<()> {
    // Query heads per KV head from 1 to 9: the value pass takes them four at a time,
    // so 5 is 4 + 1 and 7 is 4 + 3; each head must sum its own weights.
    let dev = &Device::Cpu;
    let (kv_heads, hd, len) = (2, 64, 45usize);
    for group in 1..=9 {
        let heads = group * kv_heads;
        let keys = Tensor::randn(0f32, 1.0, (3 * BLOCK_TOKENS, kv_heads, hd), dev)?;
        let values = Tensor::randn(0f32, 1.0, (3 * BLOCK_TOKENS, kv_heads, hd), dev)?;
        let q = (Tensor::randn(0f32, 1.0, (1, heads, hd), dev)? * 2.0)?;
        let tables: [(&[u32], usize); 1] = [(&[2, 0, 1], len)];
        let got = decode_attention(&q, &keys, &values, &tables, 0.125)?;
        let diff = max_difference(&got, &reference(&q, &keys, &values, &tables, 0.125)?);
        assert!(diff < 1e-5, "group {group}: {diff}");
    }
    Ok(())
}

#[test]
fn split_key_ranges_merge_to_the_whole_softmax() -> Result<()> {
    // One sequence of 3 KV heads and 517 tokens over 33 shuffled blocks: split into
    // ranges on 2 threads (and on 1: none); a head dimension with a vector tail.
    let dev = &Device::Cpu;
    let (heads, kv_heads, hd, len) = (9, 3, 68, 517usize);
    let blocks: Vec<u32> = (0..len.div_ceil(BLOCK_TOKENS) as u32).map(|b| (b * 7) % 33).collect();
    let keys = (Tensor::randn(0f32, 1.0, (33 * BLOCK_TOKENS, kv_heads, hd), dev)? * 3.0)?;
    let values = Tensor::randn(0f32, 1.0, (33 * BLOCK_TOKENS, kv_heads, hd), dev)?;
    let q = Tensor::randn(0f32, 1.0, (1, heads, hd), dev)?;
    let tables: [(&[u32], usize); 1] = [(&blocks, len)];
    assert_eq!(ranges_per_sequence(1, len, 2), 4);
    assert_eq!(ranges_per_sequence(1, len, 1), 2);
    assert_eq!(ranges_per_sequence(1, 200, 2), 1, "ranges of fewer than 128 keys");
    assert_eq!(ranges_per_sequence(8, len, 2), 1);
    let expected = reference(&q, &keys, &values, &tables, 0.125)?;
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let got = pool.install(|| decode_attention(&q, &keys, &values, &tables, 0.125))?;
        let diff = max_difference(&got, &expected);
        assert!(diff < 1e-5, "{threads} threads: {diff}");
    }
    Ok(())
}

#[test]
fn a_half_precision_pool_attends_as_its_values_widened() -> Result<()> {
    // 600 tokens: many tiles, split into ranges on both thread counts, and a second
    // sequence of one partial tile; rows of 3 heads of 68 end in a part of 8 values.
    let dev = &Device::Cpu;
    let (heads, kv_heads, hd, len) = (9, 3, 68, 600usize);
    let blocks: Vec<u32> = (0..len.div_ceil(BLOCK_TOKENS) as u32).map(|b| (b * 7) % 38).collect();
    let keys = (Tensor::randn(0f32, 1.0, (38 * BLOCK_TOKENS, kv_heads, hd), dev)? * 3.0)?;
    let values = Tensor::randn(0f32, 1.0, (38 * BLOCK_TOKENS, kv_heads, hd), dev)?;
    let q = Tensor::randn(0f32, 1.0, (2, heads, hd), dev)?;
    let tables: [(&[u32], usize); 2] = [(&blocks, len), (&blocks[3..5], 20)];
    for dtype in [candle_core::DType::F16, candle_core::DType::BF16] {
        let (keys, values) = (keys.to_dtype(dtype)?, values.to_dtype(dtype)?);
        let widened = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        let expected = reference(&q, &widened(&keys)?, &widened(&values)?, &tables, 0.125)?;
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let got = pool.install(|| decode_attention(&q, &keys, &values, &tables, 0.125))?;
            let diff = max_difference(&got, &expected);
            assert!(diff < 1e-5, "{dtype:?}, {threads} threads: {diff}");
        }
    }
    Ok(())
}

#[test]
fn refuses_a_block_outside_the_pool() -> Result<()> {
    let dev = &Device::Cpu;
    let keys = Tensor::zeros((2 * BLOCK_TOKENS, 1, 64), candle_core::DType::F32, dev)?;
    let q = Tensor::zeros((1, 2, 64), candle_core::DType::F32, dev)?;
    assert!(decode_attention(&q, &keys, &keys, &[(&[2], 3)], 0.125).is_err());
    assert!(decode_attention(&q, &keys, &keys, &[(&[1], 17)], 0.125).is_err());
    assert!(decode_attention(&q, &keys, &keys, &[(&[1], 16)], 0.125).is_ok());
    Ok(())
}
