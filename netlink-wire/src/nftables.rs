//! nftables over netlink, without an `nft` process (the plugins and the route agent): set
//! elements added, listed and removed in batches, and chain lookups. Elements carry their attachment as a comment stored the way
//! `nft` stores comments (libnftnl userdata), so `nft list` shows it and `nft -f` elements are
//! read back here.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::raw::{attr, attrs, error_code, find_attr, message, nested, strz, walk, NLMSG_DONE, NLMSG_ERROR};
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST};
use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_TABLE_NAME: u16 = 1;
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
/// The longest comment `nft` accepts (NFT_USERDATA_MAXLEN is larger, but `nft` must read it).
pub const COMMENT_MAX: usize = 128;

const ENOENT: i32 = 2;
const EEXIST: i32 = 17;

/// Address families (nfgenmsg) of the tables we touch.
pub const NFPROTO_INET: u8 = 1;
/// `ip` tables (iptables-nft's `nat`).
pub const NFPROTO_IPV4: u8 = 2;
/// `bridge` tables.
pub const NFPROTO_BRIDGE: u8 = 7;
/// `ip6` tables (ip6tables-nft's `nat`).
pub const NFPROTO_IPV6: u8 = 10;

/// A netlink failure: the errno the kernel returned, or a local error.
#[derive(Debug)]
pub enum NlError {
    /// The kernel refused (positive errno).
    Kernel(i32),
    /// The socket or the reply was unusable.
    Local(String),
}

impl std::fmt::Display for NlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NlError::Kernel(code) => write!(f, "{}", std::io::Error::from_raw_os_error(*code)),
            NlError::Local(m) => f.write_str(m),
        }
    }
}

impl NlError {
    fn local(e: impl std::fmt::Display) -> NlError {
        NlError::Local(e.to_string())
    }

    /// The table, set, chain or element does not exist.
    pub fn is_missing(&self) -> bool {
        matches!(self, NlError::Kernel(ENOENT))
    }

    /// An element with that key exists.
    pub fn is_exists(&self) -> bool {
        matches!(self, NlError::Kernel(EEXIST))
    }
}

/// One set element: its key as the kernel holds it and the comment naming its attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The key bytes (an address; for concatenations, each part padded to 4 bytes).
    pub key: Vec<u8>,
    /// The comment, empty when there is none.
    pub comment: String,
}

/// A set of one table: `family`, `table`, `set`.
#[derive(Debug, Clone, Copy)]
pub struct SetRef<'a> {
    /// NFPROTO_* of the table.
    pub family: u8,
    /// Table name.
    pub table: &'a str,
    /// Set or map name.
    pub set: &'a str,
}

/// What one message of a batch does to a set.
pub enum Op<'a> {
    /// Add `key` with a jump to `chain` as its value (for verdict maps) and `comment`.
    Add {
        /// The set.
        set: SetRef<'a>,
        /// The key.
        key: Vec<u8>,
        /// The map value: a chain to jump to.
        chain: Option<&'a str>,
        /// The attachment.
        comment: &'a str,
    },
    /// Remove `keys` (all present, or the message fails with ENOENT).
    Del {
        /// The set.
        set: SetRef<'a>,
        /// The keys.
        keys: Vec<Vec<u8>>,
    },
    /// Any other nf_tables message (tables' objects: [`crate::nft_objects`]).
    Message {
        /// NFT_MSG_* type.
        kind: u16,
        /// NLM_F_* flags beyond request and ack.
        flags: u16,
        /// NFPROTO_* of the table.
        family: u8,
        /// The attributes.
        attrs: Vec<u8>,
    },
}

/// The key bytes of an address.
pub fn ip_key(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(x) => x.octets().to_vec(),
        IpAddr::V6(x) => x.octets().to_vec(),
    }
}

/// A netfilter message: nfgenmsg (family, version 0, resource id) and attributes.
fn nfmsg(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) -> Vec<u8> {
    let [r0, r1] = res_id.to_be_bytes();
    message(kind, flags, seq, &[family, 0, r0, r1], attrs)
}

fn nft_kind(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// The userdata record `nft` writes for a comment.
pub(crate) fn comment_udata(comment: &str) -> Vec<u8> {
    let mut ud = vec![UDATA_SET_ELEM_COMMENT, (comment.len() + 1) as u8];
    ud.extend_from_slice(&strz(comment));
    ud
}

/// The comment in a userdata blob (type-length-value records), empty when there is none.
fn comment_of(udata: &[u8]) -> String {
    let mut off = 0;
    while off + 2 <= udata.len() {
        let (kind, len) = (udata[off], udata[off + 1] as usize);
        let Some(value) = udata.get(off + 2..off + 2 + len) else { break };
        if kind == UDATA_SET_ELEM_COMMENT {
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return String::from_utf8_lossy(text).into_owned();
        }
        off += 2 + len;
    }
    String::new()
}

/// One message of a batch, `exclusive` refusing to replace an existing element.
fn op_message(op: &Op, seq: u32, exclusive: bool) -> Vec<u8> {
    if let Op::Message { kind, flags, family, attrs } = op {
        return nfmsg(nft_kind(*kind), NLM_F_REQUEST | NLM_F_ACK | flags, seq, *family, 0, attrs);
    }
    let (set, kind, flags) = match op {
        Op::Add { set, .. } => {
            let excl = if exclusive { NLM_F_EXCL } else { 0 };
            (set, NFT_MSG_NEWSETELEM, NLM_F_CREATE | excl)
        }
        Op::Del { set, .. } => (set, NFT_MSG_DELSETELEM, 0),
        Op::Message { .. } => return Vec::new(),
    };
    let mut a = Vec::new();
    attr(&mut a, NFTA_SET_ELEM_LIST_TABLE, &strz(set.table));
    attr(&mut a, NFTA_SET_ELEM_LIST_SET, &strz(set.set));
    nested(&mut a, NFTA_SET_ELEM_LIST_ELEMENTS, |l| match op {
        Op::Add { key, chain, comment, .. } => nested(l, NFTA_LIST_ELEM, |e| {
            nested(e, NFTA_SET_ELEM_KEY, |k| attr(k, NFTA_DATA_VALUE, key));
            if let Some(chain) = chain {
                nested(e, NFTA_SET_ELEM_DATA, |d| {
                    nested(d, NFTA_DATA_VERDICT, |v| {
                        attr(v, NFTA_VERDICT_CODE, &NFT_JUMP.to_be_bytes());
                        attr(v, NFTA_VERDICT_CHAIN, &strz(chain));
                    })
                });
            }
            if !comment.is_empty() {
                attr(e, NFTA_SET_ELEM_USERDATA, &comment_udata(comment));
            }
        }),
        Op::Del { keys, .. } => {
            for key in keys {
                nested(l, NFTA_LIST_ELEM, |e| {
                    nested(e, NFTA_SET_ELEM_KEY, |k| attr(k, NFTA_DATA_VALUE, key))
                });
            }
        }
        Op::Message { .. } => {}
    });
    nfmsg(nft_kind(kind), NLM_F_REQUEST | NLM_F_ACK | flags, seq, set.family, 0, &a)
}

/// The batch: begin (sequence number `seq`), one message per operation, end.
pub fn batch(ops: &[Op], exclusive: bool, seq: u32) -> Vec<u8> {
    let mut out = nfmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, &[]);
    let mut seq = seq + 1;
    for op in ops {
        out.extend(op_message(op, seq, exclusive));
        seq += 1;
    }
    out.extend(nfmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, &[]));
    out
}

/// The process's one netfilter socket, opened on first use and closed only at exit. Closing a
/// netfilter socket makes nf_tables flush the deferred destruction of what the last commit
/// removed, which waits for an RCU grace period (~10 ms measured here, more under load) right
/// in DEL's critical path; at exit, after the veth delete, that work has finished on its own.
/// Requests are serialised by the lock; replies are matched by sequence number, so what an
/// earlier request left unread (the acks after a failure) is skipped.
fn with_socket<T>(span: usize, f: impl FnOnce(&Socket, u32) -> Result<T, NlError>) -> Result<T, NlError> {
    static SOCKET: Mutex<Option<Socket>> = Mutex::new(None);
    static SEQ: AtomicU32 = AtomicU32::new(1);
    let mut guard = SOCKET.lock().map_err(|_| NlError::Local("netfilter socket lock poisoned".into()))?;
    if guard.is_none() {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(NlError::local)?;
        sock.bind_auto().map_err(NlError::local)?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(NlError::local)?;
        *guard = Some(sock);
    }
    let sock = guard.as_ref().ok_or_else(|| NlError::Local("no netfilter socket".into()))?;
    // `span` sequence numbers: a batch's begin, messages and end.
    let seq = SEQ.fetch_add(span as u32, Ordering::Relaxed);
    f(sock, seq)
}

/// Opens the process's netfilter socket now: a child forked afterwards shares it, so that
/// when this process exits first, the close (and the wait it brings) is the child's.
pub fn open() -> Result<(), NlError> {
    with_socket(0, |_, _| Ok(()))
}

/// Receives until `f` says done, handing it each message whose sequence number `ours`
/// accepts; the first error wins.
fn receive(
    sock: &Socket,
    ours: impl Fn(u32) -> bool,
    mut f: impl FnMut(u16, &[u8]) -> Result<bool, NlError>,
) -> Result<(), NlError> {
    loop {
        let mut buf: Vec<u8> = Vec::with_capacity(65536);
        let n = sock.recv(&mut buf, 0).map_err(NlError::local)?;
        let mut outcome: Result<bool, NlError> = Ok(false);
        walk(&buf[..n], |kind, seq, payload| {
            if matches!(outcome, Ok(false)) && ours(seq) {
                outcome = f(kind, payload);
            }
        })
        .map_err(NlError::Local)?;
        if outcome? {
            return Ok(());
        }
    }
}

/// Applies `ops` as one transaction: all of them or none. `exclusive`: an existing element
/// fails an `Add` (EEXIST) instead of being kept as it is.
pub fn apply(ops: &[Op], exclusive: bool) -> Result<(), NlError> {
    if ops.is_empty() {
        return Ok(());
    }
    with_socket(ops.len() + 2, |sock, seq| {
        sock.send(&batch(ops, exclusive, seq), 0).map_err(NlError::local)?;
        let mut acked = 0;
        let last = seq + ops.len() as u32;
        receive(
            sock,
            |s| s > seq && s <= last,
            |kind, payload| {
                if kind != NLMSG_ERROR {
                    return Ok(false);
                }
                match error_code(payload) {
                    0 => {
                        acked += 1;
                        Ok(acked == ops.len())
                    }
                    code => Err(NlError::Kernel(-code)),
                }
            },
        )
    })
}

/// Removes `keys` from `set`: 256 elements per message (one ack each: an ack per element
/// overflows the receive buffer), 8 messages per transaction (a whole /16's elements in one
/// would exceed the send buffer). Many keys (a GC after a drain) take several transactions.
pub fn remove(set: SetRef, keys: Vec<Vec<u8>>) -> Result<(), NlError> {
    for batch in keys.chunks(256 * 8) {
        let ops: Vec<Op> = batch.chunks(256).map(|k| Op::Del { set, keys: k.to_vec() }).collect();
        apply(&ops, false)?;
    }
    Ok(())
}

/// Every element of `set`; the error tells a missing table or set ([`NlError::is_missing`])
/// from a failure.
pub fn list(set: SetRef) -> Result<Vec<Element>, NlError> {
    let mut a = Vec::new();
    attr(&mut a, NFTA_SET_ELEM_LIST_TABLE, &strz(set.table));
    attr(&mut a, NFTA_SET_ELEM_LIST_SET, &strz(set.set));
    let req = |seq| nfmsg(nft_kind(NFT_MSG_GETSETELEM), NLM_F_REQUEST | NLM_F_DUMP, seq, set.family, 0, &a);
    dump(req, |payload| {
        // After the 4-byte nfgenmsg: the element list.
        let elems = payload.get(4..).and_then(|p| find_attr(p, NFTA_SET_ELEM_LIST_ELEMENTS));
        let mut out = Vec::new();
        attrs(elems.unwrap_or_default(), |k, elem| {
            if k != NFTA_LIST_ELEM {
                return;
            }
            let key = find_attr(elem, NFTA_SET_ELEM_KEY).and_then(|k| find_attr(k, NFTA_DATA_VALUE));
            let comment = find_attr(elem, NFTA_SET_ELEM_USERDATA).map(comment_of).unwrap_or_default();
            if let Some(key) = key {
                out.push(Element { key: key.to_vec(), comment });
            }
        });
        out
    })
}

/// Sends the dump request `req(seq)` and collects what `item` makes of each reply message.
fn dump<T>(req: impl Fn(u32) -> Vec<u8>, mut item: impl FnMut(&[u8]) -> Vec<T>) -> Result<Vec<T>, NlError> {
    with_socket(1, |sock, seq| {
        sock.send(&req(seq), 0).map_err(NlError::local)?;
        let mut out = Vec::new();
        receive(
            sock,
            |s| s == seq,
            |kind, payload| match kind {
                NLMSG_DONE => Ok(true),
                NLMSG_ERROR => match error_code(payload) {
                    0 => Ok(false),
                    code => Err(NlError::Kernel(-code)),
                },
                _ => {
                    out.extend(item(payload));
                    Ok(false)
                }
            },
        )?;
        Ok(out)
    })
}

/// The rules of chain `chain` in table `family table`, each as its raw attributes (for a
/// look for the names they reference); the error tells a missing table or chain.
pub fn rules(family: u8, table: &str, chain: &str) -> Result<Vec<Vec<u8>>, NlError> {
    let mut a = Vec::new();
    attr(&mut a, NFTA_RULE_TABLE, &strz(table));
    attr(&mut a, NFTA_RULE_CHAIN, &strz(chain));
    let req = |seq| nfmsg(nft_kind(NFT_MSG_GETRULE), NLM_F_REQUEST | NLM_F_DUMP, seq, family, 0, &a);
    let (table_z, chain_z) = (strz(table), strz(chain));
    dump(req, |payload| {
        let a = payload.get(4..).unwrap_or_default();
        // Older kernels ignore the filter and dump every rule of the family.
        let ours = find_attr(a, NFTA_RULE_TABLE) == Some(&table_z[..])
            && find_attr(a, NFTA_RULE_CHAIN) == Some(&chain_z[..]);
        if ours {
            vec![a.to_vec()]
        } else {
            vec![]
        }
    })
}

/// The comment of every rule of table `family table`, with its chain, in chain order (empty
/// when the rule has none): what tells that the rules are the ones a script wrote, without
/// decoding their expressions. Empty, or an error [`NlError::is_missing`], when the table does
/// not exist.
pub fn rule_comments(family: u8, table: &str) -> Result<Vec<(String, String)>, NlError> {
    let mut a = Vec::new();
    attr(&mut a, NFTA_RULE_TABLE, &strz(table));
    let req = |seq| nfmsg(nft_kind(NFT_MSG_GETRULE), NLM_F_REQUEST | NLM_F_DUMP, seq, family, 0, &a);
    let table_z = strz(table);
    dump(req, |payload| {
        let a = payload.get(4..).unwrap_or_default();
        // Older kernels ignore the filter and dump every rule of the family.
        if find_attr(a, NFTA_RULE_TABLE) != Some(&table_z[..]) {
            return vec![];
        }
        let chain = find_attr(a, NFTA_RULE_CHAIN).map(name_of).unwrap_or_default();
        // Rule comments are userdata records as element comments are (type 0 is the comment).
        let comment = find_attr(a, NFTA_RULE_USERDATA).map(comment_of).unwrap_or_default();
        vec![(chain, comment)]
    })
}

/// Whether table `family table` exists: one request, where listing its sets would take one
/// each.
pub fn table_exists(family: u8, table: &str) -> Result<bool, NlError> {
    let mut a = Vec::new();
    attr(&mut a, NFTA_TABLE_NAME, &strz(table));
    with_socket(1, |sock, seq| {
        sock.send(&nfmsg(nft_kind(NFT_MSG_GETTABLE), NLM_F_REQUEST, seq, family, 0, &a), 0)
            .map_err(NlError::local)?;
        let mut found = Ok(false);
        // The answer is the table (no ack asked for) or an error.
        receive(
            sock,
            |s| s == seq,
            |kind, payload| {
                found = match kind {
                    NLMSG_ERROR => match error_code(payload) {
                        0 => Ok(true),
                        code if -code == ENOENT => Ok(false),
                        code => Err(NlError::Kernel(-code)),
                    },
                    _ => Ok(true),
                };
                Ok(true)
            },
        )?;
        found
    })
}

/// A NUL-terminated name attribute as a string.
fn name_of(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}

/// The names of the chains of table `family table`; empty when the table does not exist.
pub fn chains(family: u8, table: &str) -> Result<Vec<String>, NlError> {
    let table_z = strz(table);
    let req = |seq| nfmsg(nft_kind(NFT_MSG_GETCHAIN), NLM_F_REQUEST | NLM_F_DUMP, seq, family, 0, &[]);
    dump(req, |payload| {
        let a = payload.get(4..).unwrap_or_default();
        if find_attr(a, NFTA_CHAIN_TABLE) != Some(&table_z[..]) {
            return vec![];
        }
        find_attr(a, NFTA_CHAIN_NAME).map(name_of).into_iter().collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD4: SetRef = SetRef { family: NFPROTO_INET, table: "cni_bridge", set: "pods4" };

    #[test]
    fn batch_is_begin_one_message_per_op_end() {
        let key = ip_key("10.1.2.5".parse().unwrap());
        let ops = [
            Op::Del { set: POD4, keys: vec![key.clone()] },
            Op::Add { set: POD4, key, chain: Some("masq4-0a010200-24"), comment: "net/c1/eth0" },
        ];
        let b = batch(&ops, true, 1);
        let mut kinds = Vec::new();
        walk(&b, |k, _, _| kinds.push(k)).unwrap();
        assert_eq!(kinds, [NFNL_MSG_BATCH_BEGIN, 0x0a0e, 0x0a0c, NFNL_MSG_BATCH_END]);
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("masq4-0a010200-24") && text.contains("net/c1/eth0"));
    }

    #[test]
    fn comments_read_back_as_written_and_odd_userdata_is_no_comment() {
        assert_eq!(comment_of(&comment_udata("net/c1/eth0")), "net/c1/eth0");
        assert_eq!(comment_of(&[1, 2, 9, 9, 0, 3, b'a', b'b', 0]), "ab", "skips other records");
        assert_eq!(comment_of(&[0, 200, b'a']), "", "truncated");
        assert_eq!(comment_of(&[]), "");
    }
}
