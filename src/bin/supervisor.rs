//! `supervisor`: run a forkless service (`supervisor run CONFIG`).
//!
//! The same executable is the owner process (`supervisor owner`, started by `run` through a
//! fresh `exec`, never a fork), so a deployment ships one binary besides its workers.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use forkless_supervisor::logging::{self, LogFormat};

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

#[derive(Subcommand)]
enum Command {
    /// Start the owner and the workers described by CONFIG and keep them running.
    Run {
        /// The config file (TOML), e.g. examples/linear/config.toml.
        config: PathBuf,
        /// Log lines as human-readable text or as JSON objects.
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
    },
    /// Hot swap: the running owner loads PATH (default: the config's [model] path) beside the
    /// live generation; workers switch between requests; the old one is freed once unused.
    ReloadModel {
        /// The config the running supervisor was started with.
        #[arg(short, long)]
        config: PathBuf,
        /// The new weights file (safetensors).
        path: Option<PathBuf>,
    },
    /// The owner process (started by `supervisor run`; not for direct use).
    #[command(hide = true)]
    Owner,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { config, log_format } => run(config, log_format),
        Command::ReloadModel { config, path } => reload_model(config, path),
        Command::Owner => owner(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

fn run(config: PathBuf, log_format: LogFormat) -> ExitCode {
    logging::init(log_format);
    let result = forkless_supervisor::config::Config::load(&config)
        .map_err(anyhow::Error::from)
        .and_then(|config| runtime().block_on(forkless_supervisor::run(config)));
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
    logging::init_child();
    match runtime().block_on(forkless_owner::run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            let code = if e.is_fatal() {
                forkless_owner::EXIT_FATAL
            } else {
                1
            };
            ExitCode::from(code as u8)
        }
    }
}

fn reload_model(config: PathBuf, path: Option<PathBuf>) -> ExitCode {
    use forkless_supervisor::control::{request, Request, Response};
    let result = forkless_supervisor::config::Config::load(&config)
        .map_err(anyhow::Error::from)
        .and_then(|config| {
            // A relative PATH means relative to where this command runs, as for any CLI argument.
            let path = path.map(|p| std::path::absolute(&p).unwrap_or(p).display().to_string());
            runtime().block_on(request(&config, &Request::ReloadModel { path }))
        });
    match result {
        Ok(Response::Reloaded { generation }) => {
            println!("generation {generation} is live; workers switch between requests");
            ExitCode::SUCCESS
        }
        Ok(Response::Failed { error }) => {
            eprintln!("supervisor: reload-model failed: {error}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("supervisor: {e:#}");
            ExitCode::FAILURE
        }
    }
}
