//! The fencing driver: `ipmitool` over IPMI-over-LAN (`-I lanplus`). The password is read
//! from the local password file and handed to ipmitool in its environment (`-E`), never on
//! a command line; every call is bounded by a timeout and killed past it. `-C 3` picks the
//! cipher suite directly (without it each call spends seconds probing suites).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use debvisor_objects::node::BmcInfo;
use thiserror::Error;
use tokio::process::Command;

/// Why a fence (or a power query) failed.
#[derive(Debug, Error)]
pub enum FenceError {
    /// The password file could not be read.
    #[error("fencing.ipmi.password_file {path}: {message}")]
    Password { path: PathBuf, message: String },
    /// ipmitool could not be run.
    #[error("cannot run ipmitool: {0}")]
    Spawn(std::io::Error),
    /// ipmitool did not answer in time (killed).
    #[error("ipmitool {what} on {host} did not answer within {timeout:?}")]
    Timeout {
        what: &'static str,
        host: String,
        timeout: Duration,
    },
    /// ipmitool failed.
    #[error("ipmitool {what} on {host} failed: {message}")]
    Failed {
        what: &'static str,
        host: String,
        message: String,
    },
    /// The BMC never reported the power Off.
    #[error("{host} still reports power {state} after {waited:?}")]
    NotOff {
        host: String,
        state: String,
        waited: Duration,
    },
}

/// Power as the BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// Chassis power is on.
    On,
    /// Chassis power is off.
    Off,
}

/// IPMI fencing with one password file for every BMC.
#[derive(Debug, Clone)]
pub struct Ipmi {
    password_file: PathBuf,
    /// Bound of one ipmitool call.
    call_timeout: Duration,
    program: PathBuf,
}

impl Ipmi {
    /// Fencing with the password in `password_file`; each ipmitool call bounded by
    /// `call_timeout`.
    pub fn new(password_file: &Path, call_timeout: Duration) -> Ipmi {
        Ipmi {
            password_file: password_file.to_path_buf(),
            call_timeout,
            program: PathBuf::from("ipmitool"),
        }
    }

    fn password(&self) -> Result<String, FenceError> {
        let text = crate::securefs::read_trusted(&self.password_file)
            .map_err(|e| FenceError::Password {
                path: self.password_file.clone(),
                message: e.to_string(),
            })?
            .ok_or_else(|| FenceError::Password {
                path: self.password_file.clone(),
                message: "missing".into(),
            })?;
        Ok(text.trim_end_matches(['\n', '\r']).to_string())
    }

    /// Run `ipmitool -I lanplus -H host -p port -U user -E -C 3 <args>`.
    async fn ipmitool(
        &self,
        bmc: &BmcInfo,
        what: &'static str,
        args: &[&str],
    ) -> Result<String, FenceError> {
        let password = self.password()?;
        let child = Command::new(&self.program)
            .args([
                "-I",
                "lanplus",
                "-H",
                &bmc.host,
                "-p",
                &bmc.port.to_string(),
            ])
            .args(["-U", &bmc.user, "-E", "-C", "3", "-N", "1", "-R", "2"])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("IPMI_PASSWORD", password)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(FenceError::Spawn)?;
        let out = match tokio::time::timeout(self.call_timeout, child.wait_with_output()).await {
            Ok(r) => r.map_err(FenceError::Spawn)?,
            Err(_) => {
                return Err(FenceError::Timeout {
                    what,
                    host: bmc.host.clone(),
                    timeout: self.call_timeout,
                })
            }
        };
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(FenceError::Failed {
                what,
                host: bmc.host.clone(),
                message: if err.is_empty() {
                    out.status.to_string()
                } else {
                    err
                },
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The chassis power state.
    pub async fn power(&self, bmc: &BmcInfo) -> Result<Power, FenceError> {
        let out = self
            .ipmitool(bmc, "power status", &["chassis", "power", "status"])
            .await?;
        parse_power(&out).ok_or_else(|| FenceError::Failed {
            what: "power status",
            host: bmc.host.clone(),
            message: format!("unexpected answer {:?}", out.trim()),
        })
    }

    /// Fence: power off, then poll `power status` until Off, all within `timeout`.
    pub async fn fence(&self, bmc: &BmcInfo, timeout: Duration) -> Result<Duration, FenceError> {
        let start = Instant::now();
        let work = async {
            self.ipmitool(bmc, "power off", &["chassis", "power", "off"])
                .await?;
            loop {
                match self.power(bmc).await {
                    Ok(Power::Off) => return Ok(start.elapsed()),
                    Ok(Power::On) | Err(FenceError::Timeout { .. }) => {}
                    Err(e) => return Err(e),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(FenceError::NotOff {
                host: bmc.host.clone(),
                state: "on (or unknown)".into(),
                waited: timeout,
            }),
        }
    }

    /// Power on (after a fence, with `fencing.power_on_after`).
    pub async fn power_on(&self, bmc: &BmcInfo) -> Result<(), FenceError> {
        self.ipmitool(bmc, "power on", &["chassis", "power", "on"])
            .await
            .map(|_| ())
    }
}

/// `Chassis Power is on|off` → the state.
fn parse_power(out: &str) -> Option<Power> {
    let t = out.trim().to_ascii_lowercase();
    if t.ends_with("is off") {
        Some(Power::Off)
    } else if t.ends_with("is on") {
        Some(Power::On)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipmitool_power_answers_parse() {
        assert_eq!(parse_power("Chassis Power is on\n"), Some(Power::On));
        assert_eq!(parse_power("Chassis Power is off"), Some(Power::Off));
        assert_eq!(
            parse_power("Error: Unable to establish IPMI v2 / RMCP+ session"),
            None
        );
    }
}
