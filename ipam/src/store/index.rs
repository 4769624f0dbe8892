//! The index format (`.cni-index/leases`): every lease of a network in one checksummed file,
//! so that DEL and CHECK read one file instead of every lease.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::lease::Lease;

pub(super) const INDEX_MAGIC: &str = "cni-host-local-index 2";

/// The index file's content: what [`render_index`] writes and [`parse_index`] accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexFile {
    /// The kernel's boot id when it was written.
    pub boot: String,
    /// The network directory's stamp after the writer's last change.
    pub stamp: String,
    /// Every lease of the network, by address, as the index recorded it.
    pub leases: BTreeMap<IpAddr, Lease>,
}

/// 64-bit FNV-1a: detects accidental damage (an edited character, a dropped line) in a few
/// lines of code; the index is a cache, not a defence against someone who can write to it.
pub(super) fn fnv1a64(data: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, data);
    std::hash::Hasher::finish(&h)
}

/// Field encoding for index lines: ids and interface names of foreign leases may hold spaces
/// or be empty, which would shift the fields of a space-separated line.
pub(super) fn encode_field(field: &str) -> String {
    if field.is_empty() {
        return "%".into();
    }
    let mut out = String::with_capacity(field.len());
    for byte in field.bytes() {
        if byte <= b' ' || byte >= 0x7f || byte == b'%' {
            out.push_str(&format!("%{byte:02x}"));
        } else {
            out.push(byte as char);
        }
    }
    out
}

pub(super) fn decode_field(field: &str) -> Option<String> {
    if field == "%" {
        return Some(String::new());
    }
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut pos = 0;
    while pos < bytes.len() {
        if bytes[pos] == b'%' {
            let hex = field.get(pos + 1..pos + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            pos += 3;
        } else {
            out.push(bytes[pos]);
            pos += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The index file: a header, one line per lease, and `end <count> <checksum>` over everything
/// before the end line. A torn write or an edit anywhere fails the checksum.
pub fn render_index(idx: &IndexFile) -> String {
    let mut text =
        format!("{INDEX_MAGIC}\nboot {}\nstamp {}\n", encode_field(&idx.boot), encode_field(&idx.stamp));
    for (ip, l) in &idx.leases {
        text.push_str(&format!("lease {ip} {} {}\n", encode_field(&l.id), encode_field(&l.ifname)));
    }
    let sum = fnv1a64(text.as_bytes());
    text.push_str(&format!("end {} {sum:016x}\n", idx.leases.len()));
    text
}

/// Parses an index file; `None` unless it is complete and intact.
pub fn parse_index(text: &str) -> Option<IndexFile> {
    let body_len = text.strip_suffix('\n')?.rfind('\n')? + 1;
    let (body, end) = text.split_at(body_len);
    let mut end_fields = end.strip_suffix('\n')?.split(' ');
    if end_fields.next()? != "end" {
        return None;
    }
    // Exactly as rendered: `F` for `f` or `01` for `1` would parse to the same numbers.
    let (count_field, sum_field) = (end_fields.next()?, end_fields.next()?);
    let count: usize = count_field.parse().ok()?;
    let sum = fnv1a64(body.as_bytes());
    if end_fields.next().is_some() || count_field != count.to_string() || sum_field != format!("{sum:016x}") {
        return None;
    }
    let mut lines = body.lines();
    if lines.next()? != INDEX_MAGIC {
        return None;
    }
    let boot = decode_field(lines.next()?.strip_prefix("boot ")?)?;
    let stamp = decode_field(lines.next()?.strip_prefix("stamp ")?)?;
    let mut leases = BTreeMap::new();
    for line in lines {
        let mut fields = line.split(' ');
        if fields.next()? != "lease" {
            return None;
        }
        let ip: IpAddr = fields.next()?.parse().ok()?;
        let id = decode_field(fields.next()?)?;
        let ifname = decode_field(fields.next()?)?;
        if fields.next().is_some() || leases.insert(ip, Lease { id, ifname }).is_some() {
            return None;
        }
    }
    (leases.len() == count).then_some(IndexFile { boot, stamp, leases })
}
