//! Loader throughput benchmark on synthetic JPEGs.

use super::config::{CropMode, DataConfig, Resolution};
use super::loader::DataLoader;
use anyhow::{Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

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
            num_workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
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

/// A photo-like test image: smooth gradients, a few discs and some grain
/// (built with tensor ops, so that writing a few hundred stays quick).
fn synthetic_photo(size: u32, rng: &mut ChaCha8Rng) -> Result<RgbImage> {
    let s = size as i64;
    let opts = (Kind::Float, Device::Cpu);
    let yy = Tensor::arange(s, opts).view([s, 1]) / size as f64;
    let xx = Tensor::arange(s, opts).view([1, s]) / size as f64;
    let base: [f64; 3] = [
        rng.gen_range(0.0..255.0),
        rng.gen_range(0.0..255.0),
        rng.gen_range(0.0..255.0),
    ];
    let mut planes = [
        (1.0 - &xx) * base[0] + &xx * &yy * 255.0,
        (1.0 - &yy) * base[1] + &xx * 128.0,
        &yy * 100.0 + base[2] * 0.5,
    ];
    for _ in 0..6 {
        let (cx, cy, r) = (
            rng.gen_range(0.0..1.0),
            rng.gen_range(0.0..1.0),
            rng.gen_range(0.05..0.3),
        );
        let inside = ((&xx - cx).square() + (&yy - cy).square()).lt(r * r);
        for p in planes.iter_mut() {
            let v: f64 = rng.gen_range(0.0..255.0);
            *p = p.where_self(&inside.logical_not(), &Tensor::from(v as f32));
        }
    }
    let tile: Vec<f32> = (0..64 * 64).map(|_| rng.gen_range(-12.0..12.0)).collect();
    let reps = s / 64 + 1;
    let grain = Tensor::from_slice(&tile)
        .view([64, 64])
        .repeat([reps, reps])
        .narrow(0, 0, s)
        .narrow(1, 0, s);
    let img = Tensor::stack(&planes, 2) + grain.unsqueeze(2);
    let bytes = Vec::<u8>::try_from(
        img.clamp(0.0, 255.0)
            .to_kind(Kind::Uint8)
            .contiguous()
            .flatten(0, -1),
    )?;
    RgbImage::from_raw(size, size, bytes).context("building a benchmark image")
}

/// Measure the loader's images/s on synthetic JPEGs (decode, resize, crop, flip,
/// batch), over one epoch including the start of the worker threads.
pub fn bench_loader(opts: &BenchOptions) -> Result<BenchReport> {
    let (dir, remove) = match &opts.dir {
        Some(d) => (d.clone(), false),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .subsec_nanos();
            (
                std::env::temp_dir().join(format!("adt-bench-data-{}-{nanos}", std::process::id())),
                true,
            )
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| -> Result<BenchReport> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut meta = String::new();
        let mut total_bytes = 0u64;
        // Encoding is slow in unoptimised builds: encode a few distinct images and
        // write them under several names (decoding cost is what is measured).
        let distinct = opts.images.clamp(1, 32);
        let mut encoded = Vec::with_capacity(distinct);
        for _ in 0..distinct {
            let img = synthetic_photo(opts.image_size, &mut rng)?;
            let mut bytes = Vec::new();
            JpegEncoder::new_with_quality(&mut bytes, 90)
                .encode_image(&img)
                .context("encoding a benchmark JPEG")?;
            encoded.push(bytes);
        }
        for i in 0..opts.images {
            let bytes = &encoded[i % distinct];
            total_bytes += bytes.len() as u64;
            let name = format!("{i:06}.jpg");
            std::fs::write(dir.join(&name), bytes)
                .with_context(|| format!("writing {}", dir.join(&name).display()))?;
            meta.push_str(
                &serde_json::json!({"file_name": name, "text": format!("benchmark image {i}")})
                    .to_string(),
            );
            meta.push('\n');
        }
        std::fs::write(dir.join("metadata.jsonl"), meta)?;
        let cfg = DataConfig {
            path: dir.to_string_lossy().into_owned(),
            resolution: Resolution::Square(opts.resolution),
            crop: if opts.augment {
                CropMode::Random
            } else {
                CropMode::Center
            },
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
