//! The MLP example end to end: the real supervisor, the real `mlp-worker`, answers checked
//! against a reference computed here from the weights file (f64, the safetensors crate: not
//! the worker's code), under owner and worker SIGKILLs; and a hot swap to weights the service
//! cannot use, refused.

#[path = "../../tests/util.rs"]
mod util;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;
use util::*;

const IN: usize = 256;

/// `y` for `{"seed": seed}`, from the file alone: f64 throughout.
fn reference(weights: &Path, seed: u64) -> Vec<f64> {
    let bytes = std::fs::read(weights).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensor = |name: &str| -> Vec<f64> {
        let data = file.tensor(name).unwrap().data().to_vec();
        data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
    };
    let layer = |w: &[f64], b: &[f64], x: &[f64]| -> Vec<f64> {
        w.chunks_exact(x.len()).zip(b).map(|(row, b)| row.iter().zip(x).map(|(w, x)| w * x).sum::<f64>() + b).collect()
    };
    let x: Vec<f64> = seeded::input_from_seed(seed, IN).into_iter().map(f64::from).collect();
    let hidden: Vec<f64> =
        layer(&tensor("fc1.weight"), &tensor("fc1.bias"), &x).into_iter().map(|h| h.max(0.0)).collect();
    layer(&tensor("fc2.weight"), &tensor("fc2.bias"), &hidden)
}

/// Float rounding of two f32 layers against f64, and nothing more.
fn close(got: &[f64], want: &[f64]) -> bool {
    got.len() == want.len() && got.iter().zip(want).all(|(g, w)| (g - w).abs() <= 1e-4 * (1.0 + w.abs()))
}

fn floats(answer: &Value) -> Vec<f64> {
    answer["y"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

fn start(dir: &TestDir, workers: u32) -> (Supervisor, String) {
    make_weights(&dir.model_path(), 42);
    let config = dir.write_config_with(&ConfigExtra {
        workers,
        command: Some(vec![mlp_exe().display().to_string()]),
        workers_table: "timeout_s = 2",
        restart: "max_restarts = 1000",
        ..Default::default()
    });
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    (sup, addr)
}

fn make_weights(path: &Path, seed: u64) {
    let status =
        std::process::Command::new(mlp_exe()).args(["make-weights", "--seed", &seed.to_string()]).arg(path).status();
    assert!(status.unwrap().success());
}

fn predict(addr: &str, body: &str) -> (u16, Value) {
    let (status, text) = http(addr, "POST", "/predict", body);
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[test]
fn every_worker_matches_the_reference_computed_from_the_file() {
    let dir = TestDir::new();
    let (sup, addr) = start(&dir, 3);
    let mut by_worker: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for round in 0..60 {
        let seed = round % 5;
        let (status, answer) = predict(&addr, &format!("{{\"seed\": {seed}}}"));
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["generation"], 1);
        let y = floats(&answer);
        assert!(close(&y, &reference(&dir.model_path(), seed)), "seed {seed}: {y:?}");
        if seed == 3 {
            let earlier = by_worker.entry(answer["worker"].as_u64().unwrap()).or_insert_with(|| y.clone());
            assert_eq!(earlier, &y, "a worker answers the same bits every time");
        }
    }
    assert!(by_worker.len() > 1, "answers came from one worker only: {:?}", by_worker.keys());
    let answers: Vec<&Vec<f64>> = by_worker.values().collect();
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "every worker answers the same bits");
    // x given explicitly is the same request as its seed.
    let x = seeded::input_from_seed(3, IN);
    let (status, explicit) = predict(&addr, &serde_json::json!({ "x": x }).to_string());
    assert_eq!(status, 200);
    assert_eq!(floats(&explicit), *answers[0]);
    drop(sup);
}

#[test]
fn through_the_batch_lane_the_answers_are_the_same() {
    let dir = TestDir::new();
    make_weights(&dir.model_path(), 42);
    let config = dir.write_config_with(&ConfigExtra {
        workers: 3,
        command: Some(vec![mlp_exe().display().to_string()]),
        ..Default::default()
    });
    let text = std::fs::read_to_string(&config).unwrap() + "\n[lane]\nenabled = true\nmax_wait_us = 2000\n";
    std::fs::write(&config, text).unwrap();
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let threads: Vec<_> = (0..6u64)
        .map(|seed| {
            let (addr, weights) = (addr.clone(), dir.model_path());
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let (status, answer) = predict(&addr, &format!("{{\"seed\": {seed}}}"));
                    assert_eq!(status, 200, "{answer}");
                    assert!(close(&floats(&answer), &reference(&weights, seed)), "seed {seed}: {answer}");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let (ok, stdout, _) = control(&config, "status", &["--json"]);
    assert!(ok);
    let status: Value = serde_json::from_str(&stdout).unwrap();
    assert!(status["lanes"][0]["served"].as_u64().unwrap() >= 120, "every request went through the lane: {status}");
    drop(sup);
}

#[test]
fn bad_input_gets_400_with_a_message() {
    let dir = TestDir::new();
    let (_sup, addr) = start(&dir, 1);
    for (body, needle) in [
        ("{not json", "JSON"),
        ("{\"x\": [1.0, 2.0]}", "this model takes 256"),
        ("{\"seed\": 1, \"x\": [1.0]}", "exactly one"),
        ("{}", "exactly one"),
        ("{\"seed\": 1, \"colour\": 2}", "unknown field"),
    ] {
        let (status, answer) = predict(&addr, body);
        assert_eq!(status, 400, "{body} -> {answer}");
        assert!(answer.to_string().contains(needle), "{body} -> {answer}");
    }
}

#[test]
fn owner_and_worker_sigkills_under_load_give_no_wrong_answer() {
    let dir = TestDir::new();
    let (mut sup, addr) = start(&dir, 3);
    let expected: Vec<Vec<f64>> = (0..8).map(|seed| reference(&dir.model_path(), seed)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (addr, stop, expected) = (addr.clone(), stop.clone(), expected.clone());
            std::thread::spawn(move || {
                let (mut ok, mut wrong, mut failed) = (0u64, Vec::new(), 0u64);
                let mut seed = client;
                while !stop.load(Ordering::Relaxed) {
                    seed = (seed + 1) % 8;
                    match try_predict(&addr, seed) {
                        Some(answer) if close(&floats(&answer), &expected[seed as usize]) => ok += 1,
                        Some(answer) => wrong.push(format!("seed {seed}: {answer}")),
                        None => failed += 1, // the connection died with a SIGKILLed worker
                    }
                }
                (ok, wrong, failed)
            })
        })
        .collect();
    for round in 0..6 {
        if round % 2 == 0 {
            send_signal(sup.children("owner")[0], libc::SIGKILL);
            sup.wait_for("re-adopted", |_| true);
        } else {
            let victim = sup.children("worker")[0];
            send_signal(victim, libc::SIGKILL);
            sup.wait_for("ready", |l| l["pid"].as_u64().is_some_and(|p| p != victim as u64) && l["attach_us"].is_u64());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for client in clients {
        let (o, wrong, f) = client.join().unwrap();
        assert!(wrong.is_empty(), "wrong answers: {wrong:?}");
        ok += o;
        failed += f;
    }
    assert!(ok > 0, "no answer at all ({failed} failed)");
    assert!(failed <= 3 * 4, "{failed} requests failed: more than the in-flight ones of 3 killed workers");
}

/// One request on its own connection; `None` if the connection failed or the answer is not 200.
fn try_predict(addr: &str, seed: u64) -> Option<Value> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    let body = format!("{{\"seed\": {seed}}}");
    let head =
        format!("POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    stream.write_all(format!("{head}{body}").as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| serde_json::from_str(body).ok())?
}

#[test]
fn weights_the_service_cannot_use_are_refused_at_start_with_the_reason() {
    let dir = TestDir::new();
    // A linear layer's file where the MLP's tensors should be.
    let status = std::process::Command::new(worker_exe())
        .args(["make-weights", "--in", "256", "--out", "16"])
        .arg(dir.model_path())
        .status();
    assert!(status.unwrap().success());
    let config = dir
        .write_config_with(&ConfigExtra { command: Some(vec![mlp_exe().display().to_string()]), ..Default::default() });
    let mut sup = Supervisor::start(&config);
    assert!(!sup.wait_exit().success());
    let log = sup.log_text();
    assert!(log.contains("no tensor \\\"fc1.weight\\\"") && log.contains("status 78"), "{log}");
}
