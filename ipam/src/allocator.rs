//! Choosing an address from a range set: round robin from the last reserved address,
//! in the reference's order, skipping the gateway, network and broadcast addresses.

use std::net::IpAddr;

use cni_proto::IpConfig;
use ipnetwork::IpNetwork;

use crate::error::IpamError;
use crate::range::{from_u128, to_u128, Range, RangeSet};
use crate::store::Leases;

/// The number of addresses in `range`, saturated: `::/0` holds 2^128, one more than a u128.
fn size(range: &Range) -> u128 {
    (to_u128(range.end) - to_u128(range.start)).saturating_add(1)
}

/// `(first + step) % total` for `first, step < total`, without overflowing near 2^128.
fn advance(first: u128, step: u128, total: u128) -> u128 {
    if step >= total - first {
        step - (total - first)
    } else {
        first + step
    }
}

/// The address at flat position `position` across the set's ranges.
fn at(set: &RangeSet, mut position: u128) -> (&Range, IpAddr) {
    for range in &set.0 {
        let len = size(range);
        if position < len {
            return (range, from_u128(to_u128(range.start) + position, range.start));
        }
        position -= len;
    }
    unreachable!("position within the set's size")
}

/// The flat position of `ip` in the set, if it is in it.
fn position(set: &RangeSet, ip: IpAddr) -> Option<u128> {
    let mut base = 0u128;
    for range in &set.0 {
        if range.contains(ip) {
            return Some(base + to_u128(ip) - to_u128(range.start));
        }
        base = base.saturating_add(size(range));
    }
    None
}

fn config(range: &Range, ip: IpAddr) -> IpConfig {
    let address = IpNetwork::new(ip, range.subnet.prefix()).expect("prefix of a valid subnet");
    IpConfig { address, gateway: Some(range.gateway), interface: None }
}

/// Moves the cursor to the address just reserved; if that fails (a full disk), the lease goes
/// too, or the failed ADD would leave it behind with no one to release it.
fn set_cursor(store: &mut impl Leases, idx: usize, ip: IpAddr) -> Result<(), IpamError> {
    store.set_last_reserved(idx, Some(&ip.to_string())).inspect_err(|_| {
        let _ = store.release(ip);
    })
}

/// Reserves one address of range set number `idx` for (id, ifname): `requested` if given.
pub fn allocate(
    store: &mut impl Leases,
    set: &RangeSet,
    idx: usize,
    id: &str,
    ifname: &str,
    requested: Option<IpAddr>,
) -> Result<IpConfig, IpamError> {
    if let Some(held) = store.lookup(id, ifname).into_iter().find(|ip| set.range_for(*ip).is_some()) {
        return Err(IpamError::Duplicate { ip: held, id: id.to_string() });
    }
    if let Some(ip) = requested {
        let range = set.range_for(ip).ok_or_else(|| {
            IpamError::RequestedUnavailable(format!("requested IP address {ip} is not in range set {set}"))
        })?;
        if ip == range.gateway {
            return Err(IpamError::RequestedUnavailable(format!("requested ip {ip} is subnet's gateway")));
        }
        if !range.assignable(ip) {
            return Err(IpamError::RequestedUnavailable(format!(
                "requested ip {ip} is the network or broadcast address of {}",
                range.subnet
            )));
        }
        if !store.reserve(ip, id, ifname)? {
            return Err(IpamError::RequestedUnavailable(format!(
                "requested IP address {ip} is not available in range set {set}"
            )));
        }
        set_cursor(store, idx, ip)?;
        return Ok(config(range, ip));
    }
    let total: u128 = set.0.iter().map(size).fold(0, u128::saturating_add);
    let first = store
        .last_reserved(idx)?
        .and_then(|ip| position(set, ip))
        .map(|pos| pos.saturating_add(1) % total)
        .unwrap_or(0);
    // Lazily: a /64 has 2^64 candidates and the first free one is usually near.
    for step in 0..total {
        let (range, ip) = at(set, advance(first, step, total));
        if !range.assignable(ip) || store.is_leased(ip) {
            continue;
        }
        if store.reserve(ip, id, ifname)? {
            set_cursor(store, idx, ip)?;
            return Ok(config(range, ip));
        }
    }
    Err(IpamError::Exhausted(set.to_string()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::Store;

    /// A store in memory, as host-local's testing FakeStore: the allocator's logic without a
    /// directory, and failures the directory cannot be made to give.
    #[derive(Default)]
    struct Fake {
        leases: BTreeMap<IpAddr, (String, String)>,
        cursors: BTreeMap<usize, String>,
        cursor_fails: bool,
    }

    impl Leases for Fake {
        fn lookup(&self, id: &str, ifname: &str) -> Vec<IpAddr> {
            self.leases.iter().filter(|(_, (i, n))| i == id && n == ifname).map(|(ip, _)| *ip).collect()
        }
        fn is_leased(&self, ip: IpAddr) -> bool {
            self.leases.contains_key(&ip)
        }
        fn reserve(&mut self, ip: IpAddr, id: &str, ifname: &str) -> Result<bool, IpamError> {
            if self.leases.contains_key(&ip) {
                return Ok(false);
            }
            self.leases.insert(ip, (id.into(), ifname.into()));
            Ok(true)
        }
        fn release(&mut self, ip: IpAddr) -> Result<(), IpamError> {
            self.leases.remove(&ip);
            Ok(())
        }
        fn last_reserved(&self, set: usize) -> Result<Option<IpAddr>, IpamError> {
            Ok(self.cursors.get(&set).and_then(|c| c.parse().ok()))
        }
        fn set_last_reserved(&mut self, set: usize, value: Option<&str>) -> Result<(), IpamError> {
            if self.cursor_fails {
                return Err(IpamError::store("writing the cursor", std::io::Error::other("disk full")));
            }
            match value {
                Some(v) => self.cursors.insert(set, v.into()),
                None => self.cursors.remove(&set),
            };
            Ok(())
        }
    }

    #[test]
    fn on_a_fake_store_requests_duplicates_the_cursor_and_its_failure() {
        let set = set(&[("10.0.0.0/29", None, None)]);
        let mut s = Fake::default();
        s.cursors.insert(0, "10.0.0.4".into());
        assert_eq!(addr(&allocate(&mut s, &set, 0, "a", "eth0", None).unwrap()), "10.0.0.5");
        assert_eq!(s.cursors[&0], "10.0.0.5");
        let e = allocate(&mut s, &set, 0, "a", "eth0", None).unwrap_err();
        assert!(matches!(e, IpamError::Duplicate { .. }), "{e}");
        assert_eq!(addr(&allocate(&mut s, &set, 0, "b", "eth0", Some(ip("10.0.0.2"))).unwrap()), "10.0.0.2");
        assert!(allocate(&mut s, &set, 0, "c", "eth0", Some(ip("10.0.0.2"))).is_err(), "taken");
        assert!(allocate(&mut s, &set, 0, "c", "eth0", Some(ip("10.0.0.1"))).is_err(), "the gateway");
        // A cursor that cannot be written: the address just reserved is released again.
        s.cursor_fails = true;
        assert!(allocate(&mut s, &set, 0, "c", "eth0", None).is_err());
        assert!(s.lookup("c", "eth0").is_empty());
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn set(ranges: &[(&str, Option<&str>, Option<&str>)]) -> RangeSet {
        RangeSet(ranges.iter().map(|(s, a, b)| Range::new(s, *a, *b, None).unwrap()).collect())
    }

    fn addr(c: &IpConfig) -> String {
        c.address.ip().to_string()
    }

    #[test]
    fn round_robin_skips_gateway_and_wraps_then_exhausts() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path(), "n").unwrap();
        let set = set(&[("10.0.0.0/29", None, None)]); // .1 gateway, .2-.6 usable
        let got: Vec<String> = (0..5)
            .map(|i| addr(&allocate(&mut s, &set, 0, &format!("c{i}"), "eth0", None).unwrap()))
            .collect();
        assert_eq!(got, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]);
        let e = allocate(&mut s, &set, 0, "c9", "eth0", None).unwrap_err();
        assert_eq!(e.to_string(), "no IP addresses available in range set: 10.0.0.1-10.0.0.6");
        s.release("10.0.0.3".parse().unwrap()).unwrap();
        assert_eq!(addr(&allocate(&mut s, &set, 0, "c9", "eth0", None).unwrap()), "10.0.0.3");
    }

    #[test]
    fn continues_after_last_reserved_across_ranges() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path(), "n").unwrap();
        let set = set(&[("10.0.0.0/24", Some("10.0.0.250"), None), ("10.0.1.0/24", None, Some("10.0.1.3"))]);
        s.set_last_reserved(0, Some("10.0.0.253")).unwrap();
        let got: Vec<String> = (0..4)
            .map(|i| addr(&allocate(&mut s, &set, 0, &format!("c{i}"), "eth0", None).unwrap()))
            .collect();
        // .254 then the second range (its .1 is its gateway), then back to the first range's start.
        assert_eq!(got, ["10.0.0.254", "10.0.1.2", "10.0.1.3", "10.0.0.250"]);
    }

    #[test]
    fn requested_addresses_and_duplicates() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path(), "n").unwrap();
        let set = set(&[("10.0.0.0/24", None, None)]);
        let ip = |x: &str| Some(x.parse().unwrap());
        assert_eq!(addr(&allocate(&mut s, &set, 0, "a", "eth0", ip("10.0.0.77")).unwrap()), "10.0.0.77");
        assert!(matches!(
            allocate(&mut s, &set, 0, "b", "eth0", ip("10.0.0.77")),
            Err(IpamError::RequestedUnavailable(_))
        ));
        assert!(matches!(
            allocate(&mut s, &set, 0, "b", "eth0", ip("10.0.0.1")),
            Err(IpamError::RequestedUnavailable(_))
        ));
        assert!(matches!(
            allocate(&mut s, &set, 0, "b", "eth0", ip("10.9.0.1")),
            Err(IpamError::RequestedUnavailable(_))
        ));
        assert!(matches!(allocate(&mut s, &set, 0, "a", "eth0", None), Err(IpamError::Duplicate { .. })));
        // Another interface of the same container is a different attachment.
        assert!(allocate(&mut s, &set, 0, "a", "net1", None).is_ok());
        assert_eq!(s.last_reserved(0).unwrap(), "10.0.0.78".parse().ok());
    }

    #[test]
    fn ipv6_allocates_from_start() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Store::open(t.path(), "n").unwrap();
        let set = set(&[("2001:db8:1::/64", None, None)]);
        let c = allocate(&mut s, &set, 1, "a", "eth0", None).unwrap();
        assert_eq!(c.address.to_string(), "2001:db8:1::2/64");
        assert_eq!(c.gateway.unwrap().to_string(), "2001:db8:1::1");
    }
}
