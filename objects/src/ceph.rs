//! The Ceph objects' desired state, written by operators under `ceph/…` and `templates/…`:
//! pools, RBD volumes (with their snapshots as sub-keys, so one reconcile at a time touches a
//! volume) and templates (clone sources). Parsed with errors naming the field; names and
//! sizes validated. The `ceph_plan` module turns "desired vs observed" into driver steps.
//!
//! Key layout (relative to the prefix):
//!
//! | key | writer | value |
//! | --- | --- | --- |
//! | `ceph/pools/<pool>/spec` | operator | [`PoolSpec`] JSON |
//! | `ceph/pools/<pool>/status` | primary | [`CephStatus`] JSON |
//! | `ceph/volumes/<pool>:<image>/spec` | operator | [`VolumeSpec`] JSON |
//! | `ceph/volumes/<pool>:<image>/status` | primary | [`CephStatus`] JSON |
//! | `ceph/volumes/<pool>:<image>/snapshots/<snap>/spec` | operator | [`SnapshotSpec`] JSON |
//! | `ceph/volumes/<pool>:<image>/snapshots/<snap>/status` | primary | [`CephStatus`] JSON |
//! | `templates/<name>` | operator | [`Template`] JSON |
//! | `ceph/health` | primary | health JSON (status, checks), or `{status: unreachable, error, since}` |
//! | `ceph/usage` | primary | cluster usage JSON |
//! | `ceph/observed/pools/<pool>` | primary | pool stats JSON |
//! | `ceph/observed/osds/<id>` | primary | OSD stats JSON (up, in, node, utilisation) |
//! | `ceph/observed/volumes/<pool>:<image>` | primary | size, usage, parent, snapshots |
//!
//! `<pool>:<image>` is one path segment (`:` is not allowed in names), so the generic reactor
//! keys one object per volume. Observed state lives under `ceph/observed/` so that pools and
//! volumes nobody declared are reported without becoming objects in error.

/// Longest pool name accepted.
pub const POOL_NAME_MAX: usize = 63;
/// Longest image or snapshot name accepted.
pub const IMAGE_NAME_MAX: usize = 96;

/// Check a name used as one `ceph`/`rbd` argument: 1–`max` characters of `A-Z a-z 0-9 _ . -`,
/// starting with a letter or digit (so it can never read as an option or contain the `/`
/// and `@` separators of an image spec).
fn check_name(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > max {
        return Err(format!("longer than {max} characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or digit".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{c:?} is not allowed (letters, digits, _ . - only)"
        ));
    }
    Ok(())
}

/// Validate a pool name (see [`check_name`]; at most [`POOL_NAME_MAX`] characters).
pub fn validate_pool_name(name: &str) -> Result<(), String> {
    check_name(name, POOL_NAME_MAX)
}

/// Validate an RBD image name (at most [`IMAGE_NAME_MAX`] characters).
pub fn validate_image_name(name: &str) -> Result<(), String> {
    check_name(name, IMAGE_NAME_MAX)
}

/// Validate a snapshot name (at most [`IMAGE_NAME_MAX`] characters).
pub fn validate_snapshot_name(name: &str) -> Result<(), String> {
    check_name(name, IMAGE_NAME_MAX)
}

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::reactor::{KeyEntry, Kind, ObjectError};

/// Prefix of pool objects.
pub const POOLS_PREFIX: &str = "ceph/pools/";
/// Prefix of volume objects.
pub const VOLUMES_PREFIX: &str = "ceph/volumes/";
/// Prefix of templates.
pub const TEMPLATES_PREFIX: &str = "templates/";
/// Prefix of observed state written by the primary.
pub const OBSERVED_PREFIX: &str = "ceph/observed/";
/// Default placement groups of a new pool.
pub const DEFAULT_PG_NUM: u32 = 32;
/// Default replica count of a new pool.
pub const DEFAULT_POOL_SIZE: u32 = 3;
/// Largest volume accepted (1 PiB).
pub const VOLUME_SIZE_MAX: u64 = 1 << 50;

/// `ceph/pools/<pool>/spec`.
pub fn pool_spec_key(pool: &str) -> String {
    format!("{POOLS_PREFIX}{pool}/spec")
}

/// `ceph/pools/<pool>/status`.
pub fn pool_status_key(pool: &str) -> String {
    format!("{POOLS_PREFIX}{pool}/status")
}

/// The object id of a volume: `<pool>:<image>`.
pub fn volume_id(pool: &str, image: &str) -> String {
    format!("{pool}:{image}")
}

/// `ceph/volumes/<pool>:<image>/spec`.
pub fn volume_spec_key(pool: &str, image: &str) -> String {
    format!("{VOLUMES_PREFIX}{}/spec", volume_id(pool, image))
}

/// `ceph/volumes/<pool>:<image>/status`.
pub fn volume_status_key(pool: &str, image: &str) -> String {
    format!("{VOLUMES_PREFIX}{}/status", volume_id(pool, image))
}

/// `ceph/volumes/<pool>:<image>/snapshots/<snap>/spec`.
pub fn snapshot_spec_key(pool: &str, image: &str, snap: &str) -> String {
    format!(
        "{VOLUMES_PREFIX}{}/snapshots/{snap}/spec",
        volume_id(pool, image)
    )
}

/// `ceph/volumes/<pool>:<image>/snapshots/<snap>/status`.
pub fn snapshot_status_key(pool: &str, image: &str, snap: &str) -> String {
    format!(
        "{VOLUMES_PREFIX}{}/snapshots/{snap}/status",
        volume_id(pool, image)
    )
}

/// `templates/<name>`.
pub fn template_key(name: &str) -> String {
    format!("{TEMPLATES_PREFIX}{name}")
}

/// `ceph/health`.
pub fn health_key() -> String {
    "ceph/health".into()
}

/// `ceph/usage`.
pub fn usage_key() -> String {
    "ceph/usage".into()
}

/// `ceph/observed/pools/<pool>`.
pub fn observed_pool_key(pool: &str) -> String {
    format!("{OBSERVED_PREFIX}pools/{pool}")
}

/// `ceph/observed/osds/<id>`.
pub fn observed_osd_key(id: u32) -> String {
    format!("{OBSERVED_PREFIX}osds/{id}")
}

/// `ceph/observed/volumes/<pool>:<image>`.
pub fn observed_volume_key(pool: &str, image: &str) -> String {
    format!("{OBSERVED_PREFIX}volumes/{}", volume_id(pool, image))
}

/// An automatic snapshot label, `auto-YYYYmmdd-HHMMSS` (UTC).
pub fn auto_snapshot_name(at: time::OffsetDateTime) -> String {
    let t = at.to_offset(time::UtcOffset::UTC);
    format!(
        "auto-{:04}{:02}{:02}-{:02}{:02}{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Parse a size: bytes as a number, or a number with a binary suffix `K`, `M`, `G`, `T`, `P`
/// (optionally followed by `i`/`iB`/`B`): `10G`, `512M`, `1.5G` is refused (whole numbers
/// only). The result must be positive, a multiple of 512 bytes and at most
/// [`VOLUME_SIZE_MAX`].
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("{s:?} is not a size like 10G or 512M"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: {num} is too large"))?;
    let shift = match unit
        .trim_end_matches("iB")
        .trim_end_matches('i')
        .trim_end_matches('B')
    {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (K, M, G, T, P)")),
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .filter(|b| *b <= VOLUME_SIZE_MAX)
        .ok_or_else(|| format!("{s:?} exceeds the largest volume (1P)"))?;
    if bytes == 0 {
        return Err("a size must be positive".into());
    }
    if bytes % 512 != 0 {
        return Err(format!("{s:?} is not a multiple of 512 bytes"));
    }
    Ok(bytes)
}

/// Desired state of a pool (`ceph/pools/<pool>/spec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    /// Placement groups at creation (a power of two); later changes are left to Ceph.
    pub pg_num: u32,
    /// Replica count (1–10).
    pub size: u32,
    /// Refuse deletion while set.
    pub protected: bool,
    /// Delete the pool (only when not protected).
    pub delete: bool,
}

/// A pool object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// Desired state.
    pub spec: PoolSpec,
}

/// Where a new volume is cloned from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloneSource {
    /// A template by name (resolved against `templates/<name>` at plan time).
    Template(String),
    /// An explicit snapshot `pool/image@snapshot`.
    Snapshot {
        /// Pool.
        pool: String,
        /// Image.
        image: String,
        /// Snapshot.
        snapshot: String,
    },
}

/// Desired state of a volume (`ceph/volumes/<pool>:<image>/spec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Size in bytes.
    pub size: u64,
    /// Clone source at creation (ignored once the volume exists).
    pub clone_from: Option<CloneSource>,
    /// Allow shrinking when `size` is below the current size.
    pub allow_shrink: bool,
    /// Remove the volume (snapshots purged first).
    pub delete: bool,
}

/// Desired state of a snapshot (`…/snapshots/<snap>/spec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSpec {
    /// A rollback request: any new token (e.g. a timestamp) asks for one rollback; the status
    /// records the last token done.
    pub rollback: Option<String>,
    /// Remove the snapshot.
    pub delete: bool,
}

/// A volume object with its snapshots. A bad snapshot spec marks only that snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Pool.
    pub pool: String,
    /// Image.
    pub image: String,
    /// Desired state.
    pub spec: VolumeSpec,
    /// Declared snapshots by name, each parsed or why not.
    pub snapshots: BTreeMap<String, Result<SnapshotSpec, ObjectError>>,
}

/// A template (`templates/<name>`): an RBD snapshot new volumes can be cloned from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Pool of the source image.
    pub pool: String,
    /// Source image.
    pub image: String,
    /// Default snapshot to clone from.
    pub snapshot: String,
}

/// State of a Ceph object as the primary reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CephState {
    /// Matches its spec.
    Ready,
    /// Steps are being applied.
    Pending,
    /// The spec is invalid or cannot be applied; `field` and `error` say why.
    Error,
    /// Deleted as asked.
    Deleted,
}

/// Value of a `…/status` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CephStatus {
    /// The state.
    pub state: CephState,
    /// The offending field (with `state: error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Last rollback token done (snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<String>,
    /// When this state was entered (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// Fields of one JSON object, taken out one by one so that leftovers are unknown fields.
struct Fields<'a> {
    path: &'a str,
    map: Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn parse(path: &'a str, raw: &[u8]) -> Result<Self, ObjectError> {
        match serde_json::from_slice::<Value>(raw) {
            Ok(Value::Object(map)) => Ok(Fields { path, map }),
            Ok(_) => Err(ObjectError::new(path, "not a JSON object")),
            Err(e) => Err(ObjectError::new(path, format!("invalid JSON: {e}"))),
        }
    }

    fn field(&self, name: &str) -> String {
        format!("{}.{name}", self.path)
    }

    fn bool(&mut self, name: &str) -> Result<bool, ObjectError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(b),
            Some(v) => Err(ObjectError::new(
                self.field(name),
                format!("{v} is not true|false"),
            )),
        }
    }

    fn u32(&mut self, name: &str, default: u32) -> Result<u32, ObjectError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| ObjectError::new(self.field(name), format!("{v} is not a count"))),
        }
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, ObjectError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ObjectError::new(
                self.field(name),
                format!("{v} is not a string"),
            )),
        }
    }

    fn required(&mut self, name: &str) -> Result<String, ObjectError> {
        self.string(name)?
            .ok_or_else(|| ObjectError::new(self.field(name), "required"))
    }

    fn object(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|v| !v.is_null())
    }

    fn finish(self) -> Result<(), ObjectError> {
        match self.map.keys().next() {
            Some(k) => Err(ObjectError::new(self.field(k), "unknown field")),
            None => Ok(()),
        }
    }
}

fn name_field(
    field: &str,
    value: &str,
    check: fn(&str) -> Result<(), String>,
) -> Result<(), ObjectError> {
    check(value).map_err(|r| ObjectError::new(field, format!("{value:?}: {r}")))
}

/// Parse a pool object (`ceph/pools/<pool>/…`).
pub fn parse_pool(id: &str, keys: &BTreeMap<String, KeyEntry>) -> Result<Pool, ObjectError> {
    name_field("pool", id, validate_pool_name)?;
    let raw = keys
        .get("spec")
        .ok_or_else(|| ObjectError::new("spec", "missing"))?;
    let mut f = Fields::parse("spec", &raw.value)?;
    let pg_num = f.u32("pg_num", DEFAULT_PG_NUM)?;
    if !pg_num.is_power_of_two() || pg_num > 32768 {
        return Err(ObjectError::new(
            "spec.pg_num",
            format!("{pg_num} is not a power of two up to 32768"),
        ));
    }
    let size = f.u32("size", DEFAULT_POOL_SIZE)?;
    if !(1..=10).contains(&size) {
        return Err(ObjectError::new(
            "spec.size",
            format!("{size} is not 1 to 10"),
        ));
    }
    let spec = PoolSpec {
        pg_num,
        size,
        protected: f.bool("protected")?,
        delete: f.bool("delete")?,
    };
    f.finish()?;
    Ok(Pool {
        name: id.to_owned(),
        spec,
    })
}

fn parse_clone_source(v: Value) -> Result<CloneSource, ObjectError> {
    const PATH: &str = "spec.clone_from";
    let Value::Object(map) = v else {
        return Err(ObjectError::new(PATH, "not an object"));
    };
    let mut f = Fields { path: PATH, map };
    let source = match f.string("template")? {
        Some(t) => {
            name_field("spec.clone_from.template", &t, validate_image_name)?;
            CloneSource::Template(t)
        }
        None => {
            let pool = f.required("pool")?;
            name_field("spec.clone_from.pool", &pool, validate_pool_name)?;
            let image = f.required("image")?;
            name_field("spec.clone_from.image", &image, validate_image_name)?;
            let snapshot = f.required("snapshot")?;
            name_field(
                "spec.clone_from.snapshot",
                &snapshot,
                validate_snapshot_name,
            )?;
            CloneSource::Snapshot {
                pool,
                image,
                snapshot,
            }
        }
    };
    f.finish()?;
    Ok(source)
}

fn parse_volume_spec(raw: &[u8]) -> Result<VolumeSpec, ObjectError> {
    let mut f = Fields::parse("spec", raw)?;
    let delete = f.bool("delete")?;
    let size = match f.object("size") {
        None if delete => 0,
        None => return Err(ObjectError::new("spec.size", "required")),
        Some(Value::String(s)) => parse_size(&s).map_err(|r| ObjectError::new("spec.size", r))?,
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("{n} is not a byte count"))
            .and_then(|b| parse_size(&b.to_string()))
            .map_err(|r| ObjectError::new("spec.size", r))?,
        Some(v) => return Err(ObjectError::new("spec.size", format!("{v} is not a size"))),
    };
    let clone_from = f.object("clone_from").map(parse_clone_source).transpose()?;
    let spec = VolumeSpec {
        size,
        clone_from,
        allow_shrink: f.bool("allow_shrink")?,
        delete,
    };
    f.finish()?;
    Ok(spec)
}

fn parse_snapshot_spec(field: &str, raw: &[u8]) -> Result<SnapshotSpec, ObjectError> {
    let mut f = Fields::parse(field, raw)?;
    let rollback = f.string("rollback")?;
    if rollback
        .as_deref()
        .is_some_and(|t| t.is_empty() || t.len() > 64)
    {
        return Err(ObjectError::new(
            f.field("rollback"),
            "a rollback token is 1 to 64 characters",
        ));
    }
    let spec = SnapshotSpec {
        rollback,
        delete: f.bool("delete")?,
    };
    f.finish()?;
    Ok(spec)
}

/// Split a volume id `<pool>:<image>` and validate both names.
pub fn split_volume_id(id: &str) -> Result<(&str, &str), ObjectError> {
    let (pool, image) = id
        .split_once(':')
        .ok_or_else(|| ObjectError::new("volume", format!("{id:?} is not <pool>:<image>")))?;
    name_field("pool", pool, validate_pool_name)?;
    name_field("image", image, validate_image_name)?;
    Ok((pool, image))
}

/// Parse a volume object (`ceph/volumes/<pool>:<image>/…`) with its declared snapshots.
pub fn parse_volume(id: &str, keys: &BTreeMap<String, KeyEntry>) -> Result<Volume, ObjectError> {
    let (pool, image) = split_volume_id(id)?;
    let raw = keys
        .get("spec")
        .ok_or_else(|| ObjectError::new("spec", "missing (snapshots need their volume's spec)"))?;
    let spec = parse_volume_spec(&raw.value)?;
    let mut snapshots = BTreeMap::new();
    for (sub, entry) in keys {
        let Some(rest) = sub.strip_prefix("snapshots/") else {
            continue;
        };
        let Some(name) = rest.strip_suffix("/spec") else {
            continue;
        };
        let field = format!("snapshots/{name}");
        let parsed = name_field(&field, name, validate_snapshot_name)
            .and_then(|()| parse_snapshot_spec(&format!("{field}/spec"), &entry.value));
        snapshots.insert(name.to_owned(), parsed);
    }
    Ok(Volume {
        pool: pool.to_owned(),
        image: image.to_owned(),
        spec,
        snapshots,
    })
}

/// Parse a template (`templates/<name>`).
pub fn parse_template(name: &str, raw: &[u8]) -> Result<Template, ObjectError> {
    name_field("template", name, validate_image_name)?;
    let mut f = Fields::parse("template", raw)?;
    let backend = f.required("backend")?;
    if backend != "rbd" {
        return Err(ObjectError::new(
            "template.backend",
            format!("{backend:?} is not rbd"),
        ));
    }
    let pool = f.required("pool")?;
    name_field("template.pool", &pool, validate_pool_name)?;
    let image = f.required("image")?;
    name_field("template.image", &image, validate_image_name)?;
    let snapshot = f.required("snapshot")?;
    name_field("template.snapshot", &snapshot, validate_snapshot_name)?;
    f.finish()?;
    Ok(Template {
        pool,
        image,
        snapshot,
    })
}

/// The pool kind for the generic reactor (`ceph/pools/<pool>/spec` is its desired state).
#[derive(Debug, Default, Clone, Copy)]
pub struct PoolKind;

impl Kind for PoolKind {
    type Object = Pool;
    const NAME: &'static str = "pool";
    fn prefix(&self) -> &str {
        POOLS_PREFIX
    }
    fn parse(&self, id: &str, keys: &BTreeMap<String, KeyEntry>) -> Result<Pool, ObjectError> {
        parse_pool(id, keys)
    }
    fn relevant(&self, sub: &str) -> bool {
        sub == "spec"
    }
}

/// The volume kind (`spec` and `snapshots/<snap>/spec` are its desired state).
#[derive(Debug, Default, Clone, Copy)]
pub struct VolumeKind;

impl Kind for VolumeKind {
    type Object = Volume;
    const NAME: &'static str = "volume";
    fn prefix(&self) -> &str {
        VOLUMES_PREFIX
    }
    fn parse(&self, id: &str, keys: &BTreeMap<String, KeyEntry>) -> Result<Volume, ObjectError> {
        parse_volume(id, keys)
    }
    fn relevant(&self, sub: &str) -> bool {
        sub == "spec" || (sub.starts_with("snapshots/") && sub.ends_with("/spec"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, KeyEntry> {
        KeyEntry::object(pairs)
    }

    fn err_field<T: std::fmt::Debug>(r: Result<T, ObjectError>) -> String {
        r.expect_err("should be refused").field
    }

    #[test]
    fn names() {
        assert!(validate_pool_name("rbd").is_ok());
        assert!(validate_image_name("vm-01_disk.0").is_ok());
        assert!(validate_snapshot_name("auto-20261123-180000").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a@b", "a:b", "a b", "ä"] {
            assert!(validate_image_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_pool_name(&"p".repeat(64)).is_err());
        assert!(validate_image_name(&"i".repeat(96)).is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2Ti"), Ok(2 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        for bad in [
            "",
            "G",
            "1.5G",
            "10X",
            "0",
            "0G",
            "1000",
            "2P",
            "-1G",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn auto_snapshot_labels() {
        let t = time::macros::datetime!(2026-11-23 18:04:05 UTC);
        assert_eq!(auto_snapshot_name(t), "auto-20261123-180405");
        assert!(validate_snapshot_name(&auto_snapshot_name(t)).is_ok());
    }

    #[test]
    fn key_layout() {
        assert_eq!(pool_spec_key("rbd"), "ceph/pools/rbd/spec");
        assert_eq!(volume_spec_key("rbd", "vm1"), "ceph/volumes/rbd:vm1/spec");
        assert_eq!(
            snapshot_status_key("rbd", "vm1", "s1"),
            "ceph/volumes/rbd:vm1/snapshots/s1/status"
        );
        assert_eq!(
            observed_volume_key("rbd", "vm1"),
            "ceph/observed/volumes/rbd:vm1"
        );
        assert_eq!(observed_osd_key(3), "ceph/observed/osds/3");
        assert_eq!(template_key("deb12"), "templates/deb12");
        assert!(VolumeKind.relevant("spec") && VolumeKind.relevant("snapshots/s1/spec"));
        assert!(!VolumeKind.relevant("status") && !VolumeKind.relevant("snapshots/s1/status"));
        assert!(PoolKind.relevant("spec") && !PoolKind.relevant("status"));
    }

    #[test]
    fn pools_parse_with_defaults_and_named_errors() {
        let p = parse_pool(
            "rbd",
            &keys(&[("spec", r#"{"pg_num":64,"size":2,"protected":true}"#)]),
        )
        .expect("valid");
        assert_eq!(
            p.spec,
            PoolSpec {
                pg_num: 64,
                size: 2,
                protected: true,
                delete: false
            }
        );
        let p = parse_pool("rbd", &keys(&[("spec", "{}")])).expect("defaults");
        assert_eq!(
            (p.spec.pg_num, p.spec.size),
            (DEFAULT_PG_NUM, DEFAULT_POOL_SIZE)
        );
        assert_eq!(
            err_field(parse_pool("bad/name", &keys(&[("spec", "{}")]))),
            "pool"
        );
        assert_eq!(err_field(parse_pool("rbd", &keys(&[]))), "spec");
        assert_eq!(
            err_field(parse_pool("rbd", &keys(&[("spec", "[1]")]))),
            "spec"
        );
        assert_eq!(
            err_field(parse_pool("rbd", &keys(&[("spec", "{")]))),
            "spec"
        );
        assert_eq!(
            err_field(parse_pool("rbd", &keys(&[("spec", r#"{"pg_num":48}"#)]))),
            "spec.pg_num"
        );
        assert_eq!(
            err_field(parse_pool("rbd", &keys(&[("spec", r#"{"pg_num":"x"}"#)]))),
            "spec.pg_num"
        );
        assert_eq!(
            err_field(parse_pool("rbd", &keys(&[("spec", r#"{"size":0}"#)]))),
            "spec.size"
        );
        assert_eq!(
            err_field(parse_pool("rbd", &keys(&[("spec", r#"{"delete":"yes"}"#)]))),
            "spec.delete"
        );
        assert_eq!(
            err_field(parse_pool("rbd", &keys(&[("spec", r#"{"replicas":3}"#)]))),
            "spec.replicas"
        );
    }

    #[test]
    fn volumes_parse_with_snapshots_and_named_errors() {
        let v = parse_volume(
            "rbd:vm1",
            &keys(&[
                (
                    "spec",
                    r#"{"size":"10G","clone_from":{"template":"deb12"},"allow_shrink":true}"#,
                ),
                ("status", "not even JSON"),
                ("snapshots/s1/spec", r#"{"rollback":"t1"}"#),
                ("snapshots/s2/spec", r#"{"delete":true}"#),
                ("snapshots/bad@name/spec", "{}"),
                ("snapshots/s3/spec", r#"{"rollback":5}"#),
                ("snapshots/s1/status", "ignored"),
            ]),
        )
        .expect("valid volume");
        assert_eq!((v.pool.as_str(), v.image.as_str()), ("rbd", "vm1"));
        assert_eq!(v.spec.size, 10 << 30);
        assert_eq!(
            v.spec.clone_from,
            Some(CloneSource::Template("deb12".into()))
        );
        assert!(v.spec.allow_shrink && !v.spec.delete);
        assert_eq!(
            v.snapshots["s1"],
            Ok(SnapshotSpec {
                rollback: Some("t1".into()),
                delete: false
            })
        );
        assert_eq!(
            v.snapshots["s2"],
            Ok(SnapshotSpec {
                rollback: None,
                delete: true
            })
        );
        assert_eq!(
            v.snapshots["bad@name"].clone().expect_err("bad").field,
            "snapshots/bad@name"
        );
        assert_eq!(
            v.snapshots["s3"].clone().expect_err("bad").field,
            "snapshots/s3/spec.rollback"
        );

        let spec = |s: &str| parse_volume("rbd:vm1", &keys(&[("spec", s)]));
        assert_eq!(
            spec(r#"{"size":1073741824}"#).expect("bytes").spec.size,
            1 << 30
        );
        assert!(
            spec(r#"{"delete":true}"#)
                .expect("delete needs no size")
                .spec
                .delete
        );
        assert_eq!(
            spec(r#"{"size":"1G","clone_from":{"pool":"rbd","image":"base","snapshot":"s"}}"#)
                .expect("explicit source")
                .spec
                .clone_from,
            Some(CloneSource::Snapshot {
                pool: "rbd".into(),
                image: "base".into(),
                snapshot: "s".into()
            })
        );
        assert_eq!(err_field(spec("{}")), "spec.size");
        assert_eq!(err_field(spec(r#"{"size":"ten gigs"}"#)), "spec.size");
        assert_eq!(err_field(spec(r#"{"size":-5}"#)), "spec.size");
        assert_eq!(err_field(spec(r#"{"size":true}"#)), "spec.size");
        assert_eq!(
            err_field(spec(r#"{"size":"1G","clone_from":{"pool":"rbd"}}"#)),
            "spec.clone_from.image"
        );
        assert_eq!(
            err_field(spec(r#"{"size":"1G","clone_from":{"template":"a/b"}}"#)),
            "spec.clone_from.template"
        );
        assert_eq!(
            err_field(spec(r#"{"size":"1G","clone_from":{"template":"t","x":1}}"#)),
            "spec.clone_from.x"
        );
        assert_eq!(
            err_field(spec(r#"{"size":"1G","clone_from":"t"}"#)),
            "spec.clone_from"
        );
        assert_eq!(
            err_field(spec(r#"{"size":"1G","shrink":true}"#)),
            "spec.shrink"
        );
        assert_eq!(
            err_field(parse_volume("rbd", &keys(&[("spec", "{}")]))),
            "volume"
        );
        assert_eq!(
            err_field(parse_volume("rbd:a@b", &keys(&[("spec", "{}")]))),
            "image"
        );
        assert_eq!(
            err_field(parse_volume("-x:a", &keys(&[("spec", "{}")]))),
            "pool"
        );
        // A snapshot of a volume nobody declared.
        assert_eq!(
            err_field(parse_volume(
                "rbd:vm1",
                &keys(&[("snapshots/s1/spec", "{}")])
            )),
            "spec"
        );
    }

    #[test]
    fn templates_parse_with_named_errors() {
        let t = parse_template(
            "deb12",
            br#"{"backend":"rbd","pool":"rbd","image":"deb12-base","snapshot":"golden"}"#,
        )
        .expect("valid");
        assert_eq!(
            t,
            Template {
                pool: "rbd".into(),
                image: "deb12-base".into(),
                snapshot: "golden".into()
            }
        );
        let f = |s: &str| {
            parse_template("deb12", s.as_bytes())
                .expect_err("bad")
                .field
        };
        assert_eq!(
            f(r#"{"backend":"file","pool":"p","image":"i","snapshot":"s"}"#),
            "template.backend"
        );
        assert_eq!(
            f(r#"{"backend":"rbd","image":"i","snapshot":"s"}"#),
            "template.pool"
        );
        assert_eq!(
            f(r#"{"backend":"rbd","pool":"p","image":"i@x","snapshot":"s"}"#),
            "template.image"
        );
        assert_eq!(
            f(r#"{"backend":"rbd","pool":"p","image":"i"}"#),
            "template.snapshot"
        );
        assert_eq!(
            f(r#"{"backend":"rbd","pool":"p","image":"i","snapshot":"s","extra":1}"#),
            "template.extra"
        );
        assert_eq!(
            parse_template("a/b", b"{}").expect_err("bad").field,
            "template"
        );
    }

    #[test]
    fn status_serialises_compactly() {
        let s = CephStatus {
            state: CephState::Error,
            field: Some("spec.size".into()),
            error: Some("bad".into()),
            rolled_back: None,
            since: None,
        };
        assert_eq!(
            serde_json::to_string(&s).expect("json"),
            r#"{"state":"error","field":"spec.size","error":"bad"}"#
        );
    }
}
