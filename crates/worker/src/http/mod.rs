//! Serving an axum router from a worker (feature `http`, on by default): [`serve`] takes the
//! service's router and does the rest.
//!
//! - One HTTP/1.1 server per inherited listener (hyper), all sharing this worker's limits.
//! - [`HttpLimits`] (`[workers.http]`): header, body and idle timeouts, a body size limit, and a
//!   connection cap with a fast 503 beyond it (accept, answer, close: sockets never pile up
//!   in the kernel's queue, and clients learn at once to go elsewhere). Each limit that fires
//!   is logged, at most once a second per limit.
//! - [`count_requests`]: a tower layer counting finished requests, for heartbeats and
//!   `max_requests`.
//! - Drain on SIGTERM (or `max_requests`, or the supervisor going away): stop accepting,
//!   finish every request in progress, close idle connections, then return.
//! - Exit status: 0 after a drain; [`crate::EXIT_FATAL`] for a configuration the supervisor
//!   must report (no listener, unreadable limits); 1 otherwise.

mod body;
mod conn;
pub mod limits;

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

pub use limits::{HttpLimits, LimitsError, ENV_HTTP};

use crate::{Readiness, Requests, Worker, EXIT_FATAL};
use conn::{ConnClock, DeadlineIo};
use limits::Alarms;

/// A tower layer that counts each finished request on `requests` (heartbeats report the
/// count; `max_requests` drains the worker when it is reached). [`serve`] applies it.
pub fn count_requests<R>(requests: Requests) -> tower::util::MapResponseLayer<impl FnOnce(R) -> R + Clone> {
    tower::util::MapResponseLayer::new(move |response: R| {
        requests.finished();
        response
    })
}

/// A `GET` route answering 200 `{"ready": true, "generation": G, "worker": pid}` while this
/// worker serves a generation it accepted, 503 before it is ready and while it drains: mount
/// it where the load balancer probes, e.g. `.route("/readyz", readiness_route(&worker))`.
pub fn readiness_route<S: Clone + Send + Sync + 'static>(worker: &Worker) -> axum::routing::MethodRouter<S> {
    let readiness: Readiness = worker.readiness();
    axum::routing::get(move || {
        let readiness = readiness.clone();
        async move {
            let ready = readiness.is_ready();
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let body = format!(
                "{{\"ready\":{ready},\"generation\":{},\"worker\":{}}}",
                readiness.generation(),
                std::process::id()
            );
            (status, [(header::CONTENT_TYPE, "application/json")], body)
        }
    })
}

/// Serves `router` on the listeners the supervisor passed, until the worker drains; reports
/// the worker ready once the listeners are held. Returns the exit status for `main`.
pub async fn serve(mut worker: Worker, router: Router) -> ExitCode {
    let limits = match HttpLimits::from_env() {
        Ok(limits) => limits,
        Err(e) => return exit_with(EXIT_FATAL, e),
    };
    let listeners = match crate::inherited_listeners() {
        Ok(listeners) => listeners,
        Err(e) => return exit_with(EXIT_FATAL, e),
    };
    match worker.ready().await {
        Ok(()) | Err(crate::ReadyError::AlreadyReady) => {}
        Err(e) => return exit_with(1, format!("cannot report ready: {e}")),
    }
    tracing::info!(
        attach_us = worker.attach_timing().wall_us,
        "serving generation {} on {} listener(s)",
        worker.generation().number(),
        listeners.len()
    );
    let server = Server::new(router, limits).count(worker.requests());
    let mut code = match server.serve(listeners, worker.shutdown_token()).await {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("server error: {e}");
            1
        }
    };
    if let Some(fault) = worker.fault() {
        tracing::error!("{fault}");
        code = 1;
    }
    tracing::info!("drained; exiting");
    ExitCode::from(code)
}

fn exit_with(code: i32, error: impl std::fmt::Display) -> ExitCode {
    tracing::error!("{error}");
    ExitCode::from(code as u8)
}

/// The HTTP server [`serve`] runs, for services that need it on other listeners (or tests).
#[derive(Clone)]
pub struct Server {
    app: Router,
    limits: HttpLimits,
    alarms: Arc<Alarms>,
    requests: Option<Requests>,
    /// Refused connections whose close may linger (see [`Server::refuse`]).
    lingering: Arc<Semaphore>,
    bursts: Arc<Bursts>,
}

/// Notices the end of a burst of connections (most of a high peak closed again) and gives the
/// memory the burst used back to the kernel then: a worker's RSS returns to its level before
/// an attack instead of staying at its peak.
#[derive(Debug, Default)]
struct Bursts {
    open: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

impl Bursts {
    /// Peaks smaller than this are ordinary traffic.
    const LARGE: usize = 64;

    fn opened(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let open = self.open.fetch_add(1, Relaxed) + 1;
        self.peak.fetch_max(open, Relaxed);
    }

    fn closed(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let open = self.open.fetch_sub(1, Relaxed) - 1;
        let peak = self.peak.load(Relaxed);
        if peak >= Self::LARGE && open <= peak / 8 && self.peak.compare_exchange(peak, open, Relaxed, Relaxed).is_ok() {
            tracing::info!("a burst of {peak} connections is over: returning its memory");
            tokio::task::spawn_blocking(forkless_bus::child::release_free_memory);
        }
    }
}

/// Refused connections that may linger at once.
const LINGERING: usize = 256;

/// How long a draining worker keeps serving connections it has already accepted before it
/// closes the idle ones: long enough for a request a client wrote right after connecting to
/// be read (local clients need microseconds), short against any drain.
const ACCEPTED_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

impl Server {
    pub fn new(app: Router, limits: HttpLimits) -> Server {
        Server {
            app,
            limits,
            alarms: Arc::default(),
            requests: None,
            lingering: Arc::new(Semaphore::new(LINGERING)),
            bursts: Arc::default(),
        }
    }

    /// Counts every finished request on `requests` ([`count_requests`]).
    pub fn count(mut self, requests: Requests) -> Server {
        self.requests = Some(requests);
        self
    }

    /// Serves every listener until `stop` is cancelled, then drains: in-flight requests
    /// finish, idle connections close. An error means a listener failed for good.
    pub async fn serve(self, listeners: Vec<TcpListener>, stop: CancellationToken) -> std::io::Result<()> {
        let connections = Arc::new(Semaphore::new(self.connection_cap(listeners.len())));
        let app = match self.requests.clone() {
            Some(requests) => self.app.clone().layer(count_requests(requests)),
            None => self.app.clone(),
        };
        let server = Server { app, ..self };
        let mut tasks = tokio::task::JoinSet::new();
        for listener in listeners {
            tasks.spawn(server.clone().accept_loop(listener, connections.clone(), stop.clone()));
        }
        let mut result = Ok(());
        while let Some(ended) = tasks.join_next().await {
            if let Err(e) = ended.map_err(std::io::Error::other).and_then(|r| r) {
                stop.cancel();
                result = Err(e);
            }
        }
        result
    }

    /// `max_connections`, lowered to what the open-files limit leaves room for (an accept
    /// that fails with EMFILE serves nobody, not even a 503).
    fn connection_cap(&self, listeners: usize) -> usize {
        let wanted = self.limits.max_connections;
        let files = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        // Room for the listeners, the bus, the arenas, logs and the runtime's own descriptors.
        let room = files.map_or(usize::MAX, |n| (n as usize).saturating_sub(64 + listeners));
        if room < wanted {
            tracing::warn!(
                "max_connections = {wanted}, but the open-files limit (ulimit -n) is {files:?}: serving at most {room} connections at once; raise LimitNOFILE to allow more"
            );
        }
        wanted.min(room).max(1)
    }

    async fn accept_loop(
        self,
        listener: TcpListener,
        connections: Arc<Semaphore>,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        // hyper's own header timer would also cut idle keep-alive connections at the same
        // value; conn.rs times the two waits apart. 64 KiB of headers is plenty (nginx: 32).
        http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(None).max_buf_size(64 << 10);
        loop {
            let stream = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        self.accept_failed(e).await?;
                        continue;
                    }
                },
            };
            let Ok(slot) = connections.clone().try_acquire_owned() else {
                self.refuse(stream, &connections);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let clock = Arc::new(ConnClock::new(self.limits));
            let io = hyper_util::rt::TokioIo::new(DeadlineIo::new(stream, clock.clone(), self.alarms.clone()));
            let server = self.clone();
            let service = hyper::service::service_fn(move |request| server.clone().handle(request, clock.clone()));
            let connection = graceful.watch(http.serve_connection(io, service));
            let bursts = self.bursts.clone();
            bursts.opened();
            tokio::spawn(async move {
                let _ = connection.await; // a client's broken connection is its own business
                drop(slot);
                bursts.closed();
            });
        }
        // The supervisor and the other workers keep their copies of the listener.
        drop(listener);
        // A connection accepted just now may have its request still in the socket buffer,
        // unread: hyper would count it idle and close it, and a client that does not retry
        // would see a failure. A moment lets such requests start; they are then answered.
        tokio::time::sleep(ACCEPTED_GRACE).await;
        graceful.shutdown().await;
        Ok(())
    }

    /// The connection cap is reached: a fast 503, then close. The close lingers (up to a
    /// second, reading and discarding) so that a request still on its way does not turn the
    /// close into a reset that would discard the 503 at the client; at most
    /// [`LINGERING`] refusals linger at once, the others close at once.
    fn refuse(&self, stream: TcpStream, connections: &Semaphore) {
        const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 26\r\nConnection: close\r\nRetry-After: 1\r\n\r\nworker at max_connections\n";
        let cap = self.limits.max_connections;
        let open = cap.saturating_sub(connections.available_permits());
        self.alarms
            .connection_limit
            .fire(|| format!("answered 503 to a new connection: {open} connections open (max_connections = {cap})"));
        let _ = stream.try_write(REFUSAL);
        let Ok(lingering) = self.lingering.clone().try_acquire_owned() else { return };
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = stream;
            let _ = stream.shutdown().await; // FIN after the 503
            let mut scratch = [0u8; 4096];
            let drain = async { while matches!(stream.read(&mut scratch).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
            drop(lingering);
        });
    }

    /// Accept errors: out of descriptors or memory is waited out (logged); anything else
    /// about one connection is skipped.
    async fn accept_failed(&self, e: std::io::Error) -> std::io::Result<()> {
        let resources =
            [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE, rustix::io::Errno::NOBUFS, rustix::io::Errno::NOMEM];
        if resources.iter().any(|errno| e.raw_os_error() == Some(errno.raw_os_error())) {
            self.alarms.accept_failed.fire(|| format!("cannot accept connections: {e}; waiting"));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// One request: read its body under the limits, then the service.
    async fn handle(self, request: Request<Incoming>, clock: Arc<ConnClock>) -> Result<Response<Body>, Infallible> {
        clock.busy();
        let (parts, body) = request.into_parts();
        let length = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
        let response = match body::read(body, length, &self.limits, &self.alarms).await {
            Ok(bytes) => {
                let request = Request::from_parts(parts, Body::from(bytes));
                self.app.oneshot(request).await.unwrap_or_else(|never| match never {})
            }
            Err(refusal) => refusal,
        };
        clock.idle();
        Ok(response)
    }
}
