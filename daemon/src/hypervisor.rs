//! The hypervisor check: libvirt reachability, version and domain counts.
//!
//! libvirt calls block, so they run on tokio's blocking pool under a timeout; a hung libvirtd
//! costs one blocking thread, never the runtime, the lease or the keepalive.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use virt::connect::Connect;

/// What a libvirt probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// libvirt library version, `major.minor.micro`.
    pub version: String,
    /// Running domains.
    pub running: u32,
    /// Defined, not running domains.
    pub defined: u32,
}

/// Why libvirt could not be probed.
#[derive(Debug, Error)]
pub enum HypervisorError {
    #[error("libvirt {uri}: {message}")]
    Libvirt { uri: String, message: String },
    #[error("libvirt {uri}: no answer within {timeout:?}")]
    Timeout { uri: String, timeout: Duration },
}

/// A libvirt connection kept open between probes and reopened after a failure.
#[derive(Clone)]
pub struct Libvirt {
    uri: String,
    timeout: Duration,
    conn: Arc<Mutex<Option<Connect>>>,
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

impl Libvirt {
    /// A handle for `uri`; nothing is opened until the first probe.
    pub fn new(uri: &str, timeout: Duration) -> Libvirt {
        // libvirt prints every error to stderr by default; we log them ourselves.
        virt::error::clear_error_callback();
        Libvirt {
            uri: uri.to_string(),
            timeout,
            conn: Arc::new(Mutex::new(None)),
        }
    }

    /// The URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Probe libvirt: open (or reuse) the connection, read version and domain counts.
    pub async fn probe(&self) -> Result<Probe, HypervisorError> {
        let this = self.clone();
        let job = tokio::task::spawn_blocking(move || this.probe_blocking());
        match tokio::time::timeout(self.timeout, job).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(HypervisorError::Libvirt {
                uri: self.uri.clone(),
                message: format!("probe task failed: {e}"),
            }),
            Err(_) => Err(HypervisorError::Timeout {
                uri: self.uri.clone(),
                timeout: self.timeout,
            }),
        }
    }

    fn probe_blocking(&self) -> Result<Probe, HypervisorError> {
        let err = |e: virt::error::Error| HypervisorError::Libvirt {
            uri: self.uri.clone(),
            message: e.message().to_string(),
        };
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard
            .as_ref()
            .map(|c| !c.is_alive().unwrap_or(false))
            .unwrap_or(true)
        {
            if let Some(mut old) = guard.take() {
                let _ = old.close();
            }
            *guard = Some(Connect::open(Some(&self.uri)).map_err(err)?);
        }
        let Some(conn) = guard.as_ref() else {
            return Err(HypervisorError::Libvirt {
                uri: self.uri.clone(),
                message: "no connection".into(),
            });
        };
        let result = (|| {
            Ok(Probe {
                version: version_string(conn.get_lib_version()?),
                running: conn.num_of_domains()?,
                defined: conn.num_of_defined_domains()?,
            })
        })();
        if result.is_err() {
            if let Some(mut c) = guard.take() {
                let _ = c.close();
            }
        }
        result.map_err(err)
    }

    /// Close the connection (shutdown).
    pub async fn close(&self) {
        let conn = self.conn.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(mut c) = conn.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = c.close();
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(version_string(9_000_000), "9.0.0");
        assert_eq!(version_string(10_002_003), "10.2.3");
    }

    #[tokio::test]
    async fn probes_the_libvirt_test_driver() {
        let lv = Libvirt::new("test:///default", Duration::from_secs(10));
        let p = lv.probe().await.expect("test:///default answers");
        // The test driver starts with one running domain named "test".
        assert_eq!(p.running, 1);
        assert!(p.version.starts_with(|c: char| c.is_ascii_digit()));
        lv.close().await;
    }

    #[tokio::test]
    async fn reports_an_unreachable_libvirt() {
        let lv = Libvirt::new(
            "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
            Duration::from_secs(10),
        );
        let e = lv.probe().await.expect_err("no such socket");
        assert!(
            e.to_string().contains("/nonexistent/libvirt-sock")
                || e.to_string().contains("libvirt"),
            "{e}"
        );
    }
}
