//! `sd_notify`: tells systemd (under `Type=notify`) when the service is ready and when it is
//! stopping, by one datagram to `$NOTIFY_SOCKET`. Outside systemd it does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1`) to systemd if it is listening; failures are logged, not fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let result = (|| {
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            // An abstract socket name (Linux): "@name".
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(&path)?,
        };
        socket.send_to_addr(state.as_bytes(), &addr)
    })();
    if let Err(e) = result {
        tracing::warn!("sd_notify {state}: {e}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sends_to_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // Only this test sets NOTIFY_SOCKET; notify() reads it at call time.
        std::env::set_var("NOTIFY_SOCKET", &path);
        super::notify("READY=1");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}

#[cfg(test)]
mod module_example {
    /// What this module's documentation once showed as an example (the module is private now).
    #[test]
    fn the_module_in_a_few_lines() {
        crate::sd_notify::notify("READY=1"); // no NOTIFY_SOCKET here: a no-op
    }
}
