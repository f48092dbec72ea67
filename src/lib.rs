//! # lora-kernels
//!
//! Hand-written CUDA kernels for LoRA-family fine-tuning, with a plain CPU oracle of
//! every op that the GPU is tested against.
//!
//! - [`lora`]: the fused LoRA linear layer, forward, backward, merge and unmerge;
//!   CPU oracle in [`cpu::lora`], CUDA ops in [`cuda::lora`], same arguments.
//! - [`neftune`]: NEFTune's embedding gather plus uniform noise in one pass, the noise
//!   alone, and the table's gradient; CPU in [`cpu::neftune`], CUDA in
//!   [`cuda::neftune`], bit-equal.
//! - [`nf4`]: NF4 weights in bitsandbytes' exact format (quantize, dequantize, double
//!   quantization, `Linear4bit` checkpoints).
//! - [`qlora`]: the QLoRA linear layer, LoRA over an NF4 base weight, forward and
//!   backward; CPU in [`cpu::qlora`], CUDA in [`cuda::qlora`].
//! - [`dora`]: DoRA, the LoRA linear with peft's weight-norm and magnitude scaling,
//!   forward, backward, magnitude init, merge and unmerge; CPU in [`cpu::dora`], CUDA in
//!   [`cuda::dora`].
//! - [`peft`]: load and save peft adapters (LoRA, rsLoRA, DoRA) in peft's own files.
//! - [`Dropout`]: counter-based (Philox4x32-10) dropout masks, regenerated in backward.
//!
//! Layouts follow PyTorch and peft: row-major, `x` [T, K], `W` [N, K], `A` [r, K],
//! `B` [N, r]. Element types f32, f16 and bf16 ([`half`]), with f32 accumulation.
//!
//! ```no_run
//! use lora_kernels::{cuda::Gpu, lora, LoraOptions, LoraShape, LoraWeights};
//! use half::bf16;
//!
//! # fn main() -> lora_kernels::Result<()> {
//! let shape = LoraShape::new(16, 4096, 4096, 16); // T, K, N, r
//! let opts = LoraOptions::new(lora::scale(32.0, 16)); // alpha / r
//! let host = |n: usize| vec![bf16::from_f32(0.01); n];
//! let gpu = Gpu::new(0)?;
//! let (x, w) = (gpu.upload(&host(shape.x_len()))?, gpu.upload(&host(shape.w_len()))?);
//! let (a, b) = (gpu.upload(&host(shape.a_len()))?, gpu.upload(&host(shape.b_len()))?);
//! let mut y = gpu.zeros::<bf16>(shape.y_len())?;
//! let weights = LoraWeights { w: &w, a: &a, b: &b, bias: None };
//! lora_kernels::cuda::lora::forward(&gpu, &shape, &opts, &x, weights, &mut y, None)?;
//! let y_host = gpu.download(&y)?;
//! # let _ = y_host;
//! # Ok(())
//! # }
//! ```

pub mod adamw;
#[cfg(feature = "candle")]
pub mod candle;
mod check;
pub mod cpu;
pub mod cuda;
pub mod dora;
mod dtype;
mod error;
pub mod lora;
pub mod loraplus;
pub mod neftune;
pub mod nf4;
pub mod peft;
mod philox;
pub mod pissa;
pub mod qlora;
pub mod tuning;

pub use dora::{DoraGrads, DoraOutputs, DoraSaved, DoraWeights};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use lora::{LoraGrads, LoraOptions, LoraShape, LoraWeights};
pub use neftune::{EmbedShape, Noise, SeqLen};
pub use nf4::Nf4Weight;
pub use philox::{philox4x32_10, philox_word, Dropout};
pub use qlora::QloraWeights;
pub use tuning::Tuning;
