//! Loader throughput benchmark on synthetic JPEGs.

use super::config::{CropMode, DataConfig, Resolution};
use super::loader::DataLoader;
use anyhow::{Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

/// Settings of [`bench_loader`].
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Number of synthetic JPEGs.
    pub images: usize,
    /// Side of the square source JPEGs.
    pub image_size: u32,
    /// Training resolution (crop size).
    pub resolution: u32,
    pub batch_size: usize,
    pub num_workers: usize,
    /// Random crop and flip (else center crop).
    pub augment: bool,
    /// Where to write the JPEGs (default: a fresh folder in the system temp dir, removed after).
    pub dir: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            images: 256,
            image_size: 512,
            resolution: 512,
            batch_size: 8,
            num_workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            augment: true,
            dir: None,
        }
    }
}

/// Result of [`bench_loader`].
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub images: usize,
    pub image_size: u32,
    pub resolution: u32,
    pub num_workers: usize,
    pub batch_size: usize,
    pub mean_jpeg_bytes: u64,
    pub seconds: f64,
    pub images_per_s: f64,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "data loader: {:.1} images/s ({} JPEGs of {}x{} px, ~{} KiB each, to {} px, batch {}, {} workers, {:.2} s)",
            self.images_per_s,
            self.images,
            self.image_size,
            self.image_size,
            self.mean_jpeg_bytes / 1024,
            self.resolution,
            self.batch_size,
            self.num_workers,
            self.seconds
        )
    }
}

/// A photo-like test image: smooth gradients, a few discs and some grain.
fn synthetic_photo(size: u32, rng: &mut ChaCha8Rng) -> RgbImage {
    let base: [f32; 3] = [rng.gen_range(0.0..255.0), rng.gen_range(0.0..255.0), rng.gen_range(0.0..255.0)];
    let discs: Vec<(f32, f32, f32, [f32; 3])> = (0..6)
        .map(|_| {
            let s = size as f32;
            (
                rng.gen_range(0.0..s),
                rng.gen_range(0.0..s),
                rng.gen_range(s * 0.05..s * 0.3),
                [rng.gen_range(0.0..255.0), rng.gen_range(0.0..255.0), rng.gen_range(0.0..255.0)],
            )
        })
        .collect();
    let mut img = RgbImage::new(size, size);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32 / size as f32, y as f32 / size as f32);
        let mut c = [base[0] * (1.0 - fx) + 255.0 * fx * fy, base[1] * (1.0 - fy) + 128.0 * fx, base[2] * 0.5 + 100.0 * fy];
        for (cx, cy, r, col) in &discs {
            let d2 = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
            if d2 < r * r {
                c = *col;
            }
        }
        let grain: f32 = rng.gen_range(-12.0..12.0);
        *p = Rgb(c.map(|v| (v + grain).clamp(0.0, 255.0) as u8));
    }
    img
}

/// Measure the loader's images/s on synthetic JPEGs (decode, resize, crop, flip,
/// batch), over one epoch including the start of the worker threads.
pub fn bench_loader(opts: &BenchOptions) -> Result<BenchReport> {
    let (dir, remove) = match &opts.dir {
        Some(d) => (d.clone(), false),
        None => {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
            (std::env::temp_dir().join(format!("adt-bench-data-{}-{nanos}", std::process::id())), true)
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| -> Result<BenchReport> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut meta = String::new();
        let mut total_bytes = 0u64;
        for i in 0..opts.images {
            let img = synthetic_photo(opts.image_size, &mut rng);
            let mut bytes = Vec::new();
            JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&img).context("encoding a benchmark JPEG")?;
            total_bytes += bytes.len() as u64;
            let name = format!("{i:06}.jpg");
            std::fs::write(dir.join(&name), &bytes).with_context(|| format!("writing {}", dir.join(&name).display()))?;
            meta.push_str(&serde_json::json!({"file_name": name, "text": format!("benchmark image {i}")}).to_string());
            meta.push('\n');
        }
        std::fs::write(dir.join("metadata.jsonl"), meta)?;
        let cfg = DataConfig {
            path: dir.to_string_lossy().into_owned(),
            resolution: Resolution::Square(opts.resolution),
            crop: if opts.augment { CropMode::Random } else { CropMode::Center },
            flip: opts.augment,
            num_workers: opts.num_workers.max(1),
            ..Default::default()
        };
        let start = Instant::now();
        let mut loader = DataLoader::new(&cfg, opts.batch_size)?;
        let batches = opts.images / opts.batch_size;
        let mut n = 0;
        for _ in 0..batches {
            n += loader.next_batch()?.len();
        }
        let seconds = start.elapsed().as_secs_f64();
        Ok(BenchReport {
            images: n,
            image_size: opts.image_size,
            resolution: opts.resolution,
            num_workers: cfg.num_workers,
            batch_size: opts.batch_size,
            mean_jpeg_bytes: total_bytes / opts.images.max(1) as u64,
            seconds,
            images_per_s: n as f64 / seconds,
        })
    })();
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
