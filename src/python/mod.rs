//! The pyo3 binding layer: one file per Python class, conversion split by direction, and the
//! single mapping of core errors to Python exceptions. It reaches storage only through the
//! `StateEngine` trait, never through rusqlite.

pub(crate) mod errors;
pub(crate) mod from_python;
pub(crate) mod to_python;
