//! CNI spec versions and the rules that depend on them.

use std::fmt;

/// A CNI spec version (`major.minor.patch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(pub u8, pub u8, pub u8);

/// Every spec version this project's plugins implement, oldest first.
/// Only real spec versions: a library release number is never a spec version.
pub const SUPPORTED: [Version; 7] = [
    Version(0, 1, 0),
    Version(0, 2, 0),
    Version(0, 3, 0),
    Version(0, 3, 1),
    Version(0, 4, 0),
    Version(1, 0, 0),
    Version(1, 1, 0),
];

impl Version {
    /// The newest spec version.
    pub const CURRENT: Version = Version(1, 1, 0);
    /// CHECK exists from this version on.
    pub const CHECK: Version = Version(0, 4, 0);
    /// GC and STATUS exist from this version on.
    pub const GC_STATUS: Version = Version(1, 1, 0);
    /// The rich result (interfaces/ips/routes) exists from this version on.
    pub const RICH_RESULT: Version = Version(0, 3, 0);

    /// Parses `x.y.z`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Version> {
        let mut parts = text.split('.');
        let mut next = || -> Option<u8> {
            let part = parts.next()?;
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            part.parse().ok()
        };
        let version = Version(next()?, next()?, next()?);
        if parts.next().is_some() {
            return None;
        }
        Some(version)
    }

    /// Whether the plugins implement this version.
    pub fn is_supported(self) -> bool {
        SUPPORTED.contains(&self)
    }

    /// Whether results of this version carry `ips[].version` (0.3.x and 0.4.0).
    pub fn has_ip_version_field(self) -> bool {
        self >= Version(0, 3, 0) && self < Version(1, 0, 0)
    }

    /// Whether results of this version use the legacy `ip4`/`ip6` shape (0.1.0, 0.2.0).
    pub fn is_legacy(self) -> bool {
        self < Self::RICH_RESULT
    }

    /// The supported versions as strings, for VERSION output and error details.
    pub fn supported_strings() -> Vec<String> {
        SUPPORTED.iter().map(|v| v.to_string()).collect()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_three_numeric_parts() {
        assert_eq!(Version::parse("1.1.0"), Some(Version(1, 1, 0)));
        assert_eq!(Version::parse("0.3.1"), Some(Version(0, 3, 1)));
        for bad in ["", "1", "1.0", "1.0.0.0", "a.b.c", "1.-1.0", "1..0", " 1.0.0"] {
            assert_eq!(Version::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn supported_are_spec_versions_only() {
        assert_eq!(
            Version::supported_strings(),
            ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        );
        assert!(!Version(1, 2, 0).is_supported());
        assert!(!Version(1, 3, 0).is_supported());
    }

    #[test]
    fn shape_rules_per_version() {
        assert!(Version(0, 2, 0).is_legacy());
        assert!(!Version(0, 3, 0).is_legacy());
        assert!(Version(0, 3, 1).has_ip_version_field());
        assert!(Version(0, 4, 0).has_ip_version_field());
        assert!(!Version(1, 0, 0).has_ip_version_field());
        assert!(Version(0, 4, 0) < Version(1, 0, 0));
    }
}
