//! The pyo3 binding layer: one file per Python class, argument and result conversion split by
//! direction, and the single mapping of core errors to Python exceptions. It reaches storage
//! only through the `StateEngine` trait, never through rusqlite.

mod arguments;
mod backend;
mod completion;
mod errors;
mod from_python;
mod recovery;
mod results;
mod run_arguments;
mod run_results;
mod to_python;

use pyo3::prelude::*;

pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust `log` records go to Python's `logging`, under the "flujo_sqlite" logger.
    pyo3_log::Logger::new(module.py(), pyo3_log::Caching::LoggersAndLevels)?
        .filter_target("flujo_sqlite".to_owned(), log::LevelFilter::Trace)
        .install()
        .ok();
    module.add_class::<backend::NativeBackend>()?;
    module.add_class::<completion::CompletionPort>()?;
    module.add_function(wrap_pyfunction!(
        backend::wait_for_dropped_backends,
        module
    )?)?;
    module.add_function(wrap_pyfunction!(
        from_python::register_serializer_py,
        module
    )?)?;
    module.add_function(wrap_pyfunction!(from_python::encode_json_py, module)?)?;

    module.add_function(wrap_pyfunction!(to_python::decode_json_py, module)?)?;
    module.add_function(wrap_pyfunction!(recovery::recover_py, module)?)?;
    Ok(())
}
