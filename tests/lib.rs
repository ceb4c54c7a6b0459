//! Helpers shared by the cross-crate tests in this directory.
