//! The rtnetlink dumps both binaries make (routes of a family, addresses), collected into
//! vectors, and the route attributes they read back. The callers add their own error
//! context: the plugin and the agent report failures in their own error types.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::rtnl::route_addr;

/// An address family to dump routes of: the kernel dumps one family per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// AF_INET.
    V4,
    /// AF_INET6.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    /// The all-zero address of the family: the destination of a default route, which the
    /// kernel sends without RTA_DST.
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }
}

/// Every route of `family`, in every table.
pub async fn routes(handle: &Handle, family: Family) -> Result<Vec<RouteMessage>, rtnetlink::Error> {
    let query = match family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    handle.route().get(query).execute().try_collect().await
}

/// The addresses of link `link`, or of every link when `None`.
pub async fn addresses(handle: &Handle, link: Option<u32>) -> Result<Vec<AddressMessage>, rtnetlink::Error> {
    let mut request = handle.address().get();
    if let Some(index) = link {
        request = request.set_link_index_filter(index);
    }
    request.execute().try_collect().await
}

/// A route's destination address (RTA_DST); `None` for a default route.
pub fn destination(route: &RouteMessage) -> Option<IpAddr> {
    route.attributes.iter().find_map(|attr| match attr {
        RouteAttribute::Destination(dst) => route_addr(dst),
        _ => None,
    })
}

/// A route's gateway (RTA_GATEWAY); `None` for a link route or one through a nexthop object.
pub fn gateway(route: &RouteMessage) -> Option<IpAddr> {
    route.attributes.iter().find_map(|attr| match attr {
        RouteAttribute::Gateway(gw) => route_addr(gw),
        _ => None,
    })
}

/// A route's output interface (RTA_OIF).
pub fn output_interface(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|attr| match attr {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_attributes_read_back_and_a_default_route_has_no_destination() {
        let route = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix("10.1.0.0".parse().unwrap(), 16)
            .unwrap()
            .gateway("192.168.1.1".parse().unwrap())
            .unwrap()
            .output_interface(7)
            .build();
        assert_eq!(destination(&route), Some("10.1.0.0".parse().unwrap()));
        assert_eq!(gateway(&route), Some("192.168.1.1".parse().unwrap()));
        assert_eq!(output_interface(&route), Some(7));
        let default = RouteMessageBuilder::<Ipv6Addr>::new().build();
        assert_eq!(
            (destination(&default), gateway(&default), output_interface(&default)),
            (None, None, None)
        );
        assert_eq!(Family::V6.unspecified(), "::".parse::<IpAddr>().unwrap());
    }
}
