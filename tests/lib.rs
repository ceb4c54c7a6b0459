//! Workspace-level tests live here.
