//! One lease file, byte-compatible with the reference host-local: `<containerid>\r\n<ifname>`.

/// Who holds an address; `ifname` is empty for leases written before the reference
/// recorded interface names (pre-0.8.0), which match any interface of the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The container id.
    pub id: String,
    /// The interface name.
    pub ifname: String,
}

impl Lease {
    /// Parses a lease file. `None` for a torn lease: empty (a writer killed between creating
    /// and writing it) or holding NUL bytes (unwritten blocks after a power loss). Every writer
    /// (ours and the reference) writes under the lock, so a torn lease seen under the lock is
    /// the remnant of a dead writer, not a write in progress.
    pub fn parse(content: &[u8]) -> Option<Lease> {
        if content.contains(&0) {
            return None;
        }
        let text = String::from_utf8_lossy(content);
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return None;
        }
        Some(match trimmed.split_once("\r\n") {
            Some((id, ifname)) => Lease { id: id.trim().to_string(), ifname: ifname.trim().to_string() },
            None => Lease { id: trimmed.to_string(), ifname: String::new() },
        })
    }

    /// The reference's lease file content.
    pub fn render(id: &str, ifname: &str) -> String {
        format!("{}\r\n{}", id.trim(), ifname)
    }
}
