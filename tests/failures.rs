//! Broken inputs end in a clear, non-zero exit naming the culprit, never a restart loop.

use crate::util::*;

#[test]
fn missing_weights_file_is_named() {
    let dir = TestDir::new();
    let mut sup = Supervisor::start(&dir.write_config(2, ""));
    let status = sup.wait_exit();
    assert!(!status.success());
    let log = sup.log_text();
    assert!(log.contains("weights.safetensors") && log.contains("does not exist"), "{log}");
}

#[test]
fn corrupt_weights_file_is_named_and_not_restarted() {
    let dir = TestDir::new();
    std::fs::write(dir.model_path(), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"broken\": tru").unwrap();
    let mut sup = Supervisor::start(&dir.write_config(2, ""));
    let status = sup.wait_exit();
    assert!(!status.success());
    let log = sup.log_text();
    assert!(log.contains("weights.safetensors") && log.contains("not a valid safetensors file"), "{log}");
    assert_eq!(log.matches("started owner").count(), 1, "the owner is not restarted: {log}");
    assert!(!log.contains("started worker"), "no worker starts without weights: {log}");
}

#[test]
fn make_if_missing_creates_the_weights_once() {
    let dir = TestDir::new();
    let make = format!(
        "make_if_missing = [{:?}, \"make-weights\", \"--in\", \"{IN}\", \"--out\", \"{OUT}\", \"--seed\", \"{WEIGHT_SEED}\"]",
        worker_exe().display().to_string()
    );
    let mut sup = Supervisor::start(&dir.write_config(1, &make));
    let addr = sup.wait_ready();
    assert!(dir.model_path().exists());
    assert_eq!(infer_seed(&addr, 11)["y_sum"].as_f64().unwrap(), expected_answer(11).0);
}

#[test]
fn unknown_config_key_is_named_with_its_line() {
    let dir = TestDir::new();
    let config = dir.write_config(1, "");
    let text = std::fs::read_to_string(&config).unwrap().replace("count = 1", "count = 1\nworkrs = 2");
    std::fs::write(&config, text).unwrap();
    let mut sup = Supervisor::start(&config);
    assert!(!sup.wait_exit().success());
    let log = sup.log_text();
    assert!(log.contains("config.toml") && log.contains("workrs") && log.contains("line"), "{log}");
}

#[test]
fn stranger_on_the_bus_is_refused() {
    let dir = TestDir::new();
    dir.write_model();
    let mut sup = Supervisor::start(&dir.write_config(1, ""));
    sup.wait_ready();
    let bus = sup.bus.clone().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut stream = forkless_bus::BusStream::connect(&bus).await.unwrap();
        let hello = forkless_bus::Message::hello(forkless_bus::Role::Worker, std::process::id());
        // The supervisor may refuse (and close) before reading this: EPIPE is fine here.
        let _ = stream.send(&hello, &[]).await;
        match stream.recv().await {
            Ok((forkless_bus::Message::Refused { reason }, _)) => {
                assert!(reason.contains("not a child"), "{reason}")
            }
            other => {
                panic!("a process the supervisor did not start must be refused, got {other:?}")
            }
        }
    });
    // The supervisor and its workers carry on.
    assert_eq!(infer_seed(sup.addr.as_deref().unwrap(), 1)["generation"], 1);
}
