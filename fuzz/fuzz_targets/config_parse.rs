//! `Config::parse` on arbitrary text: never a panic, and a config it accepts can be turned
//! into every duration the supervisor uses without a panic either.
#![no_main]

use forkless_supervisor::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::parse(text, "/fuzz/config.toml".as_ref()) else { return };
    let _ = config.supervisor.graceful_timeout();
    let _ = config.workers.timeout();
    let _ = config.workers.start_timeout();
    let _ = config.restart.reset_after();
    let _ = config.restart.within();
    let _ = config.workers.heartbeat_period();
});
