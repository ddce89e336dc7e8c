//! Free loopback TCP ports.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

/// Ports already handed out in this process.
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static SET: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    SET.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A currently free TCP port on 127.0.0.1, never the same twice in one process.
///
/// The port is found by binding `127.0.0.1:0` and reading the port the kernel chose; the
/// listener is closed before returning, so another process can in principle grab the port
/// before the caller binds it (the etcd harness retries a start on "address already in use").
///
/// # Panics
/// If no loopback port can be bound at all (the machine is broken for these tests).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let listener = match TcpListener::bind(("127.0.0.1", 0)) {
            Ok(l) => l,
            Err(e) => panic!("free_port: cannot bind 127.0.0.1:0: {e}"),
        };
        let port = match listener.local_addr() {
            Ok(a) => a.port(),
            Err(e) => panic!("free_port: cannot read the local address: {e}"),
        };
        drop(listener);
        let mut set = handed_out().lock().unwrap_or_else(|p| p.into_inner());
        if set.insert(port) {
            return port;
        }
    }
    panic!("free_port: 1000 attempts only returned ports already handed out");
}
