//! Reading a request's body before the service sees it: at most `max_body_bytes` (else 413),
//! all of it within `body_timeout` (else 408), each time with `Connection: close`. The service
//! then gets the whole body at once, so no handler ever waits on a slow client.
//!
//! Bodies over 64 KiB are read into an anonymous mapping of their own, returned to the kernel
//! when the request ends: a burst of large uploads must not leave the worker's RSS high (the
//! C allocator keeps freed heap memory for reuse).

use axum::body::Body;
use axum::http::{header, Response, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::limits::{Alarms, HttpLimits};

/// Bodies up to this size live on the heap.
const SMALL: usize = 64 << 10;

/// A body too large for the heap, in its own mapping.
struct Mapped {
    map: memmap2::MmapMut,
    len: usize,
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

/// A body being collected.
enum Collected {
    Heap(Vec<u8>),
    Mapped(Mapped),
}

impl Collected {
    fn new(expected: Option<usize>, max: usize) -> std::io::Result<Collected> {
        match expected {
            Some(len) if len > SMALL => Ok(Collected::Mapped(Mapped { map: memmap2::MmapMut::map_anon(len)?, len: 0 })),
            _ => Ok(Collected::Heap(Vec::with_capacity(expected.unwrap_or(0).min(max)))),
        }
    }

    fn len(&self) -> usize {
        match self {
            Collected::Heap(v) => v.len(),
            Collected::Mapped(m) => m.len,
        }
    }

    /// Appends `data`; the caller has checked the total against the limit.
    fn push(&mut self, data: &[u8], max: usize) -> std::io::Result<()> {
        if let Collected::Heap(v) = self {
            if v.len() + data.len() > SMALL {
                // A chunked body outgrew the heap: move it to a mapping of the largest size allowed.
                let mut map = memmap2::MmapMut::map_anon(max)?;
                map[..v.len()].copy_from_slice(v);
                *self = Collected::Mapped(Mapped { map, len: v.len() });
            }
        }
        match self {
            Collected::Heap(v) => v.extend_from_slice(data),
            Collected::Mapped(m) => {
                m.map[m.len..][..data.len()].copy_from_slice(data);
                m.len += data.len();
            }
        }
        Ok(())
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Collected::Heap(v) => Bytes::from(v),
            Collected::Mapped(m) => Bytes::from_owner(m),
        }
    }
}

/// A response that ends the connection.
pub(crate) fn closing(status: StatusCode, message: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::from(message));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    response
}

/// The whole body, or the response that refuses it.
pub(crate) async fn read(
    body: Incoming,
    content_length: Option<u64>,
    limits: &HttpLimits,
    alarms: &Alarms,
) -> Result<Bytes, Response<Body>> {
    let max = limits.max_body_bytes;
    let too_large = |len: u64| {
        alarms.body_too_large.fire(|| format!("refused a {len}-byte request body (max_body_bytes = {max}) with 413"));
        closing(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
    };
    if let Some(len) = content_length.filter(|&len| len > max as u64) {
        return Err(too_large(len));
    }
    match tokio::time::timeout(limits.body_timeout, collect(body, content_length, max)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(ReadError::TooLarge(len))) => Err(too_large(len)),
        Ok(Err(ReadError::Client)) => Err(closing(StatusCode::BAD_REQUEST, "the request body could not be read\n")),
        Ok(Err(ReadError::Memory(e))) => {
            tracing::error!("no memory for a request body: {e}");
            Err(closing(StatusCode::SERVICE_UNAVAILABLE, "no memory for the request body\n"))
        }
        Err(_) => {
            let after = limits.body_timeout;
            alarms
                .body_timeout
                .fire(|| format!("refused a request whose body was not complete after {after:?} with 408"));
            Err(closing(StatusCode::REQUEST_TIMEOUT, "request body not received in time\n"))
        }
    }
}

enum ReadError {
    TooLarge(u64),
    Client,
    Memory(std::io::Error),
}

async fn collect(mut body: Incoming, content_length: Option<u64>, max: usize) -> Result<Bytes, ReadError> {
    let expected = content_length.map(|len| len as usize);
    let mut collected = Collected::new(expected, max).map_err(ReadError::Memory)?;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| ReadError::Client)?.into_data() else { continue };
        let total = collected.len() + data.len();
        if total > max || expected.is_some_and(|len| total > len) {
            return Err(ReadError::TooLarge(total as u64));
        }
        collected.push(&data, max).map_err(ReadError::Memory)?;
    }
    Ok(collected.into_bytes())
}
