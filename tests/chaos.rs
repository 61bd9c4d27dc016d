//! The chaos harness against the real binaries, short enough for CI: owner and worker kills
//! under load, with SIGKILL, SIGTERM and SIGSTOP. The harness itself checks every invariant
//! (and exits non-zero if one fails); these tests also read its JSON report.

use std::process::Command;

use crate::util::*;

fn chaos_config(dir: &TestDir) -> std::path::PathBuf {
    dir.write_model();
    dir.write_config_with(&ConfigExtra {
        workers: 3,
        workers_table: "timeout_s = 1",
        restart: "max_restarts = 1000\nbackoff_max_ms = 200",
        ..Default::default()
    })
}

fn chaos(dir: &TestDir, config: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let json = dir.path().join("report.json");
    let html = dir.path().join("report.html");
    let output = Command::new(chaos_exe())
        .args(["run", "--config"])
        .arg(config)
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chaos failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("PASS"), "{stdout}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("forkless chaos report"));
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn assert_common(report: &serde_json::Value) {
    assert!(report["requests"].as_u64().unwrap() > 0);
    assert_eq!(report["wrong_answers"], 0, "{report}");
    assert_eq!(report["unexplained_failures"], 0, "{report}");
    assert!(report["violations"].as_array().unwrap().is_empty(), "{report}");
    assert_eq!(report["shutdown"]["clean"], true);
    for key in ["processes", "dev_shm", "paths"] {
        assert!(report["leaks"][key].as_array().unwrap().is_empty(), "{report}");
    }
    assert_eq!(report["leaks"]["memfds"], 0);
    for kill in report["kills"].as_array().unwrap() {
        assert!(kill["recovered_s"].is_f64(), "{kill}");
        if kill["role"] == "owner" {
            assert_eq!(kill["failures"], 0, "{kill}");
        }
    }
    for key in ["p50", "p99", "max"] {
        assert!(report["latency_ms"][key].is_f64());
    }
}

#[test]
fn chaos_with_sigkill_loses_nothing_but_what_was_in_flight() {
    let dir = TestDir::new();
    let config = chaos_config(&dir);
    let report = chaos(
        &dir,
        &config,
        &["--duration", "12", "--kill", "owner@2,worker@1.5", "--connections", "4", "--seed", "7"],
    );
    assert_common(&report);
    let kills = report["kills"].as_array().unwrap();
    assert!(kills.iter().any(|k| k["role"] == "owner") && kills.iter().any(|k| k["role"] == "worker"), "{report}");
    for kill in kills {
        assert!(kill["failures"].as_u64().unwrap() <= kill["in_flight"].as_u64().unwrap(), "{kill}");
    }
}

#[test]
fn chaos_with_sigterm_fails_nothing() {
    let dir = TestDir::new();
    let config = chaos_config(&dir);
    let report = chaos(
        &dir,
        &config,
        &["--duration", "8", "--kill", "worker", "--every", "1.5", "--signal", "TERM", "--connections", "4"],
    );
    assert_common(&report);
    assert_eq!(report["failed"], 0, "{report}");
}

#[test]
fn chaos_with_sigstop_replaces_hung_workers() {
    let dir = TestDir::new();
    let config = chaos_config(&dir);
    let report = chaos(
        &dir,
        &config,
        &["--duration", "8", "--kill", "worker", "--every", "3", "--signal", "STOP", "--connections", "4"],
    );
    assert_common(&report);
    assert!(!report["kills"].as_array().unwrap().is_empty());
}

/// Another service, checked the way its config's `[check]` declares: the MLP example against
/// its reference command, then with "all workers agree".
#[test]
fn chaos_checks_any_service_by_its_check_table() {
    for reference in [
        format!("[{:?}, \"reference\", \"--seeds\", \"0..64\", \"{{weights}}\"]", mlp_exe().display().to_string()),
        "\"agree\"".to_string(),
    ] {
        let dir = TestDir::new();
        let status = Command::new(mlp_exe()).arg("make-weights").arg(dir.model_path()).status().unwrap();
        assert!(status.success());
        let restart = format!(
            "max_restarts = 1000\n[check]\npath = \"/predict\"\nbody = '{{\"seed\": SEED}}'\nanswer = \"y\"\nreference = {reference}\n"
        );
        let config = dir.write_config_with(&ConfigExtra {
            workers: 2,
            command: Some(vec![mlp_exe().display().to_string()]),
            restart: &restart,
            ..Default::default()
        });
        let report = chaos(&dir, &config, &["--duration", "6", "--kill", "owner@2,worker@2", "--connections", "4"]);
        assert_common(&report);
    }
}
