//! `supervisor`: run a forkless service (`supervisor run CONFIG`) and control it while it
//! runs (`status`, `scale`, `restart`, `reload`, `reload-model`, `stop`, like systemctl).
//!
//! The same executable is the owner process (`supervisor owner`, started by `run` through a
//! fresh `exec`, never a fork), so a deployment ships one binary besides its workers.
#![forbid(unsafe_code)]

mod prometheus;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use forkless_supervisor::backend::ProbeReport;
use forkless_supervisor::config::{Backend, Config};
use forkless_supervisor::control::{request, Request, Response};
use forkless_supervisor::logging::{self, LogFormat};
use forkless_supervisor::service::{Health, RestartTarget, StatusReport};
use forkless_supervisor::RunOptions;

#[derive(Parser)]
#[command(
    name = "supervisor",
    version,
    about = "One copy of a model's weights, many worker processes, every crash repaired."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Target {
    /// The config the running supervisor was started with.
    #[arg(short, long, default_value = "config.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Start the owner and the workers described by CONFIG and keep them running.
    Run {
        /// The config file (TOML), e.g. examples/linear/config.toml.
        config: PathBuf,
        /// Log lines as human-readable text or as JSON objects.
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
        /// Where the weights live: a GPU if one is usable (auto), host memory, or the GPU
        /// `[cuda] device` (cuda: fail if it is not usable). Overrides `[model] backend`.
        #[arg(long, value_enum)]
        backend: Option<Backend>,
    },
    /// Show every process: role, index, pid, state, restarts, uptime, memory, generation.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run N workers.
    Scale {
        #[command(flatten)]
        target: Target,
        workers: u32,
    },
    /// Replace the owner, every worker (one at a time), or worker INDEX; each replacement is
    /// ready before its predecessor stops.
    Restart {
        #[command(flatten)]
        target: Target,
        /// owner | workers | INDEX
        what: RestartTarget,
    },
    /// Re-read the config and restart the workers on it, one at a time (like SIGHUP).
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Hot swap: the running owner loads PATH (default: the config's [model] path) beside the
    /// live generation; workers switch between requests; the old one is freed once unused.
    ReloadModel {
        #[command(flatten)]
        target: Target,
        /// The new weights file (safetensors).
        path: Option<PathBuf>,
    },
    /// Put GPU DEVICE back in service after `on_device_failure = "degrade"` took it out: its
    /// workers start again, with fresh restart budgets.
    RestoreDevice {
        #[command(flatten)]
        target: Target,
        /// The device number, as in `[cuda] devices` and `supervisor status`.
        device: u32,
    },
    /// Stop gracefully: workers drain, then the owner stops (like SIGTERM).
    Stop {
        #[command(flatten)]
        target: Target,
        /// Kill what still runs at once, whatever the grace (also ends a graceful stop under way).
        #[arg(long)]
        now: bool,
    },
    /// The owner process (started by `supervisor run`; not for direct use).
    #[command(hide = true)]
    Owner,
    /// Says whether GPU DEVICE can hold shared weights: one JSON line, exit 0 (usable) or 1.
    /// `supervisor run` asks this of a child so that it never loads CUDA itself.
    #[command(hide = true)]
    ProbeGpu {
        #[arg(long, default_value_t = 0)]
        device: u32,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { config, log_format, backend } => {
            // First, while this is the only thread: descriptors inherited from whoever started
            // us (`exec 9<secret`) must never reach the children.
            let inherited = forkless_bus::child_env::mark_inherited_fds_cloexec();
            let fd_limit = forkless_supervisor::limits::raise_fd_limit();
            logging::init(log_format);
            match inherited {
                Ok(0) => {}
                Ok(n) => tracing::info!("{n} inherited descriptor(s) marked close-on-exec: children will not get them"),
                Err(e) => tracing::warn!("cannot list inherited descriptors (/proc/self/fd): {e}"),
            }
            tracing::debug!(fd_limit, "open descriptor limit");
            run(config, RunOptions { backend })
        }
        Command::Owner => owner(),
        Command::ProbeGpu { device } => probe_gpu(device),
        Command::Status { target, json } => control(&target, Request::Status, json),
        Command::Scale { target, workers } => control(&target, Request::Scale { workers }, false),
        Command::Restart { target, what } => control(&target, Request::Restart { target: what }, false),
        Command::Reload { target } => control(&target, Request::Reload, false),
        Command::Stop { target, now } => control(&target, Request::Stop { now }, false),
        Command::RestoreDevice { target, device } => control(&target, Request::RestoreDevice { device }, false),
        Command::ReloadModel { target, path } => {
            // A relative PATH means relative to where this command runs, as for any CLI argument.
            let path = path.map(|p| std::path::absolute(&p).unwrap_or(p).display().to_string());
            control(&target, Request::ReloadModel { path }, false)
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

fn run(config: PathBuf, options: RunOptions) -> ExitCode {
    let result = Config::load(&config).map_err(anyhow::Error::from).and_then(|config| {
        runtime().block_on(async {
            let (health, health_rx) = tokio::sync::watch::channel(Health::default());
            if let Some(addr) = &config.supervisor.metrics_listen {
                prometheus::serve(addr.parse()?, health_rx).await?;
            }
            Ok(forkless_supervisor::run(config, options, health).await?)
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("supervisor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn owner() -> ExitCode {
    logging::init_owner();
    match runtime().block_on(forkless_owner::run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// `probe-gpu`: the only place this executable touches the CUDA driver outside the owner.
fn probe_gpu(device: u32) -> ExitCode {
    let report = ProbeReport::probe_in_this_process(device);
    let printed = print(&format!("{}\n", serde_json::to_string(&report).expect("a probe report serialises")));
    if report.usable {
        printed
    } else {
        ExitCode::FAILURE
    }
}

/// Writes `text` to stdout. A reader that went away (`supervisor status | head -1`, a closed
/// pipe) ends the command quietly with status 0, as ripgrep does: what was asked for was
/// delivered as far as anyone listened. (Rust ignores SIGPIPE, so `print!` would panic there
/// with exit status 101 instead.) Any other write error is reported, with status 1.
fn print(text: &str) -> ExitCode {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("supervisor: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sends one request to the supervisor running `target.config` and prints the answer.
fn control(target: &Target, message: Request, json: bool) -> ExitCode {
    let answer = Config::load(&target.config)
        .map_err(anyhow::Error::from)
        .and_then(|config| Ok(runtime().block_on(request(&config, &message))?));
    match answer {
        Ok(Response::Status { status }) if json => {
            print(&format!("{}\n", serde_json::to_string_pretty(&status).expect("status serialises")))
        }
        Ok(Response::Status { status }) => print(&status_table(&status)),
        Ok(Response::Done { message }) => print(&format!("{message}\n")),
        Ok(Response::Reloaded { generation }) => {
            print(&format!("generation {generation} is live; workers switch between requests\n"))
        }
        Ok(Response::Failed { error }) => {
            eprintln!("supervisor: {error}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("supervisor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn status_table(status: &StatusReport) -> String {
    let mib = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1048576.0));
    let mut out = format!(
        "supervisor {}  up {:.0}s  config {}\nbackend {}\ngeneration {}{}  escrow {} MiB  workers wanted {}\n\n",
        status.supervisor_pid,
        status.uptime_s,
        status.config,
        status.backend,
        status.generation.map_or("-".into(), |g| g.to_string()),
        status.retiring_generation.map_or(String::new(), |g| format!(" (retiring {g})")),
        mib(Some(status.escrow_bytes)),
        status.workers_wanted,
    );
    if let Some(reason) = &status.memory_unknown {
        out += &format!("{reason}\n\n");
    }
    for lane in &status.lanes {
        out += &format!(
            "lane (generation {}{}): {} passes, {} served, mean batch {:.1} in {:.0} us, {:.2} workers per pass, \
             leader pid {}\n",
            lane.generation,
            lane.device.map_or(String::new(), |d| format!(", GPU {d}")),
            lane.passes,
            lane.served,
            lane.mean_batch,
            lane.mean_pass_us,
            lane.mean_workers_per_pass,
            lane.leader_pid
        );
    }
    if !status.lanes.is_empty() {
        out += "\n";
    }
    for device in status.devices.iter().filter(|_| status.devices.len() > 1) {
        out += &format!(
            "GPU {}: escrow {} MiB, workers {} ({} ready), memory used {} MiB{}\n",
            device.device,
            mib(Some(device.escrow_bytes)),
            device.workers,
            device.ready_workers,
            mib(device.gpu_used_bytes),
            device.failed.as_ref().map_or(String::new(), |why| format!(", OUT OF SERVICE: {why}"))
        );
    }
    out += &format!(
        "{:<7} {:>5} {:>8} {:<9} {:>8} {:>9} {:>9} {:>8} {:>4} {:>9}\n",
        "ROLE", "INDEX", "PID", "STATE", "RESTARTS", "UPTIME", "RSS MiB", "GPU MiB", "GEN", "REQUESTS"
    );
    for p in &status.processes {
        out += &format!(
            "{:<7} {:>5} {:>8} {:<9} {:>8} {:>9} {:>9} {:>8} {:>4} {:>9}\n",
            p.role,
            p.index,
            p.pid.map_or("-".into(), |p| p.to_string()),
            p.state,
            p.restarts,
            p.uptime_s.map_or("-".into(), |u| format!("{u:.0}s")),
            mib(p.rss_bytes),
            mib(p.gpu_bytes),
            p.generation.map_or("-".into(), |g| g.to_string()),
            p.requests,
        );
    }
    out
}
