//! `adt prepare-emoji`: the demo's Twemoji -> Noto emoji datasets, built from the
//! `emoji-datasource-<style>` npm packages (`scripts/setup_demo_data.sh` fetches them
//! with `npm pack`).
//!
//! Input: `<cache>/emoji-datasource-<style>-16.0.0.tgz` for every style. Steps:
//! 1. extract `package/emoji.json` and `package/img/<style>/64/*.png` into
//!    `<cache>/emoji-datasource-<style>/` (once; a stamp file marks it done);
//! 2. list every image of `emoji.json` (base emoji and skin-tone variations, in file
//!    order, variations sorted by key) that every style has;
//! 3. composite each RGBA image on white, `(v a + 255 (255 - a) + 127) / 255` per
//!    channel, and write it as RGB PNG at 64x64 and, averaged over 2x2 blocks (rounded
//!    to nearest), at 32x32;
//! 4. split by emoji: an emoji and all its skin-tone variations are held out when the
//!    first 8 bytes of `sha256("adt-demo-split/" + upper-case base code points)`, read
//!    big-endian, are `< 100` mod 1000 (about 10%), the same in every style;
//! 5. write imagefolder datasets with `metadata.jsonl` lines `{"file_name", "text"}`:
//!
//!    `<cache>/data/<name>/{train,heldout}/` (32x32) and
//!    `<cache>/data-64px/<name>/{train,heldout}/` (64x64).
//!
//! Captions: the lower-case Unicode name, the skin tone(s) for variations, and the
//! subcategory, e.g. "grinning face, face-smiling".
//!
//! Idempotent: `<cache>/data/.complete` records the inputs and the format; when it
//! matches, nothing is done. Outputs are built in `.tmp` folders and renamed into place.

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Version of the emoji-datasource packages.
pub const EMOJI_VERSION: &str = "16.0.0";
/// The demo's styles: npm package style -> dataset name.
pub const DEMO_STYLES: [(&str, &str); 2] = [("twitter", "twemoji"), ("google", "noto")];
const SPLIT_SALT: &str = "adt-demo-split/";
const HELDOUT_PER_MILLE: u64 = 100;
/// Bumped when the output changes for the same inputs.
const FORMAT_VERSION: &str = "1";

/// Options of [`prepare_emoji`].
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Folder with the tarballs; the datasets are written under it.
    pub cache: PathBuf,
    /// (npm package style, dataset name), e.g. ("twitter", "twemoji"). Images are kept
    /// when every style has them; the first style's `emoji.json` gives the list.
    pub styles: Vec<(String, String)>,
    /// Rebuild even when the stamp says the outputs are up to date.
    pub force: bool,
}

impl PrepareOptions {
    pub fn demo(cache: impl Into<PathBuf>) -> PrepareOptions {
        PrepareOptions {
            cache: cache.into(),
            styles: DEMO_STYLES
                .iter()
                .map(|(s, n)| (s.to_string(), n.to_string()))
                .collect(),
            force: false,
        }
    }
}

/// What [`prepare_emoji`] did.
#[derive(Debug, Clone, Default)]
pub struct PrepareReport {
    /// True when the stamp matched and nothing was written.
    pub up_to_date: bool,
    /// Images per (dataset name, split).
    pub counts: BTreeMap<(String, String), usize>,
    /// Images listed in emoji.json that a style lacks (skipped in every style).
    pub missing: BTreeMap<String, usize>,
    /// The 32x32 and 64x64 dataset roots.
    pub data: PathBuf,
    pub data_64px: PathBuf,
}

impl std::fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.up_to_date {
            return writeln!(f, "demo data: up to date in {}", self.data.display());
        }
        for (style, n) in &self.missing {
            if *n > 0 {
                writeln!(
                    f,
                    "demo data: {n} images listed in emoji.json are missing from the {style} set (skipped)"
                )?;
            }
        }
        for ((name, split), n) in &self.counts {
            writeln!(f, "demo data: {name:<8} {split:<8} {n:>5} images")?;
        }
        writeln!(
            f,
            "demo data: written to {} (32x32) and {} (64x64)",
            self.data.display(),
            self.data_64px.display()
        )
    }
}

fn tarball(cache: &Path, style: &str) -> PathBuf {
    cache.join(format!("emoji-datasource-{style}-{EMOJI_VERSION}.tgz"))
}

/// Extract emoji.json and the 64 px images of one package; returns the folder.
fn extract(cache: &Path, style: &str) -> Result<PathBuf> {
    let dest = cache.join(format!("emoji-datasource-{style}"));
    let stamp = format!(".extracted-{EMOJI_VERSION}");
    if dest.join(&stamp).is_file() {
        return Ok(dest);
    }
    let tgz = tarball(cache, style);
    if !tgz.is_file() {
        bail!(
            "{} is missing (run scripts/setup_demo_data.sh, which fetches it with npm pack)",
            tgz.display()
        );
    }
    let tmp = cache.join(format!("emoji-datasource-{style}.tmp"));
    remove_dir_if_any(&tmp)?;
    let img_dir = tmp.join("img").join(style).join("64");
    std::fs::create_dir_all(&img_dir).with_context(|| format!("creating {}", img_dir.display()))?;
    let prefix = format!("package/img/{style}/64/");
    let mut count = 0usize;
    let mut has_json = false;
    let unreadable = |e: std::io::Error| {
        anyhow!(
            "{}: cannot read the tarball ({e}); delete it and rerun",
            tgz.display()
        )
    };
    let file = std::fs::File::open(&tgz).with_context(|| format!("opening {}", tgz.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(unreadable)?
            .to_string_lossy()
            .into_owned();
        let rel = if name == "package/emoji.json" {
            has_json = true;
            PathBuf::from("emoji.json")
        } else if let Some(file) = name.strip_prefix(&prefix) {
            if !file.ends_with(".png") || file.contains('/') {
                continue;
            }
            count += 1;
            Path::new("img").join(style).join("64").join(file)
        } else {
            continue;
        };
        let out = tmp.join(rel);
        let mut dst =
            std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
        std::io::copy(&mut entry, &mut dst).map_err(unreadable)?;
    }
    if !has_json {
        bail!("{}: no package/emoji.json inside", tgz.display());
    }
    if count == 0 {
        bail!("{}: no {prefix}*.png inside", tgz.display());
    }
    std::fs::write(tmp.join(&stamp), b"")?;
    remove_dir_if_any(&dest)?;
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    Ok(dest)
}

fn remove_dir_if_any(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

/// A JSON field as a non-empty string (Python's truthiness: "" and null are absent).
fn non_empty<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    v.get(key)
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty())
}

fn skin_tone(code: &str) -> String {
    match code {
        "1F3FB" => "light skin tone".into(),
        "1F3FC" => "medium-light skin tone".into(),
        "1F3FD" => "medium skin tone".into(),
        "1F3FE" => "medium-dark skin tone".into(),
        "1F3FF" => "dark skin tone".into(),
        other => format!("skin tone {}", other.to_lowercase()),
    }
}

/// The caption of an emoji.json entry with the given skin tones.
pub fn caption(entry: &serde_json::Value, tones: &[&str]) -> Result<String> {
    let name = non_empty(entry, "name")
        .or_else(|| non_empty(entry, "short_name"))
        .or_else(|| entry.get("unified").and_then(|u| u.as_str()))
        .ok_or_else(|| anyhow!("emoji.json: an entry without name or unified: {entry}"))?;
    let mut parts = vec![name.to_lowercase()];
    parts.extend(tones.iter().map(|t| skin_tone(t)));
    if let Some(sub) = non_empty(entry, "subcategory") {
        parts.push(sub.to_string());
    }
    Ok(parts.join(", "))
}

/// Whether an emoji (by its base code points, e.g. "1F600") is in the held-out split.
pub fn is_heldout(base_unified: &str) -> bool {
    let h = Sha256::digest(format!("{SPLIT_SALT}{}", base_unified.to_uppercase()).as_bytes());
    let v = u64::from_be_bytes(h[..8].try_into().unwrap());
    v % 1000 < HELDOUT_PER_MILLE
}

/// One image of the datasets.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub file_name: String,
    pub text: String,
    pub heldout: bool,
}

/// Every image of `emoji.json` present in all `dirs` (and per style, how many were not).
fn list_items(
    emoji_json: &Path,
    dirs: &[(String, PathBuf)],
) -> Result<(Vec<Item>, BTreeMap<String, usize>)> {
    let text = std::fs::read_to_string(emoji_json)
        .with_context(|| format!("reading {}", emoji_json.display()))?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON list of emoji", emoji_json.display()))?;
    let mut missing: BTreeMap<String, usize> = dirs.iter().map(|(s, _)| (s.clone(), 0)).collect();
    let mut items = Vec::new();
    for e in &entries {
        let unified = e
            .get("unified")
            .and_then(|u| u.as_str())
            .ok_or_else(|| anyhow!("{}: an entry without \"unified\"", emoji_json.display()))?;
        let held = is_heldout(unified);
        let mut variants: Vec<(&serde_json::Value, Vec<&str>)> = vec![(e, vec![])];
        if let Some(skins) = e.get("skin_variations").and_then(|s| s.as_object()) {
            let mut keys: Vec<&String> = skins.keys().collect();
            keys.sort();
            for k in keys {
                variants.push((&skins[k], k.split('-').collect()));
            }
        }
        for (v, tones) in variants {
            let Some(image) = non_empty(v, "image") else {
                continue;
            };
            let mut present = true;
            for (style, dir) in dirs {
                if !dir.join(image).is_file() {
                    *missing.get_mut(style).unwrap() += 1;
                    present = false;
                }
            }
            if present {
                items.push(Item {
                    file_name: image.to_string(),
                    text: caption(e, &tones)?,
                    heldout: held,
                });
            }
        }
    }
    Ok((items, missing))
}

/// An RGBA8 image over a white background, rounded: `(v a + 255 (255 - a) + 127) / 255`.
pub fn composite_on_white(rgba: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rgba.len() / 4 * 3);
    for px in rgba.chunks_exact(4) {
        let a = px[3] as u32;
        for &v in &px[..3] {
            out.push(((v as u32 * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    out
}

/// Area average over `factor` x `factor` blocks of an RGB8 image, rounded to nearest
/// (halves up).
pub fn box_downsample(rgb: &[u8], width: usize, height: usize, factor: usize) -> Result<Vec<u8>> {
    if !width.is_multiple_of(factor) || !height.is_multiple_of(factor) {
        bail!("image {width}x{height} is not divisible by {factor}");
    }
    let (w2, h2, area) = (width / factor, height / factor, (factor * factor) as u32);
    let mut out = vec![0u8; 3 * w2 * h2];
    for y in 0..h2 {
        for x in 0..w2 {
            for c in 0..3 {
                let mut s = 0u32;
                for dy in 0..factor {
                    for dx in 0..factor {
                        s += rgb[((y * factor + dy) * width + x * factor + dx) * 3 + c] as u32;
                    }
                }
                out[(y * w2 + x) * 3 + c] = ((s + area / 2) / area) as u8;
            }
        }
    }
    Ok(out)
}

fn write_png_rgb(path: &Path, width: u32, height: u32, rgb: &[u8]) -> Result<()> {
    use image::ImageEncoder;
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut buf,
        image::codecs::png::CompressionType::Default,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
    .with_context(|| format!("encoding {}", path.display()))?;
    std::fs::write(path, buf).with_context(|| format!("writing {}", path.display()))
}

/// One `metadata.jsonl` line as Python's `json.dumps(..., ensure_ascii=False)` writes it.
fn metadata_line(file_name: &str, text: &str) -> String {
    let s = |v: &str| serde_json::to_string(v).expect("a string serialises");
    format!(
        "{{\"file_name\": {}, \"text\": {}}}\n",
        s(file_name),
        s(text)
    )
}

fn stamp_text(o: &PrepareOptions) -> String {
    let styles: Vec<String> = o.styles.iter().map(|(s, n)| format!("{s}={n}")).collect();
    serde_json::json!({
        "version": EMOJI_VERSION,
        "format": FORMAT_VERSION,
        "styles": styles,
        "writer": format!("adt {} prepare-emoji", env!("CARGO_PKG_VERSION")),
    })
    .to_string()
}

/// Build the datasets (see the module documentation).
pub fn prepare_emoji(o: &PrepareOptions) -> Result<PrepareReport> {
    if o.styles.is_empty() {
        bail!("prepare-emoji: no style given");
    }
    let data = o.cache.join("data");
    let data_64px = o.cache.join("data-64px");
    let mut report = PrepareReport {
        data: data.clone(),
        data_64px: data_64px.clone(),
        ..Default::default()
    };
    let stamp = data.join(".complete");
    let want = stamp_text(o);
    if !o.force && std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        report.up_to_date = true;
        return Ok(report);
    }
    let mut dirs = Vec::new();
    for (style, _) in &o.styles {
        dirs.push((
            style.clone(),
            extract(&o.cache, style)?.join("img").join(style).join("64"),
        ));
    }
    let emoji_json = o
        .cache
        .join(format!("emoji-datasource-{}", o.styles[0].0))
        .join("emoji.json");
    let (items, missing) = list_items(&emoji_json, &dirs)?;
    report.missing = missing;
    if items.is_empty() {
        bail!("no emoji image is present in every style");
    }
    let outs = [(32u32, data.clone()), (64u32, data_64px.clone())];
    let tmp: Vec<PathBuf> = outs
        .iter()
        .map(|(_, p)| PathBuf::from(format!("{}.tmp", p.display())))
        .collect();
    for t in &tmp {
        remove_dir_if_any(t)?;
    }
    let t0 = Instant::now();
    for ((style, name), (_, src)) in o.styles.iter().zip(&dirs) {
        let mut meta: BTreeMap<(usize, &str), std::io::BufWriter<std::fs::File>> = BTreeMap::new();
        for split in ["train", "heldout"] {
            for (t, root) in tmp.iter().enumerate() {
                let d = root.join(name).join(split);
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                let f = std::fs::File::create(d.join("metadata.jsonl"))
                    .with_context(|| format!("creating {}", d.join("metadata.jsonl").display()))?;
                meta.insert((t, split), std::io::BufWriter::new(f));
            }
        }
        for (i, it) in items.iter().enumerate() {
            let split = if it.heldout { "heldout" } else { "train" };
            let path = src.join(&it.file_name);
            let img = image::open(&path)
                .with_context(|| format!("{}: cannot decode the {style} image", path.display()))?;
            if (img.width(), img.height()) != (64, 64) {
                bail!(
                    "{}: expected 64x64, found {}x{}",
                    path.display(),
                    img.width(),
                    img.height()
                );
            }
            let rgb = composite_on_white(img.to_rgba8().as_raw());
            for (t, (size, _)) in outs.iter().enumerate() {
                let px = if *size == 64 {
                    rgb.clone()
                } else {
                    box_downsample(&rgb, 64, 64, (64 / size) as usize)?
                };
                write_png_rgb(
                    &tmp[t].join(name).join(split).join(&it.file_name),
                    *size,
                    *size,
                    &px,
                )?;
                let line = metadata_line(&it.file_name, &it.text);
                meta.get_mut(&(t, split))
                    .unwrap()
                    .write_all(line.as_bytes())?;
            }
            *report
                .counts
                .entry((name.clone(), split.to_string()))
                .or_default() += 1;
            if (i + 1) % 1000 == 0 {
                eprintln!(
                    "  {name}: {} / {} images ({:.1} s)",
                    i + 1,
                    items.len(),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        for (_, mut f) in meta {
            f.flush()?;
        }
    }
    for (t, (_, path)) in outs.iter().enumerate() {
        remove_dir_if_any(path)?;
        std::fs::rename(&tmp[t], path)
            .with_context(|| format!("renaming {} to {}", tmp[t].display(), path.display()))?;
    }
    std::fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_and_downsample_round_as_documented() {
        // Opaque, transparent and half-transparent pixels.
        let rgba = [10, 200, 255, 255, 0, 0, 0, 0, 100, 0, 50, 128];
        assert_eq!(
            composite_on_white(&rgba),
            // (100*128 + 255*127 + 127) / 255 = 177.6 -> 177; (0 + 32385 + 127)/255 = 127.5 -> 127
            vec![10, 200, 255, 255, 255, 255, 177, 127, 152]
        );
        // 2x2 RGB, one block: (1 + 2 + 3 + 4 + 2) / 4 = 2.5 -> 3 (halves up); 10 + 2 = 12/4 = 3.
        let rgb = [1, 10, 0, 2, 10, 0, 3, 10, 0, 4, 10, 2];
        assert_eq!(box_downsample(&rgb, 2, 2, 2).unwrap(), vec![3, 10, 1]);
        assert!(box_downsample(&rgb[..9], 3, 1, 2).is_err());
    }

    #[test]
    fn captions_and_metadata_match_the_python_format() {
        let e = serde_json::json!({"name": "WAVING HAND SIGN", "unified": "1F44B",
            "subcategory": "hand-fingers-open"});
        assert_eq!(
            caption(&e, &["1F3FD"]).unwrap(),
            "waving hand sign, medium skin tone, hand-fingers-open"
        );
        let e = serde_json::json!({"name": "", "short_name": null, "unified": "1F600"});
        assert_eq!(caption(&e, &["ABC"]).unwrap(), "1f600, skin tone abc");
        assert_eq!(
            metadata_line("a.png", "keycap: \"*\", é"),
            "{\"file_name\": \"a.png\", \"text\": \"keycap: \\\"*\\\", é\"}\n"
        );
    }

    #[test]
    fn heldout_split_matches_values_computed_by_python_hashlib() {
        // int.from_bytes(sha256(b"adt-demo-split/" + u).digest()[:8], "big") % 1000:
        // 2764-FE0F -> 30, 1F196 -> held out in the published split, 1F600 -> 800,
        // 1F44B -> 261, 1F603 -> 234.
        assert!(is_heldout("2764-FE0F"));
        assert!(is_heldout("1f196"));
        assert!(!is_heldout("1F600"));
        assert!(!is_heldout("1F44B"));
        assert!(!is_heldout("1F603"));
        let n = (0..5000).filter(|i| is_heldout(&format!("{i:X}"))).count();
        assert!((400..600).contains(&n), "{n}");
    }

    /// A tarball laid out as the npm package, with the given images (RGBA8 64x64) for `style`.
    fn write_package(
        cache: &Path,
        style: &str,
        emoji_json: &str,
        images: &[(&str, &image::DynamicImage)],
    ) {
        let f = std::fs::File::create(tarball(cache, style)).unwrap();
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            f,
            flate2::Compression::fast(),
        ));
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, data).unwrap();
        };
        add("package/emoji.json", emoji_json.as_bytes());
        add("package/README.md", b"not extracted");
        for (name, img) in images {
            let mut buf = std::io::Cursor::new(Vec::new());
            img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
            add(&format!("package/img/{style}/64/{name}"), buf.get_ref());
        }
        add(&format!("package/img/{style}/32/ignored.png"), b"x");
        tar.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn builds_the_datasets_from_package_tarballs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path();
        let json = r#"[
            {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "subcategory": "face-smiling"},
            {"name": "WAVING HAND SIGN", "unified": "1F44B", "image": "1f44b.png", "subcategory": "hand",
             "skin_variations": {"1F3FD": {"image": "1f44b-1f3fd.png"}, "1F3FB": {"image": "1f44b-1f3fb.png"}}},
            {"name": "HEAVY BLACK HEART", "unified": "2764-FE0F", "image": "2764-fe0f.png", "subcategory": "heart"},
            {"name": "ONLY TWITTER", "unified": "1F603", "image": "1f603.png"}
        ]"#;
        // A gradient with varying alpha (RGBA8), a grey+alpha image and an opaque RGB one.
        let rgba = image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(64, 64, |x, y| {
            image::Rgba([
                (4 * x) as u8,
                (4 * y) as u8,
                200,
                ((x * 64 + y) % 256) as u8,
            ])
        }));
        let la =
            image::DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_fn(64, 64, |x, y| {
                image::LumaA([(x * 3 + y) as u8, (255 - 2 * y) as u8])
            }));
        let rgb = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([x as u8, y as u8, 7])
        }));
        let twitter: Vec<(&str, &image::DynamicImage)> = vec![
            ("1f600.png", &rgba),
            ("1f44b.png", &la),
            ("1f44b-1f3fb.png", &rgb),
            ("1f44b-1f3fd.png", &rgb),
            ("2764-fe0f.png", &rgba),
            ("1f603.png", &rgb),
        ];
        write_package(cache, "twitter", json, &twitter);
        write_package(cache, "google", json, &twitter[..5]);
        let o = PrepareOptions::demo(cache);
        let r = prepare_emoji(&o).unwrap();
        assert!(!r.up_to_date);
        assert_eq!(r.missing["google"], 1);
        assert_eq!(r.missing["twitter"], 0);
        let key = |n: &str, s: &str| (n.to_string(), s.to_string());
        assert_eq!(r.counts[&key("twemoji", "train")], 4);
        assert_eq!(r.counts[&key("twemoji", "heldout")], 1);
        assert_eq!(r.counts[&key("noto", "heldout")], 1);
        for root in ["data", "data-64px"] {
            for name in ["twemoji", "noto"] {
                let train = std::fs::read_to_string(
                    cache.join(root).join(name).join("train/metadata.jsonl"),
                )
                .unwrap();
                assert_eq!(
                    train,
                    "{\"file_name\": \"1f600.png\", \"text\": \"grinning face, face-smiling\"}\n\
                     {\"file_name\": \"1f44b.png\", \"text\": \"waving hand sign, hand\"}\n\
                     {\"file_name\": \"1f44b-1f3fb.png\", \"text\": \"waving hand sign, light skin tone, hand\"}\n\
                     {\"file_name\": \"1f44b-1f3fd.png\", \"text\": \"waving hand sign, medium skin tone, hand\"}\n"
                );
                let held = std::fs::read_to_string(
                    cache.join(root).join(name).join("heldout/metadata.jsonl"),
                )
                .unwrap();
                assert_eq!(
                    held,
                    "{\"file_name\": \"2764-fe0f.png\", \"text\": \"heavy black heart, heart\"}\n"
                );
                assert!(!cache.join(root).join(name).join("train/1f603.png").exists());
            }
        }
        // Pixels: the composite on white of the known inputs, then the 2x2 average.
        let on_white = |v: u32, a: u32| (v * a + 255 * (255 - a) + 127) / 255;
        let got64 = image::open(cache.join("data-64px/noto/train/1f44b.png"))
            .unwrap()
            .to_rgb8();
        let got32 = image::open(cache.join("data/twemoji/heldout/2764-fe0f.png"))
            .unwrap()
            .to_rgb8();
        assert_eq!(got32.dimensions(), (32, 32));
        for y in 0..64u32 {
            for x in 0..64u32 {
                let want = on_white(x * 3 + y, 255 - 2 * y) as u8;
                assert_eq!(got64.get_pixel(x, y).0, [want; 3], "({x}, {y})");
            }
        }
        for y in 0..32u32 {
            for x in 0..32u32 {
                for c in 0..3 {
                    let mut s = 0;
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        let p = rgba.as_rgba8().unwrap().get_pixel(2 * x + dx, 2 * y + dy).0;
                        s += on_white(p[c] as u32, p[3] as u32);
                    }
                    assert_eq!(
                        got32.get_pixel(x, y).0[c] as u32,
                        (s + 2) / 4,
                        "({x}, {y}, {c})"
                    );
                }
            }
        }
        // The extracted package (emoji.json and the 64 px images only).
        let ext = cache.join("emoji-datasource-google");
        assert!(ext.join("emoji.json").is_file() && ext.join("img/google/64/1f600.png").is_file());
        assert!(!ext.join("README.md").exists() && !ext.join("img/google/32").exists());
        // Idempotent; --force rebuilds.
        assert!(prepare_emoji(&o).unwrap().up_to_date);
        let forced = PrepareOptions {
            force: true,
            ..o.clone()
        };
        assert!(!prepare_emoji(&forced).unwrap().up_to_date);
        assert!(!cache.join("data.tmp").exists() && !cache.join("data-64px.tmp").exists());
    }

    #[test]
    fn a_missing_tarball_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = prepare_emoji(&PrepareOptions::demo(dir.path())).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("emoji-datasource-twitter-16.0.0.tgz") && msg.contains("npm pack"),
            "{msg}"
        );
    }
}
