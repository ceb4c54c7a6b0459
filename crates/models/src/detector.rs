use serde::{Deserialize, Serialize};
use waterbear_features::{Feature, FeatureVector};

/// The kind of failure a score points at; it selects the mitigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signature {
    /// Nothing in particular.
    None,
    /// Disk wear-out: SMART counters and IO latency.
    Disk,
    /// Memory: corrected ECC bursts, uncorrectable errors.
    Memory,
    /// Host agent: heartbeat gaps, service crash loops.
    HostAgent,
    /// Kernel: warnings and oopses.
    Kernel,
    /// Thermal or CPU throttling.
    Thermal,
    /// The host does not answer at all.
    Unresponsive,
}

impl Signature {
    /// Every signature.
    pub const ALL: [Signature; 7] = [
        Signature::None,
        Signature::Disk,
        Signature::Memory,
        Signature::HostAgent,
        Signature::Kernel,
        Signature::Thermal,
        Signature::Unresponsive,
    ];

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Signature::None => "none",
            Signature::Disk => "disk",
            Signature::Memory => "memory",
            Signature::HostAgent => "host_agent",
            Signature::Kernel => "kernel",
            Signature::Thermal => "thermal",
            Signature::Unresponsive => "unresponsive",
        }
    }
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One feature's part in a score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    /// The feature.
    pub feature: Feature,
    /// Its value.
    pub value: f64,
    /// How much it added to the score (detector-specific units, larger is more).
    pub contribution: f64,
}

/// Up to three reasons, strongest first; fixed size so scoring never allocates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reasons {
    items: [Option<Reason>; 3],
}

impl Reasons {
    /// Adds a reason, keeping the three strongest (ties keep the earlier one).
    #[inline]
    pub fn push(&mut self, r: Reason) {
        if r.contribution <= 0.0 {
            return;
        }
        let mut cur = Some(r);
        for slot in &mut self.items {
            match (slot.as_ref(), cur) {
                (_, None) => break,
                (None, Some(c)) => {
                    *slot = Some(c);
                    cur = None;
                }
                (Some(s), Some(c)) if c.contribution > s.contribution => {
                    cur = slot.replace(c);
                }
                _ => {}
            }
        }
    }

    /// The reasons, strongest first.
    pub fn iter(&self) -> impl Iterator<Item = &Reason> {
        self.items.iter().flatten()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.items[0].is_none()
    }
}

/// A detector's verdict on one record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Failure risk in `[0, 1]`.
    pub value: f64,
    /// What kind of failure.
    pub signature: Signature,
    /// Which features drove it.
    pub reasons: Reasons,
}

impl Score {
    /// No risk.
    pub const ZERO: Score = Score {
        value: 0.0,
        signature: Signature::None,
        reasons: Reasons { items: [None; 3] },
    };
}

/// Scores one host's features. Implementations are pure and cheap: they run once per
/// telemetry record.
pub trait Detector: Send + Sync {
    /// Model name, e.g. `rule-baseline` or `disk-bb`.
    fn name(&self) -> &str;

    /// Model version, recorded in every decision.
    fn version(&self) -> &str;

    /// Scores a feature vector.
    fn score(&self, fv: &FeatureVector) -> Score;
}

/// The highest score of several detectors (each covers different failure signatures).
pub struct MaxOf {
    name: String,
    version: String,
    parts: Vec<Box<dyn Detector>>,
}

impl MaxOf {
    /// Combines `parts`; its version lists theirs.
    pub fn new(parts: Vec<Box<dyn Detector>>) -> Self {
        let name = parts.iter().map(|d| d.name()).collect::<Vec<_>>().join("+");
        let version = parts
            .iter()
            .map(|d| format!("{}@{}", d.name(), d.version()))
            .collect::<Vec<_>>()
            .join(",");
        Self {
            name,
            version,
            parts,
        }
    }
}

impl Detector for MaxOf {
    fn name(&self) -> &str {
        &self.name
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn score(&self, fv: &FeatureVector) -> Score {
        let mut best = Score::ZERO;
        for d in &self.parts {
            let s = d.score(fv);
            if s.value > best.value {
                best = s;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(c: f64) -> Reason {
        Reason {
            feature: Feature::Smart5,
            value: c,
            contribution: c,
        }
    }

    proptest::proptest! {
        #[test]
        fn reasons_keep_the_three_largest(cs in proptest::collection::vec(0.0f64..10.0, 0..12)) {
            let mut rs = Reasons::default();
            for &c in &cs { rs.push(r(c)); }
            let got: Vec<f64> = rs.iter().map(|r| r.contribution).collect();
            let mut want: Vec<f64> = cs.iter().copied().filter(|&c| c > 0.0).collect();
            want.sort_by(|a, b| b.partial_cmp(a).unwrap());
            want.truncate(3);
            proptest::prop_assert_eq!(got, want);
        }
    }

    struct Fixed(f64, Signature);
    impl Detector for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn version(&self) -> &str {
            "1"
        }
        fn score(&self, _: &FeatureVector) -> Score {
            Score {
                value: self.0,
                signature: self.1,
                reasons: Reasons::default(),
            }
        }
    }

    #[test]
    fn max_of_takes_the_strongest_signature() {
        let m = MaxOf::new(vec![
            Box::new(Fixed(0.2, Signature::Disk)),
            Box::new(Fixed(0.7, Signature::Memory)),
        ]);
        let s = m.score(&FeatureVector::default());
        assert_eq!((s.value, s.signature), (0.7, Signature::Memory));
        assert_eq!(m.version(), "fixed@1,fixed@1");
    }
}
