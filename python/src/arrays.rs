//! NumPy arrays checked and borrowed in place: what the caller passed is used as it is or
//! refused with an exception that names it; nothing is copied or converted.

use numpy::npyffi::flags::NPY_ARRAY_WRITEABLE;
use numpy::{
    dtype, BorrowError, PyArray1, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use parasync_collective::DType;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// What the caller would read in an error: the type of a non-array, or the array's dtype.
fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!("a {} array", a.dtype()),
        Err(_) => obj.get_type().name().map_or_else(|_| "an object".into(), |n| format!("a {n}")),
    }
}

/// `obj` as a C-contiguous float32 array of exactly `shape`, for the variable `name`.
fn f32_array<'a, 'py>(obj: &'a Bound<'py, PyAny>, name: &str, shape: &[usize]) -> PyResult<&'a Bound<'py, PyArrayDyn<f32>>> {
    let arr = obj.cast::<PyArrayDyn<f32>>().map_err(|_| {
        PyTypeError::new_err(format!("variable {name:?}: expected a numpy.ndarray of float32, got {}", describe(obj)))
    })?;
    if arr.shape() != shape {
        return Err(PyValueError::new_err(format!(
            "variable {name:?} has shape {shape:?}, the array has shape {:?}",
            arr.shape()
        )));
    }
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "variable {name:?}: the array is not C-contiguous (numpy.ascontiguousarray makes a contiguous copy)"
        )));
    }
    Ok(arr)
}

fn in_use(name: &str) -> PyErr {
    PyValueError::new_err(format!("variable {name:?}: the array is already in use (the same array passed twice?)"))
}

/// A gradient (or any input) borrowed read-only in place.
pub fn input<'py>(obj: &Bound<'py, PyAny>, name: &str, shape: &[usize]) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    f32_array(obj, name, shape)?.try_readonly().map_err(|_| in_use(name))
}

/// An output array borrowed writable in place.
pub fn output<'py>(obj: &Bound<'py, PyAny>, name: &str, shape: &[usize]) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    f32_array(obj, name, shape)?.try_readwrite().map_err(|e| match e {
        BorrowError::NotWriteable => {
            PyValueError::new_err(format!("variable {name:?}: the output array is read-only"))
        }
        _ => in_use(name),
    })
}

/// A batch of table ids borrowed in place: uint64, or int64 whose every id was checked
/// non-negative (then read as uint64: the same bits, nothing converted).
pub enum Ids<'py> {
    U64(PyReadonlyArray1<'py, u64>),
    I64(PyReadonlyArray1<'py, i64>),
}

impl Ids<'_> {
    /// The ids as uint64.
    pub fn as_slice(&self) -> &[u64] {
        match self {
            Ids::U64(a) => a.as_slice().expect("checked contiguous"),
            Ids::I64(a) => {
                let s = a.as_slice().expect("checked contiguous");
                // SAFETY: i64 and u64 have the same size and alignment, and `ids` checked
                // every value non-negative, so each reads as the same number.
                unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u64>(), s.len()) }
            }
        }
    }
}

const IDS_HINT: &str = "numpy.asarray(ids, dtype=numpy.uint64) makes one";

/// `obj` as the ids of a lookup or push in table `table`: a 1-D C-contiguous numpy array
/// of uint64, or of int64 with no negative id.
pub fn ids<'py>(obj: &Bound<'py, PyAny>, table: &str) -> PyResult<Ids<'py>> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "table {table:?}: ids must be a 1-D numpy.ndarray of uint64 (or non-negative int64), got {} ({IDS_HINT})",
            describe(obj)
        ))
    })?;
    let py = obj.py();
    let dt = arr.dtype();
    let (unsigned, signed) = (dt.is_equiv_to(&dtype::<u64>(py)), dt.is_equiv_to(&dtype::<i64>(py)));
    if !unsigned && !signed {
        return Err(PyTypeError::new_err(format!(
            "table {table:?}: ids must be uint64 (or non-negative int64), got {} ({IDS_HINT})",
            describe(obj)
        )));
    }
    if arr.ndim() != 1 {
        return Err(PyValueError::new_err(format!("table {table:?}: ids must be 1-D, got an array of shape {:?}", arr.shape())));
    }
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "table {table:?}: the ids array is not contiguous (numpy.ascontiguousarray makes a contiguous copy)"
        )));
    }
    let busy = |_| PyValueError::new_err(format!("table {table:?}: the ids array is being written elsewhere"));
    if unsigned {
        return Ok(Ids::U64(obj.cast::<PyArray1<u64>>()?.try_readonly().map_err(busy)?));
    }
    let a = obj.cast::<PyArray1<i64>>()?.try_readonly().map_err(busy)?;
    let s = a.as_slice().expect("checked contiguous");
    if let Some(pos) = s.iter().position(|&id| id < 0) {
        return Err(PyValueError::new_err(format!(
            "table {table:?}: ids[{pos}] is {}: ids are unsigned (int64 ids must be non-negative)",
            s[pos]
        )));
    }
    Ok(Ids::I64(a))
}

/// `obj` as the rows of `n` ids of `dim` elements in table `table`: a C-contiguous float32
/// array of shape `(n, dim)` (or, when `flat_too`, `(n * dim,)`). `what` names the argument.
fn table_rows<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    table: &str,
    what: &str,
    n: usize,
    dim: usize,
    flat_too: bool,
) -> PyResult<&'a Bound<'py, PyArrayDyn<f32>>> {
    let arr = obj.cast::<PyArrayDyn<f32>>().map_err(|_| {
        PyTypeError::new_err(format!("table {table:?}: {what} must be a numpy.ndarray of float32, got {}", describe(obj)))
    })?;
    let shape = arr.shape();
    if shape != [n, dim] && !(flat_too && shape == [n * dim]) {
        let flat = if flat_too { format!(" or [{}]", n * dim) } else { String::new() };
        return Err(PyValueError::new_err(format!(
            "table {table:?}: {what} has shape {shape:?}, expected [{n}, {dim}]{flat} (one row of {dim} per id, {n} ids)"
        )));
    }
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "table {table:?}: {what} is not C-contiguous (numpy.ascontiguousarray makes a contiguous copy)"
        )));
    }
    Ok(arr)
}

/// A push's gradient rows, borrowed read-only in place.
pub fn table_grads<'py>(obj: &Bound<'py, PyAny>, table: &str, n: usize, dim: usize) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    table_rows(obj, table, "grads", n, dim, true)?
        .try_readonly()
        .map_err(|_| PyValueError::new_err(format!("table {table:?}: grads is being written elsewhere")))
}

/// A lookup's output rows, borrowed writable in place.
pub fn table_out<'py>(obj: &Bound<'py, PyAny>, table: &str, n: usize, dim: usize) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    table_rows(obj, table, "out", n, dim, false)?.try_readwrite().map_err(|e| match e {
        BorrowError::NotWriteable => PyValueError::new_err(format!("table {table:?}: out is read-only")),
        _ => PyValueError::new_err(format!("table {table:?}: out shares memory with an array this call already uses")),
    })
}

/// A collective's buffer: a C-contiguous array of a supported dtype, as a raw view.
///
/// The view does not borrow: the caller keeps the array alive (a reference is held until
/// the operation is over) and must not touch it meanwhile, as with any in-place collective.
#[derive(Clone, Copy, Debug)]
pub struct RawView {
    /// Address of the first element.
    pub addr: usize,
    /// Number of elements.
    pub len: usize,
    /// Element type.
    pub dtype: DType,
}

// The address is only dereferenced by the operation the view was made for, while the array
// is kept alive and the caller has handed it over.
impl RawView {
    /// The elements, read-write.
    ///
    /// # Safety
    /// `T` is the element type of `self.dtype`, the array is alive and nothing else uses it.
    pub unsafe fn slice_mut<'a, T>(&self) -> &'a mut [T] {
        if self.len == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.addr as *mut T, self.len)
    }

    /// The elements, read-only.
    ///
    /// # Safety
    /// As for [`RawView::slice_mut`].
    pub unsafe fn slice<'a, T>(&self) -> &'a [T] {
        if self.len == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.addr as *const T, self.len)
    }

    fn bytes(&self) -> std::ops::Range<usize> {
        self.addr..self.addr + self.len * self.dtype.size()
    }

    /// Refuses two buffers of one operation that share memory.
    pub fn check_apart(&self, other: &RawView, what: &str) -> PyResult<()> {
        let (a, b) = (self.bytes(), other.bytes());
        if self.len > 0 && other.len > 0 && a.start < b.end && b.start < a.end {
            return Err(PyValueError::new_err(format!("{what}: the send and receive arrays overlap")));
        }
        Ok(())
    }
}

/// The collective dtype of a NumPy dtype: float32, float64, int32, int64, or
/// `ml_dtypes.bfloat16`.
fn collective_dtype(arr: &Bound<'_, PyUntypedArray>) -> Option<DType> {
    let py = arr.py();
    let dt = arr.dtype();
    let table = [
        (dtype::<f32>(py), DType::F32),
        (dtype::<f64>(py), DType::F64),
        (dtype::<i32>(py), DType::I32),
        (dtype::<i64>(py), DType::I64),
    ];
    if let Some((_, d)) = table.iter().find(|(numpy, _)| dt.is_equiv_to(numpy)) {
        return Some(*d);
    }
    let is_bf16 = dt.itemsize() == 2 && dt.typeobj().name().is_ok_and(|n| n == "bfloat16");
    is_bf16.then_some(DType::Bf16)
}

/// `obj` as a collective buffer; `what` names it in errors (`"allreduce: array"`).
pub fn collective_view(obj: &Bound<'_, PyAny>, what: &str, writable: bool) -> PyResult<RawView> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!("{what}: expected a numpy.ndarray, got {}", describe(obj)))
    })?;
    let dtype = collective_dtype(arr).ok_or_else(|| {
        PyTypeError::new_err(format!(
            "{what}: dtype {} is not supported (float32, float64, int32, int64, ml_dtypes.bfloat16)",
            arr.dtype()
        ))
    })?;
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what}: the array is not C-contiguous (numpy.ascontiguousarray makes a contiguous copy)"
        )));
    }
    // SAFETY: `arr` is a live ndarray; its object header is read, not written.
    let (data, flags) = unsafe {
        let raw = &*arr.as_array_ptr();
        (raw.fields.data as usize, raw.fields.flags)
    };
    if writable && flags & NPY_ARRAY_WRITEABLE == 0 {
        return Err(PyValueError::new_err(format!("{what}: the array is read-only")));
    }
    if data % dtype.size() != 0 {
        return Err(PyValueError::new_err(format!("{what}: the array's data is not aligned")));
    }
    Ok(RawView { addr: data, len: arr.len(), dtype })
}
