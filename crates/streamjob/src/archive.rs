//! Optional stage: telemetry -> rolling Parquet files (`[archive]`).
//!
//! A plain consumer in its own group (`<group><archive.group_suffix>`,
//! read_committed) writes each assigned partition to its own file,
//! `<dir>/<topic>-p<partition>-<first offset>.parquet` (the telemetry crate's
//! Arrow schema, one row per record that decodes and passes the stateless
//! checks). A file is rolled after `roll_records` input records or `roll_ms`
//! of wall time: the Parquet footer is written, the file synced, renamed from
//! `*.parquet.tmp` to its final name, the directory synced, and only then is
//! the partition's offset committed (past the file's last record).
//!
//! So after a crash the partition is re-read from the first offset of the file
//! that was being written; the rewrite has the same name and replaces a file
//! that was finalised but not yet committed. A leftover `*.tmp` is garbage and
//! is deleted when the same partition is next archived (or on start).
//! Records that fail to decode are not archived (the scorer sends them to the
//! DLQ) but are counted and their offsets committed like the rest.
//!
//! One archiver at a time owns a directory ([`lock_dir`]: an advisory lock on
//! `<dir>/.waterbear-archive.lock`, released by the kernel when the process
//! dies, even by SIGKILL). So an instance that lost a partition while it
//! stalled (a zombie) finishes its late file in *its own* directory, never
//! over the new owner's file of the same name: the two ranges then overlap
//! across directories (duplicates, no loss). Readers that must be exact
//! de-duplicate on `(host_id, ts_ms)`, which is unique per accepted record
//! (the validator requires strictly increasing timestamps per host).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, Registry};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use waterbear_sim::TelemetryWriter;
use waterbear_stream::StreamParams;
use waterbear_telemetry::decode;

/// `[archive]`: rolling Parquet archive of the telemetry topic. Off unless
/// `dir` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Directory of the Parquet files (created if missing). Empty: no archive.
    pub dir: String,
    /// Input records per file (a file is rolled when it reaches this).
    pub roll_records: usize,
    /// Wall time per file, ms (a file is rolled when it is this old).
    pub roll_ms: u64,
    /// Rows per Parquet row group.
    pub row_group: usize,
    /// Suffix of the archiver's consumer group.
    pub group_suffix: String,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            dir: String::new(),
            roll_records: 200_000,
            roll_ms: 60_000,
            row_group: 50_000,
            group_suffix: "-archive".into(),
        }
    }
}

/// A checked [`ArchiveConfig`].
#[derive(Debug, Clone)]
pub struct ArchiveParams {
    /// Directory.
    pub dir: PathBuf,
    /// Input records per file.
    pub roll_records: usize,
    /// Wall time per file.
    pub roll: Duration,
    /// Rows per row group.
    pub row_group: usize,
    /// Consumer group suffix.
    pub group_suffix: String,
}

impl ArchiveConfig {
    /// `None` when the archive is off; errors name the field.
    pub fn check(&self) -> Result<Option<ArchiveParams>, String> {
        if self.dir.trim().is_empty() {
            return Ok(None);
        }
        if self.roll_records == 0 {
            return Err("archive.roll_records must be at least 1".into());
        }
        if self.roll_ms == 0 {
            return Err("archive.roll_ms must be at least 1".into());
        }
        if self.row_group == 0 {
            return Err("archive.row_group must be at least 1".into());
        }
        if self.group_suffix.is_empty() {
            return Err(
                "archive.group_suffix must not be empty (the archiver needs its own group)".into(),
            );
        }
        Ok(Some(ArchiveParams {
            dir: PathBuf::from(&self.dir),
            roll_records: self.roll_records,
            roll: Duration::from_millis(self.roll_ms),
            row_group: self.row_group,
            group_suffix: self.group_suffix.clone(),
        }))
    }
}

/// Why the archiver stopped.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Creating the consumer or subscribing.
    #[error("archive consumer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// File system.
    #[error("archive {step} {path}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Writing Parquet.
    #[error("archive parquet: {0}")]
    Parquet(#[from] waterbear_sim::IoError),
    /// Another running archiver holds the directory.
    #[error(
        "archive.dir {dir} is in use by another running instance; give each instance its own directory"
    )]
    DirInUse {
        /// The directory.
        dir: String,
    },
}

/// Holds a directory for one archiver while it lives ([`lock_dir`]).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Takes `<dir>/.waterbear-archive.lock` (created if missing) with an
/// exclusive, non-blocking `flock`: [`ArchiveError::DirInUse`] while another
/// process holds it. Dropping the [`DirLock`] (or the process ending) releases it.
pub fn lock_dir(dir: &Path) -> Result<DirLock, ArchiveError> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let path = dir.join(".waterbear-archive.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("opening", &path))?;
    // SAFETY: flock only takes a file descriptor, which `file` owns and keeps
    // open for the call; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Err(ArchiveError::DirInUse {
                dir: dir.display().to_string(),
            });
        }
        return Err(io_err("locking", &path)(e));
    }
    Ok(DirLock { _file: file })
}

/// The archiver's counters on the job's Prometheus endpoint
/// (`waterbear_archive_*_total`).
#[derive(Clone)]
pub struct ArchiveMetrics {
    files: IntCounter,
    rows: IntCounter,
    skipped: IntCounter,
    discarded: IntCounter,
}

impl ArchiveMetrics {
    /// Creates the counters and registers them in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let mk = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("archive metric names are unique");
            c
        };
        Self {
            files: mk(
                "waterbear_archive_files_total",
                "Parquet files finished and committed",
            ),
            rows: mk("waterbear_archive_rows_total", "Rows in those files"),
            skipped: mk(
                "waterbear_archive_skipped_total",
                "Input records not archived (malformed; they are in the DLQ)",
            ),
            discarded: mk(
                "waterbear_archive_discarded_total",
                "Open files discarded (revoked or rewound partition, refused commit)",
            ),
        }
    }
}

/// What an archiver run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveStats {
    /// Files finalised and committed.
    pub files: u64,
    /// Rows in them.
    pub rows: u64,
    /// Input records not archived because they do not decode or fail the
    /// stateless checks (they are in the DLQ).
    pub skipped: u64,
    /// Open files discarded (partition revoked or rewound, commit refused).
    pub discarded: u64,
}

struct OpenFile {
    writer: TelemetryWriter,
    tmp: PathBuf,
    path: PathBuf,
    last_offset: i64,
    inputs: usize,
    rows: u64,
    opened: Instant,
}

/// The archiver: a blocking loop (run it on its own thread).
pub struct Archiver {
    params: ArchiveParams,
    topic: String,
    consumer: BaseConsumer,
    open: HashMap<i32, OpenFile>,
    stats: ArchiveStats,
    metrics: Option<ArchiveMetrics>,
    _lock: DirLock,
}

fn io_err<'a>(
    step: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io {
        step,
        path: path.display().to_string(),
        source,
    }
}

impl Archiver {
    /// Takes the directory ([`lock_dir`]), deletes the unfinished files an
    /// earlier run of this directory's archiver left ([`remove_leftovers`]),
    /// and subscribes to the stream's telemetry topic in the archive group.
    pub fn new(stream: &StreamParams, params: ArchiveParams) -> Result<Self, ArchiveError> {
        let lock = lock_dir(&params.dir)?;
        let left = remove_leftovers(&params.dir)?;
        if left > 0 {
            tracing::info!(
                files = left,
                "removed unfinished archive files of an earlier run"
            );
        }
        let mut p = stream.clone();
        p.group_id = format!("{}{}", p.group_id, params.group_suffix);
        p.instance_id = format!("{}{}", p.instance_id, params.group_suffix);
        let consumer: BaseConsumer = waterbear_stream::consumer_config(&p).create()?;
        consumer.subscribe(&[&stream.telemetry_topic])?;
        Ok(Self {
            params,
            topic: stream.telemetry_topic.clone(),
            consumer,
            open: HashMap::new(),
            stats: ArchiveStats::default(),
            metrics: None,
            _lock: lock,
        })
    }

    /// Also counts into `metrics` (the job's endpoint).
    pub fn with_metrics(mut self, metrics: ArchiveMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Runs until `stop()` returns true; then finalises and commits every
    /// open file.
    pub fn run(mut self, stop: impl Fn() -> bool) -> Result<ArchiveStats, ArchiveError> {
        let mut last_assignment_check = Instant::now();
        while !stop() {
            if let Some(m) = self.consumer.poll(Duration::from_millis(100)) {
                match m {
                    Ok(m) => {
                        let (part, off) = (m.partition(), m.offset());
                        let payload = m.payload().unwrap_or_default().to_vec();
                        drop(m);
                        self.add(part, off, &payload)?;
                    }
                    Err(e) => tracing::warn!(error = %e, "archive consumer"),
                }
            }
            if last_assignment_check.elapsed() >= Duration::from_millis(500) {
                last_assignment_check = Instant::now();
                self.drop_unassigned();
            }
            self.roll_due(false)?;
        }
        self.drop_unassigned();
        self.roll_due(true)?;
        tracing::info!(stats = ?self.stats, "archiver stopped");
        Ok(self.stats)
    }

    fn file_names(&self, part: i32, first: i64) -> (PathBuf, PathBuf) {
        let name = format!("{}-p{part:03}-{first:020}.parquet", self.topic);
        let path = self.params.dir.join(&name);
        let tmp = self.params.dir.join(format!("{name}.tmp"));
        (path, tmp)
    }

    fn add(&mut self, part: i32, off: i64, payload: &[u8]) -> Result<(), ArchiveError> {
        if let Some(f) = self.open.get(&part) {
            if off <= f.last_offset {
                // the consumer went back (rebalance, or a refused commit): the
                // file restarts from the committed offset
                self.discard(part);
            }
        }
        if !self.open.contains_key(&part) {
            let (path, tmp) = self.file_names(part, off);
            let writer = TelemetryWriter::create(&tmp, self.params.row_group)?;
            self.open.insert(
                part,
                OpenFile {
                    writer,
                    tmp,
                    path,
                    last_offset: off,
                    inputs: 0,
                    rows: 0,
                    opened: Instant::now(),
                },
            );
        }
        let f = self.open.get_mut(&part).expect("inserted above");
        f.last_offset = off;
        f.inputs += 1;
        match decode(payload).and_then(|r| r.check().map(|()| r)) {
            Ok(rec) => {
                f.writer.write(std::slice::from_ref(&rec))?;
                f.rows += 1;
            }
            Err(_) => {
                self.stats.skipped += 1;
                if let Some(m) = &self.metrics {
                    m.skipped.inc();
                }
            }
        }
        Ok(())
    }

    fn discard(&mut self, part: i32) {
        if let Some(f) = self.open.remove(&part) {
            drop(f.writer);
            let _ = std::fs::remove_file(&f.tmp);
            self.count_discarded();
        }
    }

    fn drop_unassigned(&mut self) {
        let assigned: Vec<i32> = match self.consumer.assignment() {
            Ok(tpl) => tpl.elements().iter().map(|e| e.partition()).collect(),
            Err(_) => return,
        };
        let gone: Vec<i32> = self
            .open
            .keys()
            .filter(|p| !assigned.contains(p))
            .copied()
            .collect();
        for p in gone {
            tracing::info!(
                partition = p,
                "archive partition revoked: open file discarded"
            );
            self.discard(p);
        }
    }

    fn roll_due(&mut self, all: bool) -> Result<(), ArchiveError> {
        let due: Vec<i32> = self
            .open
            .iter()
            .filter(|(_, f)| {
                all || f.inputs >= self.params.roll_records
                    || f.opened.elapsed() >= self.params.roll
            })
            .map(|(&p, _)| p)
            .collect();
        for p in due {
            self.finalize(p)?;
        }
        Ok(())
    }

    fn count_discarded(&mut self) {
        self.stats.discarded += 1;
        if let Some(m) = &self.metrics {
            m.discarded.inc();
        }
    }

    /// Footer, sync, rename, sync the directory, then commit the offset.
    fn finalize(&mut self, part: i32) -> Result<(), ArchiveError> {
        let f = self.open.remove(&part).expect("due files are open");
        let rows = f.writer.finish()?;
        if f.rows == 0 {
            std::fs::remove_file(&f.tmp).map_err(io_err("removing", &f.tmp))?;
        } else {
            std::fs::rename(&f.tmp, &f.path).map_err(io_err("renaming", &f.tmp))?;
            let dir = std::fs::File::open(&self.params.dir)
                .map_err(io_err("opening", &self.params.dir))?;
            dir.sync_all()
                .map_err(io_err("syncing", &self.params.dir))?;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, part, Offset::Offset(f.last_offset + 1))
            .expect("valid offset");
        match self.consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                if f.rows > 0 {
                    self.stats.files += 1;
                    self.stats.rows += rows;
                    if let Some(m) = &self.metrics {
                        m.files.inc();
                        m.rows.inc_by(rows);
                    }
                    tracing::debug!(file = %f.path.display(), rows, "archive file committed");
                }
            }
            Err(e) => {
                // Not ours any more (or the broker refused): whoever reads the
                // partition next starts at the committed offset, which is this
                // file's first offset, and replaces this file.
                tracing::warn!(partition = part, error = %e, "archive commit refused; the partition's next owner rewrites the file");
                self.count_discarded();
            }
        }
        Ok(())
    }
}

/// Deletes leftover `*.parquet.tmp` files (of a crashed run) in `dir`.
pub fn remove_leftovers(dir: &Path) -> Result<usize, ArchiveError> {
    let mut n = 0;
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    for e in rd {
        let e = e.map_err(io_err("listing", dir))?;
        let p = e.path();
        if p.to_string_lossy().ends_with(".parquet.tmp") {
            std::fs::remove_file(&p).map_err(io_err("removing", &p))?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_off_by_default_and_errors_name_the_field() {
        assert!(ArchiveConfig::default().check().unwrap().is_none());
        let c = ArchiveConfig {
            dir: "/tmp/x".into(),
            roll_records: 0,
            ..Default::default()
        };
        assert!(c.check().unwrap_err().contains("archive.roll_records"));
        let c = ArchiveConfig {
            dir: "/tmp/x".into(),
            ..Default::default()
        };
        assert_eq!(c.check().unwrap().unwrap().roll, Duration::from_secs(60));
    }

    #[test]
    fn metrics_register_on_the_job_registry() {
        let reg = Registry::new();
        let m = ArchiveMetrics::new(&reg);
        m.rows.inc_by(3);
        let names: Vec<String> = reg.gather().iter().map(|f| f.name().to_string()).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        let rows = reg
            .gather()
            .into_iter()
            .find(|f| f.name() == "waterbear_archive_rows_total")
            .unwrap();
        assert_eq!(rows.get_metric()[0].get_counter().get_value(), 3.0);
    }

    #[test]
    fn one_archiver_at_a_time_holds_a_directory() {
        let dir = std::env::temp_dir().join(format!("wb-archive-lock-{}", std::process::id()));
        let first = lock_dir(&dir).unwrap();
        let e = lock_dir(&dir).unwrap_err();
        assert!(matches!(e, ArchiveError::DirInUse { .. }), "{e:?}");
        assert!(e.to_string().contains("archive.dir"), "{e}");
        drop(first);
        let again = lock_dir(&dir).expect("free once the holder is gone");
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn leftovers_are_removed_and_finished_files_kept() {
        let dir = std::env::temp_dir().join(format!("wb-archive-left-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("t-p000-00000000000000000000.parquet.tmp"), b"x").unwrap();
        std::fs::write(dir.join("t-p000-00000000000000000007.parquet"), b"y").unwrap();
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
