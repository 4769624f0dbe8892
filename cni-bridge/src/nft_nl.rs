//! The steady-state masquerade step over nftables netlink, without an `nft` process: one
//! batch adding the pod's elements to the `pods4`/`pods6` verdict maps of `inet cni_bridge`
//! (value `jump <subnet chain>`, comment = the attachment, stored as `nft` stores comments so
//! `nft list` and DEL/GC read them back). Anything unexpected (no table yet, an old kernel)
//! is an error, and the caller falls back to `nft -f` with the whole structure.

use std::net::IpAddr;

use netlink_wire::{attr, error_code, message, nested, strz, walk, NLMSG_ERROR};
use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
/// libnftnl's NFTNL_UDATA_SET_ELEM_COMMENT, a NUL-terminated string.
const UDATA_SET_ELEM_COMMENT: u8 = 0;

/// A netfilter message: nfgenmsg (family, version 0, resource id) and attributes.
fn nfmsg(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) -> Vec<u8> {
    let [r0, r1] = res_id.to_be_bytes();
    message(kind, flags, seq, &[family, 0, r0, r1], attrs)
}

/// The batch adding `(address, chain)` elements with `comment` to the maps of `table`.
pub fn batch(table: &str, elems: &[(IpAddr, String)], comment: &str) -> Vec<u8> {
    let mut out = nfmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, 0, NFNL_SUBSYS_NFTABLES, &[]);
    let mut seq = 2;
    for (map, v4) in [("pods4", true), ("pods6", false)] {
        let mine: Vec<&(IpAddr, String)> = elems.iter().filter(|(ip, _)| ip.is_ipv4() == v4).collect();
        if mine.is_empty() {
            continue;
        }
        let mut a = Vec::new();
        attr(&mut a, NFTA_SET_ELEM_LIST_TABLE, &strz(table));
        attr(&mut a, NFTA_SET_ELEM_LIST_SET, &strz(map));
        nested(&mut a, NFTA_SET_ELEM_LIST_ELEMENTS, |l| {
            for (ip, chain) in &mine {
                nested(l, NFTA_LIST_ELEM, |e| {
                    let key = match ip {
                        IpAddr::V4(x) => x.octets().to_vec(),
                        IpAddr::V6(x) => x.octets().to_vec(),
                    };
                    nested(e, NFTA_SET_ELEM_KEY, |k| attr(k, NFTA_DATA_VALUE, &key));
                    nested(e, NFTA_SET_ELEM_DATA, |d| {
                        nested(d, NFTA_DATA_VERDICT, |v| {
                            attr(v, NFTA_VERDICT_CODE, &NFT_JUMP.to_be_bytes());
                            attr(v, NFTA_VERDICT_CHAIN, &strz(chain));
                        })
                    });
                    let mut ud = vec![UDATA_SET_ELEM_COMMENT, (comment.len() + 1) as u8];
                    ud.extend_from_slice(&strz(comment));
                    attr(e, NFTA_SET_ELEM_USERDATA, &ud);
                });
            }
        });
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM;
        out.extend(nfmsg(kind, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK, seq, NFPROTO_INET, 0, &a));
        seq += 1;
    }
    out.extend(nfmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, &[]));
    out
}

/// Sends the batch and waits for the acknowledgement of each element message.
pub fn add_elements(table: &str, elems: &[(IpAddr, String)], comment: &str) -> Result<(), String> {
    if comment.len() > 250 {
        return Err("comment too long for one userdata record".into());
    }
    let expected = [true, false].iter().filter(|v4| elems.iter().any(|(ip, _)| ip.is_ipv4() == **v4)).count();
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(|e| e.to_string())?;
    sock.bind_auto().map_err(|e| e.to_string())?;
    sock.connect(&SocketAddr::new(0, 0)).map_err(|e| e.to_string())?;
    sock.send(&batch(table, elems, comment), 0).map_err(|e| e.to_string())?;
    let mut acked = 0;
    while acked < expected {
        let mut buf: Vec<u8> = Vec::with_capacity(16384);
        let n = sock.recv(&mut buf, 0).map_err(|e| e.to_string())?;
        let mut failed = None;
        walk(&buf[..n], |kind, _, payload| {
            if kind == NLMSG_ERROR {
                match error_code(payload) {
                    0 => acked += 1,
                    code => failed = Some(code),
                }
            }
        })?;
        if let Some(code) = failed {
            return Err(std::io::Error::from_raw_os_error(-code).to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_begin_one_message_per_family_end() {
        let b =
            batch("cni_bridge", &[("10.1.2.5".parse().unwrap(), "masq4-0a010200-24".into())], "net/c1/eth0");
        let mut off = 0;
        let mut kinds = Vec::new();
        while off < b.len() {
            let len = u32::from_ne_bytes(b[off..off + 4].try_into().unwrap()) as usize;
            kinds.push(u16::from_ne_bytes(b[off + 4..off + 6].try_into().unwrap()));
            assert_eq!(len % 4, 0);
            off += len;
        }
        assert_eq!(kinds, [NFNL_MSG_BATCH_BEGIN, 0x0a0c, NFNL_MSG_BATCH_END]);
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("masq4-0a010200-24") && text.contains("net/c1/eth0"));
    }
}
