//! Step plans as typed, immutable Python objects the runner reads directly.
//!
//! Each plan class is declared once, as one list of fields ([`plan_class!`]):
//! the struct, its constructor (positional or keyword arguments in field
//! order), its pickling and its ``FIELDS`` (name and wire kind of every
//! field, which the tensor-parallel wire format walks) all come from it.
//! Every vector a runner turns into a tensor is an int64 NumPy array built
//! once from the core's buffer, which ``torch.from_numpy`` wraps without a
//! copy.

use numpy::{PyArray1, PyArray2, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use spyre_cb_core as core;

type I64Array = Py<PyArray1<i64>>;
type I64Table = Py<PyArray2<i64>>;

fn array(py: Python<'_>, v: Vec<i64>) -> I64Array {
    PyArray1::from_vec(py, v).unbind()
}

fn array_u32(py: Python<'_>, v: &[u32]) -> I64Array {
    array(py, v.iter().map(|&x| i64::from(x)).collect())
}

/// `(src, dst)` block pairs as an (n, 2) table.
fn copies(py: Python<'_>, v: &[(u32, u32)]) -> PyResult<I64Table> {
    let flat: Vec<i64> = v.iter().flat_map(|&(a, b)| [i64::from(a), i64::from(b)]).collect();
    Ok(PyArray1::from_vec(py, flat).reshape([v.len(), 2])?.unbind())
}

/// A field type of a plan: how it is built from a constructor argument, how
/// it goes back into one (pickling), and its kind on the wire: "int" and
/// "bool" (one header value), "id" (not sent), "ids" (its count sent),
/// "array" (its length sent, its values in the payload), "table" (rows and
/// columns sent, its values in the payload).
pub trait PlanField: Sized {
    const KIND: &'static str;
    fn from_arg(v: &Bound<'_, PyAny>, name: &str) -> PyResult<Self>;
    fn to_arg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>>;
}

fn bad(name: &str, what: &str, v: &Bound<'_, PyAny>) -> PyErr {
    pyo3::exceptions::PyTypeError::new_err(format!("{name} must be {what}, got {}", crate::convert::type_name(v)))
}

impl PlanField for u32 {
    const KIND: &'static str = "int";
    fn from_arg(v: &Bound<'_, PyAny>, name: &str) -> PyResult<Self> {
        v.extract().map_err(|_| bad(name, "an int in 0..2**32", v))
    }
    fn to_arg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.into_pyobject(py)?.into_any())
    }
}

impl PlanField for bool {
    const KIND: &'static str = "bool";
    fn from_arg(v: &Bound<'_, PyAny>, name: &str) -> PyResult<Self> {
        v.is_truthy().map_err(|_| bad(name, "a bool", v))
    }
    fn to_arg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(pyo3::types::PyBool::new(py, *self).to_owned().into_any())
    }
}

impl PlanField for Py<PyString> {
    const KIND: &'static str = "id";
    fn from_arg(v: &Bound<'_, PyAny>, name: &str) -> PyResult<Self> {
        Ok(v.cast::<PyString>().map_err(|_| bad(name, "a str", v))?.clone().unbind())
    }
    fn to_arg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.bind(py).clone().into_any())
    }
}

impl PlanField for Py<PyTuple> {
    const KIND: &'static str = "ids";
    fn from_arg(v: &Bound<'_, PyAny>, name: &str) -> PyResult<Self> {
        match v.cast::<PyTuple>() {
            Ok(t) => Ok(t.clone().unbind()),
            Err(_) => Ok(PyTuple::new(
                v.py(),
                v.try_iter().map_err(|_| bad(name, "a tuple of str", v))?.collect::<PyResult<Vec<_>>>()?,
            )?
            .unbind()),
        }
    }
    fn to_arg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.bind(py).clone().into_any())
    }
}

impl PlanField for I64Array {
    const KIND: &'static str = "array";
    fn from_arg(v: &Bound<'_, PyAny>, name: &str) -> PyResult<Self> {
        if let Ok(a) = v.cast::<PyArray1<i64>>() {
            return Ok(a.clone().unbind());
        }
        let items: Vec<i64> = v.extract().map_err(|_| bad(name, "a sequence of ints", v))?;
        Ok(array(v.py(), items))
    }
    fn to_arg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.bind(py).clone().into_any())
    }
}

impl PlanField for I64Table {
    const KIND: &'static str = "table";
    fn from_arg(v: &Bound<'_, PyAny>, name: &str) -> PyResult<Self> {
        if let Ok(a) = v.cast::<PyArray2<i64>>() {
            return Ok(a.clone().unbind());
        }
        let rows: Vec<Vec<i64>> = v.extract().map_err(|_| bad(name, "rows of ints", v))?;
        let t = PyArray2::from_vec2(v.py(), &rows)
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("{name}: {e}")))?;
        Ok(t.unbind())
    }
    fn to_arg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.bind(py).clone().into_any())
    }
}

/// Declares a plan class from one list of fields: the struct (every field a
/// read-only attribute), `__new__` taking the fields in order (positional or
/// keyword), `kind`, `FIELDS`, `__reduce__`, plus the class's own methods.
macro_rules! plan_class {
    (
        $(#[$doc:meta])*
        $name:ident($kind:literal) {
            $( $(#[$fdoc:meta])* $f:ident : $t:ty ),* $(,)?
        }
        $($extra:tt)*
    ) => {
        $(#[$doc])*
        #[pyclass(module = "spyre_cb._core", frozen, get_all)]
        pub struct $name {
            $( $(#[$fdoc])* pub $f: $t, )*
        }

        #[pymethods]
        impl $name {
            #[new]
            #[pyo3(signature = ($($f),*))]
            #[allow(clippy::too_many_arguments)] // one per declared field
            fn new($($f: &Bound<'_, PyAny>),*) -> PyResult<Self> {
                Ok(Self { $( $f: <$t as PlanField>::from_arg($f, stringify!($f))?, )* })
            }

            /// ``"prefill"``, ``"decode"``, ``"chunk"`` or ``"idle"``.
            #[classattr]
            fn kind() -> &'static str {
                $kind
            }

            /// ``(name, wire kind)`` of every field, in constructor order.
            #[classattr]
            #[allow(non_snake_case)]
            fn FIELDS(py: Python<'_>) -> PyResult<Py<PyTuple>> {
                let fields = [$( (stringify!($f), <$t as PlanField>::KIND) ),*];
                Ok(PyTuple::new(py, fields)?.unbind())
            }

            fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
                let py = slf.py();
                let p = slf.get();
                let args = PyTuple::new(py, [$( p.$f.to_arg(py)? ),*])?;
                Ok((slf.get_type().into_any(), args))
            }

            $($extra)*
        }
    };
}

plan_class! {
    /// Prefill of one request (prefill batch size 1), padded left to the
    /// batch tkv and right to a block boundary.
    PrefillPlan("prefill") {
        request_id: Py<PyString>,
        /// Batch tkv after the prefill; the last prompt token sits at tkv - 1.
        tkv: u32,
        /// How far the running sequences moved right (a multiple of 64).
        tkv_shift: u32,
        new_batch: bool,
        prompt_len: u32,
        /// Pad tokens before the prompt (fully padded blocks cut off).
        left_padding: u32,
        /// Pad tokens after the prompt up to the block boundary.
        right_padding: u32,
        /// Index in the input of the last prompt token (its logits give the first token).
        logits_index: u32,
        /// Padded input ids (pads are 0); empty for token-less requests.
        input_ids: I64Array,
        /// Position ids: pads 0, prompt 0..prompt_len-1.
        positions: I64Array,
        /// KV slot of every input token.
        slot_mapping: I64Array,
        /// The blocks this prefill fills.
        block_table: I64Array,
        /// KV blocks to copy before the forward, one ``(src, dst)`` row each (beams forked).
        block_copies: I64Table,
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

plan_class! {
    /// One decode step of every running sequence, most recently admitted first.
    DecodePlan("decode") {
        /// Ids in batch order (the order ``update`` takes their tokens).
        request_ids: Py<PyTuple>,
        batch_size: u32,
        /// Virtual position every sequence writes this step (batch tkv before the step).
        tkv: u32,
        /// Each sequence's last generated token.
        input_ids: I64Array,
        /// Position id of each input token (its index in the unpadded sequence).
        positions: I64Array,
        /// KV slot each input token is written to.
        slot_mapping: I64Array,
        /// Block tables, one row per sequence, padded with the null block 0: shape (batch, width).
        block_table: I64Table,
        /// In-table index of each sequence's first real token.
        left_padding: I64Array,
        /// In-table length of each sequence including this step's token.
        current_tkv: I64Array,
        /// KV blocks to copy before the forward, one ``(src, dst)`` row each (beams forked).
        block_copies: I64Table,
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

plan_class! {
    /// One prefill chunk (chunked policy): ``chunk_size`` input tokens
    /// attending over the request's earlier chunks and cached prefix through
    /// its block table (in-table positions are prompt positions).
    ChunkPlan("chunk") {
        request_id: Py<PyString>,
        prompt_len: u32,
        chunk_index: u32,
        chunk_count: u32,
        chunk_size: u32,
        /// Pad tokens at the start of the input (chunk 0 only).
        left_padding: u32,
        /// Prompt positions start..end are computed by this chunk.
        start: u32,
        end: u32,
        /// In-table position just past the input's last token.
        context_end: u32,
        /// The last chunk samples the request's first token.
        is_last: bool,
        logits_index: u32,
        /// Prompt blocks reused from the prefix cache.
        cached_blocks: u32,
        input_ids: I64Array,
        positions: I64Array,
        /// KV slot per input token (padding and shared blocks: the null block).
        slot_mapping: I64Array,
        /// The same per input block (0 = null block).
        block_slots: I64Array,
        block_table: I64Array,
        /// KV blocks to copy before the forward, one ``(src, dst)`` row each (beams forked).
        block_copies: I64Table,
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
    #[classattr]
    #[allow(non_snake_case)]
    fn FIELDS(py: Python<'_>) -> Py<PyTuple> {
        PyTuple::empty(py).unbind()
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
                block_copies: copies(py, &p.block_copies)?,
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
                block_copies: copies(py, &c.block_copies)?,
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
                    block_copies: copies(py, &d.block_copies)?,
                },
            )?
            .into_any()
        }
    })
}
