//! The lifecycle policies, as gunicorn, supervisord, systemd and OTP users rely on them:
//! hung workers, crash loops, start timeouts, recycling, rolling reloads, scaling, the job
//! API, metrics and probes, systemd notification.

use std::collections::BTreeSet;

use crate::util::*;

#[test]
fn a_hung_worker_is_killed_and_replaced() {
    let dir = TestDir::new();
    dir.write_model();
    let config =
        dir.write_config_with(&ConfigExtra { workers: 2, workers_table: "timeout_s = 1", ..Default::default() });
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let victim = sup.children("worker")[0];
    send_signal(victim, libc::SIGSTOP);
    sup.wait_for("it is hung", |l| l["message"].as_str().unwrap_or("").contains(&format!("pid {victim}")));
    sup.wait_for("ready", |l| l["pid"].as_u64().is_some_and(|p| p != victim as u64) && l["attach_us"].is_u64());
    eventually("the hung worker to be gone", || !alive(victim));
    assert_eq!(sup.children("worker").len(), 2);
    assert_eq!(infer_seed(&addr, 3)["y_sum"].as_f64().unwrap(), expected_answer(3).0);
}

#[test]
fn a_crash_loop_stops_everything_with_the_reason() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config_with(&ConfigExtra {
        workers: 2,
        command: Some(vec!["/bin/sh".into(), "-c".into(), "echo 'cannot work today' >&2; exit 3".into()]),
        restart: "max_restarts = 3\nwithin_s = 60\nbackoff_max_ms = 50",
        ..Default::default()
    });
    let mut sup = Supervisor::start(&config);
    let children = {
        sup.wait_for("listening on", |_| true);
        children_of(sup.pid())
    };
    let status = sup.wait_exit();
    assert!(!status.success());
    let log = sup.log_text();
    assert!(log.contains("kept dying") && log.contains("cannot work today") && log.contains("worker"), "{log}");
    for pid in children {
        assert!(!alive(pid), "{pid} outlived the supervisor");
    }
}

#[test]
fn a_worker_that_never_gets_ready_is_a_failed_start() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config_with(&ConfigExtra {
        command: Some(vec!["/bin/sleep".into(), "60".into()]),
        workers_table: "start_timeout_s = 0.5",
        restart: "max_restarts = 1\nbackoff_max_ms = 50",
        ..Default::default()
    });
    let mut sup = Supervisor::start(&config);
    assert!(!sup.wait_exit().success());
    let log = sup.log_text();
    assert!(log.contains("was not ready within"), "{log}");
}

#[test]
fn max_requests_recycles_workers_without_failing_requests() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config_with(&ConfigExtra { workers_table: "max_requests = 5", ..Default::default() });
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let mut pids = BTreeSet::new();
    for _ in 0..12 {
        // A recycled worker's listener is the supervisor's: requests queue until the fresh one accepts.
        pids.insert(infer_seed(&addr, 2)["worker"].as_u64().unwrap());
    }
    assert!(pids.len() >= 2, "workers were recycled: {pids:?}");
    assert!(sup.log_text().contains("exited on its own"));
    assert!(!sup.log_text().contains("kept dying"));
}

#[test]
fn hup_restarts_every_worker_without_failing_a_request() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config_with(&ConfigExtra { workers: 3, ..Default::default() });
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    let before: BTreeSet<u32> = sup.children("worker").into_iter().collect();
    let load = Load::start(&addr, 6);
    sup.signal(libc::SIGHUP);
    sup.wait_for("reload done", |_| true);
    let report = load.stop();
    let after: BTreeSet<u32> = sup.children("worker").into_iter().collect();
    assert_eq!(after.len(), 3);
    assert!(before.is_disjoint(&after), "every worker was replaced: {before:?} -> {after:?}");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(report.ok > 0);
}

#[test]
fn ttin_and_ttou_add_and_remove_a_worker() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config_with(&ConfigExtra { workers: 2, ..Default::default() });
    let mut sup = Supervisor::start(&config);
    sup.wait_ready();
    sup.signal(libc::SIGTTIN);
    sup.wait_for("ready", |l| l["index"] == 2);
    assert_eq!(sup.children("worker").len(), 3);
    // Signals are not queued: two TTOUs sent at once may arrive as one, so wait in between.
    sup.signal(libc::SIGTTOU);
    eventually("two workers left", || sup.children("worker").len() == 2);
    sup.signal(libc::SIGTTOU);
    eventually("one worker left", || sup.children("worker").len() == 1);
    let (ok, status, _) = control(&config, "status", &["--json"]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["workers_wanted"], 1);
}

#[test]
fn the_job_api_reads_like_systemctl() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config_with(&ConfigExtra { workers: 2, ..Default::default() });
    let mut sup = Supervisor::start(&config);
    let addr = sup.wait_ready();
    infer_seed(&addr, 1);

    let (ok, json, err) = control(&config, "status", &["--json"]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(status["bus_socket"].as_str().unwrap().ends_with("bus.sock"));
    assert_eq!(status["generation"], 1);
    let processes = status["processes"].as_array().unwrap();
    assert_eq!(processes.len(), 3, "{json}");
    for p in processes {
        for key in ["role", "index", "pid", "state", "restarts", "uptime_s", "rss_bytes", "gpu_bytes", "generation"] {
            assert!(p.get(key).is_some(), "{key} missing in {p}");
        }
        assert_eq!(p["state"], "ready", "{p}");
        assert!(p["rss_bytes"].as_u64().unwrap() > 0);
    }
    assert_eq!(processes[0]["role"], "owner");
    let (ok, table, _) = control(&config, "status", &[]);
    assert!(ok && table.contains("ROLE") && table.contains("worker") && table.contains("owner"), "{table}");

    let (ok, out, err) = control(&config, "scale", &["3"]);
    assert!(ok && out.contains("to 3 workers"), "{out}{err}");
    sup.wait_for("ready", |l| l["index"] == 2);

    let worker0 = status["processes"][1]["pid"].as_u64().unwrap() as u32;
    let (ok, out, err) = control(&config, "restart", &["0"]);
    assert!(ok, "{out}{err}");
    assert!(!alive(worker0), "worker 0 was replaced");
    let owner = status["processes"][0]["pid"].as_u64().unwrap() as u32;
    let (ok, _, err) = control(&config, "restart", &["owner"]);
    assert!(ok, "{err}");
    assert!(!alive(owner));
    let (ok, _, err) = control(&config, "restart", &["7"]);
    assert!(!ok && err.contains("no worker 7"), "{err}");

    let (ok, out, _) = control(&config, "stop", &[]);
    assert!(ok && out.contains("stopping"));
    assert!(sup.wait_exit().success(), "{}", sup.log_text());
}

#[test]
fn metrics_and_probes_are_served() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config_with(&ConfigExtra {
        workers: 2,
        supervisor: "metrics_listen = \"127.0.0.1:0\"",
        workers_table: "timeout_s = 2",
        ..Default::default()
    });
    let mut sup = Supervisor::start(&config);
    let metrics = sup.wait_for("metrics on", |_| true)["metrics"].as_str().unwrap().to_string();
    let addr = sup.wait_ready();
    infer_seed(&addr, 1);
    assert_eq!(http(&metrics, "GET", "/livez", "").0, 200);
    eventually("readiness", || http(&metrics, "GET", "/readyz", "").0 == 200);
    let victim = sup.children("worker")[0];
    send_signal(victim, libc::SIGKILL);
    sup.wait_for("ready", |l| l["pid"].as_u64().is_some_and(|p| p != victim as u64) && l["attach_us"].is_u64());
    eventually("metrics to show the restart and the escrow", || {
        let (status, text) = http(&metrics, "GET", "/metrics", "");
        status == 200
            && text.contains("forkless_restarts_total{role=\"worker\",reason=\"crash\"} 1")
            && text.contains("forkless_process_up{role=\"owner\",index=\"0\"} 1")
            && text.contains("forkless_escrow_bytes")
            && text.contains("forkless_process_rss_bytes{role=\"worker\",index=\"1\"}")
    });
}

#[test]
fn systemd_is_told_ready_and_stopping() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config(2, "");
    let socket = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
    notify.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut sup = Supervisor::start_with_env(&config, &[("NOTIFY_SOCKET", socket.as_os_str())]);
    sup.wait_ready();
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    sup.signal(libc::SIGTERM);
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(sup.wait_exit().success());
}

#[test]
fn quit_stops_at_once_and_leaves_nothing() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config(2, "");
    let mut sup = Supervisor::start(&config);
    sup.wait_ready();
    let children = children_of(sup.pid());
    sup.signal(libc::SIGQUIT);
    assert!(sup.wait_exit().success(), "{}", sup.log_text());
    assert!(sup.log_text().contains("fast stop"));
    for pid in children {
        assert!(!alive(pid));
    }
}

#[test]
fn a_killed_supervisors_leftovers_are_cleaned_up() {
    let dir = TestDir::new();
    dir.write_model();
    let config = dir.write_config(1, "");
    let mut first = Supervisor::start(&config);
    first.wait_ready();
    let runtime_dir = first.bus.clone().unwrap().parent().unwrap().to_path_buf();
    first.signal(libc::SIGKILL);
    first.wait_exit();
    let mut second = Supervisor::start(&config);
    second.wait_ready();
    let log = second.log_text();
    assert!(log.contains("removing the stale control socket"), "{log}");
    assert!(log.contains("stale runtime folder"), "{log}");
    // The folder is the config's own: the second supervisor took it over and holds it now.
    let pid = std::fs::read_to_string(runtime_dir.join("supervisor.pid")).unwrap();
    assert_eq!(pid, second.pid().to_string(), "the runtime folder {} is the new one's", runtime_dir.display());
}
