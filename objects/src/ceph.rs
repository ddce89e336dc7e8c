//! Ceph desired state: pools, RBD volumes with their snapshots, and templates, parsed from
//! etcd with errors naming the field; names and sizes validated; and a pure planner turning
//! "desired vs observed" into steps for the driver. Bad input yields an error status for that
//! object and never a destructive step.

// Pieces follow below.

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
