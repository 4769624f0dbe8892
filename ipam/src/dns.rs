//! DNS settings from a resolv.conf file, read as the reference reads it.

use std::path::Path;

use cni_proto::Dns;

/// Parses nameserver/domain/search/options lines; comments and short lines are skipped.
pub fn parse_resolv_conf(text: &str) -> Dns {
    let mut dns = Dns::default();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 2 {
            continue;
        }
        let rest = f[1..].iter().map(|s| s.to_string());
        match f[0] {
            "nameserver" => dns.nameservers.push(f[1].to_string()),
            "domain" => dns.domain = f[1].to_string(),
            "search" => dns.search.extend(rest),
            "options" => dns.options.extend(rest),
            _ => {}
        }
    }
    dns
}

/// Reads and parses `path`.
pub fn read_resolv_conf(path: &Path) -> std::io::Result<Dns> {
    std::fs::read_to_string(path).map(|t| parse_resolv_conf(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_the_reference() {
        let d = parse_resolv_conf(
            "# c\n; c\nnameserver 10.96.0.10\nnameserver fd00::a\ndomain example.com\n\
             search a.svc b.svc\nsearch c\noptions ndots:5 edns0\nbogus x\nnameserver\n",
        );
        assert_eq!(d.nameservers, ["10.96.0.10", "fd00::a"]);
        assert_eq!(d.domain, "example.com");
        assert_eq!(d.search, ["a.svc", "b.svc", "c"]);
        assert_eq!(d.options, ["ndots:5", "edns0"]);
    }
}
