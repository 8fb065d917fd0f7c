//! Dataset layouts: listing samples of image folders and manifests, and streaming
//! WebDataset shards.

use super::bad::{BadKind, BadSample};
use super::config::{DataConfig, DataFormat};
use super::paths::{absolute, open_regular, read_regular, DataRoot};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

pub(crate) const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp"];
const IMAGE_COLUMNS: &[&str] = &[
    "file_name",
    "image",
    "path",
    "image_path",
    "filename",
    "file",
];
const CAPTION_COLUMNS: &[&str] = &["text", "caption", "prompt"];

/// One sample of an indexed (folder or manifest) dataset.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Stable identifier: the path relative to the dataset root, as written.
    pub key: String,
    pub image: PathBuf,
    pub caption: String,
}

#[derive(Debug)]
pub(crate) enum Source {
    Indexed(Vec<Entry>),
    Shards(Vec<PathBuf>),
}

/// A dataset opened for reading: its samples (or shards), what was wrong with it
/// while listing, and a fingerprint of its listing.
#[derive(Debug)]
pub(crate) struct Opened {
    pub source: Source,
    pub format: DataFormat,
    pub description: String,
    pub index_bad: Vec<BadSample>,
    pub fingerprint: String,
}

fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn is_shard_name(name: &str) -> bool {
    name.ends_with(".tar") || name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// Expand shell-style braces: `{000..012}` numeric ranges (zero-padded to the width of
/// the bounds) and `{a,b,c}` alternatives, nested or several per pattern.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            bail!("shard pattern {pattern:?}: '}}' without '{{'");
        }
        return Ok(vec![pattern.to_string()]);
    };
    // Matching close brace.
    let mut depth = 0usize;
    let mut close = None;
    for (i, ch) in pattern[open..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(open + i);
                    break;
                }
            }
            _ => {}
        }
    }
    let close = close.with_context(|| format!("shard pattern {pattern:?}: unclosed '{{'"))?;
    let (prefix, inner, suffix) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let mut alternatives = Vec::new();
    if let Some((a, b)) = inner.split_once("..").filter(|_| !inner.contains(',')) {
        let lo: u64 = a.parse().with_context(|| {
            format!("shard pattern {pattern:?}: range start {a:?} is not a number")
        })?;
        let hi: u64 = b.parse().with_context(|| {
            format!("shard pattern {pattern:?}: range end {b:?} is not a number")
        })?;
        if hi < lo {
            bail!("shard pattern {pattern:?}: range {lo}..{hi} is empty");
        }
        if hi - lo > 10_000_000 {
            bail!("shard pattern {pattern:?}: range {lo}..{hi} is too long");
        }
        let width = if a.starts_with('0') || b.starts_with('0') {
            a.len().max(b.len())
        } else {
            0
        };
        for n in lo..=hi {
            alternatives.push(format!("{n:0width$}"));
        }
    } else {
        // Split on top-level commas.
        let mut depth = 0usize;
        let mut start = 0;
        for (i, ch) in inner.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    alternatives.push(inner[start..i].to_string());
                    start = i + 1;
                }
                _ => {}
            }
        }
        alternatives.push(inner[start..].to_string());
    }
    let mut out = Vec::new();
    for alt in alternatives {
        out.extend(expand_braces(&format!("{prefix}{alt}{suffix}"))?);
    }
    Ok(out)
}

fn walk_images(dir: &Path, root: &DataRoot, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut seen = HashSet::new();
    walk_images_in(dir, root, &mut seen, out)
}

fn walk_images_in(
    dir: &Path,
    root: &DataRoot,
    seen: &mut HashSet<PathBuf>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    // A link cycle (with follow_symlinks) must not recurse forever.
    if !seen.insert(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())) {
        return Ok(());
    }
    let mut items: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    items.sort_by_key(|e| e.file_name());
    for item in items {
        let name = item.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = item.path();
        // Follow symlinks for the type; a dangling link to an image name is kept
        // (it is reported when read). A linked folder is entered only when links
        // may be followed and it stays inside the dataset.
        let is_dir = std::fs::metadata(&path)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if is_dir {
            let is_link = std::fs::symlink_metadata(&path)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false);
            if is_link && root.check(&path).is_err() {
                tracing::warn!(
                    "skipping the linked folder {} (outside the dataset, or data.follow_symlinks = false)",
                    path.display()
                );
                continue;
            }
            walk_images_in(&path, root, seen, out)?;
        } else if is_image_name(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn relative_key(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// Trimmed caption, or the bad kind when it is empty.
fn clean_caption(text: &str) -> Option<String> {
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn imagefolder_txt(data_root: &DataRoot, cfg_strict: bool) -> Result<(Vec<Entry>, Vec<BadSample>)> {
    let root = data_root.path();
    let mut images = Vec::new();
    walk_images(root, data_root, &mut images)?;
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for image in images {
        let txt = image.with_extension("txt");
        let loc = image.display().to_string();
        if let Err(why) = data_root.check(&image).and_then(|_| data_root.check(&txt)) {
            bad.push(BadSample::new(BadKind::OutsideDataset, loc, why));
            if cfg_strict {
                break;
            }
            continue;
        }
        let caption = match read_regular(&txt) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bad.push(BadSample::new(
                    BadKind::MissingCaption,
                    loc,
                    format!("no caption file {}", txt.display()),
                ));
                if cfg_strict {
                    break;
                }
                continue;
            }
            Err(e) => {
                bad.push(BadSample::new(
                    BadKind::Unreadable,
                    txt.display().to_string(),
                    format!("reading the caption: {e}"),
                ));
                if cfg_strict {
                    break;
                }
                continue;
            }
        };
        match clean_caption(&caption) {
            Some(caption) => entries.push(Entry {
                key: relative_key(root, &image),
                image,
                caption,
            }),
            None => {
                bad.push(BadSample::new(
                    BadKind::EmptyCaption,
                    loc,
                    format!("caption file {} is empty", txt.display()),
                ));
                if cfg_strict {
                    break;
                }
            }
        }
    }
    Ok((entries, bad))
}

/// Rows of a manifest as (line number, field lookup).
enum Rows {
    Json(Vec<(usize, serde_json::Map<String, Value>)>),
    Table {
        headers: Vec<String>,
        rows: Vec<(usize, Vec<String>)>,
    },
}

fn value_to_caption(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Array(items) => items.iter().find_map(|i| i.as_str().map(str::to_string)),
        _ => None,
    }
}

fn pick_column(
    manifest: &Path,
    what: &str,
    configured: Option<&str>,
    candidates: &[&str],
    available: &BTreeSet<String>,
    field: &str,
) -> Result<String> {
    let found: Vec<&str> = available.iter().map(String::as_str).collect();
    if let Some(c) = configured {
        if available.contains(c) {
            return Ok(c.to_string());
        }
        bail!(
            "{}: data.{field} = {c:?} is not a column of the manifest (columns found: {})",
            manifest.display(),
            found.join(", ")
        );
    }
    candidates
        .iter()
        .find(|c| available.contains(**c))
        .map(|c| c.to_string())
        .with_context(|| {
            format!(
                "{}: no {what} column (looked for {}; columns found: {}); set data.{field}",
                manifest.display(),
                candidates.join(", "),
                found.join(", ")
            )
        })
}

fn read_manifest(manifest: &Path, root: &DataRoot, cfg: &DataConfig) -> Result<Manifest> {
    let name = manifest
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut bad = Vec::new();
    let rows = if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        let bytes = read_regular(manifest)
            .with_context(|| format!("reading manifest {}", manifest.display()))?;
        let mut rows = Vec::new();
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let Ok(line) = std::str::from_utf8(raw) else {
                bad.push(BadSample::new(
                    BadKind::BadRecord,
                    format!("{} line {}", manifest.display(), i + 1),
                    "not valid UTF-8 text",
                ));
                continue;
            };
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(m)) => rows.push((i + 1, m)),
                Ok(other) => bad.push(BadSample::new(
                    BadKind::BadRecord,
                    format!("{} line {}", manifest.display(), i + 1),
                    format!(
                        "expected a JSON object, found {}",
                        short(&other.to_string())
                    ),
                )),
                Err(e) => bad.push(BadSample::new(
                    BadKind::BadRecord,
                    format!("{} line {}", manifest.display(), i + 1),
                    format!("invalid JSON: {e}"),
                )),
            }
        }
        Rows::Json(rows)
    } else if name.ends_with(".csv") || name.ends_with(".tsv") {
        let delimiter = if name.ends_with(".tsv") { b'\t' } else { b',' };
        let file = open_regular(manifest)
            .with_context(|| format!("reading manifest {}", manifest.display()))?;
        let mut rdr = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .flexible(true)
            .from_reader(std::io::BufReader::new(file));
        let headers: Vec<String> = rdr
            .headers()
            .with_context(|| format!("reading the header line of {}", manifest.display()))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        let mut rows = Vec::new();
        for (i, rec) in rdr.records().enumerate() {
            // Header is line 1.
            let line = rec
                .as_ref()
                .ok()
                .and_then(|r| r.position())
                .map(|p| p.line() as usize);
            match rec {
                Ok(r) => rows.push((
                    line.unwrap_or(i + 2),
                    r.iter().map(str::to_string).collect(),
                )),
                Err(e) => bad.push(BadSample::new(
                    BadKind::BadRecord,
                    match e.position() {
                        Some(p) => format!("{} line {}", manifest.display(), p.line()),
                        None => format!("{} record {}", manifest.display(), i + 1),
                    },
                    format!("{e}"),
                )),
            }
        }
        Rows::Table { headers, rows }
    } else {
        bail!(
            "{}: unknown manifest type (expected .csv, .tsv, .jsonl or .ndjson)",
            manifest.display()
        );
    };
    let available: BTreeSet<String> = match &rows {
        Rows::Json(rows) => rows.iter().flat_map(|(_, m)| m.keys().cloned()).collect(),
        Rows::Table { headers, .. } => headers.iter().cloned().collect(),
    };
    let image_col = pick_column(
        manifest,
        "image path",
        cfg.image_column.as_deref(),
        IMAGE_COLUMNS,
        &available,
        "image_column",
    )?;
    let caption_col = pick_column(
        manifest,
        "caption",
        cfg.caption_column.as_deref(),
        CAPTION_COLUMNS,
        &available,
        "caption_column",
    )?;
    // (line, image field, caption field)
    let records: Vec<(usize, Option<String>, Option<String>)> = match rows {
        Rows::Json(rows) => rows
            .into_iter()
            .map(|(line, m)| {
                let img = m
                    .get(&image_col)
                    .and_then(|v| v.as_str())
                    .map(str::to_string);
                let cap = m.get(&caption_col).and_then(value_to_caption);
                (line, img, cap)
            })
            .collect(),
        Rows::Table { headers, rows } => {
            let ii = headers.iter().position(|h| *h == image_col).unwrap();
            let ci = headers.iter().position(|h| *h == caption_col).unwrap();
            rows.into_iter()
                .map(|(line, r)| (line, r.get(ii).cloned(), r.get(ci).cloned()))
                .collect()
        }
    };
    let mut entries = Vec::new();
    let mut referenced = HashSet::new();
    for (line, img, cap) in records {
        let loc = format!("{} line {line}", manifest.display());
        let Some(img) = img.filter(|s| !s.trim().is_empty()) else {
            bad.push(BadSample::new(
                BadKind::BadRecord,
                loc,
                format!("no image path in column {image_col:?}"),
            ));
            continue;
        };
        let image = match root.resolve(img.trim()) {
            Ok(p) => p,
            Err(why) => {
                bad.push(BadSample::new(BadKind::OutsideDataset, loc, why));
                continue;
            }
        };
        referenced.insert(normalize(&image));
        let file_loc = format!("{} ({loc})", image.display());
        match cap {
            None => bad.push(BadSample::new(
                BadKind::MissingCaption,
                file_loc,
                format!("no caption in column {caption_col:?}"),
            )),
            Some(c) => match clean_caption(&c) {
                Some(caption) => entries.push(Entry {
                    key: img.trim().to_string(),
                    image,
                    caption,
                }),
                None => bad.push(BadSample::new(
                    BadKind::EmptyCaption,
                    file_loc,
                    format!("empty caption in column {caption_col:?}"),
                )),
            },
        }
    }
    Ok(Manifest {
        entries,
        bad,
        referenced,
    })
}

/// A parsed manifest: usable entries, bad rows and every image path it names.
struct Manifest {
    entries: Vec<Entry>,
    bad: Vec<BadSample>,
    referenced: HashSet<PathBuf>,
}

fn short(s: &str) -> String {
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s.to_string()
    }
}

fn hash_entries(format: &str, entries: &[Entry]) -> String {
    let mut h = Sha256::new();
    h.update(format.as_bytes());
    for e in entries {
        h.update((e.key.len() as u64).to_le_bytes());
        h.update(e.key.as_bytes());
        h.update((e.caption.len() as u64).to_le_bytes());
        h.update(e.caption.as_bytes());
    }
    hex(&h.finalize())
}

fn hash_shards(shards: &[PathBuf]) -> String {
    let mut h = Sha256::new();
    h.update(b"webdataset");
    for s in shards {
        let p = s.to_string_lossy();
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
        if let Ok(m) = std::fs::metadata(s) {
            h.update(m.len().to_le_bytes());
            if let Ok(t) = m.modified() {
                if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
                    h.update(d.as_nanos().to_le_bytes());
                }
            }
        }
    }
    hex(&h.finalize())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn list_shards_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| is_shard_name(&n.to_string_lossy()))
        })
        .collect();
    shards.sort();
    Ok(shards)
}

/// What `auto` resolves to for `path`.
fn detect_format(path: &Path) -> Result<DataFormat> {
    let s = path.to_string_lossy();
    if s.contains('{') || is_shard_name(&s) {
        return Ok(DataFormat::Webdataset);
    }
    if !path.exists() {
        bail!("data.path {} does not exist", path.display());
    }
    if path.is_dir() {
        if path.join("metadata.jsonl").is_file() || path.join("metadata.csv").is_file() {
            return Ok(DataFormat::Imagefolder);
        }
        let has_shards = !list_shards_in(path)?.is_empty();
        let has_images = std::fs::read_dir(path)?
            .filter_map(|e| e.ok())
            .any(|e| is_image_name(&e.path()) || e.path().is_dir());
        if has_shards && !has_images {
            return Ok(DataFormat::Webdataset);
        }
        return Ok(DataFormat::Imagefolder);
    }
    let lower = s.to_lowercase();
    if [".csv", ".tsv", ".jsonl", ".ndjson"]
        .iter()
        .any(|e| lower.ends_with(e))
    {
        return Ok(DataFormat::Manifest);
    }
    bail!(
        "data.path {}: cannot tell the dataset format (expected a folder, a .csv/.tsv/.jsonl manifest or .tar shards); set data.format",
        path.display()
    )
}

/// List the dataset described by `cfg`.
pub(crate) fn open(cfg: &DataConfig) -> Result<Opened> {
    cfg.validate()?;
    let path = PathBuf::from(&cfg.path);
    let format = match cfg.format {
        DataFormat::Auto if cfg.path.is_empty() => DataFormat::Webdataset,
        DataFormat::Auto => detect_format(&path)?,
        f => f,
    };
    match format {
        DataFormat::Webdataset => {
            let mut shards = Vec::new();
            if !cfg.path.is_empty() {
                if cfg.path.contains('{') {
                    shards.extend(expand_braces(&cfg.path)?.into_iter().map(PathBuf::from));
                } else if path.is_dir() {
                    let found = list_shards_in(&path)?;
                    let root = DataRoot::new(&path, cfg.follow_symlinks);
                    for s in &found {
                        if let Err(why) = root.check(s) {
                            bail!("data.path: shard {why}");
                        }
                    }
                    if found.is_empty() {
                        bail!(
                            "data.path {}: no .tar shards in this folder",
                            path.display()
                        );
                    }
                    shards.extend(found);
                } else {
                    shards.push(path.clone());
                }
            }
            shards.extend(cfg.shards.iter().cloned());
            // A shard named in the configuration may not be a link either (unless
            // following links, and then it must stay in its folder).
            for s in &shards {
                let parent = s.parent().unwrap_or(Path::new(""));
                if let Err(why) = DataRoot::new(parent, cfg.follow_symlinks).check(s) {
                    bail!("shard {why}");
                }
            }
            let missing: Vec<&PathBuf> = shards.iter().filter(|s| !s.exists()).collect();
            if cfg.strict {
                if let Some(m) = missing.first() {
                    bail!("missing shard {} (strict mode)", m.display());
                }
            }
            if missing.len() == shards.len() {
                bail!(
                    "no usable samples: none of the {} shard(s) exists (first: {})",
                    shards.len(),
                    shards[0].display()
                );
            }
            let fingerprint = hash_shards(&shards);
            Ok(Opened {
                description: format!(
                    "webdataset, {} shard(s) from {}",
                    shards.len(),
                    describe_path(cfg)
                ),
                source: Source::Shards(shards),
                format,
                index_bad: Vec::new(),
                fingerprint,
            })
        }
        DataFormat::Imagefolder => {
            if !path.is_dir() {
                bail!(
                    "data.path {} is not a folder (format = imagefolder)",
                    path.display()
                );
            }
            let root = DataRoot::new(&path, cfg.follow_symlinks);
            let (entries, bad, kind) =
                if path.join("metadata.jsonl").is_file() || path.join("metadata.csv").is_file() {
                    let meta = if path.join("metadata.jsonl").is_file() {
                        path.join("metadata.jsonl")
                    } else {
                        path.join("metadata.csv")
                    };
                    if let Err(why) = root.check(&meta) {
                        bail!("{why}");
                    }
                    let Manifest {
                        entries,
                        mut bad,
                        referenced,
                    } = read_manifest(&meta, &root, cfg)?;
                    // Images present in the folder but not named by the metadata have no caption.
                    let mut images = Vec::new();
                    walk_images(&path, &root, &mut images)?;
                    for img in images {
                        if !referenced.contains(&normalize(&img)) {
                            bad.push(BadSample::new(
                                BadKind::MissingCaption,
                                img.display().to_string(),
                                format!("not listed in {}", meta.display()),
                            ));
                        }
                    }
                    (entries, bad, "imagefolder with metadata")
                } else {
                    let (e, b) = imagefolder_txt(&root, cfg.strict)?;
                    (e, b, "imagefolder with .txt captions")
                };
            finish_indexed(cfg, format, kind, entries, bad)
        }
        DataFormat::Manifest => {
            if !path.is_file() {
                bail!(
                    "data.path {} is not a file (format = manifest)",
                    path.display()
                );
            }
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let root = match &cfg.root {
                Some(r) => {
                    if !absolute(&base).starts_with(absolute(r)) {
                        bail!(
                            "data.root {} does not contain the manifest {}",
                            r.display(),
                            path.display()
                        );
                    }
                    DataRoot::with_base(r, &base, cfg.follow_symlinks)
                }
                None => DataRoot::new(&base, cfg.follow_symlinks),
            };
            let Manifest { entries, bad, .. } = read_manifest(&path, &root, cfg)?;
            finish_indexed(cfg, format, "manifest", entries, bad)
        }
        DataFormat::Auto => unreachable!("auto is resolved above"),
    }
}

fn normalize(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

fn describe_path(cfg: &DataConfig) -> String {
    if cfg.path.is_empty() {
        "data.shards".to_string()
    } else {
        cfg.path.clone()
    }
}

fn finish_indexed(
    cfg: &DataConfig,
    format: DataFormat,
    kind: &str,
    entries: Vec<Entry>,
    bad: Vec<BadSample>,
) -> Result<Opened> {
    if cfg.strict {
        if let Some(b) = bad.first() {
            bail!("bad sample (strict mode): {b}");
        }
    }
    if entries.is_empty() {
        let mut counts = super::bad::BadCounts::default();
        for b in &bad {
            counts.add(b.kind);
        }
        bail!(
            "no usable samples in {} ({kind}); bad: {counts}{}",
            cfg.path,
            bad.first()
                .map(|b| format!("; first: {b}"))
                .unwrap_or_default()
        );
    }
    let fingerprint = hash_entries(kind, &entries);
    Ok(Opened {
        description: format!("{kind} {}, {} samples", cfg.path, entries.len()),
        source: Source::Indexed(entries),
        format,
        index_bad: bad,
        fingerprint,
    })
}

/// The epoch's order of an indexed dataset.
pub(crate) fn epoch_order(n: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, epoch, u64::MAX));
        order.shuffle(&mut rng);
    }
    order
}

/// A well-mixed 64-bit seed from three values (splitmix64 steps).
pub(crate) fn mix(a: u64, b: u64, c: u64) -> u64 {
    fn sm(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    sm(sm(sm(a) ^ b) ^ c)
}

/// An item of a shard stream: a sample to decode, or a bad one.
pub(crate) enum ShardItem {
    Sample {
        key: String,
        location: String,
        caption: String,
        bytes: Vec<u8>,
    },
    Bad(BadSample),
}

struct Group {
    key: String,
    members: Vec<(String, String, Vec<u8>)>, // (ext, member name, bytes)
    duplicate_member: Option<String>,
}

fn split_member(name: &str) -> Option<(String, String)> {
    let (dir, base) = match name.rfind('/') {
        Some(i) => (&name[..=i], &name[i + 1..]),
        None => ("", name),
    };
    let dot = base.find('.')?;
    if dot == 0 {
        return None;
    }
    Some((
        format!("{dir}{}", &base[..dot]),
        base[dot + 1..].to_ascii_lowercase(),
    ))
}

fn finish_group(
    shard: &Path,
    g: Group,
    seen: &mut HashSet<String>,
    caption_column: Option<&str>,
) -> ShardItem {
    let first_member = g.members.first().map(|m| m.1.clone()).unwrap_or_default();
    let loc = |member: &str| format!("shard {} member {member}", shard.display());
    if !seen.insert(g.key.clone()) {
        return ShardItem::Bad(BadSample::new(
            BadKind::DuplicateKey,
            loc(&first_member),
            format!(
                "key {:?} appears more than once in the shard; the later sample is skipped",
                g.key
            ),
        ));
    }
    if let Some(m) = g.duplicate_member {
        return ShardItem::Bad(BadSample::new(
            BadKind::DuplicateKey,
            loc(&m),
            format!("key {:?} has two members named {m}", g.key),
        ));
    }
    let Some(img_idx) = g
        .members
        .iter()
        .position(|m| IMAGE_EXTENSIONS.contains(&m.0.as_str()))
    else {
        let exts: Vec<&str> = g.members.iter().map(|m| m.0.as_str()).collect();
        return ShardItem::Bad(BadSample::new(
            BadKind::MissingImage,
            loc(&first_member),
            format!(
                "key {:?} has no image member (found: {})",
                g.key,
                exts.join(", ")
            ),
        ));
    };
    let image_member = g.members[img_idx].1.clone();
    let mut caption: Option<String> = None;
    let mut why = String::from("no .txt or .json member");
    if let Some(m) = g.members.iter().find(|m| m.0 == "txt") {
        caption = Some(String::from_utf8_lossy(&m.2).into_owned());
    } else if let Some(m) = g.members.iter().find(|m| m.0 == "json") {
        match serde_json::from_slice::<Value>(&m.2) {
            Ok(Value::Object(obj)) => {
                let fields: Vec<&str> = match caption_column {
                    Some(c) => vec![c],
                    None => CAPTION_COLUMNS.to_vec(),
                };
                caption = fields
                    .iter()
                    .find_map(|f| obj.get(*f).and_then(value_to_caption));
                if caption.is_none() {
                    why = format!("{} has no caption field ({})", m.1, fields.join(", "));
                }
            }
            Ok(_) => why = format!("{} is not a JSON object", m.1),
            Err(e) => why = format!("{} is not valid JSON: {e}", m.1),
        }
    }
    let Some(caption) = caption else {
        return ShardItem::Bad(BadSample::new(
            BadKind::MissingCaption,
            loc(&image_member),
            why,
        ));
    };
    let Some(caption) = clean_caption(&caption) else {
        return ShardItem::Bad(BadSample::new(
            BadKind::EmptyCaption,
            loc(&image_member),
            "empty caption",
        ));
    };
    let shard_name = shard
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut members = g.members;
    let bytes = std::mem::take(&mut members[img_idx].2);
    ShardItem::Sample {
        key: format!("{shard_name}/{}", g.key),
        location: loc(&image_member),
        caption,
        bytes,
    }
}

/// Stream the samples of one shard in file order, calling `emit` for each; `emit`
/// returns false to stop. Missing or damaged shards give a bad item.
pub(crate) fn stream_shard(
    shard: &Path,
    caption_column: Option<&str>,
    emit: &mut dyn FnMut(ShardItem) -> bool,
) -> bool {
    let file = match open_regular(shard) {
        Ok(f) => f,
        Err(e) => {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                BadKind::MissingShard
            } else {
                BadKind::Unreadable
            };
            return emit(ShardItem::Bad(BadSample::new(
                kind,
                format!("shard {}", shard.display()),
                e.to_string(),
            )));
        }
    };
    let name = shard.to_string_lossy();
    let reader: Box<dyn Read> = if name.ends_with(".gz") || name.ends_with(".tgz") {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::with_capacity(1 << 20, file))
    };
    let mut archive = tar::Archive::new(reader);
    let corrupt = |detail: String, member: Option<&str>| {
        let loc = match member {
            Some(m) => format!("shard {} member {m}", shard.display()),
            None => format!("shard {}", shard.display()),
        };
        ShardItem::Bad(BadSample::new(BadKind::CorruptShard, loc, detail))
    };
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => return emit(corrupt(format!("not a tar archive: {e}"), None)),
    };
    let mut seen = HashSet::new();
    let mut current: Option<Group> = None;
    let mut last_member: Option<String> = None;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let after = last_member
                    .as_deref()
                    .map(|m| format!(" after member {m}"))
                    .unwrap_or_default();
                if let Some(g) = current.take() {
                    if !emit(finish_group(shard, g, &mut seen, caption_column)) {
                        return false;
                    }
                }
                return emit(corrupt(
                    format!("damaged tar{after}: {e}; the rest of the shard is skipped"),
                    None,
                ));
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => return emit(corrupt(format!("bad member name: {e}"), None)),
        };
        last_member = Some(member.clone());
        let Some((key, ext)) = split_member(&member) else {
            continue;
        };
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        if let Err(e) = entry.read_to_end(&mut bytes) {
            if let Some(g) = current.take() {
                if !emit(finish_group(shard, g, &mut seen, caption_column)) {
                    return false;
                }
            }
            return emit(corrupt(
                format!("truncated member: {e}; the rest of the shard is skipped"),
                Some(&member),
            ));
        }
        match current.as_mut() {
            Some(g) if g.key == key => {
                if g.members.iter().any(|m| m.0 == ext) {
                    g.duplicate_member.get_or_insert(member.clone());
                } else {
                    g.members.push((ext, member, bytes));
                }
            }
            _ => {
                if let Some(g) = current.take() {
                    if !emit(finish_group(shard, g, &mut seen, caption_column)) {
                        return false;
                    }
                }
                current = Some(Group {
                    key,
                    members: vec![(ext, member, bytes)],
                    duplicate_member: None,
                });
            }
        }
    }
    if let Some(g) = current.take() {
        return emit(finish_group(shard, g, &mut seen, caption_column));
    }
    true
}

/// Stream a shard through a seeded shuffle buffer of `buffer` items (0: file order).
pub(crate) fn stream_shard_shuffled(
    shard: &Path,
    caption_column: Option<&str>,
    buffer: usize,
    rng_seed: u64,
    emit: &mut dyn FnMut(ShardItem) -> bool,
) -> bool {
    if buffer <= 1 {
        return stream_shard(shard, caption_column, emit);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
    let mut held: Vec<ShardItem> = Vec::with_capacity(buffer);
    let mut go_on = stream_shard(shard, caption_column, &mut |item| {
        held.push(item);
        if held.len() >= buffer {
            let i = rng.gen_range(0..held.len());
            return emit(held.swap_remove(i));
        }
        true
    });
    while go_on && !held.is_empty() {
        let i = rng.gen_range(0..held.len());
        go_on = emit(held.swap_remove(i));
    }
    go_on
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces() {
        assert_eq!(
            expand_braces("a/{000..002}.tar").unwrap(),
            vec!["a/000.tar", "a/001.tar", "a/002.tar"]
        );
        assert_eq!(
            expand_braces("{x,y}-{1..2}").unwrap(),
            vec!["x-1", "x-2", "y-1", "y-2"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), vec!["plain.tar"]);
        assert!(expand_braces("a/{0..").is_err());
        assert!(expand_braces("a/{5..2}").is_err());
    }

    #[test]
    fn member_names() {
        assert_eq!(
            split_member("000001.jpg"),
            Some(("000001".into(), "jpg".into()))
        );
        assert_eq!(
            split_member("d.x/000001.seg.PNG"),
            Some(("d.x/000001".into(), "seg.png".into()))
        );
        assert_eq!(split_member("noext"), None);
    }

    #[test]
    fn mix_differs() {
        assert_ne!(mix(0, 0, 0), mix(0, 1, 0));
        assert_ne!(mix(0, 0, 1), mix(0, 1, 0));
    }
}
