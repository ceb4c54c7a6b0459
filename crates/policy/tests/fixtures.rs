//! Replays every `fixtures/*.json` (config, inputs, expected outputs) and compares what
//! the policy produced with what the file expects.
//!
//! Outputs are compared on the fields that carry the behaviour: for decisions host,
//! action, rule and time; for notices kind and scope. A report input whose id is
//! `<first>` reports the first decision of the run (ids are hashes, unreadable by hand).
//! `WATERBEAR_BLESS=1 cargo test -p waterbear-policy --test fixtures` rewrites the
//! expectations from the current behaviour: review the diff.

use serde::Deserialize;
use serde_json::{Value, json};
use waterbear_policy::{Input, Output, Policy, PolicyConfig, Replay};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    description: String,
    config: PolicyConfig,
    inputs: Vec<Input>,
    expected: Vec<Value>,
}

fn brief(o: &Output) -> Value {
    match o {
        Output::Decision(d) => json!({
            "decision": d.action.as_str(),
            "host_id": d.host_id,
            "rule": d.rule,
            "ts_ms": d.ts_ms,
        }),
        Output::Notice(n) => json!({
            "notice": n.kind.as_str(),
            "scope": n.scope,
        }),
    }
}

#[test]
fn fixtures_replay_to_their_expected_outputs() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "fixtures missing in {}", dir.display());
    for f in files {
        let fx: Fixture = serde_json::from_str(&std::fs::read_to_string(&f).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let mut r = Replay::new(Policy::new(fx.config.check().unwrap()), "fixture@1");
        let mut got = Vec::new();
        let mut first_id = None;
        for input in &fx.inputs {
            let input = match input {
                Input::Report { id, outcome, ts_ms } if id == "<first>" => Input::Report {
                    id: first_id
                        .clone()
                        .expect("a decision before <first> is reported"),
                    outcome: outcome.clone(),
                    ts_ms: *ts_ms,
                },
                other => other.clone(),
            };
            for o in r.step(&input) {
                if let (Output::Decision(d), None) = (&o, &first_id) {
                    first_id = Some(d.id.clone());
                }
                got.push(brief(&o));
            }
        }
        if std::env::var_os("WATERBEAR_BLESS").is_some() {
            // rewrite the expectation (review the diff before committing it)
            let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
            v["expected"] = Value::Array(got);
            std::fs::write(&f, serde_json::to_string_pretty(&v).unwrap() + "\n").unwrap();
            continue;
        }
        assert_eq!(
            got,
            fx.expected,
            "{}: {}\ngot: {}",
            f.display(),
            fx.description,
            serde_json::to_string_pretty(&got).unwrap()
        );
    }
}
