//! The job's config: `pipelines/streaming.toml` = the `waterbear-stream`
//! sections plus `[job]` and the pipeline's `[features]`, `[baseline]`,
//! `[policy]`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use waterbear_features::FeatureParams;
use waterbear_models::{Artifact, ArtifactError, Detector, HostModelError, host_detector};
use waterbear_pipeline::PipelineConfig;
use waterbear_policy::PolicyParams;
use waterbear_stream::{StreamConfig, StreamParams};

use crate::archive::{ArchiveConfig, ArchiveParams};
use crate::{Decider, Scorer};

/// Which stage(s) this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Stage 1: telemetry -> scores.
    Scorer,
    /// Stage 2: scores -> decisions.
    Decider,
    /// Both, as two loops in one process.
    Both,
}

/// `[job]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSection {
    /// Topic of the score records (stage 1 -> stage 2), keyed by cluster.
    pub scores_topic: String,
    /// Its partition count (created if missing).
    pub scores_partitions: i32,
    /// Compacted state topic of the decider (one partition per scores partition).
    pub decider_state_topic: String,
    /// Consumer group / transactional id suffix of the decider.
    pub decider_suffix: String,
    /// How far a record's timestamp may be ahead of its Kafka timestamp, ms.
    pub max_future_skew_ms: i64,
    /// Trained disk model (`models/disk-bb-*.json`) scored next to the rule baseline;
    /// its alarm threshold is mapped onto `policy.enter_threshold`. Absent: the rules
    /// alone. A model whose feature schema or `[features]` differ is refused at load.
    /// `waterbear stream --model PATH` overrides it.
    pub model: Option<PathBuf>,
    /// Scorer loops in this process (1..=64): each is a member of the scorer
    /// group with its own consumer, transactional producer and transform
    /// (instance id and transactional id suffixed `-l<i>` from the second on),
    /// so partitions are scored in parallel and one loop's commit and fetch
    /// waits overlap another's work. They share the metrics.
    pub scorer_loops: usize,
    /// The decider's `batch.idle_ms` (see the stream crate's `[batch]`);
    /// absent: the same as the scorer's. Score batches reach the decider in
    /// bursts, one per scorer commit, several a second at full load: a short
    /// idle time commits after every burst and writes every touched
    /// cluster's policy state each time, where a longer one (longer than the
    /// gaps between bursts) commits at `batch.max_ms` while scores flow and
    /// still soon after the last one. The shipped file sets 100 against the
    /// scorer's 20 (docs/benchmarks-stream.md, "Fourteenth measurement").
    /// Must be < `batch.max_ms`; 0 = off.
    pub decider_idle_ms: Option<u64>,
    /// Keep the C heap (librdkafka's fetch and produce buffers) mapped: one
    /// glibc arena, no trimming under 1 GiB free, no `mmap` under 32 MiB
    /// (`waterbear_stream::keep_c_heap_mapped`). It cut the job's page
    /// faults in the benchmark's end-to-end phase from ~80k to ~23k
    /// (docs/benchmarks-stream.md, "Seventeenth measurement"); the process
    /// then stays at its C heap's peak. `false` leaves glibc's defaults.
    /// Default `true`; no effect without glibc.
    pub keep_c_heap_mapped: bool,
}

impl Default for JobSection {
    fn default() -> Self {
        Self {
            scores_topic: "scores".into(),
            scores_partitions: 12,
            decider_state_topic: "waterbear.decider.state".into(),
            decider_suffix: "-decider".into(),
            max_future_skew_ms: 5 * 60 * 1000,
            model: None,
            scorer_loops: 1,
            decider_idle_ms: None,
            keep_c_heap_mapped: true,
        }
    }
}

/// A config error.
#[derive(Debug, thiserror::Error)]
pub enum JobConfigError {
    /// Reading the file.
    #[error("reading {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML syntax or an unknown/mistyped field.
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The stream sections.
    #[error(transparent)]
    Stream(#[from] waterbear_stream::ConfigError),
    /// The pipeline sections.
    #[error(transparent)]
    Pipeline(#[from] waterbear_pipeline::PipelineError),
    /// `job.model`: unreadable, or refused for this job's features.
    #[error("{path}: job.model = {model}: {source}")]
    Model {
        /// Config file.
        path: String,
        /// The model file.
        model: String,
        /// Why (names the failing check).
        source: HostModelError,
    },
    /// A `[job]` field out of range.
    #[error("{path}: job.{field} = {value} is invalid: {expected}")]
    Job {
        /// File.
        path: String,
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What it must be.
        expected: &'static str,
    },
    /// `[archive]`.
    #[error("{path}: {message}")]
    Archive {
        /// File.
        path: String,
        /// What is wrong (names the field).
        message: String,
    },
}

/// The whole job config, checked.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// Kafka side (env overrides applied by [`JobConfig::load`]).
    pub stream: StreamConfig,
    /// Validated stream parameters.
    pub params: StreamParams,
    /// `[job]`.
    pub job: JobSection,
    /// `[features]`, `[baseline]`, `[policy]`.
    pub pipeline: PipelineConfig,
    /// `[archive]` (`None`: off).
    pub archive: Option<ArchiveParams>,
    features: FeatureParams,
    policy: PolicyParams,
    detector: SharedDetector,
}

/// The job's detector, shared by every fresh scorer.
#[derive(Clone)]
struct SharedDetector(Arc<dyn Detector>);

impl std::fmt::Debug for SharedDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.0.name(), self.0.version())
    }
}

impl JobConfig {
    /// Reads `path`, applies `KAFKA_BOOTSTRAP`/`WATERBEAR_INSTANCE_ID` and
    /// `instance_id` (if given), checks everything.
    pub fn load(path: &Path, instance_id: Option<&str>) -> Result<Self, JobConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string(), instance_id)
    }

    /// Like [`JobConfig::load`] from text.
    pub fn from_toml_str(
        text: &str,
        origin: &str,
        instance_id: Option<&str>,
    ) -> Result<Self, JobConfigError> {
        let perr = |message: String| JobConfigError::Parse {
            path: origin.to_string(),
            message,
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| perr(e.to_string()))?;
        let job: JobSection = match table.remove("job") {
            Some(v) => v
                .try_into()
                .map_err(|e: toml::de::Error| perr(format!("[job]: {e}")))?,
            None => JobSection::default(),
        };
        if !(1..=64).contains(&job.scorer_loops) {
            return Err(JobConfigError::Job {
                path: origin.to_string(),
                field: "scorer_loops",
                value: job.scorer_loops.to_string(),
                expected: "an integer in 1..=64",
            });
        }
        let archive: ArchiveConfig = match table.remove("archive") {
            Some(v) => v
                .try_into()
                .map_err(|e: toml::de::Error| perr(format!("[archive]: {e}")))?,
            None => ArchiveConfig::default(),
        };
        let archive = archive.check().map_err(|message| JobConfigError::Archive {
            path: origin.to_string(),
            message,
        })?;
        let mut pipe = toml::Table::new();
        for k in ["features", "baseline", "policy"] {
            if let Some(v) = table.remove(k) {
                pipe.insert(k.to_string(), v);
            }
        }
        let pipeline: PipelineConfig = toml::Value::Table(pipe)
            .try_into()
            .map_err(|e: toml::de::Error| perr(e.to_string()))?;
        let rest = toml::to_string(&table).map_err(|e| perr(e.to_string()))?;
        let mut stream = StreamConfig::from_toml_str(&rest, origin)?;
        stream.apply_env();
        if let Some(id) = instance_id {
            stream.kafka.instance_id = id.to_string();
        }
        let params = stream.validate()?;
        if let Some(ms) = job.decider_idle_ms
            && ms >= stream.batch.max_ms
        {
            return Err(JobConfigError::Job {
                path: origin.to_string(),
                field: "decider_idle_ms",
                value: ms.to_string(),
                expected: "less than batch.max_ms (0 = off)",
            });
        }
        let features = pipeline
            .features
            .clone()
            .check()
            .map_err(waterbear_pipeline::PipelineError::from)?;
        let policy = pipeline
            .policy
            .clone()
            .check()
            .map_err(waterbear_pipeline::PipelineError::from)?;
        let detector = load_detector(job.model.as_deref(), origin, &pipeline, &features, &policy)?;
        Ok(Self {
            stream,
            params,
            job,
            pipeline,
            archive,
            features,
            policy,
            detector,
        })
    }

    /// Replaces `job.model` (the CLI's `--model`), with the same checks as at load.
    pub fn with_model(mut self, model: &Path, origin: &str) -> Result<Self, JobConfigError> {
        self.detector = load_detector(
            Some(model),
            origin,
            &self.pipeline,
            &self.features,
            &self.policy,
        )?;
        self.job.model = Some(model.to_path_buf());
        Ok(self)
    }

    /// Detector name@version written into every score record.
    pub fn model_label(&self) -> String {
        format!("{:?}", self.detector)
    }

    /// Stage 1's stream parameters (as configured).
    pub fn scorer_params(&self) -> StreamParams {
        self.params.clone()
    }

    /// The parameters of scorer loop `i` (see [`JobSection::scorer_loops`]):
    /// loop 0 is [`JobConfig::scorer_params`]; the others get their own
    /// instance and transactional ids, and neither create topics nor serve
    /// metrics (loop 0 does, for all).
    pub fn scorer_loop_params(&self, i: usize) -> StreamParams {
        let mut p = self.params.clone();
        if i > 0 {
            p.instance_id = format!("{}-l{i}", p.instance_id);
            p.transactional_id = format!("{}-l{i}", p.transactional_id);
            p.create_topics = false;
            p.metrics_listen = None;
        }
        p
    }

    /// Stage 2's: input = scores topic, own group, transactional id and state
    /// topic; metrics only when it runs alone (`with_scorer` false).
    pub fn decider_params(&self, with_scorer: bool) -> StreamParams {
        let mut p = self.params.clone();
        let sfx = &self.job.decider_suffix;
        p.group_id = format!("{}{sfx}", p.group_id);
        p.transactional_id = format!("{}{sfx}", p.transactional_id);
        p.telemetry_topic = self.job.scores_topic.clone();
        p.telemetry_partitions = self.job.scores_partitions;
        p.state_topic = self.job.decider_state_topic.clone();
        if let Some(ms) = self.job.decider_idle_ms {
            p.batch_idle = (ms > 0).then(|| std::time::Duration::from_millis(ms));
        }
        if with_scorer {
            p.metrics_listen = None;
        }
        p
    }

    /// A fresh stage-1 transform.
    pub fn scorer(&self) -> Scorer {
        Scorer::new(
            self.features.clone(),
            Arc::clone(&self.detector.0),
            self.job.scores_topic.clone(),
            self.job.max_future_skew_ms,
        )
    }

    /// A fresh stage-2 transform.
    pub fn decider(&self) -> Decider {
        Decider::new(self.policy.clone())
    }
}

/// The rules, plus the model at `model` if given (checked against the job's features).
fn load_detector(
    model: Option<&Path>,
    origin: &str,
    pipeline: &PipelineConfig,
    features: &FeatureParams,
    policy: &PolicyParams,
) -> Result<SharedDetector, JobConfigError> {
    let refused = |source: HostModelError| JobConfigError::Model {
        path: origin.to_string(),
        model: model.map(|m| m.display().to_string()).unwrap_or_default(),
        source,
    };
    let artifact = match model {
        None => None,
        Some(m) => {
            let f = std::fs::File::open(m)
                .map_err(|e| refused(HostModelError::Artifact(ArtifactError::Io(e))))?;
            Some(
                Artifact::read(std::io::BufReader::new(f))
                    .map_err(|e| refused(HostModelError::Artifact(e)))?,
            )
        }
    };
    let det = host_detector(
        pipeline.baseline.clone(),
        artifact.as_ref(),
        features,
        policy.enter_threshold,
    )
    .map_err(refused)?;
    Ok(SharedDetector(Arc::from(det)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models");

    const SHIPPED: &str = include_str!("../../../pipelines/streaming.toml");

    /// The shipped file with the sections of `extra` merged over it (a table
    /// such as `[job]` may appear in both).
    fn load(extra: &str) -> Result<JobConfig, JobConfigError> {
        let mut base: toml::Table = toml::from_str(SHIPPED).unwrap();
        let extra: toml::Table = toml::from_str(extra).unwrap();
        for (section, v) in extra {
            match (base.get_mut(&section), v) {
                (Some(toml::Value::Table(b)), toml::Value::Table(e)) => b.extend(e),
                (_, v) => {
                    base.insert(section, v);
                }
            }
        }
        JobConfig::from_toml_str(&toml::to_string(&base).unwrap(), "test.toml", Some("t"))
    }

    #[test]
    fn the_shipped_file_runs_two_scorer_loops_and_stream_echo_reads_it_too() {
        let c = load("").unwrap();
        assert_eq!(c.job.scorer_loops, 2);
        assert_eq!(c.params.batch_max_records, 100_000);
        // stream-echo's view: the job's sections skipped, the rest checked
        let s = StreamConfig::from_toml_str_skipping(
            SHIPPED,
            "streaming.toml",
            waterbear_stream::JOB_SECTIONS,
        )
        .unwrap();
        assert_eq!(s.batch.max_records, 100_000);
        // without skipping, [job] is an unknown field of the Kafka config
        let e = StreamConfig::from_toml_str(SHIPPED, "streaming.toml").unwrap_err();
        assert!(e.to_string().contains("job"), "{e}");
    }

    #[test]
    fn without_a_model_the_rules_score() {
        let c = load("").unwrap();
        assert_eq!(c.model_label(), "rule-baseline@1");
    }

    #[test]
    fn loads_the_committed_model_and_refuses_mismatches_naming_the_field() {
        let c = load(&format!("[job]\nmodel = \"{MODELS}/disk-bb-v2.json\"")).unwrap();
        assert!(
            c.model_label().contains("disk-bb@v2"),
            "{}",
            c.model_label()
        );

        // trained with window 36, the job computes 14: its scores would mean something else
        let e = load(&format!(
            "[job]\nmodel = \"{MODELS}/disk-bb-v2.json\"\n[features]\nwindow = 14"
        ))
        .unwrap_err();
        assert!(
            matches!(
                &e,
                JobConfigError::Model {
                    source: HostModelError::FeatureParams {
                        field: "window",
                        ..
                    },
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("job.model") && msg.contains("features.window = 36"),
            "{msg}"
        );

        // v1 was trained with window 14: refused by the default features, and
        // accepted when the job computes the same
        assert!(load(&format!("[job]\nmodel = \"{MODELS}/disk-bb-v1.json\"")).is_err());
        let c = load(&format!(
            "[job]\nmodel = \"{MODELS}/disk-bb-v1.json\"\n[features]\nwindow = 14"
        ))
        .unwrap();
        assert!(c.model_label().contains("disk-bb@v1"));

        // not a host model / not there
        let e = load(&format!("[job]\nmodel = \"{MODELS}/smd-v1.json\"")).unwrap_err();
        assert!(e.to_string().contains("smd_zscore"), "{e}");
        assert!(load("[job]\nmodel = \"/nonexistent.json\"").is_err());
    }

    #[test]
    fn scorer_loops_get_their_own_ids_and_are_checked() {
        let c = load("[job]\nscorer_loops = 3").unwrap();
        let ids: Vec<(String, String)> = (0..3)
            .map(|i| {
                let p = c.scorer_loop_params(i);
                (p.instance_id, p.transactional_id)
            })
            .collect();
        let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), 3, "{ids:?}");
        assert!(c.scorer_loop_params(0).metrics_listen.is_some());
        assert!(c.scorer_loop_params(2).metrics_listen.is_none());
        for bad in ["0", "65"] {
            let e = load(&format!("[job]\nscorer_loops = {bad}")).unwrap_err();
            assert!(e.to_string().contains("job.scorer_loops"), "{e}");
        }
    }

    #[test]
    fn the_decider_has_its_own_idle_time() {
        use std::time::Duration;
        let c = load("").unwrap();
        assert_eq!(c.params.batch_idle, Some(Duration::from_millis(20)));
        assert_eq!(
            c.decider_params(true).batch_idle,
            Some(Duration::from_millis(100))
        );
        let c = load("[job]\ndecider_idle_ms = 0").unwrap();
        assert_eq!(c.decider_params(true).batch_idle, None);
        let mut base: toml::Table = toml::from_str(SHIPPED).unwrap();
        base["job"]
            .as_table_mut()
            .unwrap()
            .remove("decider_idle_ms");
        let c = JobConfig::from_toml_str(&toml::to_string(&base).unwrap(), "t.toml", Some("t"))
            .unwrap();
        assert_eq!(
            c.decider_params(true).batch_idle,
            c.params.batch_idle,
            "absent: the scorer's"
        );
        let e = load("[job]\ndecider_idle_ms = 250").unwrap_err();
        assert!(e.to_string().contains("job.decider_idle_ms"), "{e}");
    }

    #[test]
    fn the_c_heap_is_kept_unless_switched_off() {
        assert!(load("").unwrap().job.keep_c_heap_mapped);
        assert!(
            !load("[job]\nkeep_c_heap_mapped = false")
                .unwrap()
                .job
                .keep_c_heap_mapped
        );
        let e = load("[job]\nkeep_c_heap_mapped = 1").unwrap_err();
        assert!(e.to_string().contains("keep_c_heap_mapped"), "{e}");
    }

    #[test]
    fn the_cli_override_gets_the_same_checks() {
        let c = load("").unwrap();
        let c = c
            .with_model(Path::new(&format!("{MODELS}/disk-bb-v2.json")), "--model")
            .unwrap();
        assert!(c.model_label().contains("disk-bb@v2"));
        let e = load("[features]\nwindow = 14")
            .unwrap()
            .with_model(Path::new(&format!("{MODELS}/disk-bb-v2.json")), "--model")
            .unwrap_err();
        assert!(e.to_string().starts_with("--model: job.model"), "{e}");
    }
}
