//! Conntrack's own counters, for /metrics: `insert_failed` counts the packets dropped because
//! two flows raced to the same conntrack entry (the source of the well-known 5 s DNS
//! timeouts behind SNAT; `masquerade fully-random` makes it rare, this shows whether it still
//! happens). Read from `/proc/net/stat/nf_conntrack` of the agent's network namespace at
//! each scrape: one row per CPU, hexadecimal, columns named by the first line.

/// Where the kernel publishes the per-CPU counters (of the reader's network namespace).
pub const STAT_FILE: &str = "/proc/net/stat/nf_conntrack";

/// The counters of `text` named `columns`, each summed over the CPUs; `None` for a column the
/// header does not name or a row that does not parse.
pub fn sum_columns(text: &str, columns: &[&str]) -> Vec<Option<u64>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    let rows: Vec<Vec<&str>> =
        lines.map(|l| l.split_whitespace().collect::<Vec<_>>()).filter(|r| !r.is_empty()).collect();
    columns
        .iter()
        .map(|name| {
            let at = header.iter().position(|h| h == name)?;
            rows.iter().try_fold(0u64, |sum, row| {
                let v = u64::from_str_radix(row.get(at)?, 16).ok()?;
                Some(sum.saturating_add(v))
            })
        })
        .collect()
}

/// The Prometheus rows; empty without conntrack (the module not loaded).
pub fn render() -> String {
    let Ok(text) = std::fs::read_to_string(STAT_FILE) else { return String::new() };
    let mut out = String::new();
    let wanted = [
        ("insert_failed", "Conntrack entries not inserted because another flow took the tuple first (the SNAT race), summed over CPUs."),
        ("drop", "Packets conntrack dropped (table full or insertion failed), summed over CPUs."),
    ];
    let names: Vec<&str> = wanted.iter().map(|(n, _)| *n).collect();
    for ((name, help), value) in wanted.iter().zip(sum_columns(&text, &names)) {
        if let Some(v) = value {
            out.push_str(&format!(
                "# HELP cni_route_agent_conntrack_{name}_total {help}\n# TYPE cni_route_agent_conntrack_{name}_total counter\ncni_route_agent_conntrack_{name}_total {v}\n"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_named_column_over_every_cpu() {
        let text = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
            00000004  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 0000000a 00000001 00000000 00000000  00000000 00000000 00000000 00000000\n\
            00000004  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000006 00000002 00000000 00000000  00000000 00000000 00000000 00000000\n";
        assert_eq!(sum_columns(text, &["insert_failed", "drop", "nope"]), [Some(16), Some(3), None]);
        assert_eq!(sum_columns("insert_failed\nzz\n", &["insert_failed"]), [None], "garbage is no number");
        assert_eq!(sum_columns("", &["insert_failed"]), [None]);
    }
}
