//! Bulk domain statistics through the raw `virConnectGetAllDomainStats` /
//! `virDomainListGetStats`: virt 0.4.3 wraps the first but hands back raw record pointers and
//! never frees the records, so the records are read and freed here.

use std::ffi::CStr;

use virt::sys;

use super::types::DomainStats;

/// The stats groups read: state, total CPU, balloon, vCPU count, interfaces, disks.
pub(crate) const GROUPS: u32 = sys::VIR_DOMAIN_STATS_STATE
    | sys::VIR_DOMAIN_STATS_CPU_TOTAL
    | sys::VIR_DOMAIN_STATS_BALLOON
    | sys::VIR_DOMAIN_STATS_VCPU
    | sys::VIR_DOMAIN_STATS_INTERFACE
    | sys::VIR_DOMAIN_STATS_BLOCK;

/// One typed parameter's numeric value (strings, doubles and booleans are not counters).
fn numeric(p: &sys::virTypedParameter) -> Option<u64> {
    // SAFETY: the union member read is the one `type_` names.
    unsafe {
        match u32::try_from(p.type_).ok()? {
            sys::VIR_TYPED_PARAM_INT => u64::try_from(p.value.i).ok(),
            sys::VIR_TYPED_PARAM_UINT => Some(u64::from(p.value.ui)),
            sys::VIR_TYPED_PARAM_LLONG => u64::try_from(p.value.l).ok(),
            sys::VIR_TYPED_PARAM_ULLONG => Some(p.value.ul),
            _ => None,
        }
    }
}

/// The field name of a typed parameter (NUL-terminated within its 80 bytes).
fn field(p: &sys::virTypedParameter) -> String {
    let bytes: Vec<u8> = p
        .field
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `<prefix>.<N>.<suffix>` with N a number?
fn indexed(name: &str, prefix: &str, suffix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_suffix(suffix))
        .and_then(|r| r.strip_suffix('.'))
        .map(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or(false)
}

/// What one stats record says; `None` fields were not reported (the driver does not support
/// the group, or the domain is shut off).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Parsed {
    pub state: Option<i32>,
    pub cpu_time_ns: Option<u64>,
    pub memory_kib: Option<u64>,
    pub max_memory_kib: Option<u64>,
    pub vcpus: Option<u32>,
    pub block_rd_bytes: u64,
    pub block_wr_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// Sum the counters of a parameter list.
pub(crate) fn parse_params(params: &[sys::virTypedParameter]) -> Parsed {
    let mut s = Parsed::default();
    for p in params {
        let Some(v) = numeric(p) else { continue };
        let name = field(p);
        match name.as_str() {
            "state.state" => s.state = i32::try_from(v).ok(),
            "cpu.time" => s.cpu_time_ns = Some(v),
            "balloon.current" => s.memory_kib = Some(v),
            "balloon.maximum" => s.max_memory_kib = Some(v),
            "vcpu.current" => s.vcpus = u32::try_from(v).ok(),
            n if indexed(n, "block", "rd.bytes") => {
                s.block_rd_bytes = s.block_rd_bytes.saturating_add(v)
            }
            n if indexed(n, "block", "wr.bytes") => {
                s.block_wr_bytes = s.block_wr_bytes.saturating_add(v)
            }
            n if indexed(n, "net", "rx.bytes") => s.net_rx_bytes = s.net_rx_bytes.saturating_add(v),
            n if indexed(n, "net", "tx.bytes") => s.net_tx_bytes = s.net_tx_bytes.saturating_add(v),
            _ => {}
        }
    }
    s
}

/// One record read out of libvirt's list, with its domain's identity.
pub(crate) struct Record {
    pub uuid: String,
    pub name: String,
    pub parsed: Parsed,
}

/// Owns a `virDomainStatsRecordPtr` list and frees it (records and array) on drop.
pub(crate) struct RecordList {
    ptr: *mut sys::virDomainStatsRecordPtr,
    len: usize,
}

impl RecordList {
    /// `virConnectGetAllDomainStats(conn, GROUPS)` for every domain.
    pub fn all(conn: &virt::connect::Connect) -> Result<RecordList, virt::error::Error> {
        let mut ptr: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
        // SAFETY: valid connection; libvirt allocates the NULL-terminated list into `ptr`.
        let n = unsafe { sys::virConnectGetAllDomainStats(conn.as_ptr(), GROUPS, &mut ptr, 0) };
        Self::wrap(n, ptr)
    }

    /// `virDomainListGetStats` for one domain.
    pub fn one(dom: &virt::domain::Domain) -> Result<RecordList, virt::error::Error> {
        let mut doms = [dom.as_ptr(), std::ptr::null_mut()];
        let mut ptr: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
        // SAFETY: `doms` is a NULL-terminated array of one valid domain.
        let n = unsafe { sys::virDomainListGetStats(doms.as_mut_ptr(), GROUPS, &mut ptr, 0) };
        Self::wrap(n, ptr)
    }

    fn wrap(
        n: libc::c_int,
        ptr: *mut sys::virDomainStatsRecordPtr,
    ) -> Result<RecordList, virt::error::Error> {
        match usize::try_from(n) {
            Ok(len) => Ok(RecordList { ptr, len }),
            Err(_) => Err(virt::error::Error::last_error()),
        }
    }

    /// Read every record: identity of its domain and the counters.
    pub fn records(&self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.len);
        if self.ptr.is_null() {
            return out;
        }
        for i in 0..self.len {
            // SAFETY: `i < len`, the count libvirt returned for this array.
            let rec = unsafe { *self.ptr.add(i) };
            if rec.is_null() {
                break;
            }
            // SAFETY: a record libvirt filled; `params` holds `nparams` entries.
            let (dom, params) = unsafe {
                let r = &*rec;
                let params = if r.params.is_null() || r.nparams <= 0 {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(r.params, r.nparams as usize)
                };
                (r.dom, params)
            };
            let Some((uuid, name)) = identity(dom) else {
                continue;
            };
            out.push(Record {
                uuid,
                name,
                parsed: parse_params(params),
            });
        }
        out
    }
}

impl Drop for RecordList {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: the list libvirt allocated; freed once.
            unsafe { sys::virDomainStatsRecordListFree(self.ptr) };
        }
    }
}

/// UUID and name of a raw domain pointer (local reads, no RPC).
pub(crate) fn identity(dom: sys::virDomainPtr) -> Option<(String, String)> {
    if dom.is_null() {
        return None;
    }
    let mut buf = [0 as libc::c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: valid domain pointer and a buffer of VIR_UUID_STRING_BUFLEN.
    let uuid = unsafe {
        if sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) < 0 {
            return None;
        }
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
    };
    // SAFETY: valid domain pointer; the name is owned by the domain object (not freed here).
    let name = unsafe {
        let n = sys::virDomainGetName(dom);
        if n.is_null() {
            return None;
        }
        CStr::from_ptr(n).to_string_lossy().into_owned()
    };
    Some((uuid, name))
}

impl Record {
    /// Counters with `info` (from `virDomainGetInfo`) filling what the driver did not report.
    pub fn into_stats(self, active: bool, info: Option<&virt::domain::DomainInfo>) -> DomainStats {
        let p = self.parsed;
        DomainStats {
            uuid: self.uuid,
            name: self.name,
            active,
            cpu_time_ns: p.cpu_time_ns.or(info.map(|i| i.cpu_time)).unwrap_or(0),
            memory_kib: p.memory_kib.or(info.map(|i| i.memory)).unwrap_or(0),
            max_memory_kib: p.max_memory_kib.or(info.map(|i| i.max_mem)).unwrap_or(0),
            vcpus: p.vcpus.or(info.map(|i| i.nr_virt_cpu)).unwrap_or(0),
            block_rd_bytes: p.block_rd_bytes,
            block_wr_bytes: p.block_wr_bytes,
            net_rx_bytes: p.net_rx_bytes,
            net_tx_bytes: p.net_tx_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(name: &str, v: u64) -> sys::virTypedParameter {
        let mut field = [0 as libc::c_char; 80];
        for (d, s) in field.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        sys::virTypedParameter {
            field,
            type_: sys::VIR_TYPED_PARAM_ULLONG as libc::c_int,
            value: sys::_virTypedParameterValue { ul: v },
        }
    }

    #[test]
    fn sums_disks_and_interfaces() {
        let mut params = vec![
            param("state.state", 1),
            param("cpu.time", 123),
            param("balloon.current", 65536),
            param("balloon.maximum", 131072),
            param("vcpu.current", 2),
            param("vcpu.0.time", 999),
            param("block.count", 2),
            param("block.0.rd.bytes", 10),
            param("block.0.wr.bytes", 20),
            param("block.1.rd.bytes", 1),
            param("block.1.wr.bytes", 2),
            param("block.1.rd.reqs", 1000),
            param("net.0.rx.bytes", 5),
            param("net.0.tx.bytes", 6),
            param("net.1.rx.bytes", 7),
        ];
        let mut s = param("net.1.name", 0);
        s.type_ = sys::VIR_TYPED_PARAM_STRING as libc::c_int;
        s.value = sys::_virTypedParameterValue {
            s: std::ptr::null_mut(),
        };
        params.push(s);
        let p = parse_params(&params);
        assert_eq!(
            p,
            Parsed {
                state: Some(1),
                cpu_time_ns: Some(123),
                memory_kib: Some(65536),
                max_memory_kib: Some(131072),
                vcpus: Some(2),
                block_rd_bytes: 11,
                block_wr_bytes: 22,
                net_rx_bytes: 12,
                net_tx_bytes: 6,
            }
        );
    }

    #[test]
    fn indexed_names() {
        assert!(indexed("block.12.rd.bytes", "block", "rd.bytes"));
        assert!(!indexed("block..rd.bytes", "block", "rd.bytes"));
        assert!(!indexed("block.x.rd.bytes", "block", "rd.bytes"));
        assert!(!indexed("blocks.1.rd.bytes", "block", "rd.bytes"));
    }
}
