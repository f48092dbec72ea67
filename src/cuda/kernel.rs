//! Typed kernel entries: every `extern "C" __global__` entry of `kernels/<module>.cu` is
//! a constant here ([`LK_DORA_NORM_BF16`] is `lk_dora_norm_bf16` of module
//! [`Module::Dora`]), and each family of entries that differ only in the element type is
//! a [`ByDType`] table ([`LK_DORA_NORM`]). build.rs generates them (the entry list comes
//! from nvcc's preprocessor, or without nvcc from the checked-in `src/cuda/entries.rs`);
//! a [`Kernel`] cannot be made any other way, so a misspelt kernel, or one in another
//! module than the crate thinks, does not compile.

use crate::{DType, Element, Error, Result};

/// A kernel entry point: the module (kernels/*.cu file, one fatbinary) that holds it
/// and its `extern "C"` name. Only the constants of this module are `Kernel`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Kernel {
    module: Module,
    name: &'static str,
}

impl Kernel {
    /// The module that holds the entry.
    pub(crate) const fn module(self) -> Module {
        self.module
    }

    /// The entry's name, as the module exports it.
    pub(crate) const fn name(self) -> &'static str {
        self.name
    }
}

/// A family of entries that differ only in the element type (`lk_dora_norm_f32`,
/// `_f16`, `_bf16`); a type the family has no kernel for is `None`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ByDType {
    /// The entries' name with `*` for the type, for errors.
    family: &'static str,
    f32: Option<Kernel>,
    f16: Option<Kernel>,
    bf16: Option<Kernel>,
}

impl ByDType {
    /// The family's kernel for element type `d`.
    pub(crate) fn get(&self, d: DType) -> Result<Kernel> {
        match d {
            DType::F32 => self.f32,
            DType::F16 => self.f16,
            DType::BF16 => self.bf16,
        }
        .ok_or_else(|| Error::Unsupported {
            op: self.family,
            reason: format!("no {} kernel", d.suffix()),
        })
    }

    /// The family's kernel for `T`.
    pub(crate) fn of<T: Element>(&self) -> Result<Kernel> {
        self.get(T::DTYPE)
    }
}

/// The error of a launcher asking for a variant of `family` that was not built (`what`
/// = `value`: an n-tile count, a rank step); the launchers' own choices never do.
pub(crate) fn no_variant(family: &'static str, what: &str, value: usize) -> Error {
    Error::Unsupported {
        op: family,
        reason: format!("no kernel for {what} = {value}"),
    }
}

include!(concat!(env!("OUT_DIR"), "/entries.rs"));
