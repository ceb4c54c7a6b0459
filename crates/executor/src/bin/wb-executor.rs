//! `wb-executor`: the durable recovery executor as a process.
//!
//! * `run`: resume every unfinished operation of the journal, then execute the
//!   signed decisions of a file (NDJSON of `SignedDecision`), printing one
//!   `ExecutionReport` per line. `--crash-after STEP` kills the process with
//!   SIGKILL right after STEP is durable (crash tests); `--pause-after STEP`
//!   waits for a line on stdin there (fencing tests).
//! * `sign`: sign a decision (JSON on stdin) as the policy side does.
//! * `journal`: dump the journal (operations, rejections, audit) as JSON.
//! * `host-agent`: run a host agent (the same as `waterbear host-agent`), so
//!   tests of this package can start agents from this binary.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use waterbear_executor::{
    Backoff, DurableExecutor, Journal, Key, Keyring, KvmBackend, KvmHost, KvmOptions,
    SignedDecision, sign,
};
use waterbear_policy::Decision;

#[derive(Parser)]
#[command(
    name = "wb-executor",
    version,
    about = "Durable recovery executor over host agents."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct KeyArgs {
    /// File holding the HMAC secret as hex.
    #[arg(long)]
    key_file: PathBuf,
    /// Key id.
    #[arg(long, default_value = "k1")]
    key_id: String,
}

impl KeyArgs {
    fn key(&self) -> Result<Key> {
        let hex = std::fs::read_to_string(&self.key_file)
            .with_context(|| format!("reading {}", self.key_file.display()))?;
        Ok(Key::from_hex(&self.key_id, &hex)?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Resume unfinished operations, then execute signed decisions.
    Run {
        /// Journal file (redb).
        #[arg(long)]
        journal: PathBuf,
        /// Host mapping HOST=ADDR (whole agent) or HOST=ADDR/PREFIX; repeatable.
        #[arg(long = "agent", required = true)]
        agents: Vec<String>,
        #[command(flatten)]
        key: KeyArgs,
        /// NDJSON file of signed decisions (none: only resume).
        #[arg(long)]
        decisions: Option<PathBuf>,
        /// Current time on the decisions' clock, ms (default: wall clock).
        #[arg(long)]
        now_ms: Option<i64>,
        /// Freshness window, ms.
        #[arg(long, default_value_t = 300_000)]
        freshness_ms: i64,
        /// Kill this process with SIGKILL right after this step is recorded.
        #[arg(long, conflicts_with = "pause_after")]
        crash_after: Option<String>,
        /// Stop right after this step is recorded until a line arrives on
        /// stdin (fencing tests: another executor takes over meanwhile).
        #[arg(long)]
        pause_after: Option<String>,
        /// Have migrations compare guest-memory CRCs on both sides.
        #[arg(long)]
        verify_checksum: bool,
        /// Attempts before rolling back.
        #[arg(long, default_value_t = 4)]
        max_attempts: u32,
        /// First backoff delay, ms.
        #[arg(long, default_value_t = 200)]
        backoff_ms: u64,
    },
    /// Sign a decision (JSON on stdin); prints the signed decision.
    Sign {
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Print the journal as JSON.
    Journal {
        /// Journal file.
        #[arg(long)]
        journal: PathBuf,
    },
    /// Return a host to rotation (e.g. after a repair): migrations may target
    /// it again. Works while an executor runs on the same journal (it reads
    /// the rotation before every decision).
    ReturnHost {
        /// Journal file.
        #[arg(long)]
        journal: PathBuf,
        /// Why, kept in the journal's event log (e.g. the repair ticket).
        #[arg(long)]
        reason: String,
        /// The host.
        host: String,
    },
    /// Run a host agent.
    HostAgent(waterbear_vmm::HostAgentArgs),
}

fn parse_agents(specs: &[String]) -> Result<BTreeMap<String, KvmHost>> {
    let mut out = BTreeMap::new();
    for s in specs {
        let Some((host, rest)) = s.split_once('=') else {
            bail!("--agent {s}: expected HOST=ADDR[/PREFIX]");
        };
        let (agent, prefix) = match rest.split_once('/') {
            Some((a, p)) => (a.to_owned(), Some(p.to_owned())),
            None => (rest.to_owned(), None),
        };
        out.insert(
            host.to_owned(),
            KvmHost {
                agent,
                vm_prefix: prefix,
            },
        );
    }
    Ok(out)
}

fn sigkill_self(point: &str) {
    eprintln!("wb-executor: crash point {point} reached: SIGKILL");
    let _ = std::io::stderr().flush();
    // SAFETY: kill(2) on our own pid only sends a signal; no memory is touched.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

fn pause_until_stdin(point: &str) {
    eprintln!("wb-executor: paused after {point}");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn main() -> Result<()> {
    tracing_subscriber_init();
    let cli = Cli::parse();
    match cli.command {
        Command::HostAgent(args) => {
            waterbear_vmm::run_host_agent(args.into_config()).context("host agent failed")?;
            Ok(())
        }
        Command::Sign { key } => {
            let key = key.key()?;
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            let d: Decision = serde_json::from_str(&s).context("decoding the decision")?;
            println!("{}", serde_json::to_string(&sign(&d, &key))?);
            Ok(())
        }
        Command::Journal { journal } => {
            let j = Journal::open(&journal)?;
            let dump = serde_json::json!({
                "epoch": j.current_epoch()?,
                "ops": j.ops()?,
                "rejections": j.rejections()?,
                "out_of_rotation": j.out_of_rotation()?,
                "audit": j.audit(false)?,
            });
            println!("{}", serde_json::to_string_pretty(&dump)?);
            Ok(())
        }
        Command::ReturnHost {
            journal,
            reason,
            host,
        } => {
            let j = Journal::open(&journal)?;
            if j.return_to_rotation(&host, &reason)? {
                println!("{host}: returned to rotation");
            } else {
                println!("{host}: was not out of rotation");
            }
            Ok(())
        }
        Command::Run {
            journal,
            agents,
            key,
            decisions,
            now_ms,
            freshness_ms,
            crash_after,
            pause_after,
            verify_checksum,
            max_attempts,
            backoff_ms,
        } => {
            let hosts = parse_agents(&agents)?;
            let mut opts = KvmOptions::default();
            opts.migrate.verify_checksum = verify_checksum;
            let backend = KvmBackend::new(hosts, opts);
            let j = Arc::new(Journal::open(&journal)?);
            let mut exec = DurableExecutor::new(j, backend, Keyring::new([key.key()?]))?;
            exec.backoff = Backoff {
                base_ms: backoff_ms,
                max_attempts,
                ..Backoff::default()
            };
            if pause_after.is_some() {
                exec.set_crash_point(pause_after, pause_until_stdin);
            } else {
                exec.set_crash_point(crash_after, sigkill_self);
            }
            eprintln!("wb-executor: epoch {}", exec.epoch());
            let accept = |_: &str| true;
            let mut out = std::io::stdout().lock();
            let mut failed = false;
            for r in exec.resume_unfinished(&accept)? {
                match r {
                    Ok(rep) => writeln!(out, "{}", serde_json::to_string(&rep)?)?,
                    Err(e) => {
                        eprintln!("wb-executor: resume: {e}");
                        failed = true;
                    }
                }
            }
            if let Some(path) = decisions {
                let f = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                let now = now_ms.unwrap_or_else(|| {
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or(Duration::ZERO)
                        .as_millis() as i64
                });
                for line in std::io::BufReader::new(f).lines() {
                    let line = line?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let sd: SignedDecision =
                        serde_json::from_str(&line).context("decoding a signed decision")?;
                    match exec.execute(&sd, now, freshness_ms, &accept) {
                        Ok(rep) => writeln!(out, "{}", serde_json::to_string(&rep)?)?,
                        Err(e) if e.is_stale_epoch() => bail!("fenced: {e}"),
                        Err(e) => {
                            eprintln!("wb-executor: {e}");
                            failed = true;
                        }
                    }
                }
            }
            if failed {
                bail!("some decisions were rejected or left unresolved");
            }
            Ok(())
        }
    }
}

fn tracing_subscriber_init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
