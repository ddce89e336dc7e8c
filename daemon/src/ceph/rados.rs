//! The Ceph client in-process: mon and mgr commands over librados — the same JSON commands
//! the `ceph` tool sends (`{"prefix": "osd tree", "format": "json"}`) and the same JSON
//! back — and the state collection's per-pool listing over librbd (the rows of `rbd ls -l`
//! and `rbd du` in one pass). Without it, every query is a process with its own mon session:
//! a Python `ceph` costs ≈0.3–0.5 s of CPU, an `rbd` opens every image of the pool again.
//!
//! librados and librbd are loaded at run time (`dlopen` of `librados.so.2` and `librbd.so.1`,
//! the `librados2`/`librbd1` packages `ceph-common` depends on): the build needs no Ceph
//! headers or `-dev` package, and a node without the libraries still runs — [`Rados::load`]
//! gives `None` (or [`Rados::has_rbd`] is false) and the driver keeps using the tools (logged
//! once). One connected handle is kept and shared by every call (a librados cluster handle is
//! thread-safe); it is dropped and made again after a mon command's timeout or a lost
//! connection (not after one slow OSD op: see [`Side`]). Every
//! call runs on a blocking thread, bounded by librados's own timeouts (`rados_mon_op_timeout`,
//! `rados_osd_op_timeout`, `client_mount_timeout`, set to the driver's timeout) and by a tokio
//! timeout on top. Only read-only calls go this way; changes stay with the tools.
//!
//! The pool listing skips images that did not change since the last one (see
//! [`ListingCache`]): opening an image is most of a collection's CPU.
//!
//! The cephx identity is the CLI's: the same `ceph.conf`, client name and keyring *path*
//! (the key itself is only ever read by librados; nothing secret is logged).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::error::CephError;
use super::types::{
    ImageListEntry, ImageParent, ImageState, ImageUsage, PoolImages, UnreadableImage,
};

/// `rados_t`.
type Handle = *mut c_void;

type CreateFn = unsafe extern "C" fn(*mut Handle, *const c_char, *const c_char, u64) -> c_int;
type ConfReadFileFn = unsafe extern "C" fn(Handle, *const c_char) -> c_int;
type ConfSetFn = unsafe extern "C" fn(Handle, *const c_char, *const c_char) -> c_int;
type ConnectFn = unsafe extern "C" fn(Handle) -> c_int;
/// `rados_mon_command`.
type CommandFn = unsafe extern "C" fn(
    Handle,
    *mut *const c_char,
    usize,
    *const c_char,
    usize,
    *mut *mut c_char,
    *mut usize,
    *mut *mut c_char,
    *mut usize,
) -> c_int;
type BufferFreeFn = unsafe extern "C" fn(*mut c_char);
type ShutdownFn = unsafe extern "C" fn(Handle);

/// The librados functions used, resolved once; the library stays loaded for the process.
struct Api {
    create2: CreateFn,
    conf_read_file: ConfReadFileFn,
    conf_set: ConfSetFn,
    connect: ConnectFn,
    mon_command: CommandFn,
    buffer_free: BufferFreeFn,
    shutdown: ShutdownFn,
    /// Keeps the function pointers above valid.
    _lib: libloading::Library,
}

/// The shared object loaded (the SONAME of Ceph's stable C API).
const LIBRARY: &str = "librados.so.2";

impl Api {
    fn load() -> Result<Api, String> {
        // SAFETY: loading librados runs its static constructors, which only initialise
        // the library's own globals.
        let lib =
            unsafe { libloading::Library::new(LIBRARY) }.map_err(|e| format!("{LIBRARY}: {e}"))?;
        // SAFETY (each symbol): the types are those of librados.h, stable since Ceph 12; the
        // pointers are copied out while `lib` is kept in the same struct.
        macro_rules! sym {
            ($name:literal, $ty:ty) => {
                *unsafe { lib.get::<$ty>(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("{LIBRARY}: {}: {e}", $name))?
            };
        }
        Ok(Api {
            create2: sym!("rados_create2", CreateFn),
            conf_read_file: sym!("rados_conf_read_file", ConfReadFileFn),
            conf_set: sym!("rados_conf_set", ConfSetFn),
            connect: sym!("rados_connect", ConnectFn),
            mon_command: sym!("rados_mon_command", CommandFn),
            buffer_free: sym!("rados_buffer_free", BufferFreeFn),
            shutdown: sym!("rados_shutdown", ShutdownFn),
            _lib: lib,
        })
    }

    /// The process-wide library, loaded on first use; the load error otherwise (logged once).
    fn get() -> Result<&'static Api, &'static str> {
        static API: OnceLock<Result<Api, String>> = OnceLock::new();
        API.get_or_init(|| {
            let r = Api::load();
            match &r {
                Ok(_) => tracing::info!(library = LIBRARY, "ceph: mon commands in-process over librados"),
                Err(e) => tracing::warn!(error = %e, "ceph: librados not loadable; mon commands run the `ceph` tool"),
            }
            r
        })
        .as_ref()
        .map_err(String::as_str)
    }
}

/// One connected librados handle.
struct Conn {
    api: &'static Api,
    handle: Handle,
}

// SAFETY: a connected `rados_t` may be used from several threads at once (librados's
// documented thread-safety for the cluster handle); it is shut down once, on drop.
unsafe impl Send for Conn {}
unsafe impl Sync for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create2 and is not used after this.
        unsafe { (self.api.shutdown)(self.handle) }
    }
}

/// What an FFI step failed with: the function, the errno (positive) and the status text.
#[derive(Debug, Clone)]
struct FfiError {
    what: String,
    errno: i32,
    outs: String,
}

impl FfiError {
    /// `what: status text` (the errno's text when librados gave none).
    fn message(&self) -> String {
        let msg = if self.outs.is_empty() {
            strerror(self.errno)
        } else {
            self.outs.clone()
        };
        if self.what.is_empty() {
            msg
        } else {
            format!("{}: {msg}", self.what)
        }
    }
}

impl Conn {
    /// Create, configure and connect a handle (blocking; bounded by `client_mount_timeout`).
    fn connect(api: &'static Api, cfg: &MonConfig) -> Result<Conn, FfiError> {
        let fail = |what: &str, r: c_int| FfiError {
            what: what.to_owned(),
            errno: -r,
            outs: String::new(),
        };
        let c = |s: &str, what: &str| {
            CString::new(s).map_err(|_| FfiError {
                what: format!("{what}: contains NUL"),
                errno: libc::EINVAL,
                outs: String::new(),
            })
        };
        let name = c(&format!("client.{}", cfg.client), "client name")?;
        let cluster = c("ceph", "cluster name")?;
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: valid out pointer and NUL-terminated strings.
        let r = unsafe { (api.create2)(&mut handle, cluster.as_ptr(), name.as_ptr(), 0) };
        if r < 0 {
            return Err(fail("rados_create2", r));
        }
        // From here the handle is shut down on every return path.
        let conn = Conn { api, handle };
        let conf = c(&cfg.conf.to_string_lossy(), "conf path")?;
        // SAFETY: created handle, NUL-terminated path.
        let r = unsafe { (api.conf_read_file)(handle, conf.as_ptr()) };
        if r < 0 {
            return Err(fail(
                &format!("rados_conf_read_file {}", cfg.conf.display()),
                r,
            ));
        }
        let secs = cfg.timeout.as_secs().max(1).to_string();
        let mut opts: Vec<(&str, String)> = vec![
            ("rados_mon_op_timeout", secs.clone()),
            ("rados_osd_op_timeout", secs.clone()),
            ("client_mount_timeout", secs),
        ];
        if let Some(k) = &cfg.keyring {
            opts.push(("keyring", k.to_string_lossy().into_owned()));
        }
        for (opt, value) in opts {
            let (o, v) = (c(opt, opt)?, c(&value, opt)?);
            // SAFETY: created, unconnected handle; NUL-terminated strings.
            let r = unsafe { (api.conf_set)(handle, o.as_ptr(), v.as_ptr()) };
            if r < 0 {
                return Err(fail(&format!("rados_conf_set {opt}"), r));
            }
        }
        // SAFETY: configured handle.
        let r = unsafe { (api.connect)(handle) };
        if r < 0 {
            return Err(fail("rados_connect", r));
        }
        Ok(conn)
    }

    /// Run one JSON command through the mons; the output buffer on success (blocking).
    ///
    /// Commands the mgr answers (`osd df`) go through the mons too, which forward them:
    /// `rados_mgr_command` waits on stack-held state with `rados_mon_op_timeout`, and a
    /// reply arriving after that timeout is written into the returned frame (pacific's
    /// `RadosClient::mgr_command`); the mon client cancels a timed-out request first.
    fn command(&self, json: &str) -> Result<Vec<u8>, FfiError> {
        let cmd = CString::new(json).map_err(|_| FfiError {
            what: "command contains NUL".into(),
            errno: libc::EINVAL,
            outs: String::new(),
        })?;
        let mut cmds = [cmd.as_ptr()];
        let (mut outbuf, mut outbuf_len) = (std::ptr::null_mut::<c_char>(), 0usize);
        let (mut outs, mut outs_len) = (std::ptr::null_mut::<c_char>(), 0usize);
        let f = self.api.mon_command;
        // SAFETY: connected handle; one NUL-terminated command; no input buffer; the out
        // pointers are valid and filled by librados (possibly null), freed below.
        let r = unsafe {
            f(
                self.handle,
                cmds.as_mut_ptr(),
                1,
                std::ptr::null(),
                0,
                &mut outbuf,
                &mut outbuf_len,
                &mut outs,
                &mut outs_len,
            )
        };
        // SAFETY: librados allocated the buffers with `outbuf_len`/`outs_len` bytes; each is
        // copied, then released with rados_buffer_free exactly once.
        let take = |p: *mut c_char, len: usize| -> Vec<u8> {
            if p.is_null() {
                return Vec::new();
            }
            let v = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }.to_vec();
            unsafe { (self.api.buffer_free)(p) };
            v
        };
        let out = take(outbuf, outbuf_len);
        let status = take(outs, outs_len);
        if r < 0 {
            return Err(FfiError {
                what: String::new(),
                errno: -r,
                outs: String::from_utf8_lossy(&status).trim().to_owned(),
            });
        }
        Ok(out)
    }
}

/// Where and as whom to connect (the `ceph:` config the CLI uses too).
#[derive(Debug, Clone)]
struct MonConfig {
    conf: PathBuf,
    client: String,
    keyring: Option<PathBuf>,
    timeout: Duration,
}

/// Mon/mgr JSON commands over one shared, lazily connected librados handle (see the module
/// docs). Cheap to share (`Arc`).
pub struct Rados {
    cfg: MonConfig,
    api: &'static Api,
    /// librbd, for [`Rados::pool_images`] (`None`: not loadable).
    rbd: Option<&'static RbdApi>,
    conn: Mutex<Slot>,
    /// Per pool: the images of its last listing that may be served again unread.
    listing: Mutex<HashMap<String, ListingCache>>,
}

/// The shared handle, or when and how the last connect failed.
#[derive(Default)]
struct Slot {
    conn: Option<Arc<Conn>>,
    failed: Option<(Instant, FfiError)>,
}

/// Callers that waited for a connect that failed this recently get its error instead of
/// trying again one after the other (during an outage each would wait its full timeout,
/// and blocking threads would pile up from one collection to the next).
const FAILED_CONNECT_REUSE: Duration = Duration::from_secs(2);

impl std::fmt::Debug for Rados {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rados")
            .field("cfg", &self.cfg)
            .field(
                "connected",
                &self.conn.lock().is_ok_and(|c| c.conn.is_some()),
            )
            .finish()
    }
}

impl Rados {
    /// A client of the cluster `conf` describes, as `client.<client>` with `keyring`, each
    /// call bounded by `timeout`; `None` when librados cannot be loaded (the reason is
    /// logged once per process). Nothing connects until the first command.
    pub fn load(
        conf: &Path,
        client: &str,
        keyring: Option<&Path>,
        timeout: Duration,
    ) -> Option<Rados> {
        let api = Api::get().ok()?;
        Some(Rados {
            cfg: MonConfig {
                conf: conf.to_path_buf(),
                client: client.to_owned(),
                keyring: keyring.map(Path::to_path_buf),
                timeout,
            },
            api,
            rbd: RbdApi::get().ok(),
            conn: Mutex::new(Slot::default()),
            listing: Mutex::new(HashMap::new()),
        })
    }

    /// The connected handle, connecting first if there is none (blocking).
    fn conn(&self) -> Result<Arc<Conn>, FfiError> {
        // A poisoned lock only means another caller panicked while holding it: the slot is
        // still an Option to check.
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.conn.as_ref() {
            return Ok(c.clone());
        }
        if let Some((at, e)) = &slot.failed {
            if at.elapsed() < FAILED_CONNECT_REUSE {
                return Err(e.clone());
            }
        }
        let t = Instant::now();
        match Conn::connect(self.api, &self.cfg) {
            Ok(c) => {
                tracing::debug!(client = %self.cfg.client, ms = t.elapsed().as_millis() as u64, "ceph: librados connected");
                let c = Arc::new(c);
                *slot = Slot {
                    conn: Some(c.clone()),
                    failed: None,
                };
                Ok(c)
            }
            Err(e) => {
                slot.failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Forget the handle `used` (after a timeout or a lost connection) so that the next call
    /// connects anew — unless the shared handle is another one by now: a call that failed
    /// late must not drop a newer handle another call made meanwhile.
    fn reset_if(&self, used: &Arc<Conn>) {
        let old = {
            let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            take_if_same(&mut slot.conn, used)
        };
        // Shut down outside the lock, on this blocking thread (may take a moment); the
        // handle lives on while calls still hold it.
        drop(old);
    }

    /// Run the JSON command `json` (through the mons, which forward what the mgr answers);
    /// `command` (`ceph osd tree`) and `object` name it in errors and logs. The output
    /// buffer (JSON for `"format": "json"`).
    pub async fn command(
        self: &Arc<Self>,
        json: String,
        command: &str,
        object: &str,
    ) -> Result<Vec<u8>, CephError> {
        self.blocking(Side::Mon, command, object, move |conn| conn.command(&json))
            .await
    }

    /// Whether [`Rados::pool_images`] can run (librbd loaded too).
    pub fn has_rbd(&self) -> bool {
        self.rbd.is_some()
    }

    /// librbd's functions, or an error naming `command` and `object` when it is not loaded.
    fn rbd_api(&self, command: &str, object: &str) -> Result<&'static RbdApi, CephError> {
        self.rbd.ok_or_else(|| CephError::Failed {
            command: command.to_owned(),
            object: object.to_owned(),
            code: None,
            stderr: format!("{RBD_LIBRARY} not loaded"),
        })
    }

    /// Every image head and user snapshot of `pool` with size, parent and protection (the
    /// rows of `rbd ls -l`) and their usage (the rows of `rbd du`: bytes in whole objects
    /// that changed since the previous snapshot), in one pass over the pool in-process.
    pub async fn pool_images(
        self: &Arc<Self>,
        pool: &str,
        command: &str,
        object: &str,
    ) -> Result<PoolImages, CephError> {
        let api = self.rbd_api(command, object)?;
        let pool = pool.to_owned();
        let me = self.clone();
        self.blocking(Side::Osd, command, object, move |conn| {
            // Taken out for the pass and put back after it: a pass that fails or is still
            // running when the next starts makes that one read every image again.
            let lock = || me.listing.lock().unwrap_or_else(|p| p.into_inner());
            let before = lock().remove(&pool).unwrap_or_default();
            let (images, after) = list_pool(api, conn, &pool, before)?;
            lock().insert(pool, after);
            Ok(images)
        })
        .await
    }

    /// Image `image` of `pool`: its size and user snapshots with their protection, read
    /// in-process (`None`: the pool or the image does not exist).
    pub async fn image_state(
        self: &Arc<Self>,
        pool: &str,
        image: &str,
        command: &str,
        object: &str,
    ) -> Result<Option<ImageState>, CephError> {
        let api = self.rbd_api(command, object)?;
        let (pool, image) = (pool.to_owned(), image.to_owned());
        self.blocking(Side::Osd, command, object, move |conn| {
            let p = match Pool::open(api, conn, &pool) {
                Ok(p) => p,
                Err(e) if e.errno == libc::ENOENT => return Ok(None),
                Err(e) => return Err(e),
            };
            let Some(img) = p.image(&image)? else {
                return Ok(None);
            };
            Ok(Some(ImageState {
                size: img.size()?,
                snapshots: img
                    .snaps()?
                    .into_iter()
                    .map(|s| (s.name, s.protected))
                    .collect(),
            }))
        })
        .await
    }

    /// Run `f` with the connected handle on a blocking thread, bounded by the timeout;
    /// errors become [`CephError`]s naming `command` and `object`. Whether a failure resets
    /// the shared handle depends on the `side` `f` talks to (see [`resets_handle`]).
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        side: Side,
        command: &str,
        object: &str,
        f: impl FnOnce(&Conn) -> Result<T, FfiError> + Send + 'static,
    ) -> Result<T, CephError> {
        let timeout = self.cfg.timeout;
        let me = self.clone();
        let started = Instant::now();
        // The handle the call got, for a reset after the timeout below (weak: the call
        // alone keeps it alive).
        let used: Arc<OnceLock<Weak<Conn>>> = Arc::new(OnceLock::new());
        let used_by_call = used.clone();
        let task = tokio::task::spawn_blocking(move || {
            let conn = me.conn()?;
            let _ = used_by_call.set(Arc::downgrade(&conn));
            let r = f(&conn);
            if let Err(e) = &r {
                if resets_handle(side, Some(e.errno)) {
                    me.reset_if(&conn);
                }
            }
            r
        });
        // librados's own timeouts end the call; this one only guards against a library that
        // ignores them (the blocking thread is then left to finish on its own).
        let joined = match tokio::time::timeout(timeout + Duration::from_secs(5), task).await {
            Ok(j) => j,
            Err(_) => {
                if resets_handle(side, None) {
                    self.reset_detached(used);
                }
                return Err(CephError::Timeout {
                    command: command.to_owned(),
                    object: object.to_owned(),
                    timeout,
                });
            }
        };
        let r = joined.map_err(|e| CephError::Failed {
            command: command.to_owned(),
            object: object.to_owned(),
            code: None,
            stderr: format!("librados call panicked or was cancelled: {e}"),
        })?;
        tracing::debug!(
            command,
            object,
            ms = started.elapsed().as_millis() as u64,
            ok = r.is_ok(),
            via = "librados",
            "ceph call"
        );
        r.map_err(|e| {
            if e.errno == libc::ETIMEDOUT {
                return CephError::Timeout {
                    command: command.to_owned(),
                    object: object.to_owned(),
                    timeout,
                };
            }
            CephError::Failed {
                command: command.to_owned(),
                object: object.to_owned(),
                code: Some(e.errno),
                stderr: e.message(),
            }
        })
    }

    /// [`Rados::reset_if`] the handle a timed-out call `used` (if it got one), on a
    /// blocking thread (shutting a handle down can block).
    fn reset_detached(self: &Arc<Self>, used: Arc<OnceLock<Weak<Conn>>>) {
        let me = self.clone();
        drop(tokio::task::spawn_blocking(move || {
            // Gone already: the call ended and no slot holds it, nothing to reset.
            if let Some(conn) = used.get().and_then(Weak::upgrade) {
                me.reset_if(&conn);
            }
        }));
    }
}

/// Take the value out of `slot` if it is `used` itself (the same allocation), leaving a
/// different one — made after `used` was handed out — in place.
fn take_if_same<T>(slot: &mut Option<Arc<T>>, used: &Arc<T>) -> Option<Arc<T>> {
    if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, used)) {
        slot.take()
    } else {
        None
    }
}

/// Which daemons a call talks to: what its failure says about the shared handle.
///
/// A mon command that times out means the mon session is stuck; a new handle hunts for a
/// mon again. An OSD op (the pool listing: `rbd_list`, image headers, object maps) that
/// times out means one OSD or PG is slow: a new handle would meet the same OSD, and
/// reconnecting costs a new mon session and authentication while the mons answer fine —
/// the mon commands of the same collection, on the same handle, notice a handle that is
/// really dead. A lost connection (`ENOTCONN`, `ESHUTDOWN`, …) resets from either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Mon (and mgr, through the mons) commands.
    Mon,
    /// Reads from OSDs (the librbd pool listing).
    Osd,
}

/// Whether a call to `side` that failed with `errno` (`None`: it ran past the outer tokio
/// timeout) makes the shared handle untrustworthy, so that the next call reconnects.
fn resets_handle(side: Side, errno: Option<i32>) -> bool {
    match (side, errno) {
        (Side::Mon, None) => true,
        (Side::Mon, Some(e)) => is_connection_errno(e),
        (Side::Osd, None) => false,
        (Side::Osd, Some(e)) => e != libc::ETIMEDOUT && is_connection_errno(e),
    }
}

/// The images of one pool's last listing that can be served again without opening them,
/// by image id.
///
/// An image is served from here while its header object (`rbd_header.<id>`: size,
/// snapshots, protection, features, flags, parent) and its head object map
/// (`rbd_object_map.<id>`) have the RADOS object versions they had before it was read
/// (stamped before the read: a change during it reads again next time). `used` comes from
/// the object maps (fast-diff, whole objects, as `rbd du`): a write to a new object updates
/// the head map on disk before the data, a snapshot or resize the header, and the
/// snapshots' maps do not change while the header does not. So only images with a valid
/// fast-diff are kept, and no clones (renaming the parent does not touch the child's
/// header). Every [`FULL_READ_EVERY`]th listing reads an image in full anyway.
#[derive(Default)]
struct ListingCache(HashMap<String, CachedImage>);

/// One image of [`ListingCache`].
struct CachedImage {
    /// Versions of the header and the head object map before the read.
    stamp: (u64, u64),
    rows: ImageRows,
    /// Listings served from the cache since the read.
    served: u32,
}

/// An image is read in full at least every this many listings, even when unchanged.
const FULL_READ_EVERY: u32 = 10;

/// Where image `id`, new to the cache, starts counting towards its next full read:
/// `0..FULL_READ_EVERY - 1`, spread by id (its first full read comes sooner, never later,
/// and it is served at least once before).
fn stagger(id: &str) -> u32 {
    id.bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
        % (FULL_READ_EVERY - 1)
}

/// `RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF`.
const FAST_DIFF_FEATURES: u64 = (1 << 3) | (1 << 4);
/// `RBD_FLAG_OBJECT_MAP_INVALID | RBD_FLAG_FAST_DIFF_INVALID`.
const FAST_DIFF_INVALID: u64 = (1 << 0) | (1 << 1);

impl ListingCache {
    /// The rows of image `id` if it is unchanged since stamped `stamp` and not due for a
    /// full read, renamed to `name`; it is moved into `next` then.
    fn serve(
        &mut self,
        next: &mut ListingCache,
        id: &str,
        name: &str,
        stamp: (u64, u64),
    ) -> Option<ImageRows> {
        let c = self.0.remove(id)?;
        if c.stamp != stamp || c.served + 1 >= FULL_READ_EVERY {
            return None;
        }
        let (mut rows, mut usage) = c.rows.clone();
        rows.iter_mut().for_each(|r| r.image = name.to_owned());
        usage.iter_mut().for_each(|u| u.name = name.to_owned());
        next.0.insert(
            id.to_owned(),
            CachedImage {
                served: c.served + 1,
                ..c
            },
        );
        Some((rows, usage))
    }
}

/// One pass over `pool`: see [`Rados::pool_images`]; images unchanged since `before` are
/// not opened (see [`ListingCache`]), the cache for the next pass is returned. An image
/// that fails to read is reported in [`PoolImages::unreadable`] and the pass goes on,
/// unless the error concerns the connection or is a timeout (every following image would
/// wait as long: the pool fails as a whole).
fn list_pool(
    api: &'static RbdApi,
    conn: &Conn,
    pool: &str,
    mut before: ListingCache,
) -> Result<(PoolImages, ListingCache), FfiError> {
    let p = Pool::open(api, conn, pool)?;
    let mut out = PoolImages::default();
    let mut next = ListingCache::default();
    for (id, name) in p.specs()? {
        // Format 1 images (no id) and objects that cannot be stat'ed are read in full.
        let stamp = (!id.is_empty()).then(|| p.stamp(&id)).flatten();
        let known = before.0.contains_key(&id);
        if let Some(rows) = stamp.and_then(|st| before.serve(&mut next, &id, &name, st)) {
            out.rows.extend(rows.0);
            out.usage.extend(rows.1);
            continue;
        }
        match read_image(&p, &name) {
            Ok(Some(((rows, usage), cacheable))) => {
                if let (true, Some(stamp)) = (cacheable, stamp) {
                    let rows = (rows.clone(), usage.clone());
                    // Images new to the cache (all of them at the first listing) come
                    // due at different listings: about a tenth is read in full each time.
                    let served = if known { 0 } else { stagger(&id) };
                    next.0.insert(
                        id,
                        CachedImage {
                            stamp,
                            rows,
                            served,
                        },
                    );
                }
                out.rows.extend(rows);
                out.usage.extend(usage);
            }
            // Removed since the listing: skipped, as `rbd ls -l` does.
            Ok(None) => {}
            Err(e) if is_connection_errno(e.errno) => return Err(e),
            Err(e) => out.unreadable.push(UnreadableImage {
                image: name,
                error: e.message(),
            }),
        }
    }
    Ok((out, next))
}

/// The rows of one image: its head and snapshots (`rbd ls -l`) and their usage (`rbd du`).
type ImageRows = (Vec<ImageListEntry>, Vec<ImageUsage>);

/// The rows of image `name`, and whether they may be cached (see [`ListingCache`]); `None`
/// when it is gone (removed since the listing).
fn read_image(p: &Pool<'_>, name: &str) -> Result<Option<(ImageRows, bool)>, FfiError> {
    let Some(img) = p.image(name)? else {
        return Ok(None);
    };
    let (mut rows, mut du) = (Vec::new(), Vec::new());
    let size = img.size()?;
    let parent = img.parent()?.map(|(pool, image, snapshot)| ImageParent {
        pool,
        image,
        snapshot,
    });
    // The head's features and flags (before any rbd_snap_set).
    let (features, flags) = img.features_and_flags()?;
    let cacheable = parent.is_none()
        && features & FAST_DIFF_FEATURES == FAST_DIFF_FEATURES
        && flags & FAST_DIFF_INVALID == 0;
    rows.push(ImageListEntry {
        image: name.to_owned(),
        snapshot: None,
        size,
        parent,
        protected: false,
    });
    let snaps = img.snaps()?;
    let mut from: Option<&str> = None;
    for s in &snaps {
        rows.push(ImageListEntry {
            image: name.to_owned(),
            snapshot: Some(s.name.clone()),
            size: s.size,
            parent: None,
            protected: s.protected,
        });
        du.push(ImageUsage {
            name: name.to_owned(),
            snapshot: Some(s.name.clone()),
            provisioned_size: s.size,
            used_size: img.used(Some(&s.name), from, s.size)?,
        });
        from = Some(&s.name);
    }
    du.push(ImageUsage {
        name: name.to_owned(),
        snapshot: None,
        provisioned_size: size,
        used_size: img.used(None, from, size)?,
    });
    Ok(Some(((rows, du), cacheable)))
}

/// Errnos after which the handle is not trusted any more: reconnect on the next call.
fn is_connection_errno(errno: i32) -> bool {
    matches!(
        errno,
        libc::ETIMEDOUT | libc::ENOTCONN | libc::ESHUTDOWN | libc::ECONNREFUSED | libc::EPIPE
    )
}

/// The OS's text of an errno (`No such file or directory (os error 2)`).
fn strerror(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

// ---- librbd: the per-pool listing of the collector ----

/// `rados_ioctx_t`.
type IoCtx = *mut c_void;
/// `rbd_image_t`.
type ImageHandle = *mut c_void;

/// `rbd_snap_info_t`.
#[repr(C)]
struct SnapInfo {
    id: u64,
    size: u64,
    name: *const c_char,
}

/// `rbd_linked_image_spec_t`.
#[repr(C)]
struct LinkedImageSpec {
    pool_id: i64,
    pool_name: *mut c_char,
    pool_namespace: *mut c_char,
    image_id: *mut c_char,
    image_name: *mut c_char,
    trash: bool,
}

/// `rbd_snap_spec_t`.
#[repr(C)]
struct SnapSpec {
    id: u64,
    namespace_type: c_int,
    name: *mut c_char,
}

/// `RBD_SNAP_NAMESPACE_TYPE_USER`: snapshots users made (not trash/mirror/group ones).
const SNAP_NAMESPACE_USER: c_int = 0;

/// `rbd_image_spec_t`.
#[repr(C)]
struct ImageSpec {
    id: *mut c_char,
    name: *mut c_char,
}

type DiffCallback = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;
type StatFn = unsafe extern "C" fn(IoCtx, *const c_char, *mut u64, *mut libc::time_t) -> c_int;
type LastVersionFn = unsafe extern "C" fn(IoCtx) -> u64;
type List2Fn = unsafe extern "C" fn(IoCtx, *mut ImageSpec, *mut usize) -> c_int;
type SpecCleanupFn = unsafe extern "C" fn(*mut ImageSpec, usize);
type GetU64Fn = unsafe extern "C" fn(ImageHandle, *mut u64) -> c_int;

type IoctxCreateFn = unsafe extern "C" fn(Handle, *const c_char, *mut IoCtx) -> c_int;
type IoctxDestroyFn = unsafe extern "C" fn(IoCtx);
type OpenFn = unsafe extern "C" fn(IoCtx, *const c_char, *mut ImageHandle, *const c_char) -> c_int;
type CloseFn = unsafe extern "C" fn(ImageHandle) -> c_int;
type GetSizeFn = unsafe extern "C" fn(ImageHandle, *mut u64) -> c_int;
type GetParentFn = unsafe extern "C" fn(ImageHandle, *mut LinkedImageSpec, *mut SnapSpec) -> c_int;
type LinkedCleanupFn = unsafe extern "C" fn(*mut LinkedImageSpec);
type SnapSpecCleanupFn = unsafe extern "C" fn(*mut SnapSpec);
type SnapListFn = unsafe extern "C" fn(ImageHandle, *mut SnapInfo, *mut c_int) -> c_int;
type SnapListEndFn = unsafe extern "C" fn(*mut SnapInfo);
type SnapNamespaceFn = unsafe extern "C" fn(ImageHandle, u64, *mut c_int) -> c_int;
type SnapProtectedFn = unsafe extern "C" fn(ImageHandle, *const c_char, *mut c_int) -> c_int;
type SnapSetFn = unsafe extern "C" fn(ImageHandle, *const c_char) -> c_int;
type DiffIterateFn = unsafe extern "C" fn(
    ImageHandle,
    *const c_char,
    u64,
    u64,
    u8,
    u8,
    Option<DiffCallback>,
    *mut c_void,
) -> c_int;

/// The librbd (and two librados) functions of the listing, resolved once.
struct RbdApi {
    ioctx_create: IoctxCreateFn,
    ioctx_destroy: IoctxDestroyFn,
    stat: StatFn,
    get_last_version: LastVersionFn,
    list2: List2Fn,
    image_spec_list_cleanup: SpecCleanupFn,
    get_features: GetU64Fn,
    get_flags: GetU64Fn,
    open_read_only: OpenFn,
    close: CloseFn,
    get_size: GetSizeFn,
    get_parent: GetParentFn,
    linked_image_spec_cleanup: LinkedCleanupFn,
    snap_spec_cleanup: SnapSpecCleanupFn,
    snap_list: SnapListFn,
    snap_list_end: SnapListEndFn,
    snap_get_namespace_type: SnapNamespaceFn,
    snap_is_protected: SnapProtectedFn,
    snap_set: SnapSetFn,
    diff_iterate2: DiffIterateFn,
    _rados: libloading::Library,
    _rbd: libloading::Library,
}

/// librbd's SONAME.
const RBD_LIBRARY: &str = "librbd.so.1";

impl RbdApi {
    fn load() -> Result<RbdApi, String> {
        // SAFETY: as in `Api::load` (librbd links the same librados, already loaded).
        let rados =
            unsafe { libloading::Library::new(LIBRARY) }.map_err(|e| format!("{LIBRARY}: {e}"))?;
        let rbd = unsafe { libloading::Library::new(RBD_LIBRARY) }
            .map_err(|e| format!("{RBD_LIBRARY}: {e}"))?;
        // SAFETY (each symbol): types of librados.h/librbd.h (Ceph ≥ 14); the libraries are
        // kept in the same struct.
        macro_rules! sym {
            ($lib:expr, $file:expr, $name:literal, $ty:ty) => {
                *unsafe { $lib.get::<$ty>(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("{}: {}: {e}", $file, $name))?
            };
        }
        Ok(RbdApi {
            ioctx_create: sym!(rados, LIBRARY, "rados_ioctx_create", IoctxCreateFn),
            ioctx_destroy: sym!(rados, LIBRARY, "rados_ioctx_destroy", IoctxDestroyFn),
            stat: sym!(rados, LIBRARY, "rados_stat", StatFn),
            get_last_version: sym!(rados, LIBRARY, "rados_get_last_version", LastVersionFn),
            list2: sym!(rbd, RBD_LIBRARY, "rbd_list2", List2Fn),
            image_spec_list_cleanup: sym!(
                rbd,
                RBD_LIBRARY,
                "rbd_image_spec_list_cleanup",
                SpecCleanupFn
            ),
            get_features: sym!(rbd, RBD_LIBRARY, "rbd_get_features", GetU64Fn),
            get_flags: sym!(rbd, RBD_LIBRARY, "rbd_get_flags", GetU64Fn),
            open_read_only: sym!(rbd, RBD_LIBRARY, "rbd_open_read_only", OpenFn),
            close: sym!(rbd, RBD_LIBRARY, "rbd_close", CloseFn),
            get_size: sym!(rbd, RBD_LIBRARY, "rbd_get_size", GetSizeFn),
            get_parent: sym!(rbd, RBD_LIBRARY, "rbd_get_parent", GetParentFn),
            linked_image_spec_cleanup: sym!(
                rbd,
                RBD_LIBRARY,
                "rbd_linked_image_spec_cleanup",
                LinkedCleanupFn
            ),
            snap_spec_cleanup: sym!(rbd, RBD_LIBRARY, "rbd_snap_spec_cleanup", SnapSpecCleanupFn),
            snap_list: sym!(rbd, RBD_LIBRARY, "rbd_snap_list", SnapListFn),
            snap_list_end: sym!(rbd, RBD_LIBRARY, "rbd_snap_list_end", SnapListEndFn),
            snap_get_namespace_type: sym!(
                rbd,
                RBD_LIBRARY,
                "rbd_snap_get_namespace_type",
                SnapNamespaceFn
            ),
            snap_is_protected: sym!(rbd, RBD_LIBRARY, "rbd_snap_is_protected", SnapProtectedFn),
            snap_set: sym!(rbd, RBD_LIBRARY, "rbd_snap_set", SnapSetFn),
            diff_iterate2: sym!(rbd, RBD_LIBRARY, "rbd_diff_iterate2", DiffIterateFn),
            _rados: rados,
            _rbd: rbd,
        })
    }

    fn get() -> Result<&'static RbdApi, &'static str> {
        static API: OnceLock<Result<RbdApi, String>> = OnceLock::new();
        API.get_or_init(|| {
            let r = RbdApi::load();
            match &r {
                Ok(_) => tracing::info!(library = RBD_LIBRARY, "ceph: RBD listing in-process over librbd"),
                Err(e) => tracing::warn!(error = %e, "ceph: librbd not loadable; RBD listing runs the `rbd` tool"),
            }
            r
        })
        .as_ref()
        .map_err(String::as_str)
    }
}

/// An open pool (`rados_ioctx_t`), destroyed on drop.
struct Pool<'a> {
    api: &'static RbdApi,
    io: IoCtx,
    _conn: &'a Conn,
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create, images opened on it are closed already.
        unsafe { (self.api.ioctx_destroy)(self.io) }
    }
}

/// An image opened read-only, closed on drop.
struct Image<'a> {
    api: &'static RbdApi,
    h: ImageHandle,
    _pool: &'a Pool<'a>,
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open_read_only, closed once.
        unsafe { (self.api.close)(self.h) };
    }
}

fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated string owned by librbd for the call's duration.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

fn check(what: &str, r: c_int) -> Result<c_int, FfiError> {
    if r < 0 {
        return Err(FfiError {
            what: what.to_owned(),
            errno: -r,
            outs: String::new(),
        });
    }
    Ok(r)
}

fn c_name(s: &str) -> Result<CString, FfiError> {
    CString::new(s).map_err(|_| FfiError {
        what: format!("{s:?}: contains NUL"),
        errno: libc::EINVAL,
        outs: String::new(),
    })
}

/// One snapshot as the listing needs it.
struct Snap {
    name: String,
    size: u64,
    protected: bool,
}

impl<'a> Pool<'a> {
    fn open(api: &'static RbdApi, conn: &'a Conn, pool: &str) -> Result<Pool<'a>, FfiError> {
        let name = c_name(pool)?;
        let mut io: IoCtx = std::ptr::null_mut();
        // SAFETY: connected handle, valid out pointer.
        check("rados_ioctx_create", unsafe {
            (api.ioctx_create)(conn.handle, name.as_ptr(), &mut io)
        })?;
        Ok(Pool {
            api,
            io,
            _conn: conn,
        })
    }

    /// Image ids and names (`rbd_list2`, grown on -ERANGE; format 1 images have no id).
    fn specs(&self) -> Result<Vec<(String, String)>, FfiError> {
        let mut max = 64usize;
        loop {
            // SAFETY: zeroed entries (null pointers); librbd fills at most `n` of them and
            // they are freed with rbd_image_spec_list_cleanup.
            let mut buf: Vec<ImageSpec> = (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
            let mut n = max;
            let r = unsafe { (self.api.list2)(self.io, buf.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE && n > max {
                max = n;
                continue;
            }
            check("rbd_list2", r)?;
            let n = n.min(max);
            let out = buf[..n]
                .iter()
                .map(|s| (cstr(s.id), cstr(s.name)))
                .collect();
            unsafe { (self.api.image_spec_list_cleanup)(buf.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// The RADOS version of `object` (`None`: it cannot be stat'ed, e.g. it does not exist).
    fn version(&self, object: &str) -> Option<u64> {
        let o = c_name(object).ok()?;
        let (mut size, mut mtime) = (0u64, 0 as libc::time_t);
        // SAFETY: open ioctx, NUL-terminated name, valid out pointers; the version read
        // back is the one of this stat (the ioctx is used by this thread alone).
        let r = unsafe { (self.api.stat)(self.io, o.as_ptr(), &mut size, &mut mtime) };
        (r >= 0).then(|| unsafe { (self.api.get_last_version)(self.io) })
    }

    /// The versions of image `id`'s header and head object map (see [`ListingCache`]).
    fn stamp(&self, id: &str) -> Option<(u64, u64)> {
        Some((
            self.version(&format!("rbd_header.{id}"))?,
            self.version(&format!("rbd_object_map.{id}"))?,
        ))
    }

    /// Open `name` read-only; `None` when it is gone (removed since the listing).
    fn image(&'a self, name: &str) -> Result<Option<Image<'a>>, FfiError> {
        let n = c_name(name)?;
        let mut h: ImageHandle = std::ptr::null_mut();
        // SAFETY: open ioctx, valid name and out pointer; no snapshot.
        let r = unsafe { (self.api.open_read_only)(self.io, n.as_ptr(), &mut h, std::ptr::null()) };
        if r == -libc::ENOENT {
            return Ok(None);
        }
        check("rbd_open_read_only", r)?;
        Ok(Some(Image {
            api: self.api,
            h,
            _pool: self,
        }))
    }
}

impl Image<'_> {
    /// `rbd_get_features` and `rbd_get_flags` of the image as opened (the head).
    fn features_and_flags(&self) -> Result<(u64, u64), FfiError> {
        let (mut features, mut flags) = (0u64, 0u64);
        // SAFETY: open image, valid out pointers.
        check("rbd_get_features", unsafe {
            (self.api.get_features)(self.h, &mut features)
        })?;
        check("rbd_get_flags", unsafe {
            (self.api.get_flags)(self.h, &mut flags)
        })?;
        Ok((features, flags))
    }

    fn size(&self) -> Result<u64, FfiError> {
        let mut s = 0u64;
        // SAFETY: open image, valid out pointer.
        check("rbd_get_size", unsafe {
            (self.api.get_size)(self.h, &mut s)
        })?;
        Ok(s)
    }

    /// The parent of a clone as `(pool, image, snapshot)`.
    fn parent(&self) -> Result<Option<(String, String, String)>, FfiError> {
        // SAFETY: zeroed C structs (null pointers) filled by librbd, cleaned up once each.
        let mut img: LinkedImageSpec = unsafe { std::mem::zeroed() };
        let mut snap: SnapSpec = unsafe { std::mem::zeroed() };
        let r = unsafe { (self.api.get_parent)(self.h, &mut img, &mut snap) };
        if r == -libc::ENOENT {
            return Ok(None);
        }
        check("rbd_get_parent", r)?;
        let p = (cstr(img.pool_name), cstr(img.image_name), cstr(snap.name));
        unsafe {
            (self.api.linked_image_spec_cleanup)(&mut img);
            (self.api.snap_spec_cleanup)(&mut snap);
        }
        Ok(Some(p))
    }

    /// User snapshots in id (creation) order.
    fn snaps(&self) -> Result<Vec<Snap>, FfiError> {
        let mut max: c_int = 16;
        let raw: Vec<(u64, u64, String)> = loop {
            // SAFETY: zeroed entries (null names); librbd fills at most `max` entries,
            // terminated by a null name, freed with rbd_snap_list_end.
            let mut buf: Vec<SnapInfo> = (0..max.max(1))
                .map(|_| unsafe { std::mem::zeroed() })
                .collect();
            let mut n = max;
            let r = unsafe { (self.api.snap_list)(self.h, buf.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE && n > max {
                max = n;
                continue;
            }
            let count = check("rbd_snap_list", r)? as usize;
            let out = buf
                .iter()
                .take(count)
                .map(|s| (s.id, s.size, cstr(s.name)))
                .collect();
            unsafe { (self.api.snap_list_end)(buf.as_mut_ptr()) };
            break out;
        };
        let mut out = Vec::new();
        let mut sorted = raw;
        sorted.sort_by_key(|s| s.0);
        for (id, size, name) in sorted {
            let mut ns: c_int = 0;
            // SAFETY: open image, valid out pointer.
            check("rbd_snap_get_namespace_type", unsafe {
                (self.api.snap_get_namespace_type)(self.h, id, &mut ns)
            })?;
            if ns != SNAP_NAMESPACE_USER {
                continue;
            }
            let n = c_name(&name)?;
            let mut p: c_int = 0;
            // SAFETY: open image, valid name and out pointer.
            check("rbd_snap_is_protected", unsafe {
                (self.api.snap_is_protected)(self.h, n.as_ptr(), &mut p)
            })?;
            out.push(Snap {
                name,
                size,
                protected: p != 0,
            });
        }
        Ok(out)
    }

    /// Bytes allocated in `snap` (`None`: the head) that changed since `from` (`None`: since
    /// creation), counted in whole objects clipped to `size` — what `rbd du` prints.
    fn used(&self, snap: Option<&str>, from: Option<&str>, size: u64) -> Result<u64, FfiError> {
        unsafe extern "C" fn add(_off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            if exists != 0 {
                // SAFETY: `arg` is the `&mut u64` passed below, alive for the call.
                unsafe { *arg.cast::<u64>() += len as u64 };
            }
            0
        }
        let snap_c = snap.map(c_name).transpose()?;
        let from_c = from.map(c_name).transpose()?;
        // SAFETY: open image; a snapshot name or null (the head).
        check("rbd_snap_set", unsafe {
            (self.api.snap_set)(
                self.h,
                snap_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        })?;
        let mut used = 0u64;
        // SAFETY: open image, `from` name or null, callback with its `u64` accumulator.
        check("rbd_diff_iterate2", unsafe {
            (self.api.diff_iterate2)(
                self.h,
                from_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                0,
                size,
                0,
                1,
                Some(add),
                (&mut used as *mut u64).cast(),
            )
        })?;
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_conf_fails_naming_the_command() {
        let Some(r) = Rados::load(
            Path::new("/nonexistent/ceph.conf"),
            "admin",
            None,
            Duration::from_secs(2),
        ) else {
            eprintln!("skipped: {LIBRARY} is not loadable on this host");
            return;
        };
        let r = Arc::new(r);
        for _ in 0..2 {
            // The second call gets the failed connect's error again (within 2 s).
            let e = r
                .command(
                    r#"{"prefix": "status", "format": "json"}"#.into(),
                    "ceph status",
                    "cluster",
                )
                .await
                .expect_err("no conf");
            let msg = e.to_string();
            assert!(
                msg.contains("`ceph status` for cluster")
                    && msg.contains("rados_conf_read_file /nonexistent/ceph.conf"),
                "{msg}"
            );
        }
    }

    #[test]
    fn connection_errors_reconnect() {
        assert!(is_connection_errno(libc::ETIMEDOUT));
        assert!(is_connection_errno(libc::ENOTCONN));
        assert!(!is_connection_errno(libc::ENOENT));
        assert!(!is_connection_errno(libc::EINVAL));
    }

    #[test]
    fn a_slow_osd_op_keeps_the_handle() {
        // Mon commands: a timeout (librados's or the outer one) or a lost connection.
        assert!(resets_handle(Side::Mon, Some(libc::ETIMEDOUT)));
        assert!(resets_handle(Side::Mon, Some(libc::ENOTCONN)));
        assert!(resets_handle(Side::Mon, None));
        assert!(!resets_handle(Side::Mon, Some(libc::ENOENT)));
        // OSD ops: only a lost connection.
        assert!(!resets_handle(Side::Osd, Some(libc::ETIMEDOUT)));
        assert!(!resets_handle(Side::Osd, None));
        assert!(resets_handle(Side::Osd, Some(libc::ENOTCONN)));
        assert!(resets_handle(Side::Osd, Some(libc::ESHUTDOWN)));
        assert!(!resets_handle(Side::Osd, Some(libc::EIO)));
    }

    #[test]
    fn an_unchanged_image_is_served_until_its_full_read_is_due() {
        let rows = |name: &str| -> ImageRows {
            (
                vec![ImageListEntry {
                    image: name.into(),
                    snapshot: None,
                    size: 1,
                    parent: None,
                    protected: false,
                }],
                vec![ImageUsage {
                    name: name.into(),
                    snapshot: None,
                    provisioned_size: 1,
                    used_size: 1,
                }],
            )
        };
        let fresh = || {
            let mut c = ListingCache::default();
            c.0.insert(
                "id1".into(),
                CachedImage {
                    stamp: (5, 7),
                    rows: rows("a"),
                    served: 0,
                },
            );
            c
        };
        // Another header or object map version: read again (and dropped from the cache).
        for changed in [(6, 7), (5, 8)] {
            let mut next = ListingCache::default();
            assert!(fresh().serve(&mut next, "id1", "a", changed).is_none());
            assert!(next.0.is_empty());
        }
        let mut cache = fresh();
        // Unchanged: served, under its current name, until every FULL_READ_EVERYth listing.
        let mut served = 0;
        loop {
            let mut next = ListingCache::default();
            match cache.serve(&mut next, "id1", "renamed", (5, 7)) {
                Some(r) => assert_eq!(r, rows("renamed")),
                None => break,
            }
            served += 1;
            cache = next;
        }
        assert_eq!(served, FULL_READ_EVERY - 1);
        // Full reads of images read together are spread over the listings.
        let due: std::collections::BTreeSet<u32> = (0..100)
            .map(|i| stagger(&format!("{:x}", 0x1f2e3d4c + i * 7919)))
            .collect();
        assert!(due.len() > FULL_READ_EVERY as usize / 2, "{due:?}");
        assert!(due.iter().all(|d| *d + 1 < FULL_READ_EVERY));
        // Unknown image: read.
        let mut next = ListingCache::default();
        assert!(ListingCache::default()
            .serve(&mut next, "id2", "b", (1, 1))
            .is_none());
    }

    #[test]
    fn a_late_reset_leaves_a_newer_handle() {
        let old = Arc::new("old handle");
        let mut slot = Some(old.clone());
        // The call that used the current handle resets it.
        assert!(take_if_same(&mut slot, &old).is_some_and(|t| Arc::ptr_eq(&t, &old)));
        assert!(slot.is_none());
        // Another call made a new handle meanwhile: a late reset of the old one keeps it.
        let new = Arc::new("old handle");
        slot = Some(new.clone());
        assert!(take_if_same(&mut slot, &old).is_none());
        assert!(slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &new)));
        // Nothing to take.
        let mut empty: Option<Arc<&str>> = None;
        assert!(take_if_same(&mut empty, &old).is_none());
    }
}
