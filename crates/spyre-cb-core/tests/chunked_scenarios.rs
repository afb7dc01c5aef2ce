//! The 15 published chunked-prefill scheduler scenarios
//! (tests/data/chunked_prefill_steps.json), every step: the listed ones and
//! the unlisted ones between them (the previous step with tkv + 1).

use serde_json::{Map, Value};
use spyre_cb_core::{simulate_trace, ChunkOptions, Policy, SchedulerConfig, SimRequest, StepRecord};

fn load() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/data/chunked_prefill_steps.json");
    let text = std::fs::read_to_string(path).expect("scenario data");
    let v: Value = serde_json::from_str(&text).expect("valid json");
    v["scenarios"].as_array().unwrap().clone()
}

fn config(c: &Value) -> SchedulerConfig {
    let opts = ChunkOptions {
        chunk_size: c["chunk_size"].as_u64().unwrap() as u32,
        interleave: c["interleave"].as_bool().unwrap(),
        decode_pausing: c["decode_pausing"].as_bool().unwrap(),
        prefix_caching: c["prefix_caching"].as_bool().unwrap(),
    };
    SchedulerConfig::with_policy(
        c["max_num_seqs"].as_u64().unwrap() as u32,
        c["max_model_len"].as_u64().unwrap() as u32,
        c["available_blocks"].as_u64().map(|b| b as u32),
        c["max_batch_tkv_limit"].as_u64(),
        Policy::Chunked(opts),
    )
    .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().map(|a| a.iter().map(|x| x.as_u64().unwrap() as u32).collect()).unwrap_or_default()
}

pub fn requests(sc: &Value) -> Vec<SimRequest> {
    sc["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let prompt = ids(&r["prompt_token_ids"]);
            SimRequest {
                id: Some(r["id"].as_str().unwrap().to_owned()),
                arrival: r["arrival_step"].as_u64().unwrap(),
                prompt_len: prompt.len() as u32,
                prompt,
                max_tokens: r["max_tokens"].as_u64().unwrap() as u32,
                outputs: ids(&r["output_token_ids"]),
            }
        })
        .collect()
}

/// The record as the data file spells it (every key it may list).
fn as_json(r: &StepRecord) -> Map<String, Value> {
    let mut m = Map::new();
    let b = r;
    let r = r.chunked.as_deref().expect("the chunked policy's fields");
    m.insert("step".into(), b.step.into());
    m.insert("tkv".into(), b.tkv.into());
    m.insert("waiting".into(), b.waiting.clone().into());
    m.insert("running".into(), b.running.clone().into());
    m.insert("request_outputs".into(), b.request_outputs.clone().into());
    m.insert("finished_requests".into(), b.finished_requests.clone().into());
    m.insert("n_used_blocks".into(), b.n_used_blocks.into());
    m.insert("n_reserved_blocks".into(), b.n_reserved_blocks.into());
    m.insert("n_cached_blocks".into(), r.n_cached_blocks.into());
    m.insert("n_prefix_hits".into(), r.n_prefix_hits.into());
    let tables: Map<String, Value> = r.block_tables.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
    m.insert("block_tables".into(), tables.into());
    let refs: Map<String, Value> = r.block_ref_count.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
    m.insert("block_ref_count".into(), refs.into());
    let slots: Map<String, Value> =
        r.prefill_slot_mappings.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
    m.insert("prefill_slot_mappings".into(), slots.into());
    m
}

/// Listed steps plus the unlisted ones between them.
fn expand(listed: &[Value]) -> Vec<Map<String, Value>> {
    let mut out: Vec<Map<String, Value>> = Vec::new();
    for v in listed {
        let mut m = v.as_object().unwrap().clone();
        m.entry("finished_requests").or_insert(Value::Array(vec![]));
        if let Some(prev) = out.last().cloned() {
            let (p, s) = (prev["step"].as_u64().unwrap(), m["step"].as_u64().unwrap());
            for k in p + 1..s {
                let mut d = prev.clone();
                d.insert("step".into(), k.into());
                d.insert("tkv".into(), (prev["tkv"].as_u64().unwrap() + (k - p)).into());
                // a step that finished something is never followed by an unlisted one
                assert_eq!(prev["finished_requests"], Value::Array(vec![]));
                out.push(d);
            }
        }
        out.push(m);
    }
    out
}

#[test]
fn all_published_chunked_scenarios_match_every_step() {
    let scenarios = load();
    let sched: Vec<&Value> = scenarios.iter().filter(|s| s["kind"] == "scheduler_steps").collect();
    assert_eq!(sched.len(), 15);
    let mut compared = 0;
    for sc in sched {
        let name = sc["name"].as_str().unwrap();
        let cfg = config(&sc["config"]);
        let reqs = requests(sc);
        let res = simulate_trace(cfg, &reqs, None, &mut || false).unwrap();
        assert!(res.rejected.is_empty(), "{name}: {:?}", res.rejected);
        let expected = expand(sc["checked_steps"].as_array().unwrap());
        let last = expected.last().unwrap()["step"].as_u64().unwrap();
        assert!(res.n_steps() > last, "{name}: the run covers every listed step");
        assert_eq!(res.record_at(res.n_steps() - 1).unwrap().tkv, 0, "{name}: it ends idle");
        for exp in &expected {
            let step = exp["step"].as_u64().unwrap();
            let got = as_json(&res.record_at(step).unwrap());
            for (key, want) in exp {
                // the published harness checks slot mappings only where it lists block tables
                if key == "prefill_slot_mappings" && !exp.contains_key("block_tables") {
                    continue;
                }
                let have = got.get(key).unwrap_or_else(|| panic!("{name}: unknown key {key}"));
                assert_eq!(have, want, "{name} step {step} key {key}\n got {got:?}");
                compared += 1;
            }
        }
        if let Some(counters) = sc.get("counters") {
            let c = res.counters;
            assert_eq!(counters["pause_events"].as_u64().unwrap(), c.pause_events, "{name}");
            assert_eq!(counters["resume_events"].as_u64().unwrap(), c.resume_events, "{name}");
        }
    }
    assert!(compared > 1000, "{compared} values compared");
}
