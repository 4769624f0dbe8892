//! nf_tables objects over netlink: sets (with fixed interval elements), chains and rules made
//! of expressions, as [`Op::Message`]s that go into one [`crate::nftables::apply`] batch with
//! element updates. Only what a program that writes its own rules needs: no parsing of `nft`
//! syntax, and what `nft list` shows of them is what `nft` would have made from the same rule.

use crate::nftables::{comment_udata, Op};
use crate::raw::{attr, nested, strz};
use rtnetlink::packet_core::{NLM_F_APPEND, NLM_F_CREATE};

const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;

const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_USERDATA: u16 = 12;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

/// `flags interval`.
pub const SET_INTERVAL: u32 = 0x4;
/// nft's data type numbers (what `nft list` shows a set's key as).
pub const TYPE_IPV4_ADDR: u32 = 7;
/// `ipv6_addr`.
pub const TYPE_IPV6_ADDR: u32 = 8;
/// `inet_proto`.
pub const TYPE_INET_PROTO: u32 = 12;
/// `inet_service`.
pub const TYPE_INET_SERVICE: u32 = 13;

/// A concatenation's type number, as nft composes it (6 bits a part).
pub fn concat_type(parts: &[u32]) -> u32 {
    parts.iter().fold(0, |acc, t| (acc << 6) | t)
}

/// The verdict register, and the first 128-bit and 32-bit data registers.
pub const REG_VERDICT: u32 = 0;
/// NFT_REG_1.
pub const REG_1: u32 = 1;
/// NFT_REG32_00: register `REG32_00 + n` is the `n`th 4 bytes from NFT_REG_1.
pub const REG32_00: u32 = 8;

/// `meta nfproto` and `meta l4proto`.
pub const META_NFPROTO: u32 = 15;
/// `meta l4proto`.
pub const META_L4PROTO: u32 = 16;
/// Payload bases.
pub const BASE_NETWORK: u32 = 1;
/// The transport header.
pub const BASE_TRANSPORT: u32 = 2;

/// Verdicts.
pub const NF_DROP: i32 = 0;
/// Accept.
pub const NF_ACCEPT: i32 = 1;
/// Return to the calling chain.
pub const NFT_RETURN: i32 = -5;

/// One expression of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// Load a meta key into `dreg`.
    Meta {
        /// NFT_META_*.
        key: u32,
        /// Destination register.
        dreg: u32,
    },
    /// Go on only if `sreg` equals `data`.
    CmpEq {
        /// Source register.
        sreg: u32,
        /// The value.
        data: Vec<u8>,
    },
    /// Load `len` bytes at `offset` of header `base` into `dreg`.
    Payload {
        /// NFT_PAYLOAD_*_HEADER.
        base: u32,
        /// Byte offset.
        offset: u32,
        /// Bytes.
        len: u32,
        /// Destination register.
        dreg: u32,
    },
    /// Go on only if `sreg` (a key as long as the set's) is in set `set`.
    Lookup {
        /// Set name.
        set: String,
        /// Source register.
        sreg: u32,
    },
    /// Go on only if `from <= sreg <= to` (big-endian bytes).
    Range {
        /// Source register.
        sreg: u32,
        /// Lowest.
        from: Vec<u8>,
        /// Highest.
        to: Vec<u8>,
    },
    /// Count in the named counter.
    Counter {
        /// Counter name.
        name: String,
    },
    /// A terminal verdict (NF_ACCEPT, NF_DROP, NFT_RETURN).
    Verdict(i32),
}

fn u32be(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

fn data(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    nested(buf, kind, |d| attr(d, NFTA_DATA_VALUE, value));
}

fn expression(list: &mut Vec<u8>, e: &Expr) {
    nested(list, NFTA_LIST_ELEM, |x| {
        let name = match e {
            Expr::Meta { .. } => "meta",
            Expr::CmpEq { .. } => "cmp",
            Expr::Payload { .. } => "payload",
            Expr::Lookup { .. } => "lookup",
            Expr::Range { .. } => "range",
            Expr::Counter { .. } => "objref",
            Expr::Verdict(_) => "immediate",
        };
        attr(x, NFTA_EXPR_NAME, &strz(name));
        nested(x, NFTA_EXPR_DATA, |d| match e {
            Expr::Meta { key, dreg } => {
                attr(d, 2, &u32be(*key));
                attr(d, 1, &u32be(*dreg));
            }
            Expr::CmpEq { sreg, data: v } => {
                attr(d, 1, &u32be(*sreg));
                attr(d, 2, &u32be(0));
                data(d, 3, v);
            }
            Expr::Payload { base, offset, len, dreg } => {
                attr(d, 1, &u32be(*dreg));
                attr(d, 2, &u32be(*base));
                attr(d, 3, &u32be(*offset));
                attr(d, 4, &u32be(*len));
            }
            Expr::Lookup { set, sreg } => {
                attr(d, 1, &strz(set));
                attr(d, 2, &u32be(*sreg));
            }
            Expr::Range { sreg, from, to } => {
                attr(d, 1, &u32be(*sreg));
                attr(d, 2, &u32be(0));
                data(d, 3, from);
                data(d, 4, to);
            }
            Expr::Counter { name } => {
                // NFT_OBJECT_COUNTER.
                attr(d, 1, &u32be(1));
                attr(d, 2, &strz(name));
            }
            Expr::Verdict(code) => {
                attr(d, 1, &u32be(REG_VERDICT));
                nested(d, 2, |v| {
                    nested(v, NFTA_DATA_VERDICT, |c| attr(c, NFTA_VERDICT_CODE, &code.to_be_bytes()))
                });
            }
        });
    });
}

/// The objects of one table of one family.
#[derive(Debug, Clone, Copy)]
pub struct Table<'a> {
    /// NFPROTO_*.
    pub family: u8,
    /// Its name.
    pub name: &'a str,
}

impl<'a> Table<'a> {
    fn op(&self, kind: u16, flags: u16, attrs: Vec<u8>) -> Op<'a> {
        Op::Message { kind, flags, family: self.family, attrs }
    }

    /// A regular chain (no hook), with a comment as `nft` stores one.
    pub fn new_chain(&self, chain: &str, comment: &str) -> Op<'a> {
        let mut a = Vec::new();
        attr(&mut a, NFTA_CHAIN_TABLE, &strz(self.name));
        attr(&mut a, NFTA_CHAIN_NAME, &strz(chain));
        if !comment.is_empty() {
            attr(&mut a, NFTA_CHAIN_USERDATA, &comment_udata(comment));
        }
        self.op(NFT_MSG_NEWCHAIN, NLM_F_CREATE, a)
    }

    /// Deletes an empty, unreferenced chain.
    pub fn del_chain(&self, chain: &str) -> Op<'a> {
        let mut a = Vec::new();
        attr(&mut a, NFTA_CHAIN_TABLE, &strz(self.name));
        attr(&mut a, NFTA_CHAIN_NAME, &strz(chain));
        self.op(NFT_MSG_DELCHAIN, 0, a)
    }

    /// Deletes every rule of a chain.
    pub fn flush_chain(&self, chain: &str) -> Op<'a> {
        let mut a = Vec::new();
        attr(&mut a, NFTA_RULE_TABLE, &strz(self.name));
        attr(&mut a, NFTA_RULE_CHAIN, &strz(chain));
        self.op(NFT_MSG_DELRULE, 0, a)
    }

    /// Appends a rule to a chain.
    pub fn add_rule(&self, chain: &str, exprs: &[Expr]) -> Op<'a> {
        let mut a = Vec::new();
        attr(&mut a, NFTA_RULE_TABLE, &strz(self.name));
        attr(&mut a, NFTA_RULE_CHAIN, &strz(chain));
        nested(&mut a, NFTA_RULE_EXPRESSIONS, |l| {
            for e in exprs {
                expression(l, e);
            }
        });
        self.op(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, a)
    }

    /// Declares a set keyed by `key_type` (nft's type number) of `key_len` bytes.
    pub fn new_set(&self, set: &str, key_type: u32, key_len: u32, flags: u32) -> Op<'a> {
        let mut a = Vec::new();
        attr(&mut a, NFTA_SET_TABLE, &strz(self.name));
        attr(&mut a, NFTA_SET_NAME, &strz(set));
        attr(&mut a, NFTA_SET_FLAGS, &u32be(flags));
        attr(&mut a, NFTA_SET_KEY_TYPE, &u32be(key_type));
        attr(&mut a, NFTA_SET_KEY_LEN, &u32be(key_len));
        // The kernel requires an id naming the set within its transaction (unused here: rules
        // refer to sets by name), so any number unique in this process.
        static ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        attr(&mut a, NFTA_SET_ID, &u32be(ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        self.op(NFT_MSG_NEWSET, NLM_F_CREATE, a)
    }

    /// Deletes an unreferenced set or map.
    pub fn del_set(&self, set: &str) -> Op<'a> {
        let mut a = Vec::new();
        attr(&mut a, NFTA_SET_TABLE, &strz(self.name));
        attr(&mut a, NFTA_SET_NAME, &strz(set));
        self.op(NFT_MSG_DELSET, 0, a)
    }

    /// Fills an interval set with inclusive ranges of big-endian keys (`width` bytes, sorted,
    /// not overlapping): a start element for each, and an end element just past it unless it
    /// runs to the largest key.
    pub fn add_ranges(&self, set: &str, width: usize, ranges: &[(u128, u128)]) -> Op<'a> {
        let key = |v: u128| v.to_be_bytes()[16 - width..].to_vec();
        let max = if width >= 16 { u128::MAX } else { (1u128 << (8 * width)) - 1 };
        let mut a = Vec::new();
        attr(&mut a, NFTA_SET_ELEM_LIST_TABLE, &strz(self.name));
        attr(&mut a, NFTA_SET_ELEM_LIST_SET, &strz(set));
        nested(&mut a, NFTA_SET_ELEM_LIST_ELEMENTS, |l| {
            for (from, to) in ranges {
                nested(l, NFTA_LIST_ELEM, |e| {
                    nested(e, NFTA_SET_ELEM_KEY, |k| attr(k, NFTA_DATA_VALUE, &key(*from)))
                });
                if *to < max {
                    nested(l, NFTA_LIST_ELEM, |e| {
                        nested(e, NFTA_SET_ELEM_KEY, |k| attr(k, NFTA_DATA_VALUE, &key(to + 1)));
                        attr(e, NFTA_SET_ELEM_FLAGS, &u32be(NFT_SET_ELEM_INTERVAL_END));
                    });
                }
            }
        });
        self.op(NFT_MSG_NEWSETELEM, NLM_F_CREATE, a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenations_are_typed_as_nft_types_them() {
        // `ipv4_addr . inet_proto . inet_service`, as `nft --debug=netlink` shows it.
        assert_eq!(concat_type(&[TYPE_IPV4_ADDR, TYPE_INET_PROTO, TYPE_INET_SERVICE]), 29453);
        assert_eq!(concat_type(&[TYPE_IPV4_ADDR, TYPE_IPV4_ADDR]), 455);
    }
}
