//! Step plans as typed, immutable Python objects the runner reads directly.
//!
//! Every vector a runner turns into a tensor is an int64 NumPy array built
//! once from the core's buffer (no Python list on the way), which
//! ``torch.from_numpy`` wraps without a copy. Plans pickle (for broadcasting
//! to tensor-parallel ranks).

use numpy::{PyArray1, PyArray2, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use spyre_cb_core as core;

type I64Array = Py<PyArray1<i64>>;

fn array(py: Python<'_>, v: Vec<i64>) -> I64Array {
    PyArray1::from_vec(py, v).unbind()
}

fn array_u32(py: Python<'_>, v: &[u32]) -> I64Array {
    array(py, v.iter().map(|&x| i64::from(x)).collect())
}

/// Any int sequence (list, array) as an owned int64 array (used when unpickling).
fn as_array(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<I64Array> {
    Ok(array(py, obj.extract::<Vec<i64>>()?))
}

/// Prefill of one request (prefill batch size 1), padded left to the batch
/// tkv and right to a block boundary.
#[pyclass(module = "spyre_cb._core", frozen, get_all)]
pub struct PrefillPlan {
    pub request_id: Py<PyString>,
    /// Batch tkv after the prefill; the last prompt token sits at tkv - 1.
    pub tkv: u32,
    /// How far the running sequences moved right (a multiple of 64).
    pub tkv_shift: u32,
    pub new_batch: bool,
    pub prompt_len: u32,
    /// Pad tokens before the prompt (fully padded blocks cut off).
    pub left_padding: u32,
    /// Pad tokens after the prompt up to the block boundary.
    pub right_padding: u32,
    /// Index in the input of the last prompt token (its logits give the first token).
    pub logits_index: u32,
    /// Padded input ids (pads are 0); empty for token-less requests.
    pub input_ids: I64Array,
    /// Position ids: pads 0, prompt 0..prompt_len-1.
    pub positions: I64Array,
    /// KV slot of every input token.
    pub slot_mapping: I64Array,
    /// The blocks this prefill fills.
    pub block_table: I64Array,
}

#[pymethods]
impl PrefillPlan {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        request_id: Py<PyString>,
        tkv: u32,
        tkv_shift: u32,
        new_batch: bool,
        prompt_len: u32,
        left_padding: u32,
        right_padding: u32,
        logits_index: u32,
        input_ids: &Bound<'_, PyAny>,
        positions: &Bound<'_, PyAny>,
        slot_mapping: &Bound<'_, PyAny>,
        block_table: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        Ok(Self {
            request_id,
            tkv,
            tkv_shift,
            new_batch,
            prompt_len,
            left_padding,
            right_padding,
            logits_index,
            input_ids: as_array(py, input_ids)?,
            positions: as_array(py, positions)?,
            slot_mapping: as_array(py, slot_mapping)?,
            block_table: as_array(py, block_table)?,
        })
    }

    #[classattr]
    fn kind() -> &'static str {
        "prefill"
    }

    /// Input length: left padding + prompt + right padding (whole blocks).
    #[getter]
    fn input_len(&self) -> u32 {
        self.left_padding + self.prompt_len + self.right_padding
    }

    /// The ids in the order ``update`` takes their tokens: ``(request_id,)``.
    #[getter]
    fn request_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, [self.request_id.bind(py)])
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        let p = slf.get();
        let args = (
            p.request_id.clone_ref(py),
            p.tkv,
            p.tkv_shift,
            p.new_batch,
            p.prompt_len,
            p.left_padding,
            p.right_padding,
            p.logits_index,
            p.input_ids.clone_ref(py),
            p.positions.clone_ref(py),
            p.slot_mapping.clone_ref(py),
            p.block_table.clone_ref(py),
        );
        Ok((slf.get_type().into_any(), args.into_pyobject(py)?))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "PrefillPlan(request_id={:?}, tkv={}, tkv_shift={}, new_batch={}, prompt_len={}, left_padding={}, right_padding={})",
            self.request_id.bind(py).to_string(),
            self.tkv,
            self.tkv_shift,
            if self.new_batch { "True" } else { "False" },
            self.prompt_len,
            self.left_padding,
            self.right_padding
        )
    }
}

/// One decode step of every running sequence, most recently admitted first.
#[pyclass(module = "spyre_cb._core", frozen, get_all)]
pub struct DecodePlan {
    /// Ids in batch order (the order ``update`` takes their tokens).
    pub request_ids: Py<PyTuple>,
    pub batch_size: u32,
    /// Virtual position every sequence writes this step (batch tkv before the step).
    pub tkv: u32,
    /// Each sequence's last generated token.
    pub input_ids: I64Array,
    /// Position id of each input token (its index in the unpadded sequence).
    pub positions: I64Array,
    /// KV slot each input token is written to.
    pub slot_mapping: I64Array,
    /// Block tables, one row per sequence, padded with the null block 0: shape (batch, width).
    pub block_table: Py<PyArray2<i64>>,
    /// In-table index of each sequence's first real token.
    pub left_padding: I64Array,
    /// In-table length of each sequence including this step's token.
    pub current_tkv: I64Array,
}

#[pymethods]
impl DecodePlan {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        request_ids: Py<PyTuple>,
        batch_size: u32,
        tkv: u32,
        input_ids: &Bound<'_, PyAny>,
        positions: &Bound<'_, PyAny>,
        slot_mapping: &Bound<'_, PyAny>,
        block_table: &Bound<'_, PyAny>,
        left_padding: &Bound<'_, PyAny>,
        current_tkv: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let rows: Vec<Vec<i64>> = block_table.extract()?;
        let table = PyArray2::from_vec2(py, &rows)
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("block_table: {e}")))?;
        Ok(Self {
            request_ids,
            batch_size,
            tkv,
            input_ids: as_array(py, input_ids)?,
            positions: as_array(py, positions)?,
            slot_mapping: as_array(py, slot_mapping)?,
            block_table: table.unbind(),
            left_padding: as_array(py, left_padding)?,
            current_tkv: as_array(py, current_tkv)?,
        })
    }

    #[classattr]
    fn kind() -> &'static str {
        "decode"
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        let p = slf.get();
        let args = (
            p.request_ids.clone_ref(py),
            p.batch_size,
            p.tkv,
            p.input_ids.clone_ref(py),
            p.positions.clone_ref(py),
            p.slot_mapping.clone_ref(py),
            p.block_table.bind(py).call_method0("tolist")?,
            p.left_padding.clone_ref(py),
            p.current_tkv.clone_ref(py),
        );
        Ok((slf.get_type().into_any(), args.into_pyobject(py)?))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "DecodePlan(request_ids={}, batch_size={}, tkv={})",
            self.request_ids.bind(py).repr().map(|r| r.to_string()).unwrap_or_default(),
            self.batch_size,
            self.tkv
        )
    }
}

/// Nothing runs this step (the batch is empty).
#[pyclass(module = "spyre_cb._core", frozen)]
pub struct IdlePlan;

#[pymethods]
impl IdlePlan {
    #[new]
    fn new() -> Self {
        Self
    }
    #[classattr]
    fn kind() -> &'static str {
        "idle"
    }
    #[getter]
    fn request_ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyTuple> {
        PyTuple::empty(py)
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> (Bound<'py, PyAny>, Bound<'py, PyTuple>) {
        (slf.get_type().into_any(), PyTuple::empty(slf.py()))
    }
    fn __repr__(&self) -> &'static str {
        "IdlePlan()"
    }
}

/// One prefill chunk (chunked policy): ``chunk_size`` input tokens attending
/// over the request's earlier chunks and cached prefix through its block
/// table (in-table positions are prompt positions).
#[pyclass(module = "spyre_cb._core", frozen, get_all)]
pub struct ChunkPlan {
    pub request_id: Py<PyString>,
    pub prompt_len: u32,
    pub chunk_index: u32,
    pub chunk_count: u32,
    pub chunk_size: u32,
    /// Pad tokens at the start of the input (chunk 0 only).
    pub left_padding: u32,
    /// Prompt positions start..end are computed by this chunk.
    pub start: u32,
    pub end: u32,
    /// In-table position just past the input's last token.
    pub context_end: u32,
    /// The last chunk samples the request's first token.
    pub is_last: bool,
    pub logits_index: u32,
    /// Prompt blocks reused from the prefix cache.
    pub cached_blocks: u32,
    pub input_ids: I64Array,
    pub positions: I64Array,
    /// KV slot per input token (padding and shared blocks: the null block).
    pub slot_mapping: I64Array,
    /// The same per input block (0 = null block).
    pub block_slots: I64Array,
    pub block_table: I64Array,
}

#[pymethods]
impl ChunkPlan {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        request_id: Py<PyString>,
        prompt_len: u32,
        chunk_index: u32,
        chunk_count: u32,
        chunk_size: u32,
        left_padding: u32,
        start: u32,
        end: u32,
        context_end: u32,
        is_last: bool,
        logits_index: u32,
        cached_blocks: u32,
        input_ids: &Bound<'_, PyAny>,
        positions: &Bound<'_, PyAny>,
        slot_mapping: &Bound<'_, PyAny>,
        block_slots: &Bound<'_, PyAny>,
        block_table: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        Ok(Self {
            request_id,
            prompt_len,
            chunk_index,
            chunk_count,
            chunk_size,
            left_padding,
            start,
            end,
            context_end,
            is_last,
            logits_index,
            cached_blocks,
            input_ids: as_array(py, input_ids)?,
            positions: as_array(py, positions)?,
            slot_mapping: as_array(py, slot_mapping)?,
            block_slots: as_array(py, block_slots)?,
            block_table: as_array(py, block_table)?,
        })
    }

    #[classattr]
    fn kind() -> &'static str {
        "chunk"
    }

    /// The step's tkv: the prompt length.
    #[getter]
    fn tkv(&self) -> u32 {
        self.prompt_len
    }

    /// The ids that sample a token: ``(request_id,)`` for the last chunk, else ``()``.
    #[getter]
    fn request_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        if self.is_last {
            PyTuple::new(py, [self.request_id.bind(py)])
        } else {
            Ok(PyTuple::empty(py))
        }
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let py = slf.py();
        let p = slf.get();
        let n = |x: u32| -> PyResult<Bound<'py, PyAny>> { Ok(x.into_pyobject(py)?.into_any()) };
        let items = [
            p.request_id.bind(py).clone().into_any(),
            n(p.prompt_len)?,
            n(p.chunk_index)?,
            n(p.chunk_count)?,
            n(p.chunk_size)?,
            n(p.left_padding)?,
            n(p.start)?,
            n(p.end)?,
            n(p.context_end)?,
            pyo3::types::PyBool::new(py, p.is_last).to_owned().into_any(),
            n(p.logits_index)?,
            n(p.cached_blocks)?,
            p.input_ids.bind(py).clone().into_any(),
            p.positions.bind(py).clone().into_any(),
            p.slot_mapping.bind(py).clone().into_any(),
            p.block_slots.bind(py).clone().into_any(),
            p.block_table.bind(py).clone().into_any(),
        ];
        let t = PyTuple::new(py, items)?;
        Ok((slf.get_type().into_any(), t))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "ChunkPlan(request_id={:?}, prompt_len={}, chunk={}/{}, start={}, end={}, is_last={})",
            self.request_id.bind(py).to_string(),
            self.prompt_len,
            self.chunk_index + 1,
            self.chunk_count,
            self.start,
            self.end,
            self.is_last
        )
    }
}

/// The core's plan as its Python object (vectors moved into arrays).
pub fn to_python(py: Python<'_>, plan: core::StepPlan) -> PyResult<Py<PyAny>> {
    Ok(match plan {
        core::StepPlan::Idle => Py::new(py, IdlePlan)?.into_any(),
        core::StepPlan::Prefill(p) => Py::new(
            py,
            PrefillPlan {
                request_id: PyString::new(py, &p.request_id).unbind(),
                tkv: p.tkv,
                tkv_shift: p.tkv_shift,
                new_batch: p.new_batch,
                prompt_len: p.prompt_len,
                left_padding: p.left_padding,
                right_padding: p.right_padding,
                logits_index: p.logits_index,
                input_ids: array_u32(py, &p.input_ids),
                positions: array_u32(py, &p.positions),
                slot_mapping: array(py, p.slot_mapping),
                block_table: array_u32(py, &p.block_table),
            },
        )?
        .into_any(),
        core::StepPlan::Chunk(c) => Py::new(
            py,
            ChunkPlan {
                request_id: PyString::new(py, &c.request_id).unbind(),
                prompt_len: c.prompt_len,
                chunk_index: c.chunk_index,
                chunk_count: c.chunk_count,
                chunk_size: c.chunk_size,
                left_padding: c.left_padding,
                start: c.start,
                end: c.end,
                context_end: c.context_end,
                is_last: c.is_last,
                logits_index: c.logits_index,
                cached_blocks: c.cached_blocks,
                input_ids: array_u32(py, &c.input_ids),
                positions: array_u32(py, &c.positions),
                slot_mapping: array(py, c.slot_mapping),
                block_slots: array_u32(py, &c.block_slots),
                block_table: array_u32(py, &c.block_table),
            },
        )?
        .into_any(),
        core::StepPlan::Decode(d) => {
            let n = d.batch_size as usize;
            let table = array_u32(py, &d.block_table);
            let table = table.bind(py).reshape([n, d.width as usize])?;
            Py::new(
                py,
                DecodePlan {
                    request_ids: PyTuple::new(py, d.request_ids.iter().map(|s| &**s))?.unbind(),
                    batch_size: d.batch_size,
                    tkv: d.tkv,
                    input_ids: array_u32(py, &d.input_ids),
                    positions: array_u32(py, &d.positions),
                    slot_mapping: array(py, d.slot_mapping),
                    block_table: table.unbind(),
                    left_padding: array_u32(py, &d.left_padding),
                    current_tkv: array_u32(py, &d.current_tkv),
                },
            )?
            .into_any()
        }
    })
}
