//! The error-code table in docs/errors.md and the code's table ([`cni_bridge::error::CODE_TABLE`])
//! say the same, both ways: no code undocumented, no documented code that cannot happen.

use std::collections::BTreeMap;

use cni_bridge::error::CODE_TABLE;

/// `code -> from` of the table under "## Error codes" in docs/errors.md.
fn readme_table() -> BTreeMap<u32, String> {
    let readme = include_str!("../../docs/errors.md");
    let section =
        readme.split("\n## Error codes\n").nth(1).expect("docs/errors.md has an \"## Error codes\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let Ok(code) = cells[0].parse::<u32>() else { continue }; // header and rule lines
        let from = cells.last().expect("a row has cells").to_string();
        assert!(rows.insert(code, from).is_none(), "code {code} twice in the README");
    }
    assert!(!rows.is_empty(), "no rows parsed from the README's error table");
    rows
}

#[test]
fn readme_error_table_matches_the_code() {
    let readme = readme_table();
    let code: BTreeMap<u32, String> =
        CODE_TABLE.iter().map(|(c, from)| (*c, from.as_str().to_string())).collect();
    assert_eq!(code.len(), CODE_TABLE.len(), "a code twice in CODE_TABLE");
    for (c, from) in &code {
        assert_eq!(
            readme.get(c),
            Some(from),
            "code {c} (from {from}) is not documented as such in the README"
        );
    }
    for (c, from) in &readme {
        assert_eq!(
            code.get(c),
            Some(from),
            "README documents code {c} (from {from}), the code has no such code"
        );
    }
}
