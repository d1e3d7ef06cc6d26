//! NumPy arrays checked and borrowed in place: what the caller passed is used as it is or
//! refused with an exception that names it; nothing is copied or converted.

use numpy::npyffi::flags::NPY_ARRAY_WRITEABLE;
use numpy::{
    dtype, BorrowError, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
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
