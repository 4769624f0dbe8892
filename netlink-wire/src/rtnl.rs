//! Reading what rtnetlink hands back: a NACK's errno and the addresses in its messages. Apart
//! from lib.rs so that dump.rs uses them without importing the crate root.

use std::net::IpAddr;

use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::route::RouteAddress;

/// The errno of a kernel NACK (positive).
pub fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| -code.get()),
        _ => None,
    }
}

/// An IPv4/IPv6 route address.
pub fn route_addr(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// The address of an address message.
pub fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    message.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })
}
