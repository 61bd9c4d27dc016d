//! The demo service answers correctly, identically from every worker.

use std::collections::BTreeSet;

use crate::util::*;

#[test]
fn every_worker_gives_the_reference_answer() {
    let dir = TestDir::new();
    dir.write_model();
    let mut sup = Supervisor::start(&dir.write_config(4, ""));
    let addr = sup.wait_ready();
    let (y_sum, y_head) = expected_answer(7);
    let mut workers = BTreeSet::new();
    for _ in 0..40 {
        let answer = infer_seed(&addr, 7);
        assert_eq!(answer["y_sum"].as_f64().unwrap(), y_sum, "{answer}");
        let head: Vec<f32> = answer["y_head"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(head, y_head);
        assert_eq!(answer["generation"], 1);
        workers.insert(answer["worker"].as_u64().unwrap() as u32);
    }
    let all: BTreeSet<u32> = sup.children("worker").into_iter().collect();
    assert!(workers.is_subset(&all), "answers came from workers {workers:?}, children are {all:?}");
}

#[test]
fn explicit_input_matches_seeded_input() {
    let dir = TestDir::new();
    dir.write_model();
    let mut sup = Supervisor::start(&dir.write_config(1, ""));
    let addr = sup.wait_ready();
    let x = seeded::input_from_seed(3, IN);
    let body = serde_json::json!({ "x": x }).to_string();
    let (status, explicit) = http(&addr, "POST", "/infer", &body);
    assert_eq!(status, 200, "{explicit}");
    let explicit: serde_json::Value = serde_json::from_str(&explicit).unwrap();
    assert_eq!(explicit["y_sum"], infer_seed(&addr, 3)["y_sum"]);
}

#[test]
fn bad_requests_get_400_with_a_message() {
    let dir = TestDir::new();
    dir.write_model();
    let mut sup = Supervisor::start(&dir.write_config(1, ""));
    let addr = sup.wait_ready();
    for (body, needle) in [
        ("{not json", "invalid JSON"),
        ("{\"x\": [1.0, 2.0]}", "this model takes 256"),
        ("{\"seed\": 1, \"x\": [1.0]}", "exactly one"),
        ("{}", "exactly one"),
        ("{\"seed\": -1}", "invalid JSON"),
        ("{\"seed\": 1, \"colour\": 2}", "unknown field"),
    ] {
        let (status, text) = http(&addr, "POST", "/infer", body);
        assert_eq!(status, 400, "{body} -> {text}");
        assert!(text.contains(needle), "{body} -> {text}");
    }
    let (status, health) = http(&addr, "GET", "/healthz", "");
    assert_eq!(status, 200);
    assert!(health.contains("\"status\":\"ok\""), "{health}");
}

#[test]
fn every_listen_address_is_served() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config_listening(2, "", &["127.0.0.1:0", "127.0.0.1:0"]);
    let mut sup = Supervisor::start(&config);
    sup.wait_ready();
    let addrs: Vec<String> = sup.addr.clone().unwrap().split(',').map(str::to_string).collect();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    for addr in addrs {
        assert_eq!(infer_seed(&addr, 2)["y_sum"].as_f64().unwrap(), expected_answer(2).0);
    }
}
