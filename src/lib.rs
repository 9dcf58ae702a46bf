//! flujo-sqlite: a fast, safe, file-compatible SQLite state backend for Flujo.
//!
//! The core (everything but `python`) is plain Rust: it knows nothing of Python and is tested
//! with `cargo test`. The `python` module, built only with the `python` feature, is the thin
//! pyo3 binding that maturin compiles into `flujo_sqlite._native`.

// Files are told apart by device and inode, and the Python binding wakes the event loop
// through a Unix socket (asyncio's default loop on Windows cannot watch one).
#[cfg(not(unix))]
compile_error!("flujo-sqlite supports Unix-like systems (Linux, macOS) only");

pub mod engine;
pub mod error;
pub mod model;
pub mod sqlite;
pub mod timestamp;

#[cfg(feature = "python")]
mod python;

#[cfg(feature = "python")]
#[pyo3::pymodule]
fn _native(module: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    python::register(module)
}
