//! The batch lane end to end on the host path (issue #13): requests of every worker share
//! passes, answers are the reference's bit for bit, the pass runner can be killed at any time
//! without a wrong answer or a failure on another worker's connection, and a hot swap moves
//! the requests to the new generation's lane.

use std::process::Command;

use serde_json::Value;

use crate::util::*;

/// `[lane]` on, with a wait long enough that concurrent requests of different workers meet in
/// one pass even on a busy 2-core machine.
fn lane_config(dir: &TestDir, workers: u32, extra_workers: &str) -> std::path::PathBuf {
    lane_config_with(dir, workers, extra_workers, "max_batch = 64\nmax_wait_us = 3000\n")
}

fn lane_config_with(dir: &TestDir, workers: u32, extra_workers: &str, lane: &str) -> std::path::PathBuf {
    dir.write_model();
    let config = dir.write_config_with(&ConfigExtra {
        workers,
        workers_table: extra_workers,
        restart: "max_restarts = 1000\nbackoff_max_ms = 200",
        ..Default::default()
    });
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[lane]\nenabled = true\n{lane}"));
    std::fs::write(&config, text).unwrap();
    config
}

fn lane_status(config: &std::path::Path) -> Value {
    let (ok, stdout, stderr) = control(config, "status", &["--json"]);
    assert!(ok, "status failed: {stderr}");
    let status: Value = serde_json::from_str(&stdout).unwrap();
    status["lanes"][0].clone()
}

#[test]
fn one_pass_serves_the_requests_of_several_workers() {
    let dir = TestDir::new();
    let config = lane_config(&dir, 4, "");
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let loads: Vec<Load> = (0..8).map(|i| Load::start(&addr, i)).collect();
    eventually("passes that served more than one worker", || {
        let lane = lane_status(&config);
        lane["workers_per_pass"].as_array().is_some_and(|w| w.iter().skip(1).any(|n| n.as_u64() > Some(0)))
    });
    let reports: Vec<LoadReport> = loads.into_iter().map(Load::stop).collect();
    for (seed, report) in reports.iter().enumerate() {
        assert!(report.failures.is_empty(), "seed {seed}: {:?}", report.failures);
        let expected = expected_answer(seed as u64).0;
        for (y_sum, generation) in &report.answers {
            assert_eq!(*generation, 1);
            assert_eq!(y_sum.parse::<f64>().unwrap(), expected, "seed {seed}: the lane's answer is the reference's");
        }
    }
    let lane = lane_status(&config);
    assert_eq!(lane["generation"], 1);
    assert!(lane["served"].as_u64().unwrap() > 0, "{lane}");
    assert!(lane["mean_batch"].as_f64().unwrap() >= 1.0, "{lane}");
    assert_eq!(lane["failed"], 0, "{lane}");
}

/// `linger_us`: two closed-loop clients on two workers, and passes that never wait for a
/// first request (`max_wait_us = 0`). Without linger each pass leaves with whatever is queued,
/// one request or two as it happens; with it a pass that carried both waits for both to come
/// back, so (almost) every pass carries two (1.01 on average without linger, here).
#[test]
fn linger_keeps_closed_loop_clients_in_one_pass() {
    let dir = TestDir::new();
    let config = lane_config_with(&dir, 2, "", "max_batch = 8\nmax_wait_us = 0\nlinger_us = 1000000\n");
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let loads: Vec<Load> = (0..2).map(|i| Load::start(&addr, i)).collect();
    eventually("400 requests served", || lane_status(&config)["served"].as_u64() >= Some(400));
    let lane = lane_status(&config);
    for report in loads.into_iter().map(Load::stop) {
        assert!(report.failures.is_empty(), "{:?}", report.failures);
    }
    // A pass of one happens only when a pass runner starts a term (no previous pass), or when a
    // client took over a second to come back.
    assert!(lane["mean_batch"].as_f64().unwrap() > 1.5, "most passes carry both clients: {lane}");
}

#[test]
fn killing_the_pass_runner_fails_nothing_of_the_other_workers() {
    let dir = TestDir::new();
    let config = lane_config(&dir, 4, "timeout_s = 2");
    let json = dir.path().join("report.json");
    let output = Command::new(chaos_exe())
        .args(["run", "--config"])
        .arg(&config)
        .args(["--duration", "8", "--connections", "12", "--kill", "leader@1", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chaos failed:\n{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["wrong_answers"], 0, "{stdout}");
    assert_eq!(report["unexplained_failures"], 0, "failures only on the killed workers' connections: {stdout}");
    let kills = report["kills"].as_array().unwrap();
    assert!(kills.len() >= 3, "the pass runner was killed repeatedly: {stdout}");
    assert!(
        kills.iter().filter(|k| k["next_pass_ms"].is_f64()).count() >= kills.len() / 2,
        "another worker took the lease over and ran the next pass: {stdout}"
    );
    assert!(report["ok"].as_u64().unwrap() > 0);
}

#[test]
fn a_hot_swap_moves_requests_to_the_new_generations_lane() {
    let dir = TestDir::new();
    let config = lane_config(&dir, 3, "");
    let new_model = dir.write_model_at(&dir.path().join("new.safetensors"), 43);
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let load = Load::start_retrying(&addr, 5);
    let (ok, stdout, stderr) = control(&config, "reload-model", &[new_model.to_str().unwrap()]);
    assert!(ok, "reload-model failed: {stderr}");
    assert!(stdout.contains("generation 2 is live"), "{stdout}");
    sup.wait_for("no longer used by any worker", |l| l["generation"] == 1);
    let after = infer_seed(&addr, 5);
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(after["generation"], 2);
    assert_eq!(after["y_sum"].as_f64().unwrap(), expected_answer_with(43, 5).0);
    for (y_sum, generation) in &report.answers {
        let weights = if *generation == 1 { WEIGHT_SEED } else { 43 };
        assert_eq!(y_sum.parse::<f64>().unwrap(), expected_answer_with(weights, 5).0, "no mixed answer");
    }
    let lane = lane_status(&config);
    assert_eq!(lane["generation"], 2, "status shows the live generation's lane: {lane}");
    assert!(lane["served"].as_u64().unwrap() > 0, "{lane}");
}
