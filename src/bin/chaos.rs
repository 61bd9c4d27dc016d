//! `chaos`: kill a forkless service's processes under load and prove nothing is lost and no
//! answer is wrong. See `crates/chaos` and docs/CHAOS.md.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use forkless_chaos::{schedule, KillSignal, Options};

#[derive(Parser)]
#[command(name = "chaos", version, about = "Kill a forkless service's processes under load and check every answer.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Signal {
    #[value(name = "KILL")]
    Kill,
    #[value(name = "TERM")]
    Term,
    #[value(name = "STOP")]
    Stop,
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long)]
    config: PathBuf,
    /// Seconds of load.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Requests per second in all (default: as fast as answers come).
    #[arg(long, conflicts_with = "connections")]
    rate: Option<f64>,
    /// Keep-alive connections, each with one request outstanding.
    #[arg(long)]
    connections: Option<usize>,
    /// What to kill: owner, worker, workers[:N], leader (the batch lane's pass runner); each may
    /// carry its own period (owner@5); `none`: load only.
    #[arg(long, default_value = "owner,worker")]
    kill: String,
    /// Seconds between kills (for targets without @SECS); jittered ±20 %.
    #[arg(long, default_value_t = 3.0)]
    every: f64,
    #[arg(long, value_enum, default_value_t = Signal::Kill)]
    signal: Signal,
    /// Seed of every random choice (kill schedule, victims, request seeds).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report (timeline with the kills marked) here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// The supervisor executable (default: beside this one).
    #[arg(long)]
    supervisor: Option<PathBuf>,
    /// Copy the supervisor's log (JSON lines, workers' lines included) to this file.
    #[arg(long)]
    supervisor_log: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Start the supervisor with CONFIG, drive load, kill on schedule, report.
    Run(RunArgs),
    /// Turn a JSON report into the summary and the HTML page again.
    Render {
        #[arg(long)]
        json: PathBuf,
        #[arg(long)]
        html: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    forkless_supervisor::logging::init(forkless_supervisor::logging::LogFormat::Human);
    let args = match Cli::parse().command {
        Command::Run(args) => args,
        Command::Render { json, html } => return render(&json, html.as_deref()),
    };
    let options = match args.options() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("chaos: --kill: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let report = match runtime.block_on(forkless_chaos::run(options)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("chaos: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    finish(&report, args.json.as_deref(), args.html.as_deref())
}

impl RunArgs {
    /// The harness's options; `Err` for an unreadable `--kill`.
    fn options(&self) -> Result<Options, String> {
        let mut options = Options::new(self.config.clone());
        options.duration = Duration::try_from_secs_f64(self.duration)
            .map_err(|_| format!("--duration {} is not a number of seconds", self.duration))?;
        if self.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err("--rate must be a positive number of requests per second".into());
        }
        options.rate = self.rate;
        options.connections = self.connections.unwrap_or(if self.rate.is_some() { 8 } else { options.connections });
        options.plans = schedule::parse_plans(&self.kill, self.every)?;
        options.signal = match self.signal {
            Signal::Kill => KillSignal::Kill,
            Signal::Term => KillSignal::Term,
            Signal::Stop => KillSignal::Stop,
        };
        options.seed = self.seed;
        options.supervisor_log = self.supervisor_log.clone();
        if let Some(supervisor) = &self.supervisor {
            options.supervisor = supervisor.clone();
        }
        Ok(options)
    }
}

/// Prints the summary, writes the files asked for, and exits non-zero if an invariant failed.
fn finish(
    report: &forkless_chaos::report::Report,
    json: Option<&std::path::Path>,
    html: Option<&std::path::Path>,
) -> ExitCode {
    print!("{}", report.summary());
    let outputs = [
        (json, json.map(|_| serde_json::to_string_pretty(report).expect("serialises"))),
        (html, html.map(|_| report.html())),
    ];
    for (path, text) in outputs {
        if let (Some(path), Some(text)) = (path, text) {
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("chaos: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn render(json: &std::path::Path, html: Option<&std::path::Path>) -> ExitCode {
    let report: forkless_chaos::report::Report = match std::fs::read_to_string(json)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(report) => report,
        Err(e) => {
            eprintln!("chaos: cannot read the report {}: {e}", json.display());
            return ExitCode::FAILURE;
        }
    };
    finish(&report, None, html)
}
