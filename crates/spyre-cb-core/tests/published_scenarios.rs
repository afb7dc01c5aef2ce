//! The 12 published step traces (tests/data/scheduler_steps.json), every
//! step: the listed ones and the plain decode steps between them.

use serde_json::Value;
use spyre_cb_core::{simulate, SchedulerConfig, SimRequest, StepRecord};

fn load() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/scheduler_steps.json");
    let text = std::fs::read_to_string(path).expect("scenario data");
    let v: Value = serde_json::from_str(&text).expect("valid json");
    v["scenarios"].as_array().unwrap().clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect()).unwrap_or_default()
}

fn num(v: &Value) -> Option<u64> {
    v.as_u64()
}

fn record(v: &Value) -> StepRecord {
    StepRecord {
        step: v["step"].as_u64().unwrap(),
        tkv: v["tkv"].as_u64().unwrap() as u32,
        waiting: strings(&v["waiting"]),
        running: strings(&v["running"]),
        request_outputs: strings(&v["request_outputs"]),
        finished_requests: strings(&v["finished_requests"]),
        n_reserved_blocks: v["n_reserved_blocks"].as_u64().unwrap() as u32,
        n_used_blocks: v["n_used_blocks"].as_u64().unwrap() as u32,
        chunked: None,
    }
}

/// Listed steps plus the decode steps between them (previous listed step, tkv + k).
fn expand(listed: &[StepRecord]) -> Vec<StepRecord> {
    let mut out: Vec<StepRecord> = Vec::new();
    for r in listed {
        if let Some(prev) = out.last().cloned() {
            for s in prev.step + 1..r.step {
                assert!(prev.finished_requests.is_empty() && prev.request_outputs == prev.running);
                let mut d = prev.clone();
                d.step = s;
                d.tkv = prev.tkv + (s - prev.step) as u32;
                out.push(d);
            }
        }
        out.push(r.clone());
    }
    out
}

#[test]
fn all_published_scenarios_match_every_step() {
    let scenarios = load();
    assert_eq!(scenarios.len(), 12);
    for sc in scenarios {
        let name = sc["name"].as_str().unwrap();
        let cfg = SchedulerConfig::new(
            sc["max_num_seqs"].as_u64().unwrap() as u32,
            sc["max_model_len"].as_u64().unwrap() as u32,
            num(&sc["available_blocks"]).map(|b| b as u32),
            num(&sc["max_batch_tkv_limit"]),
        )
        .unwrap();
        let reqs: Vec<SimRequest> = (0..sc["prompt_lens"].as_array().unwrap().len())
            .map(|i| {
                SimRequest::new(
                    sc["arrivals"][i].as_u64().unwrap(),
                    sc["prompt_lens"][i].as_u64().unwrap() as u32,
                    sc["max_tokens"][i].as_u64().unwrap() as u32,
                )
            })
            .collect();
        let listed: Vec<StepRecord> = sc["checked_steps"].as_array().unwrap().iter().map(record).collect();
        let expected = expand(&listed);
        let trace = simulate(cfg, &reqs, None);
        assert!(trace.rejected.is_empty(), "{name}: {:?}", trace.rejected);
        let got = trace.steps();
        assert_eq!(got.len(), expected.len(), "{name}: number of steps");
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g, e, "{name}: step {}", e.step);
        }
    }
}

/// A tkv shift must not push a running request past max_model_len
/// (condition 3's second half): A starts unaligned at tkv 10 with 190 tokens
/// to go; B's 100-token prompt would shift the batch to tkv 148.
#[test]
fn shift_never_pushes_running_request_past_max_model_len() {
    let cfg = SchedulerConfig::new(2, 256, None, None).unwrap();
    let reqs = [SimRequest::new(0, 10, 200), SimRequest::new(10, 100, 5)];
    let r = simulate(cfg, &reqs, None).steps();
    assert!(r.iter().all(|s| s.tkv <= 256));
    assert_eq!(r[1].tkv, 10); // 64 + 200 > 256: A starts unaligned
                              // B waits until tkv reaches its prompt length and joins without a shift
    let joined = r.iter().find(|s| s.request_outputs == ["1"]).unwrap();
    assert_eq!((joined.step, joined.tkv), (92, 100));
    assert_eq!(joined.running, ["1", "0"]);
}
