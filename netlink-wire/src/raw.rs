//! Raw netlink messages for the families rtnetlink does not speak (nftables batches, nexthop
//! objects): attributes and messages encoded, replies walked.

/// Appends attribute `kind` with `payload`, padded to 4 bytes.
pub fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + (4 - len % 4) % 4, 0);
}

/// Appends a nested attribute whose contents `write_inner` writes.
pub fn nested(buf: &mut Vec<u8>, kind: u16, write_inner: impl FnOnce(&mut Vec<u8>)) {
    const NLA_F_NESTED: u16 = 0x8000;
    let mut inner = Vec::new();
    write_inner(&mut inner);
    attr(buf, kind | NLA_F_NESTED, &inner);
}

/// A NUL-terminated string payload.
pub fn strz(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// A message: netlink header, the family's own header (`family_header`), attributes.
pub fn message(kind: u16, flags: u16, seq: u32, family_header: &[u8], attrs: &[u8]) -> Vec<u8> {
    let len = 16 + family_header.len() + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(family_header);
    msg.extend_from_slice(attrs);
    msg
}

/// The message types [`walk`]'s callers match on (an ack is an NLMSG_ERROR with errno 0),
/// taken from netlink-packet-core rather than redefined.
pub use rtnetlink::packet_core::{NLMSG_DONE, NLMSG_ERROR};

/// Calls `visit(type, seq, payload after the header)` for each message in `buf`.
pub fn walk(buf: &[u8], mut visit: impl FnMut(u16, u32, &[u8])) -> Result<(), String> {
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        if len < 16 || off + len > buf.len() {
            return Err("malformed netlink message".into());
        }
        let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
        let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().expect("4 bytes"));
        visit(kind, seq, &buf[off + 16..off + len]);
        off += (len + 3) & !3;
    }
    Ok(())
}

/// Calls `visit(kind, payload)` for each attribute in `buf`, `kind` without the nested and
/// byte-order flags. Stops at the first truncated attribute.
pub fn attrs<'a>(buf: &'a [u8], mut visit: impl FnMut(u16, &'a [u8])) {
    let mut off = 0;
    while off + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & 0x3fff;
        if len < 4 || off + len > buf.len() {
            return;
        }
        visit(kind, &buf[off + 4..off + len]);
        off += (len + 3) & !3;
    }
}

/// The payload of the first attribute `kind` in `buf`.
pub fn find_attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    let mut found = None;
    attrs(buf, |this_kind, payload| {
        if this_kind == kind && found.is_none() {
            found = Some(payload);
        }
    });
    found
}

/// The (negative) errno an NLMSG_ERROR payload carries; 0 for an ack.
pub fn error_code(payload: &[u8]) -> i32 {
    payload.get(..4).map(|bytes| i32::from_ne_bytes(bytes.try_into().expect("4 bytes"))).unwrap_or(-1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_messages_walk_back() {
        let mut a = Vec::new();
        attr(&mut a, 1, &[1, 2, 3]);
        nested(&mut a, 2, |n| attr(n, 3, &strz("ab")));
        assert_eq!(a.len(), 8 + 12);
        assert_eq!(u16::from_ne_bytes([a[10], a[11]]), 2 | 0x8000);
        let mut two = message(100, 1, 7, &[0; 4], &a);
        two.extend(message(NLMSG_ERROR, 0, 8, &[], &0i32.to_ne_bytes()));
        let mut seen = Vec::new();
        walk(&two, |k, s, p| seen.push((k, s, p.len()))).unwrap();
        assert_eq!(seen, [(100, 7, 4 + a.len()), (NLMSG_ERROR, 8, 4)]);
        assert_eq!(error_code(&0i32.to_ne_bytes()), 0);
        assert!(walk(&two[..20], |_, _, _| {}).is_err());
        let inner = find_attr(&a, 2).unwrap();
        assert_eq!(find_attr(inner, 3), Some(&strz("ab")[..]));
        assert_eq!(find_attr(&a, 1), Some(&[1, 2, 3][..]));
        assert_eq!(find_attr(&a[..6], 1), None, "truncated");
    }
}
