//! The runner's CPU kernels (`spyre-cb-kernels`) over numpy views of torch
//! tensors: no copy in, the result written into a caller-owned array, the GIL
//! released while the kernel runs. Malformed inputs raise `ValueError`
//! naming the limit they broke (shapes, non-contiguous arrays, buffers that
//! share memory); an array of another dtype raises the argument
//! conversion's `TypeError`. Nothing is read out of bounds.

use numpy::{PyArrayMethods, PyUntypedArrayMethods};
use numpy::{
    PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyReadonlyArray4, PyReadwriteArray1, PyReadwriteArray2,
    PyReadwriteArray3, PyReadwriteArray4,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use spyre_cb_kernels::{
    paged_decode, paged_decode_qkv, CacheElem, DecodeInputs, DecodeShape, Element, LinearShape, QkvInputs,
};

/// `ValueError` naming the first of `arrays` (name, is C-contiguous) that is
/// not C-contiguous; `op` names the kernel.
fn require_contiguous(op: &str, arrays: &[(&str, bool)]) -> PyResult<()> {
    match arrays.iter().find(|(_, ok)| !ok) {
        Some((what, _)) => Err(PyValueError::new_err(format!("{op}: {what} must be C-contiguous"))),
        None => Ok(()),
    }
}

/// `ValueError` when two of `arrays` (name, first byte, bytes) overlap, one
/// of them written: NumPy's borrow checks cannot see it when both are views
/// of one bfloat16 tensor (each `numpy_view` is a new array object).
fn require_disjoint(op: &str, arrays: &[(&str, *const u8, usize)]) -> PyResult<()> {
    for (i, (a, pa, na)) in arrays.iter().enumerate() {
        for (b, pb, nb) in &arrays[i + 1..] {
            let (a0, b0) = (*pa as usize, *pb as usize);
            if *na > 0 && *nb > 0 && a0 < b0 + nb && b0 < a0 + na {
                return Err(PyValueError::new_err(format!("{op}: {a} and {b} share memory")));
            }
        }
    }
    Ok(())
}

/// (name, first byte, bytes) of an array, for [`require_disjoint`].
fn extent<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    what: &'a str,
    array: &Bound<'_, numpy::PyArray<T, D>>,
) -> (&'a str, *const u8, usize) {
    (what, array.data() as *const u8, array.len() * std::mem::size_of::<T>())
}

/// Decode attention read in place from a paged KV cache (one query per
/// sequence); see the kernels crate for the exact semantics.
#[pyfunction]
#[pyo3(signature = (query, key_cache, value_cache, block_table, context_start, context_end, scale, out, threads = 1))]
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_attention(
    py: Python<'_>,
    query: PyReadonlyArray3<'_, f32>,
    key_cache: PyReadonlyArray4<'_, f32>,
    value_cache: PyReadonlyArray4<'_, f32>,
    block_table: PyReadonlyArray2<'_, i64>,
    context_start: PyReadonlyArray1<'_, i64>,
    context_end: PyReadonlyArray1<'_, i64>,
    scale: f32,
    out: PyReadwriteArray3<'_, f32>,
    threads: usize,
) -> PyResult<()> {
    decode(py, query, key_cache, value_cache, block_table, context_start, context_end, scale, out, threads)
}

/// [`paged_decode_attention`] over a bfloat16 cache given as its bits
/// (`uint16` views of torch's `bfloat16` tensors); query and result in `f32`.
#[pyfunction]
#[pyo3(signature = (query, key_cache, value_cache, block_table, context_start, context_end, scale, out, threads = 1))]
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_attention_bf16(
    py: Python<'_>,
    query: PyReadonlyArray3<'_, f32>,
    key_cache: PyReadonlyArray4<'_, u16>,
    value_cache: PyReadonlyArray4<'_, u16>,
    block_table: PyReadonlyArray2<'_, i64>,
    context_start: PyReadonlyArray1<'_, i64>,
    context_end: PyReadonlyArray1<'_, i64>,
    scale: f32,
    out: PyReadwriteArray3<'_, f32>,
    threads: usize,
) -> PyResult<()> {
    decode(py, query, key_cache, value_cache, block_table, context_start, context_end, scale, out, threads)
}

#[allow(clippy::too_many_arguments)]
fn decode<E: CacheElem + numpy::Element>(
    py: Python<'_>,
    query: PyReadonlyArray3<'_, f32>,
    key_cache: PyReadonlyArray4<'_, E>,
    value_cache: PyReadonlyArray4<'_, E>,
    block_table: PyReadonlyArray2<'_, i64>,
    context_start: PyReadonlyArray1<'_, i64>,
    context_end: PyReadonlyArray1<'_, i64>,
    scale: f32,
    mut out: PyReadwriteArray3<'_, f32>,
    threads: usize,
) -> PyResult<()> {
    let (q, k, v) = (query.shape(), key_cache.shape(), value_cache.shape());
    let shape = DecodeShape {
        batch: q[0],
        n_heads: q[1],
        kv_heads: k[2],
        head_dim: q[2],
        value_dim: v[3],
        n_blocks: k[0],
        block_size: k[1],
        table_width: block_table.shape()[1],
    };
    if k[3] != q[2] || v[..3] != k[..3] || block_table.shape()[0] != q[0] {
        return Err(PyValueError::new_err(format!(
            "paged decode attention: shapes disagree: query {q:?}, key_cache {k:?}, value_cache {v:?}, block_table {:?}",
            block_table.shape()
        )));
    }
    require_contiguous(
        "paged decode attention",
        &[
            ("query", query.is_c_contiguous()),
            ("key_cache", key_cache.is_c_contiguous()),
            ("value_cache", value_cache.is_c_contiguous()),
            ("block_table", block_table.is_c_contiguous()),
            ("out", out.is_c_contiguous()),
        ],
    )?;
    let inputs = DecodeInputs {
        query: query.as_slice()?,
        key_cache: key_cache.as_slice()?,
        value_cache: value_cache.as_slice()?,
        block_table: block_table.as_slice()?,
        context_start: context_start.as_slice()?,
        context_end: context_end.as_slice()?,
        scale,
    };
    let out = out.as_slice_mut()?;
    py.detach(|| paged_decode(&shape, &inputs, out, threads)).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// A decode step's attention from its fused QKV rows (bfloat16 as its bits):
/// the query and key heads rotated, the new keys and values stored at
/// `slots`, the attention over each sequence's context, the result rounded
/// into `out` (`[batch, n_heads * value_dim]`); FMS's separate steps, bit
/// for bit; see the kernels crate. Checked before the cache is written.
#[pyfunction]
#[pyo3(signature = (qkv, cos, neg_sin, sin, slots, key_cache, value_cache, block_table, context_start, context_end, scale, n_heads, out, threads = 1))]
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_qkv_bf16(
    py: Python<'_>,
    qkv: PyReadonlyArray2<'_, u16>,
    cos: PyReadonlyArray2<'_, f32>,
    neg_sin: PyReadonlyArray2<'_, f32>,
    sin: PyReadonlyArray2<'_, f32>,
    slots: PyReadonlyArray1<'_, i64>,
    key_cache: PyReadwriteArray4<'_, u16>,
    value_cache: PyReadwriteArray4<'_, u16>,
    block_table: PyReadonlyArray2<'_, i64>,
    context_start: PyReadonlyArray1<'_, i64>,
    context_end: PyReadonlyArray1<'_, i64>,
    scale: f32,
    n_heads: usize,
    out: PyReadwriteArray2<'_, u16>,
    threads: usize,
) -> PyResult<()> {
    let inputs = (qkv, cos, neg_sin, sin, slots, block_table, context_start, context_end);
    decode_qkv(py, inputs, key_cache, value_cache, scale, n_heads, out, threads)
}

/// [`paged_decode_qkv_bf16`] in `f32`.
#[pyfunction]
#[pyo3(signature = (qkv, cos, neg_sin, sin, slots, key_cache, value_cache, block_table, context_start, context_end, scale, n_heads, out, threads = 1))]
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_qkv_f32(
    py: Python<'_>,
    qkv: PyReadonlyArray2<'_, f32>,
    cos: PyReadonlyArray2<'_, f32>,
    neg_sin: PyReadonlyArray2<'_, f32>,
    sin: PyReadonlyArray2<'_, f32>,
    slots: PyReadonlyArray1<'_, i64>,
    key_cache: PyReadwriteArray4<'_, f32>,
    value_cache: PyReadwriteArray4<'_, f32>,
    block_table: PyReadonlyArray2<'_, i64>,
    context_start: PyReadonlyArray1<'_, i64>,
    context_end: PyReadonlyArray1<'_, i64>,
    scale: f32,
    n_heads: usize,
    out: PyReadwriteArray2<'_, f32>,
    threads: usize,
) -> PyResult<()> {
    let inputs = (qkv, cos, neg_sin, sin, slots, block_table, context_start, context_end);
    decode_qkv(py, inputs, key_cache, value_cache, scale, n_heads, out, threads)
}

/// `paged_decode_qkv`'s read-only arrays: qkv, cos, neg_sin, sin, slots, block
/// table, context start and end.
type QkvArrays<'py, E> = (
    PyReadonlyArray2<'py, E>,
    PyReadonlyArray2<'py, f32>,
    PyReadonlyArray2<'py, f32>,
    PyReadonlyArray2<'py, f32>,
    PyReadonlyArray1<'py, i64>,
    PyReadonlyArray2<'py, i64>,
    PyReadonlyArray1<'py, i64>,
    PyReadonlyArray1<'py, i64>,
);

#[allow(clippy::too_many_arguments)]
fn decode_qkv<E: Element + CacheElem + numpy::Element>(
    py: Python<'_>,
    arrays: QkvArrays<'_, E>,
    mut key_cache: PyReadwriteArray4<'_, E>,
    mut value_cache: PyReadwriteArray4<'_, E>,
    scale: f32,
    n_heads: usize,
    mut out: PyReadwriteArray2<'_, E>,
    threads: usize,
) -> PyResult<()> {
    let (qkv, cos, neg_sin, sin, slots, block_table, context_start, context_end) = arrays;
    let (k, v) = (key_cache.shape().to_vec(), value_cache.shape().to_vec());
    if v[..3] != k[..3] || block_table.shape()[0] != qkv.shape()[0] {
        return Err(PyValueError::new_err(format!(
            "paged decode attention: shapes disagree: qkv {:?}, key_cache {k:?}, value_cache {v:?}, block_table {:?}",
            qkv.shape(),
            block_table.shape()
        )));
    }
    let op = "paged decode attention";
    require_contiguous(
        op,
        &[
            ("qkv", qkv.is_c_contiguous()),
            ("cos", cos.is_c_contiguous()),
            ("neg_sin", neg_sin.is_c_contiguous()),
            ("sin", sin.is_c_contiguous()),
            ("slots", slots.is_c_contiguous()),
            ("key_cache", key_cache.is_c_contiguous()),
            ("value_cache", value_cache.is_c_contiguous()),
            ("block_table", block_table.is_c_contiguous()),
            ("context_start", context_start.is_c_contiguous()),
            ("context_end", context_end.is_c_contiguous()),
            ("out", out.is_c_contiguous()),
        ],
    )?;
    require_disjoint(
        op,
        &[
            extent("key_cache", &key_cache),
            extent("value_cache", &value_cache),
            extent("out", &out),
            extent("qkv", &qkv),
        ],
    )?;
    let shape = DecodeShape {
        batch: qkv.shape()[0],
        n_heads,
        kv_heads: k[2],
        head_dim: k[3],
        value_dim: v[3],
        n_blocks: k[0],
        block_size: k[1],
        table_width: block_table.shape()[1],
    };
    let inputs = QkvInputs {
        qkv: qkv.as_slice()?,
        cos: cos.as_slice()?,
        neg_sin: neg_sin.as_slice()?,
        sin: sin.as_slice()?,
        slots: slots.as_slice()?,
        block_table: block_table.as_slice()?,
        context_start: context_start.as_slice()?,
        context_end: context_end.as_slice()?,
        scale,
    };
    let (key_cache, value_cache, out) = (key_cache.as_slice_mut()?, value_cache.as_slice_mut()?, out.as_slice_mut()?);
    py.detach(|| paged_decode_qkv(&shape, &inputs, key_cache, value_cache, out, threads))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Reorders a bfloat16 weight (`[out, in]`, its bits) into `packed` (1-D,
/// `packed_linear_len(out, in, "bfloat16")` elements) for [`linear_bf16`].
#[pyfunction]
pub fn pack_linear_bf16(
    py: Python<'_>,
    weight: PyReadonlyArray2<'_, u16>,
    packed: PyReadwriteArray1<'_, u16>,
) -> PyResult<()> {
    pack(py, weight, packed)
}

/// [`pack_linear_bf16`] for an `f32` weight.
#[pyfunction]
pub fn pack_linear_f32(
    py: Python<'_>,
    weight: PyReadonlyArray2<'_, f32>,
    packed: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    pack(py, weight, packed)
}

fn pack<E: Element + numpy::Element>(
    py: Python<'_>,
    weight: PyReadonlyArray2<'_, E>,
    mut packed: PyReadwriteArray1<'_, E>,
) -> PyResult<()> {
    let (n, k) = (weight.shape()[0], weight.shape()[1]);
    if !weight.is_c_contiguous() || !packed.is_c_contiguous() {
        return Err(PyValueError::new_err("linear: weight and packed must be C-contiguous"));
    }
    let weight = weight.as_slice()?;
    let packed = packed.as_slice_mut()?;
    py.detach(|| spyre_cb_kernels::pack(weight, n, k, packed)).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Elements of a packed weight of `out_features x in_features` in `dtype`
/// (`"bfloat16"` or `"float32"`).
#[pyfunction]
pub fn packed_linear_len(out_features: usize, in_features: usize, dtype: &str) -> PyResult<usize> {
    match dtype {
        "bfloat16" => Ok(spyre_cb_kernels::packed_len::<u16>(out_features, in_features)),
        "float32" => Ok(spyre_cb_kernels::packed_len::<f32>(out_features, in_features)),
        _ => Err(PyValueError::new_err(format!("linear: dtype must be 'bfloat16' or 'float32', got {dtype:?}"))),
    }
}

/// `out = x weight^T + bias` in bfloat16 (all given as their bits, `uint16`
/// views of torch's `bfloat16` tensors), the weight packed by
/// [`pack_linear_bf16`]; see the kernels crate.
#[pyfunction]
#[pyo3(signature = (x, packed, bias, out, threads = 1))]
pub fn linear_bf16(
    py: Python<'_>,
    x: PyReadonlyArray2<'_, u16>,
    packed: PyReadonlyArray1<'_, u16>,
    bias: Option<PyReadonlyArray1<'_, u16>>,
    out: PyReadwriteArray2<'_, u16>,
    threads: usize,
) -> PyResult<()> {
    run_linear(py, x, packed, bias, out, threads)
}

/// [`linear_bf16`] in `f32`, the weight packed by [`pack_linear_f32`].
#[pyfunction]
#[pyo3(signature = (x, packed, bias, out, threads = 1))]
pub fn linear_f32(
    py: Python<'_>,
    x: PyReadonlyArray2<'_, f32>,
    packed: PyReadonlyArray1<'_, f32>,
    bias: Option<PyReadonlyArray1<'_, f32>>,
    out: PyReadwriteArray2<'_, f32>,
    threads: usize,
) -> PyResult<()> {
    run_linear(py, x, packed, bias, out, threads)
}

fn run_linear<E: Element + numpy::Element>(
    py: Python<'_>,
    x: PyReadonlyArray2<'_, E>,
    packed: PyReadonlyArray1<'_, E>,
    bias: Option<PyReadonlyArray1<'_, E>>,
    mut out: PyReadwriteArray2<'_, E>,
    threads: usize,
) -> PyResult<()> {
    let (xs, os) = (x.shape(), out.shape());
    if os[0] != xs[0] {
        return Err(PyValueError::new_err(format!(
            "linear: shapes disagree: x {xs:?}, out {os:?} (x [rows, in], out [rows, out])"
        )));
    }
    let shape = LinearShape { rows: xs[0], in_features: xs[1], out_features: os[1] };
    require_contiguous(
        "linear",
        &[
            ("x", x.is_c_contiguous()),
            ("packed", packed.is_c_contiguous()),
            ("out", out.is_c_contiguous()),
            ("bias", bias.as_ref().is_none_or(|b| b.is_c_contiguous())),
        ],
    )?;
    let (x, packed) = (x.as_slice()?, packed.as_slice()?);
    let bias = bias.as_ref().map(|b| b.as_slice()).transpose()?;
    let out = out.as_slice_mut()?;
    py.detach(|| spyre_cb_kernels::linear(&shape, x, packed, bias, out, threads))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Root-mean-square normalization of each row of `x` (`[rows, dim]`) into
/// `out`, then times `weight` and plus `bias` (`[dim]` each, optional), in
/// bfloat16 given as its bits, computed in `f32` and rounded after each step
/// as torch rounds FMS's `LayerNormParameterized`; see the kernels crate.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, eps, out))]
pub fn rms_norm_bf16(
    py: Python<'_>,
    x: PyReadonlyArray2<'_, u16>,
    weight: Option<PyReadonlyArray1<'_, u16>>,
    bias: Option<PyReadonlyArray1<'_, u16>>,
    eps: f32,
    out: PyReadwriteArray2<'_, u16>,
) -> PyResult<()> {
    run_rms_norm(py, x, weight, bias, eps, out)
}

/// [`rms_norm_bf16`] in `f32`.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, eps, out))]
pub fn rms_norm_f32(
    py: Python<'_>,
    x: PyReadonlyArray2<'_, f32>,
    weight: Option<PyReadonlyArray1<'_, f32>>,
    bias: Option<PyReadonlyArray1<'_, f32>>,
    eps: f32,
    out: PyReadwriteArray2<'_, f32>,
) -> PyResult<()> {
    run_rms_norm(py, x, weight, bias, eps, out)
}

fn run_rms_norm<E: Element + numpy::Element>(
    py: Python<'_>,
    x: PyReadonlyArray2<'_, E>,
    weight: Option<PyReadonlyArray1<'_, E>>,
    bias: Option<PyReadonlyArray1<'_, E>>,
    eps: f32,
    mut out: PyReadwriteArray2<'_, E>,
) -> PyResult<()> {
    if x.shape() != out.shape() {
        return Err(PyValueError::new_err(format!(
            "rms_norm: x {:?} and out {:?} must have the same shape",
            x.shape(),
            out.shape()
        )));
    }
    let op = "rms_norm";
    require_contiguous(op, &[("x", x.is_c_contiguous()), ("out", out.is_c_contiguous())])?;
    require_disjoint(op, &[extent("x", &x), extent("out", &out)])?;
    let dim = x.shape()[1];
    let (x, out) = (x.as_slice()?, out.as_slice_mut()?);
    let weight = weight.as_ref().map(|w| w.as_slice()).transpose()?;
    let bias = bias.as_ref().map(|b| b.as_slice()).transpose()?;
    py.detach(|| spyre_cb_kernels::rms_norm(x, dim, weight, bias, eps, out))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// A residual connection, then the next RMS norm (bfloat16 as its bits): `h
/// = delta * multiplier + h` in place (`delta + h` when `multiplier` is
/// None), each op rounded as torch rounds it, then `out = rms_norm(h)` as
/// [`rms_norm_bf16`]; see the kernels crate.
#[pyfunction]
#[pyo3(signature = (delta, multiplier, h, weight, bias, eps, out))]
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_bf16(
    py: Python<'_>,
    delta: PyReadonlyArray2<'_, u16>,
    multiplier: Option<f32>,
    h: PyReadwriteArray2<'_, u16>,
    weight: Option<PyReadonlyArray1<'_, u16>>,
    bias: Option<PyReadonlyArray1<'_, u16>>,
    eps: f32,
    out: PyReadwriteArray2<'_, u16>,
) -> PyResult<()> {
    run_add_rms_norm(py, delta, multiplier, h, weight, bias, eps, out)
}

/// [`add_rms_norm_bf16`] in `f32`.
#[pyfunction]
#[pyo3(signature = (delta, multiplier, h, weight, bias, eps, out))]
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_f32(
    py: Python<'_>,
    delta: PyReadonlyArray2<'_, f32>,
    multiplier: Option<f32>,
    h: PyReadwriteArray2<'_, f32>,
    weight: Option<PyReadonlyArray1<'_, f32>>,
    bias: Option<PyReadonlyArray1<'_, f32>>,
    eps: f32,
    out: PyReadwriteArray2<'_, f32>,
) -> PyResult<()> {
    run_add_rms_norm(py, delta, multiplier, h, weight, bias, eps, out)
}

#[allow(clippy::too_many_arguments)]
fn run_add_rms_norm<E: Element + numpy::Element>(
    py: Python<'_>,
    delta: PyReadonlyArray2<'_, E>,
    multiplier: Option<f32>,
    mut h: PyReadwriteArray2<'_, E>,
    weight: Option<PyReadonlyArray1<'_, E>>,
    bias: Option<PyReadonlyArray1<'_, E>>,
    eps: f32,
    mut out: PyReadwriteArray2<'_, E>,
) -> PyResult<()> {
    if delta.shape() != h.shape() || h.shape() != out.shape() {
        return Err(PyValueError::new_err(format!(
            "add_rms_norm: delta {:?}, h {:?} and out {:?} must have the same shape",
            delta.shape(),
            h.shape(),
            out.shape()
        )));
    }
    let op = "add_rms_norm";
    require_contiguous(
        op,
        &[("delta", delta.is_c_contiguous()), ("h", h.is_c_contiguous()), ("out", out.is_c_contiguous())],
    )?;
    require_disjoint(op, &[extent("h", &h), extent("out", &out), extent("delta", &delta)])?;
    let dim = h.shape()[1];
    let (delta, h, out) = (delta.as_slice()?, h.as_slice_mut()?, out.as_slice_mut()?);
    let weight = weight.as_ref().map(|w| w.as_slice()).transpose()?;
    let bias = bias.as_ref().map(|b| b.as_slice()).transpose()?;
    py.detach(|| spyre_cb_kernels::add_rms_norm(delta, multiplier, h, dim, weight, bias, eps, out))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// FMS's rotary embedding of `x` (`[rows, heads, head_dim]`, bfloat16 as its
/// bits) into `out`, each row's pairs rotated by its angles (`cos`, `neg_sin`,
/// `sin`: `[rows, head_dim / 2]` float32), with torch's roundings (the
/// results are FMS's, bit for bit); see the kernels crate.
#[pyfunction]
pub fn rope_bf16(
    py: Python<'_>,
    x: PyReadonlyArray3<'_, u16>,
    cos: PyReadonlyArray2<'_, f32>,
    neg_sin: PyReadonlyArray2<'_, f32>,
    sin: PyReadonlyArray2<'_, f32>,
    out: PyReadwriteArray3<'_, u16>,
) -> PyResult<()> {
    run_rope(py, x, cos, neg_sin, sin, out)
}

/// [`rope_bf16`] in `f32`.
#[pyfunction]
pub fn rope_f32(
    py: Python<'_>,
    x: PyReadonlyArray3<'_, f32>,
    cos: PyReadonlyArray2<'_, f32>,
    neg_sin: PyReadonlyArray2<'_, f32>,
    sin: PyReadonlyArray2<'_, f32>,
    out: PyReadwriteArray3<'_, f32>,
) -> PyResult<()> {
    run_rope(py, x, cos, neg_sin, sin, out)
}

fn run_rope<E: Element + numpy::Element>(
    py: Python<'_>,
    x: PyReadonlyArray3<'_, E>,
    cos: PyReadonlyArray2<'_, f32>,
    neg_sin: PyReadonlyArray2<'_, f32>,
    sin: PyReadonlyArray2<'_, f32>,
    mut out: PyReadwriteArray3<'_, E>,
) -> PyResult<()> {
    if x.shape() != out.shape() {
        return Err(PyValueError::new_err(format!(
            "rope: x {:?} and out {:?} must have the same shape",
            x.shape(),
            out.shape()
        )));
    }
    let op = "rope";
    require_contiguous(
        op,
        &[
            ("x", x.is_c_contiguous()),
            ("cos", cos.is_c_contiguous()),
            ("neg_sin", neg_sin.is_c_contiguous()),
            ("sin", sin.is_c_contiguous()),
            ("out", out.is_c_contiguous()),
        ],
    )?;
    require_disjoint(op, &[extent("x", &x), extent("out", &out)])?;
    let xs = x.shape();
    let shape = spyre_cb_kernels::RopeShape { rows: xs[0], heads: xs[1], head_dim: xs[2] };
    let (x, out) = (x.as_slice()?, out.as_slice_mut()?);
    let (cos, neg_sin, sin) = (cos.as_slice()?, neg_sin.as_slice()?, sin.as_slice()?);
    py.detach(|| spyre_cb_kernels::rope(&shape, x, cos, neg_sin, sin, out))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Whether this CPU runs [`linear_bf16`] vectorized (AVX512_BF16).
#[pyfunction]
pub fn linear_bf16_is_fast() -> bool {
    spyre_cb_kernels::linear_bf16_is_fast()
}

/// Whether this CPU runs [`linear_f32`] vectorized (AVX-512F).
#[pyfunction]
pub fn linear_f32_is_fast() -> bool {
    spyre_cb_kernels::linear_f32_is_fast()
}

/// Runs the kernels' split work on the worker threads of the GNU OpenMP
/// runtime at `library` (torch's `libgomp`), through its `GOMP_parallel`,
/// instead of on threads started per call; `None` goes back to those. The
/// library is never loaded here: returns False, and changes nothing, when it
/// is not already loaded in this process or lacks the entry.
#[pyfunction]
#[pyo3(signature = (library))]
pub fn share_openmp_workers(library: Option<&str>) -> PyResult<bool> {
    let Some(library) = library else {
        // SAFETY: no fork-join
        unsafe { spyre_cb_kernels::parallel::set_fork_join(None) };
        return Ok(false);
    };
    let Some(fork_join) = gomp_parallel(library)? else {
        return Ok(false);
    };
    // SAFETY: `GOMP_parallel` keeps the ForkJoin contract, and its library stays
    // loaded: `gomp_parallel` holds a reference to it that is never dropped.
    unsafe { spyre_cb_kernels::parallel::set_fork_join(Some(fork_join)) };
    Ok(true)
}

/// Whether the kernels' split work runs on a shared OpenMP runtime's workers.
#[pyfunction]
pub fn openmp_workers_shared() -> bool {
    spyre_cb_kernels::parallel::pooled()
}

#[cfg(unix)]
fn gomp_parallel(library: &str) -> PyResult<Option<spyre_cb_kernels::parallel::ForkJoin>> {
    let path = std::ffi::CString::new(library)
        .map_err(|_| PyValueError::new_err("share_openmp_workers: the library path holds a NUL byte"))?;
    // SAFETY: RTLD_NOLOAD only looks the library up among those loaded; the
    // handle's reference is kept for the process's life.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return Ok(None);
    }
    // SAFETY: a symbol looked up in a loaded library by a NUL-terminated name
    let entry = unsafe { libc::dlsym(handle, c"GOMP_parallel".as_ptr()) };
    if entry.is_null() {
        return Ok(None);
    }
    // SAFETY: GNU OpenMP's GOMP_parallel has the ForkJoin signature:
    // void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags)
    Ok(Some(unsafe { std::mem::transmute::<*mut libc::c_void, spyre_cb_kernels::parallel::ForkJoin>(entry) }))
}

#[cfg(not(unix))]
fn gomp_parallel(_library: &str) -> PyResult<Option<spyre_cb_kernels::parallel::ForkJoin>> {
    Ok(None)
}
