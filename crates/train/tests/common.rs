//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shared data directory, or `None` with a printed notice.
pub fn shared() -> Option<PathBuf> {
    let s = std::env::current_dir().ok().and_then(|_| {
        let r = root().canonicalize().ok()?;
        r.ancestors()
            .map(|a| a.join("shared"))
            .find(|p| p.join("data").is_dir())
    });
    if s.is_none() {
        eprintln!("NOTE: ../shared is absent: this test runs on the samples in data/ only");
    }
    s
}

pub fn sample_bb() -> PathBuf {
    root().join("data/backblaze-sample.parquet")
}

pub fn sample_smd() -> PathBuf {
    root().join("data/smd-sample")
}

/// `python3` with polars and numpy, or a panic saying how to install them (set
/// WATERBEAR_SKIP_PYTHON=1 to skip the comparison explicitly).
pub fn python() -> Option<&'static str> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import polars, numpy"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return Some("python3");
    }
    if std::env::var_os("WATERBEAR_SKIP_PYTHON").is_some() {
        eprintln!(
            "NOTE: WATERBEAR_SKIP_PYTHON set and python3 lacks polars/numpy: reference comparison skipped"
        );
        return None;
    }
    panic!(
        "python3 with polars and numpy is needed for the reference comparison: run scripts/py-deps.sh (or set WATERBEAR_SKIP_PYTHON=1)"
    );
}
