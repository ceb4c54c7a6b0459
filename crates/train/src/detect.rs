//! `detect`: anomaly scores for any `timestamp,value` series, online and untuned.
//!
//! Each value is compared with an exponentially weighted baseline (mean and variance,
//! `α = 0.05`) of the values *before* it: `z = (x − μ) / max(σ, floor)` with the floor
//! relative to the level (`1e-3·|μ|`, at least `1e-9`), and the score is
//! `z² / (z² + 9)`: 0 on the baseline, 0.5 at three standard deviations, → 1 beyond.
//! The baseline learns from a winsorised value (clamped to `μ ± 4σ`), so a single spike
//! does not inflate it, while a level shift is absorbed within a few dozen points
//! (each step moves the mean by up to `4σα` and widens σ). The first `WARMUP` values
//! score 0.

use std::io::{BufRead, Write};
use std::path::Path;

use crate::TrainError;

const ALPHA: f64 = 0.05;
const WARMUP: u64 = 10;
const CLAMP: f64 = 4.0;

/// Online scorer of one series.
#[derive(Debug, Clone, Default)]
pub struct SeriesScorer {
    mean: f64,
    var: f64,
    n: u64,
}

impl SeriesScorer {
    /// A scorer that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The score of `x` against the values before it, then folds `x` in.
    pub fn push(&mut self, x: f64) -> f64 {
        if !x.is_finite() {
            return 0.0;
        }
        if self.n == 0 {
            self.mean = x;
            self.var = 0.0;
            self.n = 1;
            return 0.0;
        }
        let floor = (1e-3 * self.mean.abs()).max(1e-9);
        let sd = self.var.sqrt().max(floor);
        let z = (x - self.mean) / sd;
        let score = if self.n < WARMUP {
            0.0
        } else {
            z * z / (z * z + 9.0)
        };
        let xc = if self.n < WARMUP {
            x
        } else {
            x.clamp(self.mean - CLAMP * sd, self.mean + CLAMP * sd)
        };
        let d = xc - self.mean;
        self.mean += ALPHA * d;
        self.var = (1.0 - ALPHA) * (self.var + ALPHA * d * d);
        self.n += 1;
        score
    }
}

/// Scores a `timestamp,value` CSV from `input` into `timestamp,value,anomaly_score` on
/// `output`. A header line (a first line whose value does not parse) is kept and
/// extended; blank lines are skipped; an unparsable value later is an error naming the line.
pub fn detect_stream(input: impl BufRead, mut output: impl Write) -> Result<usize, TrainError> {
    let mut s = SeriesScorer::new();
    let mut n = 0usize;
    let io = |e| TrainError::Io {
        path: "<detect>".into(),
        source: e,
    };
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(io)?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let (ts, v) = line
            .rsplit_once(',')
            .ok_or_else(|| TrainError::Data(format!("line {}: expected timestamp,value", i + 1)))?;
        match v.trim().parse::<f64>() {
            Ok(x) => {
                let score = s.push(x);
                writeln!(output, "{ts},{},{score:.6}", v.trim()).map_err(io)?;
                n += 1;
            }
            Err(_) if i == 0 => writeln!(output, "{ts},{},anomaly_score", v.trim()).map_err(io)?,
            Err(_) => {
                return Err(TrainError::Data(format!(
                    "line {}: value {v:?} is not a number",
                    i + 1
                )));
            }
        }
    }
    output.flush().map_err(io)?;
    Ok(n)
}

/// [`detect_stream`] from file `input` to file `output`; returns the rows scored.
pub fn detect_csv(input: &Path, output: &Path) -> Result<usize, TrainError> {
    let f = std::fs::File::open(input).map_err(TrainError::io(input))?;
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    }
    let o = std::fs::File::create(output).map_err(TrainError::io(output))?;
    detect_stream(std::io::BufReader::new(f), std::io::BufWriter::new(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(xs: &[f64]) -> Vec<f64> {
        let mut s = SeriesScorer::new();
        xs.iter().map(|&x| s.push(x)).collect()
    }

    fn noise(i: usize) -> f64 {
        ((i as f64 * 12.9898).sin() * 43_758.545).fract() - 0.5
    }

    #[test]
    fn spike_scores_high_and_noise_low() {
        let mut xs: Vec<f64> = (0..300).map(|i| 100.0 + noise(i)).collect();
        xs[200] = 110.0;
        let s = scores(&xs);
        assert!(s[200] > 0.9, "spike {}", s[200]);
        let normal = s[20..200].iter().cloned().fold(0.0, f64::max);
        assert!(normal < 0.6, "noise max {normal}");
        assert!(s.iter().all(|v| (0.0..=1.0).contains(v)));
        // the spike did not blind the detector: the next points are scored as before
        assert!(s[205..300].iter().cloned().fold(0.0, f64::max) < 0.6);
    }

    #[test]
    fn level_shift_is_absorbed() {
        let xs: Vec<f64> = (0..600)
            .map(|i| if i < 300 { 10.0 } else { 50.0 } + noise(i))
            .collect();
        let s = scores(&xs);
        assert!(s[300] > 0.9);
        let late = s[450..600].iter().cloned().fold(0.0, f64::max);
        assert!(late < 0.6, "after the shift {late}");
    }

    #[test]
    fn scores_are_online() {
        let xs: Vec<f64> = (0..100).map(|i| noise(i) * 3.0).collect();
        let full = scores(&xs);
        let mut changed = xs.clone();
        changed[60] = 1e6;
        let other = scores(&changed);
        assert_eq!(full[..60], other[..60]);
    }

    #[test]
    fn csv_round_trip_with_header() {
        let input = "timestamp,value\n1,1.0\n2,1.0\n\n3,abc\n";
        let mut out = Vec::new();
        let e = detect_stream(input.as_bytes(), &mut out).unwrap_err();
        assert!(e.to_string().contains("line 5"), "{e}");
        let input = "timestamp,value\n1,1.0\n2,2.5\n";
        let mut out = Vec::new();
        assert_eq!(detect_stream(input.as_bytes(), &mut out).unwrap(), 2);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "timestamp,value,anomaly_score\n1,1.0,0.000000\n2,2.5,0.000000\n"
        );
    }
}
