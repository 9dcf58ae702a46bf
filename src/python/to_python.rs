use pyo3::prelude::*;
pub(crate) fn decode_json<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}
#[pyfunction]
#[pyo3(name = "decode_json")]
pub(crate) fn decode_json_py<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    decode_json(py, text)
}
