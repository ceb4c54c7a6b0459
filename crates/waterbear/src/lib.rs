//! The library half of the `waterbear` command: the runs its subcommands perform,
//! callable from tests. `anyhow` stays in `main.rs`; these return typed errors.

mod backtest;
mod config;
mod demo;
mod explain;
mod kvm_demo;
mod plot;

pub use backtest::{
    BacktestError, BacktestOptions, BacktestReport, Row, ShadowScore, Variant, default_variants,
    make_backblaze_sample, run_backtest,
};
pub use config::{ConfigLoadError, DemoConfig, EMBEDDED_DEMO_CONFIG};
pub use demo::{DemoError, DemoOptions, DemoSummary, ModeRow, run_demo};
pub use explain::{ExplainError, explain, utc};
pub use kvm_demo::{KvmDemoError, KvmDemoOptions, KvmSummary, run_kvm_demo};
