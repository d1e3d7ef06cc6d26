//! `parasync._native`: the Python binding of the Parasync client and collectives.
//!
//! Thin by design: it converts arguments (NumPy arrays are read and written in place),
//! releases the GIL while bytes move, and maps errors to the exception classes defined in
//! `parasync/_errors.py`. All behaviour lives in the `parasync-client` and
//! `parasync-collective` crates.

use pyo3::prelude::*;

mod arrays;
mod comm;
mod errors;
mod ps;
mod tables;

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<ps::PsClient>()?;
    m.add_class::<ps::PushSummary>()?;
    m.add_class::<tables::SparsePushSummary>()?;
    m.add_class::<comm::Communicator>()?;
    m.add_class::<comm::Work>()?;
    m.add_function(wrap_pyfunction!(ps::ps_addresses_from_env, m)?)?;
    m.add_function(wrap_pyfunction!(comm::launch_info, m)?)?;
    Ok(())
}
