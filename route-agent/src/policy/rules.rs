//! The objects the compiler makes (sets and the rules of group chains), written two ways: as
//! `nft` syntax for a whole table, and as netlink expressions for changes in place, which go
//! into the kernel with the element updates in one transaction and without an `nft` process
//! (which would first read the whole table: ~15 ms here before it changes anything).

use std::fmt;

use netlink_wire::nft_objects::{
    concat_type, Expr, Table, BASE_NETWORK, BASE_TRANSPORT, META_L4PROTO, META_NFPROTO, NFT_RETURN,
    NF_ACCEPT, NF_DROP, REG32_00, REG_1, SET_INTERVAL, TYPE_INET_PROTO, TYPE_INET_SERVICE, TYPE_IPV4_ADDR,
    TYPE_IPV6_ADDR,
};
use netlink_wire::nftables::Op;

use super::model::Protocol;

/// A set the policies make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetSpec {
    /// Pod addresses of one family (IPv4 when true); elements follow pods.
    Pods(bool),
    /// `address . protocol . port` of named ports; elements follow pods.
    Named(bool),
    /// Fixed address ranges (ipBlocks less their holes).
    Cidr(bool, Vec<(u128, u128)>),
    /// Fixed port ranges.
    Ports(Vec<(u128, u128)>),
}

fn addr_type(v4: bool) -> &'static str {
    if v4 {
        "ipv4_addr"
    } else {
        "ipv6_addr"
    }
}

fn range_text(a: u128, b: u128, show: impl Fn(u128) -> String) -> String {
    if a == b {
        show(a)
    } else {
        format!("{}-{}", show(a), show(b))
    }
}

/// An address of one family from its number.
pub fn addr_text(x: u128, v4: bool) -> String {
    if v4 {
        std::net::Ipv4Addr::from(x as u32).to_string()
    } else {
        std::net::Ipv6Addr::from(x).to_string()
    }
}

impl SetSpec {
    /// The declaration `nft` takes after `add set inet <table> <name>`.
    pub fn decl(&self) -> String {
        match self {
            SetSpec::Pods(v4) => format!("{{ type {}; }}", addr_type(*v4)),
            SetSpec::Named(v4) => format!("{{ type {} . inet_proto . inet_service; }}", addr_type(*v4)),
            SetSpec::Cidr(v4, ranges) => {
                let elems: Vec<String> =
                    ranges.iter().map(|(a, b)| range_text(*a, *b, |x| addr_text(x, *v4))).collect();
                format!(
                    "{{ type {}; flags interval; elements = {{ {} }}; }}",
                    addr_type(*v4),
                    elems.join(", ")
                )
            }
            SetSpec::Ports(ranges) => {
                let elems: Vec<String> =
                    ranges.iter().map(|(a, b)| range_text(*a, *b, |x| x.to_string())).collect();
                format!("{{ type inet_service; flags interval; elements = {{ {} }}; }}", elems.join(", "))
            }
        }
    }

    /// The netlink messages that declare (and for fixed sets, fill) it.
    pub fn create<'a>(&self, table: Table<'a>, name: &str) -> Vec<Op<'a>> {
        let addr = |v4: bool| if v4 { (TYPE_IPV4_ADDR, 4) } else { (TYPE_IPV6_ADDR, 16) };
        match self {
            SetSpec::Pods(v4) => {
                let (t, len) = addr(*v4);
                vec![table.new_set(name, t, len, 0)]
            }
            SetSpec::Named(v4) => {
                let (t, len) = addr(*v4);
                let ty = concat_type(&[t, TYPE_INET_PROTO, TYPE_INET_SERVICE]);
                vec![table.new_set(name, ty, len + 8, 0)]
            }
            SetSpec::Cidr(v4, ranges) => {
                let (t, len) = addr(*v4);
                vec![table.new_set(name, t, len, SET_INTERVAL), table.add_ranges(name, len as usize, ranges)]
            }
            SetSpec::Ports(ranges) => {
                vec![
                    table.new_set(name, TYPE_INET_SERVICE, 2, SET_INTERVAL),
                    table.add_ranges(name, 2, ranges),
                ]
            }
        }
    }
}

/// Who the peer is: the packet's source (ingress) or destination (egress).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Field {
    /// `saddr`.
    Source,
    /// `daddr`.
    Destination,
}

/// A peer match: the address of one family in a set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerMatch {
    /// IPv4 (else IPv6).
    pub v4: bool,
    /// Which address.
    pub field: Field,
    /// The set.
    pub set: String,
}

/// A port match.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortsMatch {
    /// Any packet.
    Any,
    /// Any port of a protocol.
    Proto(Protocol),
    /// One port or range.
    Range(Protocol, u16, u16),
    /// Ports in a fixed set.
    Set(Protocol, String),
    /// Destination address, protocol and port together in a set (named ports).
    Named(bool, String),
}

/// What a matching packet gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed (ingress).
    Accept,
    /// Allowed past egress: back to the caller, which checks ingress next.
    Return,
    /// Counted in the named counter and dropped.
    Deny(&'static str),
}

/// A rule of a group chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    /// The peer, when the rule names one.
    pub peer: Option<PeerMatch>,
    /// The ports.
    pub ports: PortsMatch,
    /// The verdict.
    pub verdict: Verdict,
}

fn family(v4: bool) -> &'static str {
    if v4 {
        "ip"
    } else {
        "ip6"
    }
}

impl fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.peer {
            let field = match p.field {
                Field::Source => "saddr",
                Field::Destination => "daddr",
            };
            write!(f, "{} {field} @{} ", family(p.v4), p.set)?;
        }
        match &self.ports {
            PortsMatch::Any => {}
            PortsMatch::Proto(p) => write!(f, "meta l4proto {} ", p.nft())?,
            PortsMatch::Range(p, a, b) if a == b => write!(f, "meta l4proto {} th dport {a} ", p.nft())?,
            PortsMatch::Range(p, a, b) => write!(f, "meta l4proto {} th dport {a}-{b} ", p.nft())?,
            PortsMatch::Set(p, s) => write!(f, "meta l4proto {} th dport @{s} ", p.nft())?,
            PortsMatch::Named(v4, s) => write!(f, "{} daddr . meta l4proto . th dport @{s} ", family(*v4))?,
        }
        match self.verdict {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Return => f.write_str("return"),
            Verdict::Deny(counter) => write!(f, "counter name {counter} drop"),
        }
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

impl RuleSpec {
    /// The expressions `nft` makes of this rule's text, in its order and registers.
    pub fn expressions(&self) -> Vec<Expr> {
        let mut out = Vec::new();
        // In an inet table an address match first checks the family, once per rule.
        let mut family_checked = false;
        let nfproto = |out: &mut Vec<Expr>, v4: bool| {
            out.push(Expr::Meta { key: META_NFPROTO, dreg: REG_1 });
            out.push(Expr::CmpEq { sreg: REG_1, data: vec![if v4 { 2 } else { 10 }] });
        };
        let addr = |v4: bool, field: Field, dreg: u32| {
            let (offset, len) = match (v4, field) {
                (true, Field::Source) => (12, 4),
                (true, Field::Destination) => (16, 4),
                (false, Field::Source) => (8, 16),
                (false, Field::Destination) => (24, 16),
            };
            Expr::Payload { base: BASE_NETWORK, offset, len, dreg }
        };
        let dport = |dreg: u32| Expr::Payload { base: BASE_TRANSPORT, offset: 2, len: 2, dreg };
        let l4 = |out: &mut Vec<Expr>, p: Protocol| {
            out.push(Expr::Meta { key: META_L4PROTO, dreg: REG_1 });
            out.push(Expr::CmpEq { sreg: REG_1, data: vec![proto_number(p)] });
        };
        if let Some(p) = &self.peer {
            nfproto(&mut out, p.v4);
            family_checked = true;
            out.push(addr(p.v4, p.field, REG_1));
            out.push(Expr::Lookup { set: p.set.clone(), sreg: REG_1 });
        }
        match &self.ports {
            PortsMatch::Any => {}
            PortsMatch::Proto(p) => l4(&mut out, *p),
            PortsMatch::Range(p, a, b) => {
                l4(&mut out, *p);
                out.push(dport(REG_1));
                if a == b {
                    out.push(Expr::CmpEq { sreg: REG_1, data: a.to_be_bytes().to_vec() });
                } else {
                    out.push(Expr::Range {
                        sreg: REG_1,
                        from: a.to_be_bytes().to_vec(),
                        to: b.to_be_bytes().to_vec(),
                    });
                }
            }
            PortsMatch::Set(p, s) => {
                l4(&mut out, *p);
                out.push(dport(REG_1));
                out.push(Expr::Lookup { set: s.clone(), sreg: REG_1 });
            }
            PortsMatch::Named(v4, s) => {
                if !family_checked {
                    nfproto(&mut out, *v4);
                }
                // A concatenation's parts in consecutive 32-bit registers, numbered as nft
                // numbers them (a part starting on a 128-bit boundary by its 128-bit name).
                let (proto_reg, port_reg) =
                    if *v4 { (REG32_00 + 1, REG32_00 + 2) } else { (REG_1 + 1, REG32_00 + 5) };
                out.push(addr(*v4, Field::Destination, REG_1));
                out.push(Expr::Meta { key: META_L4PROTO, dreg: proto_reg });
                out.push(dport(port_reg));
                out.push(Expr::Lookup { set: s.clone(), sreg: REG_1 });
            }
        }
        match self.verdict {
            Verdict::Accept => out.push(Expr::Verdict(NF_ACCEPT)),
            Verdict::Return => out.push(Expr::Verdict(NFT_RETURN)),
            Verdict::Deny(counter) => {
                out.push(Expr::Counter { name: counter.to_string() });
                out.push(Expr::Verdict(NF_DROP));
            }
        }
        out
    }
}
