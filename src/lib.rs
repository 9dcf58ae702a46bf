//! flujo-sqlite: a fast, safe, file-compatible SQLite state backend for Flujo.
//!
//! The core (everything but `python`) is plain Rust: it knows nothing of Python and is tested
//! with `cargo test`. The `python` module, built only with the `python` feature, is the thin
//! pyo3 binding that maturin compiles into `flujo_sqlite._native`.

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
