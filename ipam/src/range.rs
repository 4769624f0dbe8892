//! Address ranges and range sets: defaults, validation and membership, as the reference has them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

/// An address as a number, so both families share the arithmetic.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address numbered `number` in the family of `like`.
pub fn from_u128(number: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(number as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(number)),
    }
}

/// Unmaps `::ffff:a.b.c.d` to IPv4, as the reference's canonicalisation does.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// One pool: a subnet and the inclusive part of it to allocate from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// The subnet (network address, prefix).
    pub subnet: IpNetwork,
    /// First address to give out.
    pub start: IpAddr,
    /// Last address to give out.
    pub end: IpAddr,
    /// The gateway, never given out.
    pub gateway: IpAddr,
}

impl Range {
    /// Validates a range and fills in defaults: gateway and start at network+1, end at the
    /// last address (IPv4: the one before broadcast).
    pub fn new(
        subnet: &str,
        start: Option<&str>,
        end: Option<&str>,
        gateway: Option<&str>,
    ) -> Result<Range, String> {
        let net: IpNetwork = subnet.parse().map_err(|e| format!("invalid subnet {subnet:?}: {e}"))?;
        let bits = if net.is_ipv4() { 32 } else { 128 };
        if net.prefix() > bits - 2 {
            return Err(format!("Network {net} too small to allocate from"));
        }
        if net.ip() != net.network() {
            return Err(format!(
                "Network has host bits set. For a subnet mask of length {} the network address is {}",
                net.prefix(),
                net.network()
            ));
        }
        let family_ip = |what: &str, s: &str| -> Result<IpAddr, String> {
            let ip: IpAddr = s.parse().map_err(|_| format!("invalid {what} {s:?}"))?;
            let ip = canonical(ip);
            if ip.is_ipv4() != net.is_ipv4() {
                return Err(format!("{what} {ip} is not of the family of subnet {net}"));
            }
            Ok(ip)
        };
        let first = from_u128(to_u128(net.network()) + 1, net.ip());
        let last = {
            let bcast = to_u128(net.broadcast());
            from_u128(if net.is_ipv4() { bcast - 1 } else { bcast }, net.ip())
        };
        let gateway =
            gateway.filter(|s| !s.is_empty()).map(|g| family_ip("gateway", g)).transpose()?.unwrap_or(first);
        let start =
            start.filter(|s| !s.is_empty()).map(|s| family_ip("rangeStart", s)).transpose()?.unwrap_or(first);
        let end =
            end.filter(|s| !s.is_empty()).map(|s| family_ip("rangeEnd", s)).transpose()?.unwrap_or(last);
        // A gateway outside the subnet passes here but fails later as an unreachable route.
        for (what, ip) in [("RangeStart", start), ("RangeEnd", end), ("gateway", gateway)] {
            if !net.contains(ip) {
                return Err(format!("{what} {ip} not in network {net}"));
            }
        }
        if to_u128(start) > to_u128(end) {
            return Err(format!("RangeStart {start} is after RangeEnd {end}"));
        }
        Ok(Range { subnet: net, start, end, gateway })
    }

    /// Whether `ip` lies in `start..=end`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.start.is_ipv4()
            && (to_u128(self.start)..=to_u128(self.end)).contains(&to_u128(ip))
    }

    /// Whether `ip` may be handed out: not the gateway, the network address or (IPv4) broadcast.
    pub fn assignable(&self, ip: IpAddr) -> bool {
        ip != self.gateway
            && ip != self.subnet.network()
            && !(self.subnet.is_ipv4() && ip == self.subnet.broadcast())
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.contains(other.start)
            || self.contains(other.end)
            || other.contains(self.start)
            || other.contains(self.end)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// A set of pools that together give one address per attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet(pub Vec<Range>);

impl RangeSet {
    /// Checks the set is non-empty, of one family, and without overlaps.
    pub fn validate(&self) -> Result<(), String> {
        let first = self.0.first().ok_or("empty range set")?;
        if self.0.iter().any(|r| r.start.is_ipv4() != first.start.is_ipv4()) {
            return Err("mixed address families".into());
        }
        for (index, first_range) in self.0.iter().enumerate() {
            for later in &self.0[index + 1..] {
                if first_range.overlaps(later) {
                    return Err(format!("subnets {first_range} and {later} overlap"));
                }
            }
        }
        Ok(())
    }

    /// The range holding `ip`.
    pub fn range_for(&self, ip: IpAddr) -> Option<&Range> {
        self.0.iter().find(|r| r.contains(ip))
    }

    /// Whether any pool of the two sets overlaps.
    pub fn overlaps(&self, other: &RangeSet) -> bool {
        self.0.iter().any(|a| other.0.iter().any(|b| a.overlaps(b)))
    }

    /// Whether the set is IPv4.
    pub fn is_ipv4(&self) -> bool {
        self.0[0].start.is_ipv4()
    }
}

impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(Range::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_match_the_reference() {
        let r = Range::new("10.1.2.0/24", None, None, None).unwrap();
        assert_eq!((r.start, r.end, r.gateway), (ip("10.1.2.1"), ip("10.1.2.254"), ip("10.1.2.1")));
        let r6 = Range::new("2001:db8:1::/64", None, None, None).unwrap();
        assert_eq!(r6.end, ip("2001:db8:1::ffff:ffff:ffff:ffff"));
        assert_eq!(r6.gateway, ip("2001:db8:1::1"));
    }

    #[test]
    fn rejects_bad_ranges() {
        let err = |s, a, b, g| Range::new(s, a, b, g).unwrap_err();
        assert!(err("10.1.2.0/31", None, None, None).contains("too small"));
        assert!(err("10.1.2.5/24", None, None, None).contains("host bits"));
        assert!(err("nope", None, None, None).contains("invalid subnet"));
        assert!(err("10.1.2.0/24", Some("10.1.3.1"), None, None).contains("not in network"));
        assert!(err("10.1.2.0/24", None, Some("10.1.3.1"), None).contains("not in network"));
        assert!(err("10.1.2.0/24", Some("10.1.2.9"), Some("10.1.2.8"), None).contains("after"));
        assert!(err("10.1.2.0/24", None, None, Some("fd00::1")).contains("family"));
        assert_eq!(
            err("10.1.2.0/24", None, None, Some("10.1.3.1")),
            "gateway 10.1.3.1 not in network 10.1.2.0/24"
        );
    }

    #[test]
    fn membership_and_assignability() {
        let r = Range::new("10.1.2.0/24", Some("10.1.2.0"), Some("10.1.2.255"), None).unwrap();
        assert!(r.contains(ip("10.1.2.255")) && !r.contains(ip("10.1.3.0")) && !r.contains(ip("fd00::1")));
        assert!(!r.assignable(ip("10.1.2.0")));
        assert!(!r.assignable(ip("10.1.2.255")));
        assert!(!r.assignable(ip("10.1.2.1")));
        assert!(r.assignable(ip("10.1.2.2")));
        assert!(r.contains(ip("::ffff:10.1.2.7")));
    }

    #[test]
    fn sets_reject_overlap_and_mixed_families() {
        let a = Range::new("10.1.2.0/24", None, None, None).unwrap();
        let b = Range::new("10.1.2.0/25", None, None, None).unwrap();
        let c = Range::new("fd00::/64", None, None, None).unwrap();
        assert!(RangeSet(vec![a.clone(), b]).validate().unwrap_err().contains("overlap"));
        assert!(RangeSet(vec![a.clone(), c]).validate().unwrap_err().contains("mixed"));
        assert!(RangeSet(vec![]).validate().is_err());
        let d = Range::new("10.1.3.0/24", None, None, None).unwrap();
        let set = RangeSet(vec![a, d]);
        assert!(set.validate().is_ok());
        assert_eq!(set.to_string(), "10.1.2.1-10.1.2.254,10.1.3.1-10.1.3.254");
    }
}
