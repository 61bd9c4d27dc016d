//! The load: closed-loop keep-alive connections (`--connections C`), or an open-loop fixed
//! rate (`--rate R`), each request the check's (`[check]`; by default `POST /infer {"seed": n}`)
//! with a seed from a fixed set, every answer checked against the
//! [`Reference`](crate::reference::Reference).
//!
//! A keep-alive connection stays with the worker that accepted it, so each connection knows
//! which worker (pid) it talks to: a failure is attributed to that worker's death when the pid
//! was killed, which is what bounds "failures from a SIGKILL" by the requests in flight on it.
//! A request that finds its reused connection closed before any response byte (the server
//! closed an idle keep-alive connection: a draining worker) is sent again once on a fresh
//! connection, as HTTP clients do, and counted as `retried`, not hidden.
//!
//! ```no_run
//! # async fn f(addr: std::net::SocketAddr) -> std::io::Result<()> {
//! let mut connection = forkless_chaos::load::Connection::open(addr).await?;
//! let reply = connection.post("/infer", br#"{"seed": 1}"#).await?;
//! assert_eq!(reply.status, 200);
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest a single request may take before it counts as failed ("timeout").
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/1.1 keep-alive connection.
pub struct Connection {
    stream: BufReader<TcpStream>,
    /// Requests answered on this connection so far.
    pub used: u64,
}

/// A response.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// How a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCause {
    /// Could not connect.
    Connect,
    /// The connection broke before or during the response.
    ConnectionLost,
    Timeout,
    /// HTTP 5xx.
    ServerError,
    /// HTTP 4xx or an unreadable body.
    BadResponse,
}

impl Connection {
    pub async fn open(addr: SocketAddr) -> std::io::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Connection { stream: BufReader::new(stream), used: 0 })
    }

    /// Sends a POST and reads the whole response. An EOF before the status line is
    /// `UnexpectedEof` (the caller may retry that on a fresh connection).
    pub async fn post(&mut self, path: &str, body: &[u8]) -> std::io::Result<Reply> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: forkless\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad_response)?;
        let mut length = 0usize;
        // From here on part of the response has arrived: any error is "aborted", never retried.
        let aborted = |_| std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await.map_err(aborted)? == 0 {
                return Err(std::io::ErrorKind::ConnectionAborted.into());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().map_err(|_| bad_response())?;
                }
            }
        }
        let mut body = vec![0; length];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::ConnectionAborted))?;
        self.used += 1;
        Ok(Reply { status, body })
    }
}

/// The peer closed a reused keep-alive connection before sending any of the response: an EOF
/// on the status line, or a reset/broken pipe (Linux resets a socket closed with our unread
/// request in it). Nothing of the answer was received, so sending it again is safe for this
/// idempotent request, and it is what HTTP clients do.
fn closed_before_response(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe)
}

fn bad_response() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response")
}

/// The outcome of one request, as the load records it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When it was sent, since the start of the run.
    pub at: Duration,
    pub latency: Duration,
    /// The worker that answered, or the one the connection was on when it failed.
    pub worker: Option<u32>,
    pub result: Result<Answer, FailureCause>,
    /// It was sent twice: its reused connection was closed before any response byte.
    pub retried: bool,
    /// The worker whose connection closed under the first attempt (when `retried`).
    pub retried_from: Option<u32>,
}

/// A 200 answer, decoded.
#[derive(Debug, Clone)]
pub struct Answer {
    pub seed: u64,
    /// The whole JSON answer (the check reads its fields).
    pub body: serde_json::Value,
    pub generation: u64,
    pub worker: u32,
}

/// Sends the check's request for `seed` (by default `POST /infer {"seed": seed}`) on
/// `connection` (opening one if needed), retrying once on a fresh connection if a reused one
/// turns out closed. Leaves `connection` empty after a failure.
pub async fn request(
    addr: SocketAddr,
    connection: &mut Option<Connection>,
    check: &crate::check::CheckSpec,
    seed: u64,
    started: Instant,
) -> Outcome {
    let at = started.elapsed();
    let begun = Instant::now();
    let body = check.body(seed);
    let mut retried = false;
    let result = loop {
        if connection.is_none() {
            match tokio::time::timeout(REQUEST_TIMEOUT, Connection::open(addr)).await {
                Ok(Ok(fresh)) => *connection = Some(fresh),
                _ => break Err(FailureCause::Connect),
            }
        }
        let conn = connection.as_mut().expect("opened above");
        let reused = conn.used > 0;
        match tokio::time::timeout(REQUEST_TIMEOUT, conn.post(&check.path, body.as_bytes())).await {
            Ok(Ok(reply)) => break decode(seed, reply),
            Ok(Err(e)) if reused && !retried && closed_before_response(&e) => {
                *connection = None;
                retried = true;
            }
            Ok(Err(_)) => break Err(FailureCause::ConnectionLost),
            Err(_) => break Err(FailureCause::Timeout),
        }
    };
    if result.is_err() {
        *connection = None;
    }
    let worker = result.as_ref().ok().map(|a| a.worker);
    Outcome { at, latency: begun.elapsed(), worker, result, retried, retried_from: None }
}

fn decode(seed: u64, reply: Reply) -> Result<Answer, FailureCause> {
    match reply.status {
        200 => {}
        500..=599 => return Err(FailureCause::ServerError),
        _ => return Err(FailureCause::BadResponse),
    }
    let json: serde_json::Value = serde_json::from_slice(&reply.body).map_err(|_| FailureCause::BadResponse)?;
    Ok(Answer {
        seed,
        generation: json.get("generation").and_then(serde_json::Value::as_u64).ok_or(FailureCause::BadResponse)?,
        worker: json.get("worker").and_then(serde_json::Value::as_u64).ok_or(FailureCause::BadResponse)? as u32,
        body: json,
    })
}
