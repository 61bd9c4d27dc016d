//! Issue #10, the lead's items: each test reproduces what broke on the old code (a hot swap
//! during the first load, a ready worker shown as starting, a second TERM that did not hurry
//! the stop, three generations at once, `/bin/true` restarting forever, `scale 100000`, a
//! reload of a FIFO) and checks the behaviour now.

use std::ffi::OsStr;
use std::time::Duration;

use serde_json::Value;

use crate::util::*;

fn status_json(config: &std::path::Path) -> Value {
    let (ok, stdout, stderr) = control(config, "status", &["--json"]);
    assert!(ok, "status failed: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// Item 1: `reload-model` sent while the owner still loads the first generation used to reach
/// the owner as a `Load` while it waited for the answer to its own publish: it exited, was
/// restarted, re-adopted, and no worker was ever started. Now the supervisor sends an owner
/// nothing before its first load is answered, and workers start whenever a generation is live.
#[test]
fn a_hot_swap_during_the_first_load_is_refused_and_workers_still_start() {
    let dir = TestDir::new();
    // A model whose load takes a while (a 1 GiB tensor the demo ignores), so the reload lands
    // while the owner is still loading it.
    write_model_with_ballast(&dir.model_path(), 256 << 20);
    let config = dir.write_config(2, "");
    let mut sup = Supervisor::start(&config);
    let listening = sup.wait_for("listening on", |_| true);
    let (ok, stdout, stderr) = control(&config, "reload-model", &[]);
    if !ok {
        assert!(
            stderr.contains("first generation") || stderr.contains("no owner is running"),
            "a refusal must say why: {stderr}"
        );
    } else {
        assert!(stdout.contains("generation 2 is live"), "{stdout}");
    }
    sup.wait_for("workers ready", |_| true);
    let addr = listening["addrs"].as_str().unwrap().to_string();
    assert_eq!(infer_seed(&addr, 3)["y_sum"].as_f64().unwrap(), expected_answer(3).0);
    let status = status_json(&config);
    let ready = status["processes"].as_array().unwrap().iter().filter(|p| p["state"] == "ready").count();
    assert_eq!(ready, 3, "owner and both workers serve: {status}");
    assert!(!sup.log_text().contains("protocol violation"), "{}", sup.log_text());
}

/// Item 2: a worker that became ready before the spawner recorded its start was shown as
/// `starting` for good. Process states now only move forward.
#[test]
fn a_restarted_worker_that_serves_is_never_shown_starting() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config_with(&ConfigExtra { restart: "max_restarts = 1000", ..ConfigExtra::default() });
    let mut sup = Supervisor::start(&config);
    sup.wait_ready();
    for round in 0..30 {
        let old = sup.children("worker")[0];
        send_signal(old, libc::SIGKILL);
        let ready = sup.wait_for("worker 0 ready", |l| l["pid"].as_u64().is_some_and(|p| p != u64::from(old)));
        let pid = ready["pid"].as_u64().unwrap();
        let status = status_json(&config);
        let row = status["processes"].as_array().unwrap().iter().find(|p| p["pid"] == pid).cloned();
        let row = row.unwrap_or_else(|| panic!("round {round}: no row for pid {pid}: {status}"));
        assert_eq!(row["state"], "ready", "round {round}: pid {pid} serves but shows {row}");
    }
}

/// Item 3: a second TERM (or `stop --now`) must kill what remains at once, whatever the grace.
/// A SIGSTOPped worker cannot act on its TERM, so only the grace's end (here 10 minutes) or the
/// escalation stops it.
#[test]
fn a_second_term_stops_at_once_whatever_the_grace() {
    for escalate_by_cli in [false, true] {
        let dir = TestDir::new();
        dir.write_model();
        let config = dir.write_config_with(&ConfigExtra {
            workers: 2,
            supervisor: "graceful_timeout_s = 600",
            workers_table: "timeout_s = 0",
            ..ConfigExtra::default()
        });
        let mut sup = Supervisor::start(&config);
        sup.wait_ready();
        let stuck = sup.children("worker")[0];
        send_signal(stuck, libc::SIGSTOP);
        sup.signal(libc::SIGTERM);
        sup.wait_for("stopping gracefully", |_| true);
        if escalate_by_cli {
            let (ok, _, stderr) = control(&config, "stop", &["--now"]);
            assert!(ok, "stop --now: {stderr}");
        } else {
            sup.signal(libc::SIGTERM);
        }
        let status = sup.wait_exit();
        assert!(status.success(), "{status}; log:\n{}", sup.log_text());
        assert!(!alive(stuck), "the stuck worker was left running");
    }
}

/// Item 4: hot swaps while workers come and go never leave more than two generations in
/// memory, and end with one.
#[test]
fn hot_swaps_while_workers_restart_keep_at_most_two_generations() {
    let dir = TestDir::new();
    dir.write_model();
    let models: Vec<_> =
        (0..2).map(|i| dir.write_model_at(&dir.path().join(format!("m{i}.safetensors")), 43 + i)).collect();
    let config = dir.write_config(3, "");
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let load = Load::start_retrying(&addr, 9);
    let churn = {
        let config = config.clone();
        std::thread::spawn(move || {
            for _ in 0..6 {
                let _ = control(&config, "restart", &["workers"]);
            }
        })
    };
    let mut live = 1;
    for round in 0..6 {
        let model = &models[round % 2];
        let (ok, _, stderr) = control(&config, "reload-model", &[model.to_str().unwrap()]);
        if ok {
            live += 1;
        } else {
            assert!(stderr.contains("try again") || stderr.contains("still"), "round {round}: {stderr}");
        }
        let held = arena_fds(sup.pid()).len();
        assert!(held <= 2, "round {round}: the supervisor holds {held} arenas");
        std::thread::sleep(Duration::from_millis(50));
    }
    churn.join().unwrap();
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:?}\n{}", report.failures, sup.log_text());
    eventually("one generation left", || arena_fds(sup.pid()).len() == 1);
    assert_eq!(status_json(&config)["generation"], live);
}

/// Item 6: a worker that exits 0 before it is ready is a failed start: backoff and restart
/// intensity apply (it used to restart in a tight loop forever).
#[test]
fn a_worker_that_exits_at_once_is_a_failed_start() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config_with(&ConfigExtra {
        command: Some(vec!["/bin/true".into()]),
        restart: "max_restarts = 3\nwithin_s = 600",
        ..ConfigExtra::default()
    });
    let mut sup = Supervisor::start(&config);
    let status = sup.wait_exit();
    assert_eq!(status.code(), Some(1), "log:\n{}", sup.log_text());
    let log = sup.log_text();
    assert!(log.contains("before it was ready") && log.contains("kept dying"), "{log}");
    let starts = log.matches("started worker 0").count();
    assert_eq!(starts, 4, "one start and three restarts, then give up: {log}");
}

/// Item 7: `scale` is bounded like `[workers] count`, and scaling down cancels pending starts.
#[test]
fn scaling_is_bounded_and_scaling_down_cancels_starts() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config(1, "");
    let mut sup = Supervisor::start(&config);
    sup.wait_ready();
    let fds_before = fd_count(sup.pid());
    let (ok, _, stderr) = control(&config, "scale", &["100000"]);
    assert!(!ok && stderr.contains("1024"), "{stderr}");
    let (ok, _, stderr) = control(&config, "scale", &["200"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = control(&config, "scale", &["2"]);
    assert!(ok, "{stderr}");
    eventually("two workers and nothing else", || {
        let status = status_json(&config);
        let workers: Vec<_> =
            status["processes"].as_array().unwrap().iter().filter(|p| p["role"] == "worker").cloned().collect();
        workers.len() == 2 && workers.iter().all(|w| w["state"] == "ready")
    });
    eventually("no child beyond the owner and two workers", || sup.children("worker").len() == 2);
    eventually("the supervisor's fds are back", || fd_count(sup.pid()) <= fds_before + 4);
}

/// Item 9, reload half: a reload of something that cannot be loaded (here a FIFO) fails with a
/// reason naming it instead of hanging, and later reloads work.
#[test]
fn a_reload_of_a_fifo_fails_and_later_reloads_work() {
    let dir = TestDir::new();
    dir.write_model();
    let fifo = dir.path().join("fifo.safetensors");
    rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o600), 0)
        .unwrap();
    let new_model = dir.write_model_at(&dir.path().join("new.safetensors"), 43);
    let config = dir.write_config(1, "load_timeout_s = 5");
    let mut sup = Supervisor::start(&config);
    sup.wait_ready();
    let (ok, _, stderr) = control(&config, "reload-model", &[fifo.to_str().unwrap()]);
    assert!(!ok, "a FIFO was accepted");
    assert!(stderr.contains("fifo.safetensors"), "the reason must name the file: {stderr}");
    // The owner may be being replaced (a load that timed out replaces it): retry until it is back.
    let reload = || {
        supervisor_command(&[OsStr::new("reload-model"), OsStr::new("-c"), config.as_os_str(), new_model.as_os_str()])
    };
    let mut answer = reload();
    for _ in 0..100 {
        if answer.0 || !answer.2.contains("try again") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        answer = reload();
    }
    let (ok, stdout, stderr) = answer;
    assert!(ok, "a later reload failed: {stderr}");
    assert!(stdout.contains("is live"), "{stdout}");
}

/// `restore-device` travels to the service and back; on the host there is no GPU to restore,
/// and the answer says so (the degrade/restore cycle itself is a unit test of the service).
#[test]
fn restoring_a_device_the_service_does_not_have_is_refused_with_the_reason() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config(1, "");
    let mut sup = Supervisor::start(&config);
    sup.wait_ready();
    let (ok, _, stderr) = control(&config, "restore-device", &["1"]);
    assert!(!ok && stderr.contains("host memory: it has no GPU to restore"), "{stderr}");
    assert_eq!(sup.children("worker").len(), 1, "nothing else changed");
}
