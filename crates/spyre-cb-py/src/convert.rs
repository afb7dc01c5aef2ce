//! Argument conversion: every Python value is checked here and a bad one
//! becomes a typed error that names the argument and the limit.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyString};

use crate::errors::{err, Kind};

pub const U32: u64 = u32::MAX as u64;
/// Largest step count a simulation accepts (a trace's length must fit a Python int index).
pub const MAX_STEPS: u64 = 1 << 62;

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// A non-negative integer argument (int or anything with `__index__`, never
/// bool) that fits `max`, or the typed error `kind`.
pub fn uint(obj: &Bound<'_, PyAny>, name: &str, max: u64, kind: Kind) -> PyResult<u64> {
    let py = obj.py();
    if obj.is_instance_of::<PyBool>() {
        return Err(err(py, kind, format!("{name} must be an int, got bool")));
    }
    let v: i128 = match obj.extract::<i128>() {
        Ok(v) => v,
        Err(_) => {
            let overflow = obj.call_method0("__index__").is_ok();
            return Err(if overflow {
                err(py, kind, format!("{name} = {obj} is larger than the supported maximum {max}"))
            } else {
                err(py, kind, format!("{name} must be an int, got {}", type_name(obj)))
            });
        }
    };
    if v < 0 {
        // the smallest value the option takes is the caller's (or the core's) to name
        return Err(err(py, kind, format!("{name} must not be negative, got {v}")));
    }
    if v > i128::from(max) {
        return Err(err(py, kind, format!("{name} = {v} is larger than the supported maximum {max}")));
    }
    Ok(v as u64)
}

pub fn opt_uint(obj: Option<&Bound<'_, PyAny>>, name: &str, max: u64, kind: Kind) -> PyResult<Option<u64>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => uint(o, name, max, kind).map(Some),
    }
}

/// A request id: a str that is valid Unicode (no lone surrogates).
pub fn request_id(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    let py = obj.py();
    match obj.cast::<PyString>() {
        Ok(s) => s.to_str().map(str::to_owned).map_err(|_| {
            err(py, Kind::InvalidRequest, "request_id must be valid Unicode text (it has a lone surrogate)")
        }),
        Err(_) => Err(err(py, Kind::InvalidRequest, format!("request_id must be a str, got {}", type_name(obj)))),
    }
}

/// A sequence of non-negative ints (each at most `max`), named `name[i]` in errors.
pub fn uint_list(obj: &Bound<'_, PyAny>, name: &str, max: u64, kind: Kind) -> PyResult<Vec<u32>> {
    let py = obj.py();
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<pyo3::types::PyBytes>() {
        return Err(err(py, kind, format!("{name} must be a sequence of ints, got {}", type_name(obj))));
    }
    let iter = obj
        .try_iter()
        .map_err(|_| err(py, kind, format!("{name} must be a sequence of ints, got {}", type_name(obj))))?;
    let mut out = Vec::with_capacity(obj.len().unwrap_or(0));
    for (i, item) in iter.enumerate() {
        out.push(uint(&item?, &format!("{name}[{i}]"), max, kind)? as u32);
    }
    Ok(out)
}

/// A sequence of bools (no ints), for stop flags.
pub fn bool_list(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<bool>> {
    let py = obj.py();
    let iter = obj.try_iter().map_err(|_| {
        err(py, Kind::InvalidRequest, format!("{name} must be a sequence of bools, got {}", type_name(obj)))
    })?;
    let mut out = Vec::new();
    for (i, item) in iter.enumerate() {
        let item = item?;
        match item.cast::<PyBool>() {
            Ok(b) => out.push(b.is_true()),
            Err(_) => {
                let msg = format!("{name}[{i}] must be a bool, got {}", type_name(&item));
                return Err(err(py, Kind::InvalidRequest, msg));
            }
        }
    }
    Ok(out)
}
