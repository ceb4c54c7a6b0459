//! The library half of the `waterbear` command: the runs its subcommands perform,
//! callable from tests. `anyhow` stays in `main.rs`; these return typed errors.

mod config;
mod demo;

pub use config::{ConfigLoadError, DemoConfig, EMBEDDED_DEMO_CONFIG};
pub use demo::{DemoError, DemoOptions, DemoSummary, ModeRow, run_demo};
