//! Synthetic image-caption datasets of simple coloured shapes, for smoke tests.

use anyhow::{bail, Context, Result};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

const COLOURS: &[(&str, [u8; 3])] = &[
    ("red", [220, 30, 30]),
    ("green", [30, 170, 60]),
    ("blue", [40, 70, 220]),
    ("yellow", [240, 220, 40]),
    ("purple", [140, 50, 170]),
    ("orange", [245, 140, 20]),
    ("white", [250, 250, 250]),
    ("black", [15, 15, 15]),
];
const SHAPES: &[&str] = &["circle", "square", "triangle"];

fn inside(shape: &str, x: f32, y: f32, cx: f32, cy: f32, r: f32) -> bool {
    let (dx, dy) = (x - cx, y - cy);
    match shape {
        "circle" => dx * dx + dy * dy <= r * r,
        "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        _ => {
            // Upward triangle with apex at (cx, cy - r) and base at cy + r.
            if dy < -r || dy > r {
                return false;
            }
            let half_width = r * (dy + r) / (2.0 * r);
            dx.abs() <= half_width
        }
    }
}

/// Write `n` PNG images of `size`x`size` pixels into `dir`, each a coloured shape on a
/// plain background, with `metadata.jsonl` captions such as "a red circle on a blue
/// background". The same seed gives the same files.
pub fn write_synthetic_dataset(dir: &Path, n: usize, size: u32, seed: u64) -> Result<()> {
    if n == 0 || size < 8 {
        bail!("synthetic dataset needs n >= 1 and size >= 8, found n = {n}, size = {size}");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut meta = String::new();
    for i in 0..n {
        let shape = SHAPES[rng.gen_range(0..SHAPES.len())];
        let fg = rng.gen_range(0..COLOURS.len());
        let bg = (fg + rng.gen_range(1..COLOURS.len())) % COLOURS.len();
        let s = size as f32;
        let r = s * rng.gen_range(0.18..0.32);
        let cx = rng.gen_range(r..s - r);
        let cy = rng.gen_range(r..s - r);
        let img = RgbImage::from_fn(size, size, |x, y| {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            Rgb(if inside(shape, px, py, cx, cy, r) {
                COLOURS[fg].1
            } else {
                COLOURS[bg].1
            })
        });
        let name = format!("{i:06}.png");
        let path = dir.join(&name);
        img.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        let caption = format!(
            "a {} {shape} on a {} background",
            COLOURS[fg].0, COLOURS[bg].0
        );
        meta.push_str(&serde_json::json!({ "file_name": name, "text": caption }).to_string());
        meta.push('\n');
    }
    // Written last and atomically: a kill before this leaves no metadata, and the
    // next run generates the folder again.
    crate::weights::atomic_write(&dir.join("metadata.jsonl"), meta.as_bytes())
}
