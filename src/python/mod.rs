//! The pyo3 binding layer: one file per Python class, argument and result conversion split by
//! direction, and the single mapping of core errors to Python exceptions. It reaches storage
//! only through the `StateEngine` trait, never through rusqlite.

mod arguments;
mod backend;
mod completion;
mod errors;
mod from_python;
mod logging;
mod recovery;
mod results;
mod run_arguments;
mod run_results;
mod stack;
mod to_python;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use pyo3::prelude::*;

/// `log::$level!(...)` while the GIL is held, giving back what the logging raised. pyo3-log
/// leaves an exception from Python's logging (a handler's filter that raises, a Ctrl-C landing
/// in a handler) as the thread's pending exception, where the next call into Python would trip
/// over it and a result being delivered would be lost; this hands it to the caller instead.
macro_rules! log_with_gil {
    ($py:expr, $level:ident, $($message:tt)+) => {{
        log::$level!($($message)+);
        pyo3::PyErr::take($py).map_or(Ok(()), Err)
    }};
}
pub(crate) use log_with_gil;

/// The handle to the logger levels pyo3-log caches, set once the module is registered.
static LOG_LEVELS: OnceLock<pyo3_log::ResetHandle> = OnceLock::new();

/// Clears the logger levels pyo3-log caches (so that a debug record costs no trip through the
/// GIL): logging configured since then takes effect.
pub(crate) fn refresh_log_levels() {
    if let Some(levels) = LOG_LEVELS.get() {
        levels.reset();
    }
}

/// `refresh_log_levels`, at most once a second, for every call: a level changed at run time
/// (raised to DEBUG to look into a problem) reaches backends already open within a second.
pub(crate) fn refresh_log_levels_now_and_then() {
    static STARTED: OnceLock<Instant> = OnceLock::new();
    static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
    let second = STARTED.get_or_init(Instant::now).elapsed().as_secs();
    if LAST_SECOND.swap(second, Ordering::Relaxed) != second {
        refresh_log_levels();
    }
}

pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust `log` records go to Python's `logging`, under the "flujo_sqlite" logger.
    let records = pyo3_log::Logger::new(module.py(), pyo3_log::Caching::LoggersAndLevels)?
        .filter_target("flujo_sqlite".to_owned(), log::LevelFilter::Trace);
    let levels = records.reset_handle();
    if log::set_boxed_logger(Box::new(logging::Logger::new(module.py(), records)?)).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
        let _ = LOG_LEVELS.set(levels);
    }
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
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
    module.add_function(wrap_pyfunction!(
        from_python::honor_flujo_serializers,
        module
    )?)?;

    module.add_function(wrap_pyfunction!(to_python::decode_json_py, module)?)?;
    module.add_function(wrap_pyfunction!(recovery::recover_py, module)?)?;
    Ok(())
}
