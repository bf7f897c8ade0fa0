//! CPU kernels the families share: the fused element-wise passes (`kernels`, `epilogue`,
//! `norm`), matrix-vector products for few rows (`few_rows`, `exact_bf16`), products over
//! many rows on weights widened to f32 (`widened`), the linear layer that picks among them
//! (`proj`), paged decode attention (`decode_attention`) and the vision encoders' attention
//! within frames (`frame_attention`).
//! Each computes what the composed candle ops compute; tests hold them to it.

pub mod decode_attention;
pub mod epilogue;
pub mod exact_bf16;
pub mod few_rows;
pub mod frame_attention;
pub mod kernels;
pub mod norm;
pub mod proj;
pub mod widened;
