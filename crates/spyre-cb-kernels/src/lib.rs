//! CPU compute kernels of spyre_cb's model runner.
//!
//! The scheduling core decides *what* runs; these kernels make one part of
//! running it cheap on a CPU. Today that is [`paged_decode`]: the attention of
//! a decode step read straight out of the paged KV cache. A generic tensor
//! library has to gather every sequence's blocks into one contiguous copy,
//! padded to the batch's shared `tkv`, build a mask and run a masked softmax
//! over the padding too; this kernel walks each sequence's block table, reads
//! only its real keys (from its left padding to its `tkv`) where they lie,
//! and never materializes a mask or a copy. No Python in here: the binding
//! hands in slices.

mod attention;
mod linear;
mod math;
mod norm;
pub mod parallel;
mod qkv_attention;
mod rope;

pub use attention::{paged_decode, DecodeInputs, DecodeShape, KernelError};
pub use linear::{
    linear, linear_bf16_is_fast, linear_f32_is_fast, pack, packed_len, round_bf16, Element, LinearError, LinearShape,
    FEATURES,
};
pub use math::CacheElem;
pub use norm::{add_rms_norm, rms_norm, NormError};
pub use qkv_attention::{paged_decode_qkv, QkvInputs};
pub use rope::{rope, RopeError, RopeShape};
