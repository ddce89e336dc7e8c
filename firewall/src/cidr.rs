//! [`Cidr`]: an IPv4 or IPv6 network, the unit every address match of the ruleset is made of.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 or IPv6 network (`10.0.0.0/24`, `fd00::/64`; a bare address means a single host).
///
/// It exists so that every address the ruleset matches on is parsed and checked before anything
/// is rendered: nft's own errors for a bad prefix do not say which rule they came from. Host bits
/// are cleared on construction (`10.0.0.5/24` becomes `10.0.0.0/24`), so callers may pass an
/// interface's `address/prefix` as the network it sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// The network `addr/len` (host bits cleared); an error when `len` is too long for the family.
    pub fn new(addr: IpAddr, len: u8) -> Result<Cidr, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("{addr}/{len}: prefix length {len} is too large"));
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Cidr { addr, len })
    }

    /// A single host (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether this is an IPv4 network.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `other` lies entirely inside this network (same family).
    pub fn contains(&self, other: &Cidr) -> bool {
        if self.is_ipv4() != other.is_ipv4() || other.len < self.len {
            return false;
        }
        match Cidr::new(other.addr, self.len) {
            Ok(narrowed) => narrowed.addr == self.addr,
            Err(_) => false,
        }
    }

    /// Whether the network is a single host.
    pub fn is_host(&self) -> bool {
        self.len == if self.is_ipv4() { 32 } else { 128 }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not an address or address/prefix (e.g. 10.0.0.0/24)");
        match s.split_once('/') {
            Some((a, p)) => {
                let addr: IpAddr = a.parse().map_err(|_| bad())?;
                let len: u8 = p.parse().map_err(|_| bad())?;
                Cidr::new(addr, len)
            }
            None => Ok(Cidr::host(s.parse().map_err(|_| bad())?)),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_masks() {
        let c: Cidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        let c: Cidr = "2001:db8::5/64".parse().unwrap();
        assert_eq!(c.to_string(), "2001:db8::/64");
        let c: Cidr = "192.0.2.7".parse().unwrap();
        assert!(c.is_host());
        assert_eq!(c.to_string(), "192.0.2.7/32");
        let c: Cidr = "0.0.0.0/0".parse().unwrap();
        assert_eq!(c.prefix_len(), 0);
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn containment() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(&"10.2.0.0/16".parse().unwrap()));
        assert!(net.contains(&net));
        assert!(!net.contains(&"11.0.0.0/16".parse().unwrap()));
        assert!(!net.contains(&"0.0.0.0/0".parse().unwrap()));
        assert!(!net.contains(&"fd00::/64".parse().unwrap()));
        let any: Cidr = "::/0".parse().unwrap();
        assert!(any.contains(&"2001:db8::1".parse().unwrap()));
    }
}
