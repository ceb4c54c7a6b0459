//! Placeholder for the workspace-level integration test crate.
