//! End to end: a smaller demo through every stage, judged against the ground truth.

use std::collections::HashSet;

use waterbear::{DemoConfig, DemoOptions, run_demo};
use waterbear_policy::Decision;
use waterbear_sim::FailureMode;

#[test]
fn demo_predicts_disk_failures_keeps_budgets_and_beats_reactive_healing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DemoConfig::embedded();
    cfg.sim.hosts = 200;
    cfg.sim.days = 5.0;
    cfg.sim.seed = 7;
    cfg.sim.failure_fraction = 0.15;
    // the embedded default scores with the committed disk model next to the rules
    let model = cfg.model_artifact().unwrap();
    assert!(model.is_some());
    let s = run_demo(&DemoOptions {
        config: cfg.clone(),
        out_dir: dir.path().to_path_buf(),
        progress: false,
        model: model.clone(),
    })
    .unwrap();

    let disk = s.mode(FailureMode::Disk);
    assert!(
        disk.injected >= 5,
        "too few disk failures to judge: {disk:?}"
    );
    assert!(
        disk.predicted * 10 >= disk.injected * 7,
        "predicted {} of {} disk failures",
        disk.predicted,
        disk.injected
    );
    assert!(disk.median_lead_h.unwrap() > 0.0);
    assert!(s.max_in_flight_per_fault_domain <= cfg.policy.max_per_fault_domain);
    assert!(
        s.vm_interruptions * 2 < s.reactive_vm_interruptions,
        "waterbear {} vs reactive {}",
        s.vm_interruptions,
        s.reactive_vm_interruptions
    );
    // sudden failures have no precursor: nothing may claim to have seen them coming much
    let sudden = s.mode(FailureMode::Sudden);
    assert_eq!(sudden.averted, 0, "{sudden:?}");

    // outputs: decisions are valid NDJSON, with unique deterministic ids that agree with the summary
    let text = std::fs::read_to_string(dir.path().join("decisions.ndjson")).unwrap();
    let decisions: Vec<Decision> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(decisions.len() as u64, s.actions.values().sum::<u64>());
    let ids: HashSet<&str> = decisions.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids.len(), decisions.len());
    assert!(decisions.iter().all(|d| d.model.contains("disk-bb@v2")));
    assert!(
        decisions
            .iter()
            .all(|d| !d.why.is_empty() && !d.reasons.is_empty())
    );
    for f in [
        "telemetry.parquet",
        "truth.parquet",
        "truth.ndjson",
        "outcomes.ndjson",
        "summary.json",
        "summary.md",
    ] {
        assert!(
            dir.path().join(f).metadata().unwrap().len() > 0,
            "{f} is empty"
        );
    }

    // same seed, same decisions
    let dir2 = tempfile::tempdir().unwrap();
    run_demo(&DemoOptions {
        config: cfg,
        out_dir: dir2.path().to_path_buf(),
        progress: false,
        model,
    })
    .unwrap();
    assert_eq!(
        text,
        std::fs::read_to_string(dir2.path().join("decisions.ndjson")).unwrap()
    );
}
