//! `waterbear explain <decision-id>`: the chain behind one decision, read back from a
//! demo or backtest output directory (NDJSON): the telemetry window, the features and
//! score, the model, the rule that fired, the alternatives rejected, the targets, the
//! executor's outcome, and the rest of the incident's escalation ladder.

use std::fmt::Write as _;
use std::path::Path;

use thiserror::Error;
use waterbear_executor::ExecutionReport;
use waterbear_policy::{Decision, Notice};

/// Why a decision could not be explained.
#[derive(Debug, Error)]
pub enum ExplainError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line did not parse.
    #[error("{path}:{line}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// The cause.
        source: serde_json::Error,
    },
    /// No decision or notice has this id.
    #[error(
        "no decision or policy record with id `{id}` in {dir} ({decisions} decisions, {notices} records)"
    )]
    NotFound {
        /// The id asked for.
        id: String,
        /// The run directory.
        dir: String,
        /// Decisions in it.
        decisions: usize,
        /// Notices in it.
        notices: usize,
    },
}

fn read_ndjson<T: serde::de::DeserializeOwned>(
    path: &Path,
    required: bool,
) -> Result<Vec<T>, ExplainError> {
    let p = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ExplainError::Read { path: p, source }),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| ExplainError::Parse {
                path: p.clone(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a time in ms since the epoch.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil from days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn hours(ms: i64) -> String {
    format!("{:.1} h", ms as f64 / 3_600_000.0)
}

/// Explains decision (or policy record) `id` from the run in `dir`.
pub fn explain(dir: &Path, id: &str) -> Result<String, ExplainError> {
    let decisions: Vec<Decision> = read_ndjson(&dir.join("decisions.ndjson"), true)?;
    let outcomes: Vec<ExecutionReport> = read_ndjson(&dir.join("outcomes.ndjson"), false)?;
    let notices: Vec<Notice> = read_ndjson(&dir.join("policy_records.ndjson"), false)?;
    let mut o = String::new();
    if let Some(n) = notices.iter().find(|n| n.id == id) {
        let _ = writeln!(
            o,
            "policy record {} — {} at {}",
            n.id,
            n.kind.as_str(),
            utc(n.ts_ms)
        );
        let _ = writeln!(o, "scope: {}", n.scope);
        let _ = writeln!(o, "why:   {}", n.why);
        if !n.hosts.is_empty() {
            let _ = writeln!(o, "hosts: {}", n.hosts.join(", "));
        }
        if let Some(c) = &n.command {
            let _ = writeln!(
                o,
                "command: {}",
                serde_json::to_string(c).unwrap_or_default()
            );
            for d in decisions.iter().filter(|d| d.commands.contains(&n.id)) {
                let _ = writeln!(
                    o,
                    "shaped decision {} ({} on {})",
                    d.id, d.action, d.host_id
                );
            }
        }
        return Ok(o);
    }
    let Some(d) = decisions.iter().find(|d| d.id == id) else {
        return Err(ExplainError::NotFound {
            id: id.to_owned(),
            dir: dir.display().to_string(),
            decisions: decisions.len(),
            notices: notices.len(),
        });
    };
    let _ = writeln!(
        o,
        "decision {} — {} on {}{}",
        d.id,
        d.action,
        d.host_id,
        if d.shadow {
            " (SHADOW: logged, not executed)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        o,
        "host {} in cluster {}, fault domain {}, update domain {}; incident {} step {}",
        d.host_id, d.cluster, d.fault_domain, d.update_domain, d.incident, d.generation
    );
    let _ = writeln!(o, "\n1. telemetry window");
    let _ = writeln!(
        o,
        "   {} records from {} to {} (decided at {})",
        d.window.records,
        utc(d.window.first_ts_ms),
        utc(d.window.last_ts_ms),
        utc(d.ts_ms)
    );
    let _ = writeln!(o, "\n2. score");
    let _ = writeln!(
        o,
        "   model {}: {} risk {:.3}",
        d.model, d.signature, d.score
    );
    for r in &d.reasons {
        let _ = writeln!(
            o,
            "   reason {} = {} (contribution {:.3})",
            r.feature, r.value, r.contribution
        );
    }
    if let Some(f) = &d.features {
        let mut nz: Vec<(&String, &f64)> = f.iter().filter(|(_, v)| **v != 0.0).collect();
        nz.sort_by(|a, b| a.0.cmp(b.0));
        let _ = writeln!(o, "   features ({} of {} non-zero):", nz.len(), f.len());
        for (k, v) in nz {
            let _ = writeln!(o, "     {k} = {v}");
        }
    }
    let _ = writeln!(o, "\n3. rule `{}`", d.rule);
    let _ = writeln!(o, "   {}", d.why);
    if let (Some(t), Some(e)) = (d.ttf_ms, d.evacuation_ms) {
        let _ = writeln!(
            o,
            "   predicted time to failure {}, evacuation {:.1} min",
            hours(t),
            e as f64 / 60_000.0
        );
    }
    if !d.commands.is_empty() {
        let _ = writeln!(o, "   operator commands: {}", d.commands.join(", "));
        for c in notices.iter().filter(|n| d.commands.contains(&n.id)) {
            let _ = writeln!(o, "     {}: {}", c.id, c.why);
        }
    }
    let _ = writeln!(o, "\n4. alternatives considered");
    for a in &d.alternatives {
        let _ = writeln!(o, "   - {}: {}", a.action, a.rejected);
    }
    if !d.targets.is_empty() {
        let _ = writeln!(o, "\n5. migration targets");
        for t in &d.targets {
            let _ = writeln!(o, "   - {} receives {} VM(s)", t.host_id, t.vms);
        }
    }
    let _ = writeln!(o, "\n6. outcome");
    match outcomes.iter().find(|r| r.decision_id == d.id) {
        Some(r) => {
            let status = match &r.error {
                None => "succeeded".to_owned(),
                Some(e) => format!("failed: {e}"),
            };
            let _ = writeln!(o, "   {status}, finished {}", utc(r.finished_ms));
            if let Some(op) = &r.report {
                let _ = writeln!(
                    o,
                    "   moved {} VMs ({} MiB), froze {}, interrupted {}, healed {:?}, took {:.1} s",
                    op.vms_moved,
                    op.mem_moved_mib,
                    op.vms_frozen,
                    op.vms_interrupted,
                    op.healed,
                    op.duration_ms as f64 / 1000.0
                );
            }
        }
        None => {
            let _ = writeln!(o, "   no outcome recorded");
        }
    }
    let chain: Vec<&Decision> = decisions
        .iter()
        .filter(|x| x.host_id == d.host_id && x.incident == d.incident)
        .collect();
    if chain.len() > 1 {
        let _ = writeln!(o, "\n7. the incident's ladder");
        for x in chain {
            let mark = if x.id == d.id { "→" } else { " " };
            let out = outcomes.iter().find(|r| r.decision_id == x.id).map_or(
                "no outcome".to_owned(),
                |r| match (&r.error, &r.report) {
                    (Some(e), _) => format!("failed: {e}"),
                    (None, Some(op)) => format!("done, healed {:?}", op.healed),
                    _ => "done".into(),
                },
            );
            let _ = writeln!(
                o,
                "   {mark} {} step {} {} at {} ({})",
                x.id,
                x.generation,
                x.action,
                utc(x.ts_ms),
                out
            );
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_767_225_600_000), "2026-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000 + 3_661_000), "2000-02-29 01:01:01 UTC");
    }
}
