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
    for name in ["AdamW moments", "state total", "target"] {
        let ours: Vec<String> = row(&table, name)
            .iter()
            .map(|c| first(c).replace('—', "-"))
            .collect();
        let theirs: Vec<String> = row(&asset, name)
            .iter()
            .map(|c| {
                let v = first(c);
                // The README prints targets as integers.
                if name == "target" {
                    v.trim_end_matches(".0").to_string()
                } else {
                    v
                }
            })
            .collect();
        assert_eq!(ours, theirs, "row {name:?}");
    }
    // Lines whose dtype depends on the configuration ("VAE (fp32)", "VAE (bf16)"):
    // per column the one asset line that applies, its value and its dtype in the
    // README cell ("0.16 (bf16)").
    for name in [
        "frozen base weights",
        "bf16 trajectory copy",
        "VAE",
        "text encoders",
        "DINOv2 features",
    ] {
        let ours = row(&table, name);
        let lines: Vec<(String, Vec<String>)> = asset
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let n = cells[0];
                (n == name || n.starts_with(&format!("{name} ("))).then(|| {
                    let dtype = n[name.len()..]
                        .trim_matches(|c| c == ' ' || c == '(' || c == ')')
                        .split(',')
                        .next()
                        .unwrap_or("")
                        .to_string();
                    (dtype, cells[1..].iter().map(|c| c.to_string()).collect())
                })
            })
            .collect();
        assert!(!lines.is_empty(), "no asset line {name:?}");
        for (i, cell) in ours.iter().enumerate() {
            let applies: Vec<&(String, Vec<String>)> =
                lines.iter().filter(|(_, v)| v[i] != "-").collect();
            assert!(
                applies.len() <= 1,
                "{name:?} column {i}: several asset lines"
            );
            match applies.first() {
                None => assert_eq!(first(cell).replace('—', "-"), "-", "{name:?} column {i}"),
                Some((dtype, v)) => {
                    assert_eq!(first(cell), v[i], "{name:?} column {i}");
                    if !dtype.is_empty() {
                        assert!(
                            cell.contains(&format!("({dtype}")),
                            "{name:?} column {i}: {cell:?} does not say {dtype}"
                        );
                    }
                }
            }
        }
    }
    // Host memory of text encoders on the host is quoted in the text-encoder cell.
    for (cell, host) in row(&table, "text encoders")
        .iter()
        .zip(row(&asset, "host memory (text encoders)"))
    {
        if host != "0.00" {
            assert!(
                cell.contains(&format!("{host} GiB of host memory")),
                "{cell:?} does not quote {host} GiB of host memory"
            );
        }
    }
    // Totals: measured-activation columns as numbers, the others as lower bounds.
    let totals: Vec<String> = row(&table, "total")
        .iter()
        .map(|c| c.replace("≥ ", ">= ").replace("≤ ", "<= "))
        .collect();
    assert_eq!(totals, row(&asset, "total"));
}
