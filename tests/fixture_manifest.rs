//! The committed fixtures are the ones `scripts/fixtures/make_all.sh` produced: every
//! file under `tests/fixtures` (except the manifest itself and FIXTURES.md) is listed
//! in `tests/fixtures/MANIFEST.sha256` with its sha256, and nothing else is listed.
//! A fixture changed by hand, or a generator's output committed without the manifest
//! (`scripts/fixtures/manifest.sh write`), fails here.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, root, out);
        } else {
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            out.insert(format!("./{rel}"), p);
        }
    }
}

#[test]
fn committed_fixtures_match_the_manifest() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let manifest = std::fs::read_to_string(root.join("MANIFEST.sha256")).unwrap();
    let mut listed = BTreeMap::new();
    for (n, line) in manifest.lines().enumerate() {
        let (hash, name) = line
            .split_once("  ")
            .unwrap_or_else(|| panic!("MANIFEST.sha256 line {}: {line:?}", n + 1));
        assert_eq!(hash.len(), 64, "MANIFEST.sha256 line {}", n + 1);
        listed.insert(name.to_string(), hash.to_string());
    }
    let mut files = BTreeMap::new();
    walk(&root, &root, &mut files);
    files.remove("./MANIFEST.sha256");
    files.remove("./FIXTURES.md");
    let unlisted: Vec<_> = files.keys().filter(|k| !listed.contains_key(*k)).collect();
    let absent: Vec<_> = listed.keys().filter(|k| !files.contains_key(*k)).collect();
    assert!(
        unlisted.is_empty() && absent.is_empty(),
        "tests/fixtures and MANIFEST.sha256 disagree: not listed {unlisted:?}, listed but absent {absent:?} \
         (regenerate with scripts/fixtures/make_all.sh, or scripts/fixtures/manifest.sh write)"
    );
    let mut changed = Vec::new();
    for (name, path) in &files {
        let sha = format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()));
        if sha != listed[name] {
            changed.push(name.clone());
        }
    }
    assert!(
        changed.is_empty(),
        "fixtures differ from MANIFEST.sha256: {changed:?}"
    );
    println!("{} fixture files match the manifest", files.len());
}
