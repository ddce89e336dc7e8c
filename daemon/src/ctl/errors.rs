//! Errors as an operator reads them: one line saying what failed and the likely cause
//! ("cannot reach etcd at http://…:2379: connection refused — is etcd running?"), with the
//! full chain of causes (tonic's status, the transport error, the OS error) only with `-v`.

use std::sync::atomic::{AtomicBool, Ordering};

use debvisor_objects::StoreError;

static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Show full error chains (`-v`).
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

/// Are full error chains wanted?
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// The likely cause of a store error, in a few words, from its rendered chain; `None` when
/// nothing known matches (the innermost cause is then shown).
pub fn likely_cause(chain: &str) -> Option<&'static str> {
    let m = chain.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| m.contains(n));
    if has(&["connection refused"]) {
        Some("connection refused — is etcd running and listening on that address?")
    } else if has(&[
        "dns error",
        "failed to lookup address",
        "name or service not known",
    ]) {
        Some("the host name does not resolve — check the endpoint")
    } else if has(&[
        "unknownissuer",
        "unknown issuer",
        "invalid peer certificate",
        "certificate verify failed",
        "badsignature",
    ]) {
        Some("etcd's TLS certificate is not trusted — give its CA with --cacert")
    } else if has(&[
        "notvalidforname",
        "not valid for name",
        "certificate is not valid for",
    ]) {
        Some("etcd's TLS certificate does not name this host — connect by a name it lists, or set server_name")
    } else if has(&[
        "certificate required",
        "certificaterequired",
        "bad certificate",
        "handshake",
    ]) {
        Some("the TLS handshake failed — does etcd want a client certificate (--cert/--key)?")
    } else if has(&[
        "invalid http version",
        "http2 error",
        "frame with invalid size",
        "invalid content-type",
    ]) {
        Some("that address does not speak etcd's gRPC (http vs https, or another service)")
    } else if has(&[
        "user name is empty",
        "token",
        "authentication failed",
        "invalid user id or password",
        "invalid auth",
    ]) {
        Some("etcd wants a user — give --user and --password-file")
    } else if has(&["permission denied", "permissiondenied"]) {
        Some("etcd refused access — check the user's role or the certificate's common name")
    } else if has(&["timed out", "deadline", "timeout"]) {
        Some("no answer in time — is the address right and the port open?")
    } else if has(&["network is unreachable", "no route to host"]) {
        Some("no route to that address — check the network")
    } else {
        None
    }
}

/// The innermost cause of a `: `-joined chain (what the OS or the server said last).
fn innermost(chain: &str) -> &str {
    chain
        .rsplit(": ")
        .find(|p| !p.trim().is_empty())
        .unwrap_or(chain)
        .trim()
}

/// What a store error means for an operator: one line, or the full chain with `-v`.
pub fn describe(e: &StoreError, verbose: bool) -> String {
    let full = e.to_string();
    if verbose {
        return full;
    }
    match e {
        StoreError::Request { op, message } => {
            let cause = likely_cause(message)
                .map(str::to_string)
                .unwrap_or_else(|| innermost(message).to_string());
            format!("etcd request {op} failed: {cause} (-v for details)")
        }
        StoreError::Setup { endpoints, message } => {
            let cause = likely_cause(message)
                .map(str::to_string)
                .unwrap_or_else(|| innermost(message).to_string());
            format!("cannot reach etcd at {endpoints}: {cause} (-v for details)")
        }
        _ => full,
    }
}

/// A store error as a command reports it (honours `-v`).
pub fn etcd_error(e: StoreError) -> String {
    describe(&e, verbose())
}

/// The one line of a failed connection to `endpoints`.
pub fn unreachable(endpoints: &str, e: &StoreError, verbose: bool) -> String {
    if verbose {
        return format!("cannot reach etcd at {endpoints}: {e}");
    }
    let chain = e.to_string();
    match e {
        StoreError::File { .. } | StoreError::Auth { .. } => chain,
        StoreError::Timeout { timeout, .. } => format!(
            "cannot reach etcd at {endpoints}: no answer within {timeout:?} — is the address right and the port open? (-v for details)"
        ),
        _ => {
            let cause = likely_cause(&chain)
                .map(str::to_string)
                .unwrap_or_else(|| innermost(&chain).to_string());
            format!("cannot reach etcd at {endpoints}: {cause} (-v for details)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_named_in_one_line() {
        let e = StoreError::Request {
            op: "list",
            message: "status: Unavailable, message: \"tcp connect error\", details: [], metadata: MetadataMap { headers: {} }: transport error: tcp connect error: Connection refused (os error 111)".into(),
        };
        let short = describe(&e, false);
        assert!(
            short.contains("connection refused — is etcd running"),
            "{short}"
        );
        assert!(!short.contains("MetadataMap"), "{short}");
        assert!(describe(&e, true).contains("MetadataMap"));
        let u = unreachable("http://127.0.0.1:1", &e, false);
        assert!(
            u.starts_with("cannot reach etcd at http://127.0.0.1:1: connection refused"),
            "{u}"
        );
        let odd = StoreError::Request {
            op: "get",
            message: "status: Internal: something: odd thing".into(),
        };
        assert!(describe(&odd, false).contains("odd thing"));
        assert!(likely_cause("invalid peer certificate: UnknownIssuer")
            .is_some_and(|c| c.contains("--cacert")));
    }
}
