//! The crate's layers as [candle](https://crates.io/crates/candle-core) modules (cargo
//! feature `candle`, on by default; `candle-cuda` adds candle's CUDA backend).
//!
//! | layer | what it computes | trainable |
//! |---|---|---|
//! | [`LoraLinear`] over a dense base | `y = x Wᵀ + bias + s · drop(x) Aᵀ Bᵀ` | A, B |
//! | [`LoraLinear`] over an NF4 base ([`QLoraLinear`]) | the same with `W = deq(W₄)` | A, B |
//! | [`DoraLinear`] (dense, or NF4: [`QDoraLinear`]) | peft's DoRA ([`crate::dora`]) | A, B, m |
//! | [`NeftuneEmbedding`] | rows of a frozen table, plus NEFTune noise in training | — |
//!
//! **Backends.** Each layer is a candle custom op (`CustomOp3`) with a backward, so
//! candle's autograd (`Var`, `Tensor::backward`) flows through it. On candle's CPU
//! backend the op runs the crate's CPU oracle ([`crate::cpu`]); on its CUDA backend
//! (feature `candle-cuda`) it launches the crate's kernels ([`crate::cuda`]) on the
//! stream of the tensors' `CudaDevice` (`CudaDevice::cuda_stream()`), so the ops queue
//! behind candle's own and nothing synchronizes the host. One [`crate::cuda::Gpu`] per
//! candle device is kept in a process-wide cache (it holds the loaded kernels, a
//! cuBLAS handle and scratch); the cache decides no path: every choice is in the
//! layer's [`LayerOptions`].
//!
//! **Types.** The input decides the compute type (f32, f16 or bf16): the frozen base
//! must be stored in it (an NF4 base dequantizes to it). The adapter parameters are f32
//! [`candle_core::Var`]s (master weights, as peft keeps them), cast to the compute type
//! inside the forward; candle's `to_dtype` backward casts their gradients back, so an
//! optimizer sees f32 gradients ([`crate::adamw`] updates them on the GPU in one launch).
//!
//! **Layouts.** `x` is `[..., K]` (any leading dimensions, flattened to T tokens); it
//! is made contiguous first if it is not. The output is `[..., N]`.
//!
//! **Training and dropout.** Each layer's `forward_t(x, train)` with `train = true`
//! applies the layer's dropout (LoRA, DoRA) or NEFTune noise (embedding), each call with
//! the next Philox offset of the layer's own counter, so a run is reproducible from
//! its seed; [`candle_core::Module::forward`] is evaluation (no dropout, no noise), and
//! so is candle's blanket `ModuleT` over it.
//!
//! **peft.** [`LoraLinear::adapter_module`] / [`DoraLinear::adapter_module`] give the
//! layer's adapter as a [`crate::peft::AdapterModule`], and `load_adapter_module` sets
//! the parameters from one, so a model saves and loads peft's `adapter_model.safetensors`
//! through [`crate::peft::Adapter`].

mod ops;

mod layers;

mod optim;

pub mod llama;

#[cfg(feature = "candle-cuda")]
pub use gpu_cache::gpu;
pub use layers::{
    DoraLinear, FrozenWeight, LayerOptions, LoraLinear, NeftuneEmbedding, QDoraLinear, QLoraLinear,
};
pub use optim::FusedAdamW;

use candle_core::DType as CDType;

use crate::{DType, Error};

/// The crate's error as a candle error (its message kept).
pub(crate) fn to_candle(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The crate's dtype for a candle dtype the layers compute in.
pub(crate) fn compute_dtype(d: CDType, what: &str) -> candle_core::Result<DType> {
    match d {
        CDType::F32 => Ok(DType::F32),
        CDType::F16 => Ok(DType::F16),
        CDType::BF16 => Ok(DType::BF16),
        other => Err(candle_core::Error::Msg(format!(
            "{what}: dtype {other:?} is not supported (f32, f16 or bf16)"
        ))),
    }
}

#[cfg(feature = "candle-cuda")]
pub(crate) mod gpu_cache {
    //! One [`Gpu`] per candle CUDA device, on that device's stream.
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda_backend::{CudaDevice, DeviceId};

    use crate::cuda::Gpu;

    type Cache = Mutex<HashMap<DeviceId, Arc<Gpu>>>;

    fn cache() -> &'static Cache {
        static CACHE: OnceLock<Cache> = OnceLock::new();
        CACHE.get_or_init(|| Mutex::new(HashMap::new()))
    }

    /// The crate's [`Gpu`] for candle device `dev` (made on first use from
    /// `dev.cuda_stream()`, then shared), e.g. to read [`Gpu::pool_usage`].
    pub fn gpu(dev: &CudaDevice) -> candle_core::Result<Arc<Gpu>> {
        let mut map = cache().lock().map_err(|_| {
            candle_core::Error::Msg("lora-kernels: the Gpu cache is poisoned".into())
        })?;
        if let Some(g) = map.get(&dev.id()) {
            return Ok(g.clone());
        }
        let g = Arc::new(Gpu::from_stream(dev.cuda_stream()).map_err(super::to_candle)?);
        map.insert(dev.id(), g.clone());
        Ok(g)
    }
}
