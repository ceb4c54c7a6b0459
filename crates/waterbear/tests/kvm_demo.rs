//! `waterbear demo --kvm` on real guests (/dev/kvm): the decisions on a few
//! hosts are carried out on KVM VMs behind host agents.

use waterbear::{DemoConfig, DemoOptions, KvmDemoOptions, run_kvm_demo};

#[test]
fn kvm_demo_moves_and_freezes_real_guests() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DemoConfig::embedded();
    cfg.sim.hosts = 200;
    cfg.sim.days = 4.0;
    cfg.sim.seed = 7;
    cfg.sim.failure_fraction = 0.15;
    let mut k = KvmDemoOptions::new(env!("CARGO_BIN_EXE_waterbear").into());
    k.vm_mib = 16;
    let model = cfg.model_artifact().unwrap();
    let (demo, real) = run_kvm_demo(
        &DemoOptions {
            config: cfg,
            out_dir: dir.path().to_path_buf(),
            progress: false,
            model,
        },
        &k,
    )
    .unwrap();
    eprintln!("{real}");
    assert!(demo.records > 0);
    assert!(!real.hosts.is_empty());
    assert!(real.operations.values().sum::<u64>() > 0, "{real:?}");
    assert_eq!(real.failed, 0, "{real:?}");
    assert_eq!(real.vms_running_once, real.vms, "{real:?}");
    assert!(real.journal_problems.is_empty(), "{real:?}");
    assert!(dir.path().join("kvm_summary.json").exists());
    assert!(dir.path().join("kvm_outcomes.ndjson").exists());
}
