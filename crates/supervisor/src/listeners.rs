//! Listening sockets: bound once by the supervisor, inherited by every worker as fds 3.. under
//! the systemd `LISTEN_FDS` convention. All workers accept on the same queue, so a worker that
//! restarts loses no queued connection: the kernel keeps them for the others.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::{Domain, Socket, Type};

/// Failure to bind a configured address.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ([workers] listen): {source}; stop whatever uses it or pick another address")]
pub struct BindError {
    pub addr: String,
    pub source: std::io::Error,
}

/// The bound sockets, in config order.
#[derive(Debug)]
pub struct Listeners {
    sockets: Vec<Socket>,
}

impl Listeners {
    pub fn bind(addrs: &[String], backlog: i32) -> Result<Self, BindError> {
        let sockets = addrs
            .iter()
            .map(|addr| bind_one(addr, backlog).map_err(|source| BindError { addr: addr.clone(), source }))
            .collect::<Result<_, _>>()?;
        Ok(Listeners { sockets })
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The actual addresses (port 0 in the config becomes the chosen port).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets.iter().filter_map(|s| s.local_addr().ok()?.as_socket()).collect()
    }

    /// Duplicates of every socket, for one child (each child closes its own copies).
    pub fn duplicate(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.sockets.iter().map(|s| Ok(s.try_clone()?.into())).collect()
    }
}

fn bind_one(addr: &str, backlog: i32) -> std::io::Result<Socket> {
    let addr: SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket)
}

#[cfg(test)]
mod module_example {
    /// What this module's documentation once showed as an example (the module is private now).
    #[test]
    fn the_module_in_a_few_lines() {
        let listeners = crate::listeners::Listeners::bind(&["127.0.0.1:0".into()], 128).unwrap();
        assert_eq!(listeners.len(), 1);
        assert_ne!(listeners.local_addrs()[0].port(), 0);
    }
}
