//! [`Cidr`]: an IPv4 or IPv6 network, the unit every address match of the ruleset is made of.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 or IPv6 network (`10.0.0.0/24`, `fd00::/64`; a bare address means a single host).
///
/// It exists so that every address the ruleset matches on is parsed and checked before anything
/// is rendered: nft's own errors for a bad prefix do not say which rule they came from. The
/// arithmetic is [`IpNet`]'s; this wrapper only adds two rules ipnet leaves to its callers:
/// host bits are cleared on construction, parsing and deserializing (`10.0.0.5/24` becomes
/// `10.0.0.0/24`, so callers may pass an interface's `address/prefix` as the network it sits on,
/// and equal networks compare equal when they are merged), and a bare address parses as a single
/// host (ipnet's parser requires a prefix length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr(IpNet);

impl Cidr {
    /// The network `addr/len` (host bits cleared); an error when `len` is too long for the family.
    pub fn new(addr: IpAddr, len: u8) -> Result<Cidr, String> {
        IpNet::new(addr, len)
            .map(Cidr::from)
            .map_err(|_| format!("{addr}/{len}: prefix length {len} is too large"))
    }

    /// A single host (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr(IpNet::from(addr))
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.0.addr()
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// Whether this is an IPv4 network.
    pub fn is_ipv4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }

    /// Whether `other` lies entirely inside this network (same family).
    pub fn contains(&self, other: &Cidr) -> bool {
        self.0.contains(&other.0)
    }

    /// Whether the network is a single host.
    pub fn is_host(&self) -> bool {
        self.0.prefix_len() == self.0.max_prefix_len()
    }
}

/// The network `net` sits on (host bits cleared).
impl From<IpNet> for Cidr {
    fn from(net: IpNet) -> Cidr {
        Cidr(net.trunc())
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        match s.parse::<IpNet>() {
            Ok(net) => Ok(Cidr::from(net)),
            Err(_) => s.parse().map(Cidr::host).map_err(|_| {
                format!(
                    "{s:?} is not an address or address/prefix (e.g. 10.0.0.0/24; \
                     the prefix length is at most 32 for IPv4, 128 for IPv6)"
                )
            }),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.fmt(f)
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
    fn construction_clears_host_bits_and_errors_name_the_input() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(Cidr::new(ip, 16).unwrap().to_string(), "10.1.0.0/16");
        assert_eq!(
            Cidr::new(ip, 33),
            Err("10.1.2.3/33: prefix length 33 is too large".into())
        );
        let e = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert!(e.starts_with("\"10.0.0.0/33\" is not an address"), "{e}");
        let c: Cidr = serde_json::from_str("\"fd00::1/8\"").unwrap();
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"fd00::/8\"");
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
