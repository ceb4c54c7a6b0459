use std::path::PathBuf;

use thiserror::Error;

use waterbear_models::ArtifactError;

/// Everything training, evaluation and detection can fail with.
#[derive(Debug, Error)]
pub enum TrainError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// polars failed (a missing column, a bad parquet file, …).
    #[error("{context}: {source}")]
    Polars {
        /// What was being done.
        context: String,
        /// The cause.
        source: polars::error::PolarsError,
    },
    /// A pipeline TOML did not parse or a field is out of range.
    #[error("{path}: {message}")]
    Config {
        /// The file (or `<inline>`).
        path: String,
        /// Which field and why.
        message: String,
    },
    /// The data cannot support the request (no rows in a period, no failures, …).
    #[error("data: {0}")]
    Data(String),
    /// linfa refused to fit.
    #[error("fitting {what}: {message}")]
    Fit {
        /// The model.
        what: &'static str,
        /// linfa's message.
        message: String,
    },
    /// A model artifact is unreadable or does not fit this build.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// Drawing a plot failed.
    #[error("plot {path}: {message}")]
    Plot {
        /// The PNG.
        path: PathBuf,
        /// The cause.
        message: String,
    },
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    pub(crate) fn polars(
        context: impl Into<String>,
    ) -> impl FnOnce(polars::error::PolarsError) -> Self {
        let context = context.into();
        move |source| Self::Polars { context, source }
    }
}
