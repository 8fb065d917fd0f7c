//! The README's memory-account table against `assets/memory-account/account.txt` (the
//! output of `adt bench --account`), figure by figure.

use std::path::PathBuf;

fn read(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The cells after the first of the line of `text` whose first cell starts with `name`
/// (`|`-separated; README rows start with `|`).
fn row(text: &str, name: &str) -> Vec<String> {
    let line = text
        .lines()
        .find(|l| l.trim_start_matches('|').trim().starts_with(name))
        .unwrap_or_else(|| panic!("no row {name:?}"));
    line.trim()
        .trim_matches('|')
        .split('|')
        .skip(1)
        .map(|c| c.trim().to_string())
        .collect()
}

#[test]
fn readme_account_table_matches_the_asset() {
    let readme = read("README.md");
    let start = readme
        .find("### Memory account of the training state")
        .expect("README section");
    let section = &readme[start..];
    let table_end = section.find("\n\n|").map(|i| i + 2).unwrap();
    let table: String = section[table_end..]
        .lines()
        .take_while(|l| l.starts_with('|'))
        .collect::<Vec<_>>()
        .join("\n");
    let asset = read("assets/memory-account/account.txt");
    let first = |s: &str| s.split_whitespace().next().unwrap_or("").to_string();
    for (readme_name, asset_name) in [
        ("AdamW moments", "AdamW moments"),
        ("bf16 trajectory copy", "bf16 trajectory copy"),
        ("frozen base weights", "frozen base weights (fp32)"),
        ("state total", "state total"),
        ("target", "target"),
    ] {
        let ours: Vec<String> = row(&table, readme_name)
            .iter()
            .map(|c| first(c).replace('—', "-"))
            .collect();
        let theirs: Vec<String> = row(&asset, asset_name)
            .iter()
            .map(|c| {
                let v = first(c);
                // The README prints targets as integers.
                if readme_name == "target" {
                    v.trim_end_matches(".0").to_string()
                } else {
                    v
                }
            })
            .collect();
        assert_eq!(ours, theirs, "row {readme_name:?}");
    }
    // Totals: measured-activation columns as numbers, the others as lower bounds.
    let totals: Vec<String> = row(&table, "total")
        .iter()
        .map(|c| c.replace("≥ ", ">= "))
        .collect();
    assert_eq!(totals, row(&asset, "total"));
}
