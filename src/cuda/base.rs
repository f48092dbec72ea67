//! The frozen base weight as the ops read it: a dense W, an NF4 W dequantized inside
//! the GEMM core, or an NF4 W dequantized one bounded panel at a time (rows for the
//! forward and the row-panel backward, columns for the backward's column-panel path).
//! The LoRA, DoRA, QLoRA and QDoRA launchers all build on it; it imports none of them.

use super::nf4::launch_dequant;
use super::{dptr, Gpu, LkNf4};
use crate::{Element, Result, Tuning};

/// The base weight of [`super::lora`]'s backward core, `dX = d W + G A`.
#[derive(Clone, Copy)]
pub(crate) enum DxWeight {
    /// A dense W [N, K] at this address.
    Dense(u64),
    /// W [N, K] in NF4 (validated), dequantized tile by tile in shared memory by the NF4
    /// NN core.
    Nf4(LkNf4),
    /// W [N, K] in NF4, dequantized one bounded column panel at a time
    /// ([`for_each_col_panel`]) for the dense NN core, each launch writing
    /// its columns of dX (row stride K).
    Nf4ColPanels(LkNf4),
}

/// The most elements of one dequantized panel of W (2²⁵: 64 MiB in bf16). Every W of a
/// 1B–3B Llama fits one panel (W dequantized once, one core launch); larger ones take
/// two or more. A bigger bound costs memory; a smaller one leaves the core launches of
/// the panels with fewer tiles than the GPU has SMs.
pub const PANEL_ELEMS: usize = 1 << 25;

/// The panel bound of a call: its tuning's [`Tuning::panel_elems`], else
/// [`PANEL_ELEMS`].
pub(crate) fn panel_limit(tuning: &Tuning) -> usize {
    tuning.panel_elems.unwrap_or(PANEL_ELEMS).max(1)
}

/// Rows per panel: as many as fit the cap, a multiple of 8 when W has more rows (so
/// every panel's columns of y start 16-byte aligned).
pub(crate) fn panel_rows(limit: usize, rows: usize, cols: usize) -> usize {
    let fit = (limit / cols).max(1);
    if fit >= rows {
        rows
    } else if fit >= 8 {
        fit / 8 * 8
    } else {
        fit
    }
}

/// Calls `f(i, n0, nc, panel)` for each panel of rows `n0..n0 + nc` of W, the panel
/// dequantized to T in a scratch buffer (address `panel`, row stride K), panels of at
/// most `limit` elements (at least one row).
pub(crate) fn for_each_panel<T: Element>(
    gpu: &Gpu,
    limit: usize,
    desc: &LkNf4,
    mut f: impl FnMut(usize, usize, usize, u64) -> Result<()>,
) -> Result<()> {
    let (rows, cols) = (desc.rows as usize, desc.cols as usize);
    let pr = panel_rows(limit, rows, cols);
    // SAFETY of the scratch: each panel is written in full by the dequantize kernel
    // before the GEMM that reads it (stream order), and the next panel's dequantize is
    // queued after that GEMM.
    let panel = gpu.scratch::<T>(pr * cols)?;
    let (pp, _gp) = dptr(gpu, "panel", &panel)?;
    for (i, n0) in (0..rows).step_by(pr).enumerate() {
        let nc = pr.min(rows - n0);
        launch_dequant::<T>(gpu, desc, (n0 * cols, 0), nc * cols, pp, false)?;
        f(i, n0, nc, pp)?;
    }
    Ok(())
}

/// The narrowest column panel the backward's column-panel path takes (unless the panel
/// is all of W): 1024 columns, four 256-wide core tiles.
const COL_PANEL_MIN: usize = 1024;

/// Whether the column panels of W [rows, cols] are wide enough for the backward's
/// column-panel path: all of W in one panel, or at least [`COL_PANEL_MIN`] columns.
pub(crate) fn col_panels_fit(limit: usize, rows: usize, cols: usize) -> bool {
    let pc = panel_cols(limit, rows, cols);
    pc == cols || pc >= COL_PANEL_MIN
}

/// Columns per column panel of W [rows, cols]: as many as fit the cap, a multiple of 64
/// (of 8 when fewer than 64 fit, at least 8), or all of them.
fn panel_cols(limit: usize, rows: usize, cols: usize) -> usize {
    let fit = limit / rows;
    if fit >= cols {
        cols
    } else if fit >= 64 {
        fit / 64 * 64
    } else {
        (fit / 8 * 8).max(8)
    }
}

/// Calls `f(c0, pc, panel)` for each panel of columns `c0..c0 + pc` of W (K % 8 == 0),
/// the panel dequantized to T in a scratch buffer [rows, pc] (address `panel`, row
/// stride pc; every c0 a multiple of 8).
pub(crate) fn for_each_col_panel<T: Element>(
    gpu: &Gpu,
    tuning: &Tuning,
    desc: &LkNf4,
    mut f: impl FnMut(usize, usize, u64) -> Result<()>,
) -> Result<()> {
    let (rows, cols) = (desc.rows as usize, desc.cols as usize);
    let pc = panel_cols(panel_limit(tuning), rows, cols);
    // SAFETY of the scratch: as for_each_panel's (each panel written in full before the
    // GEMM that reads it, the next one queued after that GEMM).
    let panel = gpu.scratch::<T>(rows * pc)?;
    let (pp, _gp) = dptr(gpu, "panel", &panel)?;
    for c0 in (0..cols).step_by(pc) {
        let w = pc.min(cols - c0);
        launch_dequant::<T>(gpu, desc, (c0, w), rows * w, pp, false)?;
        f(c0, w, pp)?;
    }
    Ok(())
}
