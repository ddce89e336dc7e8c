//! The coordination store: a thin, typed layer over etcd-client that adds the key prefix,
//! bounds every unary request with a timeout, and turns responses into plain values.
//!
//! Streams (watch, lease keep-alive) are not bounded by the request timeout; HTTP/2
//! keep-alive pings detect a dead server under them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteResponse, GetOptions,
    GetResponse, Identity, LeaseKeepAliveStream, LeaseKeeper, PutOptions, PutResponse,
    ResponseHeader, TlsOptions, Txn, TxnOp, TxnResponse, WatchOptions, WatchStream,
};
use thiserror::Error;

use crate::witness::{StoreChange, StoreMark, Witness};

/// Errors of the store layer.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A TLS file or the password file could not be read.
    #[error("store.{field}: cannot read {path}: {source}")]
    File {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The client could not be built (bad endpoint URL, bad TLS material, auth refused).
    #[error("cannot set up etcd client for {endpoints}: {message}")]
    Setup { endpoints: String, message: String },
    /// etcd refused the user name or password: a configuration error that retrying will not
    /// fix, so callers fail at once instead of treating it like an outage.
    #[error("etcd refused the credentials of store.user {user:?} (password from store.password_file {}): {message}", password_file.display())]
    Auth {
        user: String,
        password_file: PathBuf,
        message: String,
    },
    /// A request failed (server unreachable, TLS handshake failed, permission denied, …).
    #[error("etcd request {op} failed: {message}")]
    Request { op: &'static str, message: String },
    /// A request did not answer within the request timeout.
    #[error("etcd request {op} timed out after {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    /// A value was not what the schema says.
    #[error("key {key}: {reason}")]
    Value { key: String, reason: String },
}

impl StoreError {
    fn request(op: &'static str, e: etcd_client::Error) -> StoreError {
        StoreError::Request {
            op,
            message: error_chain(&e),
        }
    }
}

/// Render an error with all its sources (tonic hides the useful part, e.g. a TLS
/// `UnknownIssuer`, two levels down).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let m = src.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = src.source();
    }
    s
}

/// Did etcd answer the token request with "authentication failed, invalid user ID or
/// password" (gRPC `InvalidArgument`)?
fn is_auth_failure(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            m.contains("authentication failed") || m.contains("invalid user ID or password")
        }
        _ => false,
    }
}

/// How to reach etcd. Built by the daemon from its `store:` config section.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/debvisor` (no trailing slash).
    pub prefix: String,
    /// CA bundle to verify the servers.
    pub ca: Option<PathBuf>,
    /// Client certificate and key for client-certificate auth.
    pub cert: Option<PathBuf>,
    /// Key of `cert`.
    pub key: Option<PathBuf>,
    /// Override of the TLS server name.
    pub server_name: Option<String>,
    /// etcd user name.
    pub user: Option<String>,
    /// File with the user's password.
    pub password_file: Option<PathBuf>,
    /// Timeout of one connection attempt.
    pub connect_timeout: Duration,
    /// Timeout of one unary request.
    pub request_timeout: Duration,
}

/// A key-value pair with its key made relative to the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// Key relative to the prefix (`nodes/n1/info`).
    pub key: String,
    /// Raw value.
    pub value: Vec<u8>,
    /// Revision of the last change of this key.
    pub mod_revision: i64,
    /// Revision at which the key was created.
    pub create_revision: i64,
    /// Lease the key is bound to (0 = none).
    pub lease: i64,
}

/// The closed set of operation names failed requests are counted by (`/metrics` label
/// `op`): every request of this layer maps to one of them.
pub const REQUEST_OPS: [&str; 8] = [
    "get", "list", "put", "txn", "delete", "watch", "lease", "other",
];

/// Which [`REQUEST_OPS`] slot a request's own name counts in.
fn op_slot(op: &str) -> usize {
    let family = match op {
        "probe" => "get",
        o if o.starts_with("lease") => "lease",
        o => o,
    };
    REQUEST_OPS
        .iter()
        .position(|o| *o == family)
        .unwrap_or(REQUEST_OPS.len() - 1)
}

/// What the store layer counts for `/metrics`, shared by every clone of a [`Store`]: failed
/// requests by operation, and the node lease's renewals (its keeper holds only the store,
/// so they are kept here rather than passed through every registration path).
#[derive(Debug, Default)]
pub struct StoreMetrics {
    /// Failed or timed-out requests per [`REQUEST_OPS`] slot.
    errors: [AtomicU64; REQUEST_OPS.len()],
    /// Good renewals of the node lease and how long each took (send to answer).
    pub lease_renewals: crate::histogram::Histogram,
    /// Renewals of the node lease that failed (no answer, stream broken, timeout).
    pub lease_renewal_failures: AtomicU64,
}

impl StoreMetrics {
    /// Count one failed request named `op` (`get`, `lease_grant`, …).
    pub fn request_failed(&self, op: &str) {
        self.errors[op_slot(op)].fetch_add(1, Ordering::Relaxed);
    }

    /// Failed requests so far, one per [`REQUEST_OPS`] entry, in its order.
    pub fn request_errors(&self) -> Vec<(&'static str, u64)> {
        REQUEST_OPS
            .iter()
            .zip(self.errors.iter())
            .map(|(op, n)| (*op, n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
    prefix: String,
    timeout: Duration,
    endpoints: Vec<String>,
    /// The store's identity as seen in our answers (shared by every clone).
    witness: Arc<Witness>,
    /// Error and lease counters (shared by every clone).
    metrics: Arc<StoreMetrics>,
}

/// A linearizable key-value answer, whose header witnesses the store's identity.
trait Headed {
    fn header(&self) -> Option<&ResponseHeader>;
}

macro_rules! headed {
    ($($t:ty),*) => {$(
        impl Headed for $t {
            fn header(&self) -> Option<&ResponseHeader> {
                <$t>::header(self)
            }
        }
    )*};
}
headed!(GetResponse, PutResponse, DeleteResponse, TxnResponse);

fn read_file(field: &'static str, path: &PathBuf) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::File {
        field,
        path: path.clone(),
        source,
    })
}

impl Store {
    /// Build a client. Like etcd-client itself this does not prove the server is there:
    /// call [`Store::probe`] for that. With user auth, the token request happens here, so an
    /// unreachable server fails this call.
    pub async fn connect(opts: &StoreOptions) -> Result<Store, StoreError> {
        let mut co = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if opts.ca.is_some() || opts.cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &opts.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read_file("tls.ca", ca)?));
            }
            if let (Some(cert), Some(key)) = (&opts.cert, &opts.key) {
                tls = tls.identity(Identity::from_pem(
                    read_file("tls.cert", cert)?,
                    read_file("tls.key", key)?,
                ));
            }
            if let Some(name) = &opts.server_name {
                tls = tls.domain_name(name.clone());
            }
            co = co.with_tls(tls);
        }
        if let (Some(user), Some(pwfile)) = (&opts.user, &opts.password_file) {
            let raw = read_file("password_file", pwfile)?;
            let password = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            co = co
                .with_user(user.clone(), password)
                .with_auto_token_refresh(true);
        }
        let endpoints = opts.endpoints.clone();
        let fut = Client::connect(endpoints.clone(), Some(co));
        let client =
            match tokio::time::timeout(opts.connect_timeout + opts.request_timeout, fut).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) if is_auth_failure(&e) => {
                    return Err(StoreError::Auth {
                        user: opts.user.clone().unwrap_or_default(),
                        password_file: opts.password_file.clone().unwrap_or_default(),
                        message: error_chain(&e),
                    })
                }
                Ok(Err(e)) => {
                    return Err(StoreError::Setup {
                        endpoints: endpoints.join(","),
                        message: error_chain(&e),
                    })
                }
                Err(_) => {
                    return Err(StoreError::Timeout {
                        op: "connect",
                        timeout: opts.connect_timeout + opts.request_timeout,
                    })
                }
            };
        Ok(Store {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
            timeout: opts.request_timeout,
            endpoints,
            witness: Arc::new(Witness::default()),
            metrics: Arc::new(StoreMetrics::default()),
        })
    }

    /// Remember the store's identity from an earlier run (see [`crate::witness`]).
    pub fn seed_mark(&self, mark: StoreMark) {
        self.witness.seed(mark);
    }

    /// The store's identity as this process has seen it (to remember across restarts).
    pub fn mark(&self) -> Option<StoreMark> {
        self.witness.mark()
    }

    /// Set when the store was found replaced under us and no operator confirmed it yet.
    pub fn store_change(&self) -> Option<StoreChange> {
        self.witness.change()
    }

    /// An operator confirmed the store as it is: removals are no longer held for it.
    pub fn accept_store_change(&self) {
        self.witness.accept();
    }

    /// Follow [`Store::store_change`].
    pub fn watch_store_change(&self) -> tokio::sync::watch::Receiver<Option<StoreChange>> {
        self.witness.subscribe()
    }

    /// The counters of this store (shared by every clone), for `/metrics`.
    pub fn metrics(&self) -> Arc<StoreMetrics> {
        self.metrics.clone()
    }

    /// The endpoints this store talks to.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    /// Absolute key of a relative one.
    pub fn abs(&self, rel: &str) -> String {
        format!("{}/{}", self.prefix, rel)
    }

    /// Relative key of an absolute one (None when outside the prefix).
    pub fn rel<'a>(&self, abs: &'a str) -> Option<&'a str> {
        abs.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
    }

    fn to_kv(&self, kv: &etcd_client::KeyValue) -> Option<Kv> {
        let key = std::str::from_utf8(kv.key()).ok()?;
        Some(Kv {
            key: self.rel(key)?.to_string(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
            lease: kv.lease(),
        })
    }

    /// Convert a raw key-value from a watch event.
    pub fn convert(&self, kv: &etcd_client::KeyValue) -> Option<Kv> {
        self.to_kv(kv)
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        let r = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(|e| StoreError::request(op, e)),
            Err(_) => Err(StoreError::Timeout {
                op,
                timeout: self.timeout,
            }),
        };
        if r.is_err() {
            self.metrics.request_failed(op);
        }
        r
    }

    /// Like [`Store::bounded`] for a linearizable key-value request: its answer's header
    /// feeds the witness, against the floor known when the request was sent.
    async fn unary<T: Headed>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        let floor = self.witness.floor();
        let resp = self.bounded(op, fut).await?;
        if let Some(h) = resp.header() {
            self.witness
                .observe(op, h.cluster_id(), h.revision(), floor);
        }
        Ok(resp)
    }

    /// Prove the server answers: returns the current revision.
    pub async fn probe(&self) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let key = self.abs(&crate::schema::schema_version());
        let resp = self
            .unary(
                "probe",
                c.get(key, Some(GetOptions::new().with_count_only())),
            )
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Read one key.
    pub async fn get(&self, rel: &str) -> Result<Option<Kv>, StoreError> {
        let mut c = self.client.clone();
        let resp = self.unary("get", c.get(self.abs(rel), None)).await?;
        Ok(resp.kvs().first().and_then(|kv| self.to_kv(kv)))
    }

    /// Read every key under a relative prefix, with the revision the read was taken at.
    pub async fn list(&self, rel_prefix: &str) -> Result<(Vec<Kv>, i64), StoreError> {
        let mut c = self.client.clone();
        let resp = self
            .unary(
                "list",
                c.get(self.abs(rel_prefix), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok((
            resp.kvs().iter().filter_map(|kv| self.to_kv(kv)).collect(),
            rev,
        ))
    }

    /// Write one key (no lease).
    pub async fn put(&self, rel: &str, value: impl Into<Vec<u8>>) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        self.unary("put", c.put(self.abs(rel), value.into(), None))
            .await?;
        Ok(())
    }

    /// Delete one key; returns whether it existed.
    pub async fn delete(&self, rel: &str) -> Result<bool, StoreError> {
        let mut c = self.client.clone();
        let r = self.unary("delete", c.delete(self.abs(rel), None)).await?;
        Ok(r.deleted() > 0)
    }

    /// Run a transaction built with [`TxnBuilder`].
    pub async fn txn(&self, t: TxnBuilder) -> Result<TxnResponse, StoreError> {
        let mut c = self.client.clone();
        let txn = Txn::new()
            .when(
                t.compares
                    .into_iter()
                    .map(|(k, f)| f(self.abs(&k)))
                    .collect::<Vec<_>>(),
            )
            .and_then(
                t.success
                    .into_iter()
                    .map(|op| op.into_op(self))
                    .collect::<Vec<_>>(),
            )
            .or_else(
                t.failure
                    .into_iter()
                    .map(|op| op.into_op(self))
                    .collect::<Vec<_>>(),
            );
        self.unary("txn", c.txn(txn)).await
    }

    /// Watch every key under a relative prefix from `start_revision` (inclusive).
    pub async fn watch(
        &self,
        rel_prefix: &str,
        start_revision: i64,
    ) -> Result<WatchStream, StoreError> {
        let mut c = self.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision)
            .with_prev_key();
        self.bounded("watch", c.watch(self.abs(rel_prefix), Some(opts)))
            .await
    }

    /// Grant a lease with the given TTL; returns its id.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let secs = ttl.as_secs().max(1) as i64;
        let r = self
            .bounded("lease_grant", c.lease_grant(secs, None))
            .await?;
        Ok(r.id())
    }

    /// Open a keep-alive stream for a lease. The first refresh happens here; an expired
    /// lease is reported as `Ok(None)`.
    pub async fn lease_keep_alive(
        &self,
        id: i64,
    ) -> Result<Option<(LeaseKeeper, LeaseKeepAliveStream)>, StoreError> {
        let mut c = self.client.clone();
        match self
            .bounded("lease_keep_alive", c.lease_keep_alive(id))
            .await
        {
            Ok(x) => Ok(Some(x)),
            // etcd-client reports an expired lease on the first answer this way.
            Err(StoreError::Request { message, .. }) if message.contains("lease not found") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Remaining TTL of a lease in seconds; 0 or less when it no longer exists.
    pub async fn lease_ttl(&self, id: i64) -> Result<i64, StoreError> {
        let mut c = self.client.clone();
        let r = self
            .bounded("lease_time_to_live", c.lease_time_to_live(id, None))
            .await?;
        Ok(r.ttl())
    }

    /// Revoke a lease: every key bound to it disappears at once.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        match self.bounded("lease_revoke", c.lease_revoke(id)).await {
            Ok(_) => Ok(()),
            Err(StoreError::Request { message, .. }) if message.contains("lease not found") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Compact the store history up to `revision` (tests and maintenance).
    pub async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        self.bounded("compact", c.compact(revision, None)).await?;
        Ok(())
    }

    /// The raw client, for APIs this layer does not wrap (election).
    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

type CompareFn = Box<dyn FnOnce(String) -> Compare + Send>;

/// An operation inside a transaction, with a relative key.
#[derive(Debug, Clone)]
pub enum Op {
    /// Put a value, optionally bound to a lease.
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<i64>,
    },
    /// Delete a key.
    Delete { key: String },
    /// Read a key.
    Get { key: String },
}

impl Op {
    fn into_op(self, store: &Store) -> TxnOp {
        match self {
            Op::Put { key, value, lease } => TxnOp::put(
                store.abs(&key),
                value,
                lease.map(|l| PutOptions::new().with_lease(l)),
            ),
            Op::Delete { key } => TxnOp::delete(store.abs(&key), None),
            Op::Get { key } => TxnOp::get(store.abs(&key), None),
        }
    }
}

/// Builder of a transaction on relative keys: compares, then the ops on success and failure.
#[derive(Default)]
pub struct TxnBuilder {
    compares: Vec<(String, CompareFn)>,
    success: Vec<Op>,
    failure: Vec<Op>,
}

impl TxnBuilder {
    /// An empty transaction (no compare: always succeeds).
    pub fn new() -> Self {
        Self::default()
    }

    /// Require that `key` does not exist.
    pub fn absent(mut self, key: &str) -> Self {
        self.compares.push((
            key.to_string(),
            Box::new(|k| Compare::create_revision(k, CompareOp::Equal, 0)),
        ));
        self
    }

    /// Require that `key` exists.
    pub fn present(mut self, key: &str) -> Self {
        self.compares.push((
            key.to_string(),
            Box::new(|k| Compare::create_revision(k, CompareOp::Greater, 0)),
        ));
        self
    }

    /// Require that `key` is bound to `lease`.
    pub fn lease_is(mut self, key: &str, lease: i64) -> Self {
        self.compares.push((
            key.to_string(),
            Box::new(move |k| Compare::lease(k, CompareOp::Equal, lease)),
        ));
        self
    }

    /// Require that `key` was last modified at `rev` (compare-and-swap).
    pub fn mod_revision_is(mut self, key: &str, rev: i64) -> Self {
        self.compares.push((
            key.to_string(),
            Box::new(move |k| Compare::mod_revision(k, CompareOp::Equal, rev)),
        ));
        self
    }

    /// Require that `key` holds `value`.
    pub fn value_is(mut self, key: &str, value: impl Into<Vec<u8>>) -> Self {
        let v = value.into();
        self.compares.push((
            key.to_string(),
            Box::new(move |k| Compare::value(k, CompareOp::Equal, v)),
        ));
        self
    }

    /// Require that `key` holds something other than `value` (etcd fails a value compare
    /// on an absent key).
    pub fn value_is_not(mut self, key: &str, value: impl Into<Vec<u8>>) -> Self {
        let v = value.into();
        self.compares.push((
            key.to_string(),
            Box::new(move |k| Compare::value(k, CompareOp::NotEqual, v)),
        ));
        self
    }

    /// On success, put `value` at `key`.
    pub fn put(mut self, key: &str, value: impl Into<Vec<u8>>) -> Self {
        self.success.push(Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        });
        self
    }

    /// On success, put `value` at `key` bound to `lease`.
    pub fn put_leased(mut self, key: &str, value: impl Into<Vec<u8>>, lease: i64) -> Self {
        self.success.push(Op::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        });
        self
    }

    /// On success, delete `key`.
    pub fn delete(mut self, key: &str) -> Self {
        self.success.push(Op::Delete { key: key.into() });
        self
    }

    /// On failure, read `key` (to learn why the compare failed).
    pub fn or_get(mut self, key: &str) -> Self {
        self.failure.push(Op::Get { key: key.into() });
        self
    }

    /// Number of write operations on success (for write accounting).
    pub fn writes(&self) -> usize {
        self.success
            .iter()
            .filter(|o| !matches!(o, Op::Get { .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_names_fall_into_the_closed_set() {
        let m = StoreMetrics::default();
        for op in [
            "get",
            "probe",
            "list",
            "txn",
            "lease_grant",
            "lease_keep_alive",
            "compact",
            "connect",
        ] {
            m.request_failed(op);
        }
        let errors: std::collections::HashMap<_, _> = m.request_errors().into_iter().collect();
        assert_eq!(errors.len(), REQUEST_OPS.len());
        assert_eq!(errors["get"], 2);
        assert_eq!(errors["list"], 1);
        assert_eq!(errors["lease"], 2);
        assert_eq!(errors["other"], 2);
        assert_eq!(errors["put"], 0);
    }
}
