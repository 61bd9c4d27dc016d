//! The worker's tie to the supervisor, on a background thread: a small tokio runtime that
//! attaches exactly like a Rust worker ([`forkless_worker::WorkerBuilder::attach`]), then keeps the
//! link (heartbeats, hot swaps, releases) and carries out `ready()`. The Python acceptance
//! checks run on this thread, in the worker crate's hook ([`crate::accept`]): at attach and on
//! every offer of a hot swap.
//!
//! Python threads talk to it through [`Link`]: they wait for the attach on a condition
//! variable and send commands over a channel, never running anything on the runtime themselves,
//! so every call can release the GIL while it waits.
//!
//! Signals stay with the Python server: the link installs no SIGTERM/SIGINT handler. When the
//! worker itself decides to stop (`max_requests` reached, or the supervisor gone), it asks the
//! server to drain the way the server expects it: SIGTERM to this process (gunicorn's and
//! uvicorn's graceful stop). It never exits the process.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use forkless_worker::{Generations, Gpu, Parent, Requests, Worker};

use crate::accept::PythonCheck;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;

/// What the process does when the worker decides to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnShutdown {
    /// SIGTERM to this process: the server drains and exits 0.
    Terminate,
    /// Nothing: the service watches `shutdown_requested()` itself.
    Nothing,
}

/// How to attach.
pub struct StartOptions {
    pub parent: Parent,
    pub on_shutdown: OnShutdown,
    /// The service's acceptance check, run at attach and on every offer.
    pub check: Option<PythonCheck>,
    /// The batch lane's pass factory, if the service may declare a pass (the Python one is
    /// `lane::PythonPass::make`).
    pub lane: Option<Box<forkless_worker::lane::MakeSharedPass>>,
}

/// An attach that did not work: the message, and the exit status that tells the supervisor
/// what to do about it (78: restarting cannot help; 75: retry later; 1: restart).
#[derive(Debug, Clone)]
pub struct Failure {
    pub message: String,
    pub exit_code: i32,
}

/// The attached worker, as Python threads see it.
#[derive(Debug, Clone)]
pub struct Attached {
    pub generations: Generations,
    pub requests: Requests,
    pub shutdown: CancellationToken,
    pub index: u32,
    pub gpu: Option<Gpu>,
    /// From `attach()` being called to the generation mapped, CUDA context included.
    pub attach_ms: f64,
    /// The attach itself as the worker crate times it (bus to mapped), in microseconds.
    pub attach_wall_us: u64,
}

#[derive(Debug, Clone)]
enum State {
    Attaching,
    Attached(Arc<Attached>),
    Failed(Failure),
}

enum Command {
    Ready(std::sync::mpsc::Sender<Result<(), String>>),
}

/// The one link of this process.
pub struct Link {
    pid: u32,
    /// The link thread: it must never wait on itself (an acceptance check runs on it).
    thread: OnceLock<ThreadId>,
    state: Mutex<State>,
    changed: Condvar,
    commands: UnboundedSender<Command>,
    ready: Mutex<bool>,
    /// Signalled once `ready` turns true (the lane's pass runners wait for the app to be loaded).
    became_ready: Condvar,
}

static LINK: OnceLock<Link> = OnceLock::new();

/// Starts attaching on a background thread, once per process; later calls return the same
/// link. Fails when the link was started by the parent of a fork: it does not cross fork().
pub fn start(options: StartOptions) -> Result<&'static Link, Failure> {
    let mut receiver = None;
    let link = LINK.get_or_init(|| {
        let (commands, inbox) = unbounded_channel();
        receiver = Some(inbox);
        Link {
            pid: std::process::id(),
            thread: OnceLock::new(),
            state: Mutex::new(State::Attaching),
            changed: Condvar::new(),
            commands,
            ready: Mutex::new(false),
            became_ready: Condvar::new(),
        }
    });
    if let Some(inbox) = receiver {
        let spawned = std::thread::Builder::new().name("forkless-link".into()).spawn(move || run(options, inbox));
        if let Err(e) = spawned {
            link.set(State::Failed(Failure {
                message: format!("cannot start the forkless link thread: {e}"),
                exit_code: 1,
            }));
        }
    }
    link.check_pid()?;
    Ok(link)
}

/// The link of this process, if `start` was called.
pub fn get() -> Option<&'static Link> {
    LINK.get()
}

impl Link {
    fn set(&self, state: State) {
        *self.state.lock().expect("link state poisoned") = state;
        self.changed.notify_all();
    }

    fn check_pid(&self) -> Result<(), Failure> {
        let pid = std::process::id();
        if pid == self.pid {
            return Ok(());
        }
        Err(Failure {
            message: format!(
                "forkless attached in process {} and this is its forked child {pid}: a worker's link does not \
                 survive fork(); attach in the process that serves (with gunicorn: no --preload, use \
                 `python -m forkless.gunicorn`)",
                self.pid
            ),
            exit_code: forkless_worker::EXIT_FATAL,
        })
    }

    /// Refuses a wait on the link from the link thread itself (from an acceptance check): it
    /// would never end.
    fn check_thread(&self) -> Result<(), Failure> {
        if self.thread.get() != Some(&std::thread::current().id()) {
            return Ok(());
        }
        Err(Failure {
            message: "forkless.attach(), ready() and generation() cannot be called from an acceptance check: the \
                      check runs while the worker attaches or takes a hot swap's offer, and gets the generation it \
                      decides on as its argument"
                .into(),
            exit_code: 1,
        })
    }

    /// Waits (at most `timeout`) for the attach to finish. `Ok(None)` on timeout.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Option<Arc<Attached>>, Failure> {
        self.check_pid()?;
        self.check_thread()?;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = self.state.lock().expect("link state poisoned");
        loop {
            match &*state {
                State::Attached(attached) => return Ok(Some(attached.clone())),
                State::Failed(failure) => return Err(failure.clone()),
                State::Attaching => {}
            }
            state = match deadline {
                None => self.changed.wait(state).expect("link state poisoned"),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    self.changed.wait_timeout(state, left).expect("link state poisoned").0
                }
            };
        }
    }

    /// The attached worker, if the attach has finished successfully.
    pub fn attached(&self) -> Option<Arc<Attached>> {
        match &*self.state.lock().expect("link state poisoned") {
            State::Attached(attached) if self.check_pid().is_ok() => Some(attached.clone()),
            _ => None,
        }
    }

    /// Tells the supervisor this worker serves (once; later calls do nothing). Waits for the
    /// attach first.
    pub fn ready(&self) -> Result<(), Failure> {
        self.wait(None)?;
        let mut ready = self.ready.lock().expect("link ready flag poisoned");
        if *ready {
            return Ok(());
        }
        let failed = |message: String| Failure { message, exit_code: 1 };
        let (reply, answer) = std::sync::mpsc::channel();
        self.commands.send(Command::Ready(reply)).map_err(|_| failed("the forkless link thread is gone".into()))?;
        answer
            .recv()
            .map_err(|_| failed("the forkless link thread is gone".into()))?
            .map_err(|e| failed(format!("cannot report ready to the supervisor: {e}")))?;
        *ready = true;
        self.became_ready.notify_all();
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.lock().expect("link ready flag poisoned")
    }

    /// Waits at most `timeout` for the worker to be ready; true if it is.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let ready = self.ready.lock().expect("link ready flag poisoned");
        let (ready, _) =
            self.became_ready.wait_timeout_while(ready, timeout, |ready| !*ready).expect("link ready flag poisoned");
        *ready
    }
}

/// The background thread: attach, then serve commands and watch for the end, forever (the
/// process ends with the server; this thread never ends it).
fn run(options: StartOptions, mut inbox: UnboundedReceiver<Command>) {
    let link = LINK.get().expect("the link exists before its thread starts");
    let _ = link.thread.set(std::thread::current().id());
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            let message = format!("cannot start the forkless link's tokio runtime: {e}");
            return link.set(State::Failed(Failure { message, exit_code: 1 }));
        }
    };
    runtime.block_on(async move {
        let started = Instant::now();
        let mut attach = Worker::builder().parent(options.parent).signal_handlers(false);
        if let Some(check) = options.check {
            attach = attach.accept(check);
        }
        if let Some(make) = options.lane {
            attach = attach.lane_pass_shared(move |generation| make(generation));
        }
        let mut worker = match attach.attach().await {
            Ok(worker) => worker,
            Err(e) => {
                let exit_code = e.exit_code();
                return link.set(State::Failed(Failure { message: e.to_string(), exit_code }));
            }
        };
        let shutdown = worker.shutdown_token();
        link.set(State::Attached(Arc::new(Attached {
            generations: worker.generations(),
            requests: worker.requests(),
            shutdown: shutdown.clone(),
            index: worker.index(),
            gpu: worker.gpu().cloned(),
            attach_ms: started.elapsed().as_secs_f64() * 1e3,
            attach_wall_us: worker.attach_timing().wall_us,
        })));
        let mut stopping = false;
        loop {
            tokio::select! {
                command = inbox.recv() => match command {
                    Some(Command::Ready(reply)) => {
                        let _ = reply.send(worker.ready().await.map_err(|e| e.to_string()));
                    }
                    None => std::future::pending::<()>().await,
                },
                _ = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    if options.on_shutdown == OnShutdown::Terminate {
                        tracing::info!("asking the server to drain (SIGTERM to this process)");
                        if let Err(e) = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM) {
                            tracing::error!("cannot send SIGTERM to this process: {e}");
                        }
                    }
                }
            }
        }
    });
}
