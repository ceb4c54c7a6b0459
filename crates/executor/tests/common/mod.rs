//! Helpers for the real-KVM tests: host agents as child processes (the
//! `host-agent` subcommand of `wb-executor`), VMs, conditions with deadlines.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use waterbear_executor::{Key, SignedDecision, sign};
use waterbear_models::Signature;
use waterbear_policy::{Action, Decision, decision_id};
use waterbear_vmm::agent::VmInfo;
use waterbear_vmm::{AgentClient, Request, Response, RunState};

pub const WAIT: Duration = Duration::from_secs(30);
pub const EXE: &str = env!("CARGO_BIN_EXE_wb-executor");

pub struct AgentProc {
    pub child: Child,
    pub addr: String,
    _out: BufReader<ChildStdout>,
    _dir: tempfile::TempDir,
}

impl AgentProc {
    pub fn spawn() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        Self::spawn_with(&path, dir)
    }

    /// An agent whose data directory is `data_dir` (kept by the caller);
    /// `keep` is dropped with the agent.
    pub fn spawn_with(data_dir: &std::path::Path, keep: tempfile::TempDir) -> Self {
        let dir = keep;
        let mut child = Command::new(EXE)
            .args(["host-agent", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Self {
            child,
            addr,
            _out: out,
            _dir: dir,
        }
    }

    pub fn client(&self) -> AgentClient {
        let c = AgentClient::connect(&self.addr).unwrap();
        c.set_timeout(Some(Duration::from_secs(60))).unwrap();
        c
    }

    pub fn list(&self) -> Vec<VmInfo> {
        self.client().list().unwrap()
    }

    pub fn find(&self, name: &str) -> Option<VmInfo> {
        self.list().into_iter().find(|v| v.name == name)
    }

    pub fn start_vm(&self, name: &str, mib: u64, rate: u64) {
        match self
            .client()
            .call(&Request::StartVm {
                name: name.into(),
                mem_mib: mib,
                dirty_bytes_per_sec: rate,
            })
            .unwrap()
        {
            Response::Vm { .. } => {}
            other => panic!("{other:?}"),
        }
        wait_until("VM ready", || {
            self.find(name).is_some_and(|v| v.ready && v.counter > 5)
        });
    }

    /// Kills the agent process (this test's own child).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(mut c) = AgentClient::connect(&self.addr) {
            let _ = c.set_timeout(Some(Duration::from_secs(5)));
            let _ = c.call(&Request::Shutdown);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

/// Polls `cond` (each poll is an agent round trip) until it holds or WAIT passes.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Exactly one of `agents` lists `vm`, it runs, and its counter advances.
/// Returns the index of that agent.
pub fn runs_exactly_once(agents: &[&AgentProc], vm: &str) -> usize {
    let found: Vec<(usize, VmInfo)> = agents
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.find(vm).map(|v| (i, v)))
        .collect();
    assert_eq!(found.len(), 1, "VM {vm} listed on {found:?}");
    let (i, v) = found.into_iter().next().unwrap();
    assert_eq!(v.state, RunState::Running, "{v:?}");
    wait_until("the counter to advance", || {
        agents[i].find(vm).is_some_and(|w| w.counter > v.counter)
    });
    i
}

pub const SECRET: &[u8; 32] = b"waterbear test key, 32 bytes ok!";

pub fn key() -> Key {
    Key::new("k1", *SECRET).unwrap()
}

pub fn decision(host: &str, incident: u64, action: Action, ts_ms: i64) -> Decision {
    Decision {
        id: decision_id(host, incident, action, 0),
        host_id: host.into(),
        cluster: "c00".into(),
        fault_domain: 0,
        update_domain: 0,
        incident,
        generation: 0,
        action,
        ts_ms,
        score: 0.93,
        signature: Signature::Disk,
        reasons: vec![],
        model: "rule-baseline@1".into(),
        why: "test".into(),
        rule: "ladder".into(),
        window: Default::default(),
        ttf_ms: None,
        evacuation_ms: None,
        targets: vec![],
        alternatives: vec![],
        commands: vec![],
        shadow: false,
        features: None,
    }
}

pub fn signed(host: &str, incident: u64, action: Action, ts_ms: i64) -> SignedDecision {
    sign(&decision(host, incident, action, ts_ms), &key())
}
