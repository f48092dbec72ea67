"""lora-kernels for PyTorch: fused LoRA, QLoRA, DoRA and QDoRA linear layers.

- :mod:`lora_kernels.ops`: the kernels as ``torch.ops.lora_kernels.*`` custom ops
  (fake implementations for ``torch.compile`` / FSDP / meta tracing, autograd through
  ``torch.library.register_autograd``), on torch's current stream, on torch's tensors.
- :func:`patch` / :func:`unpatch`: peft's LoRA layers (over ``nn.Linear`` and
  bitsandbytes' ``Linear4bit``) run on those ops; the model saves and loads with peft
  as before.

The Rust crate (`lora-kernels`) is the core; this package is a thin layer over its
extension module ``lora_kernels._lib``.
"""

from . import ops
from ._lib import build_info as _build_info
from .peft_patch import fallbacks, is_patched, patch, reset_warnings, unpatch

__all__ = ["ops", "patch", "unpatch", "is_patched", "fallbacks", "reset_warnings", "build_info"]
__version__ = "0.1.0"


def build_info() -> dict:
    """Whether the CUDA kernels were compiled into this build, for which GPU
    architectures, and by which nvcc."""
    built, archs, nvcc = _build_info()
    return {"cuda_kernels": built, "archs": archs, "nvcc": nvcc}
