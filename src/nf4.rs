//! NF4 (4-bit NormalFloat, QLoRA) weights in bitsandbytes' exact format (0.50), with
//! optional double quantization of the block scales, and `Linear4bit` checkpoints.
//!
//! ## The format
//! - W [N, K] is quantized as one flat row-major array of `N·K` values in blocks of
//!   `blocksize` consecutive elements (a block may cross rows; the last one is padded
//!   with zeros). `absmax[b]` = max |w| over block b (f32).
//! - Each value's code is the number of [`NF4_MIDPOINTS`] that `w · (1 / absmax)` is
//!   strictly greater than (f32 reciprocal, then f32 product; a value on a midpoint takes
//!   the lower code). An all-zero block has absmax 0, so its scaled values are NaN and
//!   take code 0, as bitsandbytes' kernel does: it dequantizes to −0.
//! - Two codes per byte, the first element in the high nibble: byte i holds elements 2i
//!   (bits 7..4) and 2i+1 (bits 3..0); `ceil(N·K / 2)` bytes.
//! - Dequantized value: `NF4_CODE[code] · absmax[b]` (one f32 product), rounded to the
//!   target type.
//! - Double quantization: `offset` = mean of the absmax values (f64 sums of each 256 in
//!   order, then of those sums in order, divided, rounded to f32), then
//!   `absmax − offset` is quantized blockwise (256 values per block) to 8 bits with
//!   bitsandbytes' signed dynamic map ([`dynamic_map`]): `absmax2[j]` = max |v| over
//!   block j, `q = nearest code of v · (1 / absmax2[j])` (bitsandbytes' binary search and
//!   tie rule). Reconstructed: `absmax = code2[q] · absmax2[b / 256] + offset` (f32
//!   product, then f32 sum).
//!
//! Stored size: 4 bits per parameter plus 32 bits per block, or 8 bits per block plus
//! 32 per 256 blocks with double quantization: 4.127 bits per parameter at blocksize 64.
//!
//! ## Errors, not panics
//! Every public function here checks its input before it computes or writes anything:
//! sizes with `checked_mul` ([`Error::Dim`] when `rows · cols` or `tokens · K`
//! overflows), the lengths of every part ([`Error::Length`]), and the scales' values
//! ([`Nf4Weight::validate`]: non-finite or negative scales are an [`Error::Checkpoint`]
//! naming the tensor and index). [`Nf4Weight::quantize`] rejects NaN and ±Inf input;
//! its rustdoc states what bitsandbytes does with them.

use std::collections::HashMap;

use crate::{DType, Element, Error, Result};

/// The 16 NF4 code values (bitsandbytes' `quant_map`), ascending.
// The literals are the published values in full; each parses to the exact f32.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// The 15 decision thresholds between consecutive NF4 codes (the midpoints of the
/// codes, as f32), ascending: code = number of thresholds strictly below the value.
#[allow(clippy::excessive_precision)]
pub const NF4_MIDPOINTS: [f32; 15] = [
    -0.848_096_400_499_343_9,
    -0.610_632_926_225_662_2,
    -0.459_995_269_775_390_6,
    -0.339_679_434_895_515_44,
    -0.234_607_405_960_559_84,
    -0.137_911_733_239_889_14,
    -0.045_525_018_125_772_476,
    0.039_790_149_778_127_67,
    0.120_255_250_483_751_3,
    0.203_521_251_678_466_8,
    0.292_013_771_831_989_3,
    0.389_312_535_524_368_3,
    0.501_663_416_624_069_2,
    0.642_786_920_070_648_2,
    0.861_478_418_111_801_1,
];

/// Block size of the double quantization of absmax values (bitsandbytes: 256).
pub const NESTED_BLOCKSIZE: usize = 256;

/// The NF4 code of `x` (already scaled into [-1, 1]); NaN gives 0.
pub fn nf4_code(x: f32) -> u8 {
    NF4_MIDPOINTS.iter().filter(|&&m| x > m).count() as u8
}

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`): for
/// i in 0..7, the midpoints of `linspace(0.1, 1, 2^i + 1)` (f32, computed as torch
/// does) times ±10^(i−6), plus 0 and 1, sorted: 256 values in [-1, 1].
pub fn dynamic_map() -> [f32; 256] {
    let mut v: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let n = (1usize << i) + 1;
        // torch.linspace(0.1, 1, n) in f32: the first half counts up from the start, the
        // second half down from the end, each one fused multiply-add.
        let (start, end) = (0.1f32, 1.0f32);
        let step = (end - start) / (n - 1) as f32;
        let lin: Vec<f32> = (0..n)
            .map(|j| {
                if j < n / 2 {
                    step.mul_add(j as f32, start)
                } else {
                    (-step).mul_add((n - 1 - j) as f32, end)
                }
            })
            .collect();
        let scale = 10f64.powi(i - 6) as f32;
        for w in lin.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            v.push(scale * mean);
            v.push(-scale * mean);
        }
    }
    v.push(0.0);
    v.push(1.0);
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut out = [0f32; 256];
    out.copy_from_slice(&v);
    out
}

/// The 8-bit code of `x` (scaled into [-1, 1]) in `code` (256 ascending values):
/// bitsandbytes' blockwise quantizer, a 7-step binary search from the middle, then the
/// nearer of the two neighbours (ties to the value found by the search).
pub fn dynamic_code(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let (mut upper_pivot, mut lower_pivot) = (255usize, 0usize);
    let (mut lower, mut upper) = (-1.0f32, 1.0f32);
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    if x > val {
        let mid = (upper + val) * 0.5;
        if x > mid {
            upper_pivot as u8
        } else {
            pivot as u8
        }
    } else {
        let mid = (lower + val) * 0.5;
        if x < mid {
            lower_pivot as u8
        } else {
            pivot as u8
        }
    }
}

/// Double-quantized absmax values.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code per NF4 block (checkpoint tensor `weight.absmax`, u8).
    pub q: Vec<u8>,
    /// One f32 scale per [`NESTED_BLOCKSIZE`] NF4 blocks (`weight.nested_absmax`).
    pub absmax2: Vec<f32>,
    /// The 256-value code the `q` index ([`dynamic_map`] unless loaded otherwise;
    /// `weight.nested_quant_map`).
    pub code: Vec<f32>,
    /// The mean that was subtracted before quantizing (quant_state `nested_offset`).
    pub offset: f32,
}

/// The block scales of an NF4 weight: plain f32, or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    F32(Vec<f32>),
    Double(DoubleQuant),
}

/// An NF4-quantized weight [rows, cols] (`nn.Linear.weight`: [N, K]) on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Weight {
    pub rows: usize,
    pub cols: usize,
    pub blocksize: usize,
    /// `ceil(rows · cols / 2)` bytes, first element of each pair in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    /// The type the weight had before quantization (a checkpoint records it).
    pub dtype: DType,
}

/// Checks a blocksize: a power of two in 32..=4096.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if !(32..=4096).contains(&blocksize) || !blocksize.is_power_of_two() {
        return Err(Error::Dim {
            name: "blocksize",
            value: blocksize,
            reason: "must be a power of two in 32..=4096",
        });
    }
    Ok(())
}

/// Checks the arguments of a quantize call: blocksize, dims in 1..2³¹, and the length of
/// the dense weight. Returns `rows · cols`.
pub(crate) fn check_quantize_args(
    rows: usize,
    cols: usize,
    blocksize: usize,
    len: usize,
) -> Result<usize> {
    check_blocksize(blocksize)?;
    for (name, v) in [("rows", rows), ("cols", cols)] {
        if v == 0 || v > i32::MAX as usize {
            return Err(Error::Dim {
                name,
                value: v,
                reason: "must be in 1..2^31",
            });
        }
    }
    let numel = checked_numel(rows, cols)?;
    crate::lora::check_len("w", len, numel)?;
    Ok(numel)
}

/// `rows · cols`, or [`Error::Dim`] naming `rows` when the product overflows usize.
fn checked_numel(rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols).ok_or(Error::Dim {
        name: "rows",
        value: rows,
        reason: "rows · cols overflows usize",
    })
}

/// The largest `rows · cols` a weight may have: its dense f32 form must be addressable
/// (`isize::MAX` bytes), as [`crate::LoraShape`] requires of every dense tensor.
const MAX_NUMEL: usize = isize::MAX as usize / 4;

/// The reason of the error [`Nf4Weight::quantize`] gives for a NaN, +Inf or −Inf.
fn non_finite_reason(v: f32) -> &'static str {
    if v.is_nan() {
        "that element is NaN; Nf4Weight::quantize takes finite values only"
    } else if v > 0.0 {
        "that element is +inf; Nf4Weight::quantize takes finite values only"
    } else {
        "that element is -inf; Nf4Weight::quantize takes finite values only"
    }
}

/// The `name` of the [`Error::Value`] that [`Nf4Weight::quantize`] gives for non-finite
/// input; its `value` is the index of the first NaN or ±Inf element of `w`.
pub const NON_FINITE_INDEX: &str = "w (index of the first non-finite element)";

impl Nf4Weight {
    /// Number of elements, `rows · cols`; [`Error::Dim`] naming `rows` when the product
    /// overflows usize.
    pub fn numel(&self) -> Result<usize> {
        checked_numel(self.rows, self.cols)
    }

    /// Number of NF4 blocks, `ceil(rows · cols / blocksize)`; an error for a blocksize
    /// [`check_blocksize`] rejects or an overflowing `rows · cols`.
    pub fn blocks(&self) -> Result<usize> {
        check_blocksize(self.blocksize)?;
        Ok(self.numel()?.div_ceil(self.blocksize))
    }

    /// Quantizes `w` [rows, cols] exactly as bitsandbytes' `quantize_4bit(w, blocksize,
    /// quant_type="nf4", compress_statistics=double_quant)`.
    ///
    /// ## Non-finite input is an error
    /// A NaN, +Inf or −Inf anywhere in `w` gives [`Error::Value`] with `name`
    /// [`NON_FINITE_INDEX`] and `value` the index of the first such element (the reason
    /// says which of the three it is), before anything is computed. So does a finite
    /// weight whose double-quantized scales overflow f32 (values near `f32::MAX`), with
    /// `name` `"w"`: every weight this returns passes [`Nf4Weight::validate`] and
    /// dequantizes to finite values.
    ///
    /// bitsandbytes (its CUDA `kQuantizeBlockwise`, read from its source) takes
    /// `absmax = fmaxf` over `|x|` of the block, which skips NaN, then codes `x · (1 /
    /// absmax)` with comparisons that are all false for NaN. So there:
    /// - a NaN takes code 0 and dequantizes to `−absmax`, a finite value, silently;
    /// - a ±Inf makes its block's absmax +Inf and its scale 0: every finite value of the
    ///   block takes code 7 (0.0) and dequantizes to `0 · inf` = NaN, the ±Inf itself to
    ///   `−inf`;
    /// - with `compress_statistics`, the offset (the mean of all absmax values) is +Inf,
    ///   so every block's centred scale is −Inf or NaN, every nested scale +Inf, and the
    ///   whole weight dequantizes to NaN or ±Inf.
    ///
    /// [`Nf4Weight::quantize_allow_nonfinite`] reproduces that behaviour (it is what the
    /// GPU quantizer, [`crate::cuda::nf4::quantize`], does too).
    pub fn quantize<T: Element>(
        w: &[T],
        rows: usize,
        cols: usize,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        check_quantize_args(rows, cols, blocksize, w.len())?;
        if let Some((i, v)) = w
            .iter()
            .map(|v| v.to_f32())
            .enumerate()
            .find(|(_, v)| !v.is_finite())
        {
            return Err(Error::Value {
                name: NON_FINITE_INDEX,
                value: i as f64,
                reason: non_finite_reason(v),
            });
        }
        let q = Self::quantize_allow_nonfinite(w, rows, cols, blocksize, double_quant)?;
        match q.validate() {
            Ok(()) => Ok(q),
            // The input is finite, so the one value check that can fail is a double-
            // quantized scale's reconstruction overflowing f32.
            Err(Error::Checkpoint(_)) => Err(Error::Value {
                name: "w",
                value: w.iter().fold(0f64, |m, v| m.max(v.to_f64().abs())),
                reason: "max |w|: too large for double quantization (a reconstructed block \
                         scale overflows f32)",
            }),
            Err(e) => Err(e),
        }
    }

    /// [`Nf4Weight::quantize`] without its check for NaN and ±Inf: what bitsandbytes
    /// computes for them (see [`Nf4Weight::quantize`]), bit for bit, with one difference:
    /// a block whose values are all NaN gets absmax 0 here (bitsandbytes: −`f32::MAX`,
    /// the start value of its max reduction). A ±Inf gives a weight that
    /// [`Nf4Weight::validate`] rejects (a non-finite block scale), so it can be neither
    /// dequantized nor saved; a NaN gives a valid weight. Only the arguments are checked.
    pub fn quantize_allow_nonfinite<T: Element>(
        w: &[T],
        rows: usize,
        cols: usize,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        let numel = check_quantize_args(rows, cols, blocksize, w.len())?;
        let blocks = numel.div_ceil(blocksize);
        let mut absmax = vec![0f32; blocks];
        let mut packed = vec![0u8; numel.div_ceil(2)];
        for ((vals, am), first) in w
            .chunks(blocksize)
            .zip(absmax.iter_mut())
            .zip((0..).step_by(blocksize))
        {
            *am = vals.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
            let inv = 1.0 / *am;
            for (j, v) in vals.iter().enumerate() {
                let e: usize = first + j;
                let c = nf4_code(v.to_f32() * inv);
                packed[e / 2] |= if e.is_multiple_of(2) { c << 4 } else { c };
            }
        }
        let absmax = if double_quant {
            Absmax::Double(double_quantize(&absmax))
        } else {
            Absmax::F32(absmax)
        };
        Ok(Nf4Weight {
            rows,
            cols,
            blocksize,
            packed,
            absmax,
            dtype: T::DTYPE,
        })
    }

    /// The f32 block scales (reconstructed from the double quantization if there is one),
    /// after [`Nf4Weight::validate`].
    pub fn absmax_f32(&self) -> Result<Vec<f32>> {
        self.validate()?;
        Ok(self.scales())
    }

    /// The block scales of a validated weight.
    fn scales(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::F32(a) => a.clone(),
            Absmax::Double(d) => (0..d.q.len()).map(|b| d.scale(b)).collect(),
        }
    }

    /// The dequantized weight [rows, cols], as bitsandbytes' `dequantize_4bit`, after
    /// [`Nf4Weight::validate`] (its error if the fields are inconsistent).
    pub fn dequantize<T: Element>(&self) -> Result<Vec<T>> {
        self.validate()?;
        let absmax = self.scales();
        let numel = self.numel()?;
        Ok((0..numel)
            .map(|e| {
                let byte = self.packed[e / 2];
                let c = if e % 2 == 0 { byte >> 4 } else { byte & 15 };
                T::from_f32(NF4_CODE[c as usize] * absmax[e / self.blocksize])
            })
            .collect())
    }

    /// Stored bits per parameter: codes, block scales and (double quantization) the
    /// nested scales and offset. Computed in f64 from the fields as they are (no
    /// validation): NaN or infinite for a weight with no elements.
    pub fn bits_per_param(&self) -> f64 {
        let scale_bits = match &self.absmax {
            Absmax::F32(a) => 32.0 * a.len() as f64,
            Absmax::Double(d) => 8.0 * d.q.len() as f64 + 32.0 * d.absmax2.len() as f64 + 32.0,
        };
        (8.0 * self.packed.len() as f64 + scale_bits) / (self.rows as f64 * self.cols as f64)
    }

    /// Checks internal consistency: the blocksize ([`Error::Dim`] `blocksize`); rows and
    /// cols at least 1 and `rows · cols` without overflow and below 2⁶¹ ([`Error::Dim`]
    /// `rows`, `cols` or `rows * cols`); every length ([`Error::Length`] `packed`,
    /// `absmax`, `nested_absmax`, `nested_quant_map`); and the values of the scales
    /// ([`Error::Checkpoint`], its message naming the tensor and index, e.g.
    /// `weight.nested_absmax[3] is inf`): plain absmax values finite and non-negative
    /// (a negative one flips its block's signs); with double quantization the nested
    /// code table and offset finite, the nested scales finite and non-negative, and
    /// every reconstructed block scale `code[q] · absmax2 + offset` finite. (A
    /// reconstructed scale may be slightly negative: bitsandbytes' own double
    /// quantization gives that for an all-zero block, within its quantization error.)
    pub fn validate(&self) -> Result<()> {
        self.check("weight")
    }

    /// [`Nf4Weight::validate`], the tensors in value errors named `{tensor}.absmax` etc.
    fn check(&self, tensor: &str) -> Result<()> {
        use crate::lora::check_len;
        check_blocksize(self.blocksize)?;
        for (name, v) in [("rows", self.rows), ("cols", self.cols)] {
            if v == 0 {
                return Err(Error::Dim {
                    name,
                    value: 0,
                    reason: "must be at least 1",
                });
            }
        }
        let numel = self.numel()?;
        if numel > MAX_NUMEL {
            return Err(Error::Dim {
                name: "rows * cols",
                value: numel,
                reason: "too large: the dense f32 weight must fit in isize::MAX bytes",
            });
        }
        let blocks = numel.div_ceil(self.blocksize);
        check_len("packed", self.packed.len(), numel.div_ceil(2))?;
        let bad = |what: &str, i: Option<usize>, v: f32, rule: &str| {
            let at = i.map_or(String::new(), |i| format!("[{i}]"));
            Err(Error::Checkpoint(format!(
                "{tensor}{what}{at} is {v}: {rule}"
            )))
        };
        match &self.absmax {
            Absmax::F32(a) => {
                check_len("absmax", a.len(), blocks)?;
                if let Some((i, &v)) = a
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !(**v >= 0.0 && v.is_finite()))
                {
                    return bad(
                        ".absmax",
                        Some(i),
                        v,
                        "block scales must be finite and non-negative",
                    );
                }
            }
            Absmax::Double(d) => {
                check_len("absmax", d.q.len(), blocks)?;
                check_len(
                    "nested_absmax",
                    d.absmax2.len(),
                    blocks.div_ceil(NESTED_BLOCKSIZE),
                )?;
                check_len("nested_quant_map", d.code.len(), 256)?;
                if let Some((i, &v)) = d.code.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                    return bad(
                        ".nested_quant_map",
                        Some(i),
                        v,
                        "the nested code table must be finite",
                    );
                }
                if let Some((i, &v)) = d
                    .absmax2
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !(**v >= 0.0 && v.is_finite()))
                {
                    return bad(
                        ".nested_absmax",
                        Some(i),
                        v,
                        "nested scales must be finite and non-negative",
                    );
                }
                if !d.offset.is_finite() {
                    return bad(
                        " quant_state.nested_offset",
                        None,
                        d.offset,
                        "must be finite",
                    );
                }
                if let Some((b, v)) = (0..blocks)
                    .map(|b| (b, d.scale(b)))
                    .find(|(_, v)| !v.is_finite())
                {
                    let rule = format!(
                        "nested_quant_map[{}] · nested_absmax[{}] + nested_offset overflows f32",
                        d.q[b],
                        b / NESTED_BLOCKSIZE
                    );
                    return bad(".absmax (reconstructed)", Some(b), v, &rule);
                }
            }
        }
        Ok(())
    }
}

impl DoubleQuant {
    /// The reconstructed scale of block `b` (its lengths checked by the caller).
    fn scale(&self, b: usize) -> f32 {
        self.code[self.q[b] as usize] * self.absmax2[b / NESTED_BLOCKSIZE] + self.offset
    }
}

/// bitsandbytes' double quantization of the absmax values.
fn double_quantize(absmax: &[f32]) -> DoubleQuant {
    let code = dynamic_map();
    // The mean: f64 sums of each 256 values in order, then of those sums in order (the
    // GPU quantizer's order, so both give the same bits; for any realistic absmax range
    // every partial sum is exact in f64 and the f32 mean is correctly rounded).
    let total: f64 = absmax
        .chunks(NESTED_BLOCKSIZE)
        .map(|c| c.iter().map(|&a| a as f64).sum::<f64>())
        .sum();
    let offset = (total / absmax.len() as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut q = Vec::with_capacity(absmax.len());
    let mut absmax2 = Vec::new();
    for chunk in centred.chunks(NESTED_BLOCKSIZE) {
        let m = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax2.push(m);
        let inv = 1.0 / m;
        q.extend(chunk.iter().map(|&v| dynamic_code(&code, v * inv)));
    }
    DoubleQuant {
        q,
        absmax2,
        code: code.to_vec(),
        offset,
    }
}

// ---- bitsandbytes Linear4bit checkpoints --------------------------------------------

fn fmt_err(msg: impl Into<String>) -> Error {
    Error::Checkpoint(msg.into())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl Nf4Weight {
    /// Loads the NF4 weight `{prefix}weight` of a bitsandbytes `Linear4bit` state dict
    /// saved as safetensors (`weight`, `weight.absmax`, `weight.quant_map`, and with
    /// double quantization `weight.nested_absmax`, `weight.nested_quant_map`; the
    /// quant state JSON in `weight.quant_state.bitsandbytes__nf4`). `prefix` is e.g.
    /// `"model.layers.0.mlp.up_proj."` (or `""`).
    ///
    /// Every problem is an [`Error::Checkpoint`] naming the tensor or quant_state field:
    /// a malformed file, a missing or mistyped tensor, an unsupported format, a shape
    /// whose product overflows or that disagrees with the tensors' lengths, and every
    /// value [`Nf4Weight::validate`] rejects (named with the prefix, e.g.
    /// `model.layers.0.mlp.up_proj.weight.nested_absmax[3] is inf`).
    pub fn load_linear4bit(bytes: &[u8], prefix: &str) -> Result<Self> {
        use safetensors::{Dtype, SafeTensors};
        let st =
            SafeTensors::deserialize(bytes).map_err(|e| fmt_err(format!("safetensors: {e}")))?;
        let key = |s: &str| format!("{prefix}weight{s}");
        let get = |s: &str, dtype: Dtype| -> Result<Vec<u8>> {
            let name = key(s);
            let t = st
                .tensor(&name)
                .map_err(|_| fmt_err(format!("tensor `{name}` is missing")))?;
            if t.dtype() != dtype {
                return Err(fmt_err(format!(
                    "tensor `{name}` is {:?}, expected {dtype:?}",
                    t.dtype()
                )));
            }
            Ok(t.data().to_vec())
        };
        let state_name = st
            .names()
            .into_iter()
            .find(|n| n.starts_with(&key(".quant_state.bitsandbytes__")))
            .ok_or_else(|| {
                fmt_err(format!(
                    "no `{}` tensor",
                    key(".quant_state.bitsandbytes__nf4")
                ))
            })?;
        let quant_type = state_name.rsplit("__").next().unwrap_or("").to_string();
        if quant_type != "nf4" {
            return Err(fmt_err(format!(
                "quant_type `{quant_type}` is not supported (only nf4; FP4 is not)"
            )));
        }
        let state_bytes = get(".quant_state.bitsandbytes__nf4", Dtype::U8)?;
        let state: serde_json::Value = serde_json::from_slice(&state_bytes)
            .map_err(|e| fmt_err(format!("quant_state JSON: {e}")))?;
        let field = |f: &str| {
            state
                .get(f)
                .ok_or_else(|| fmt_err(format!("quant_state has no `{f}` field")))
        };
        let qt = field("quant_type")?.as_str().unwrap_or("");
        if qt != "nf4" {
            return Err(fmt_err(format!(
                "quant_state.quant_type `{qt}` is not supported (only nf4)"
            )));
        }
        let blocksize = field("blocksize")?
            .as_u64()
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| fmt_err("quant_state.blocksize is not a non-negative integer"))?;
        check_blocksize(blocksize).map_err(|e| fmt_err(format!("quant_state.blocksize: {e}")))?;
        let dtype = match field("dtype")?.as_str().unwrap_or("") {
            "float32" => DType::F32,
            "float16" => DType::F16,
            "bfloat16" => DType::BF16,
            other => {
                return Err(fmt_err(format!(
                    "quant_state.dtype `{other}` is not supported"
                )))
            }
        };
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .ok_or_else(|| fmt_err("quant_state.shape is not an array"))?
            .iter()
            .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                fmt_err("quant_state.shape holds a value that is not a non-negative integer")
            })?;
        let [rows, cols] = shape[..] else {
            return Err(fmt_err(format!("quant_state.shape {shape:?} is not 2-D")));
        };
        let packed = get("", Dtype::U8)?;
        let quant_map = f32s(&get(".quant_map", Dtype::F32)?);
        if quant_map != NF4_CODE {
            return Err(fmt_err(format!(
                "`{}` is not the NF4 code table",
                key(".quant_map")
            )));
        }
        let absmax = match state.get("nested_blocksize") {
            None => Absmax::F32(f32s(&get(".absmax", Dtype::F32)?)),
            Some(nb) => {
                if nb.as_u64() != Some(NESTED_BLOCKSIZE as u64) {
                    return Err(fmt_err(format!(
                        "quant_state.nested_blocksize {nb} is not supported (only 256)"
                    )));
                }
                let nd = field("nested_dtype")?.as_str().unwrap_or("");
                if nd != "float32" {
                    return Err(fmt_err(format!(
                        "quant_state.nested_dtype `{nd}` is not supported (only float32)"
                    )));
                }
                let offset = field("nested_offset")?
                    .as_f64()
                    .ok_or_else(|| fmt_err("quant_state.nested_offset is not a number"))?;
                if !(offset as f32).is_finite() {
                    return Err(fmt_err(format!(
                        "quant_state.nested_offset {offset:e} of `{}` is not a finite f32",
                        key("")
                    )));
                }
                let offset = offset as f32;
                Absmax::Double(DoubleQuant {
                    q: get(".absmax", Dtype::U8)?,
                    absmax2: f32s(&get(".nested_absmax", Dtype::F32)?),
                    code: f32s(&get(".nested_quant_map", Dtype::F32)?),
                    offset,
                })
            }
        };
        let w = Nf4Weight {
            rows,
            cols,
            blocksize,
            packed,
            absmax,
            dtype,
        };
        w.check(&key("")).map_err(|e| match e {
            // Already names the tensor and index.
            e @ Error::Checkpoint(_) => e,
            e => fmt_err(format!(
                "`{}` is inconsistent with its quant_state (shape {shape:?}, blocksize \
                 {blocksize}): {e}",
                key("")
            )),
        })?;
        Ok(w)
    }

    /// Writes this weight as a bitsandbytes `Linear4bit` state dict in safetensors, keys
    /// under `prefix` (the layout [`Nf4Weight::load_linear4bit`] reads and bitsandbytes
    /// loads).
    pub fn save_linear4bit(&self, prefix: &str) -> Result<Vec<u8>> {
        use safetensors::{tensor::TensorView, Dtype};
        self.validate()?;
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let dtype = match self.dtype {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        };
        let mut state = serde_json::json!({
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": dtype,
            "shape": [self.rows, self.cols],
        });
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
            (
                format!("{prefix}weight"),
                Dtype::U8,
                vec![self.packed.len(), 1],
                self.packed.clone(),
            ),
            (
                format!("{prefix}weight.quant_map"),
                Dtype::F32,
                vec![16],
                f32_bytes(&NF4_CODE),
            ),
        ];
        match &self.absmax {
            Absmax::F32(a) => tensors.push((
                format!("{prefix}weight.absmax"),
                Dtype::F32,
                vec![a.len()],
                f32_bytes(a),
            )),
            Absmax::Double(d) => {
                state["nested_blocksize"] = NESTED_BLOCKSIZE.into();
                state["nested_dtype"] = "float32".into();
                state["nested_offset"] = (d.offset as f64).into();
                tensors.push((
                    format!("{prefix}weight.absmax"),
                    Dtype::U8,
                    vec![d.q.len()],
                    d.q.clone(),
                ));
                tensors.push((
                    format!("{prefix}weight.nested_absmax"),
                    Dtype::F32,
                    vec![d.absmax2.len()],
                    f32_bytes(&d.absmax2),
                ));
                tensors.push((
                    format!("{prefix}weight.nested_quant_map"),
                    Dtype::F32,
                    vec![256],
                    f32_bytes(&d.code),
                ));
            }
        }
        let json = serde_json::to_vec(&state).map_err(|e| fmt_err(e.to_string()))?;
        tensors.push((
            format!("{prefix}weight.quant_state.bitsandbytes__nf4"),
            Dtype::U8,
            vec![json.len()],
            json,
        ));
        let views: HashMap<String, TensorView<'_>> = tensors
            .iter()
            .map(|(n, dt, shape, data)| {
                TensorView::new(*dt, shape.clone(), data)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| fmt_err(format!("{n}: {e}")))
            })
            .collect::<Result<_>>()?;
        safetensors::serialize(&views, None).map_err(|e| fmt_err(e.to_string()))
    }
}
