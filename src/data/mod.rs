//! Image-caption datasets for training: formats, preprocessing, prefetching,
//! feature caches and bad-input handling.
//!
//! Supported layouts (see [`DataFormat`]):
//! - an image folder with a `metadata.jsonl` / `metadata.csv` (`file_name`, `text`),
//!   or with a same-name `.txt` caption next to every image;
//! - WebDataset tar shards (`KEY.jpg` + `KEY.txt` / `KEY.json`), streamed;
//! - a CSV / TSV / JSONL manifest of image paths (relative to the manifest) and captions.
//!
//! Samples are decoded (JPEG, PNG, WebP; grayscale, palette, 16-bit, alpha composited on
//! white, EXIF orientation applied), resized on the shortest side, cropped to the training
//! resolution, optionally flipped, and batched as `[B, 3, H, W]` f32 tensors in [-1, 1]
//! together with the SDXL micro-conditioning of every sample.
//!
//! Bad samples are skipped and counted (one warning per kind, a summary per epoch), or
//! with `strict = true` the first one is an error naming the file (and shard member).

mod bad;
mod bench;
mod cache;
mod config;
mod image;
mod inspect;
mod loader;
mod paths;
mod pipeline;
mod source;
mod synth;

pub use bad::{BadCounts, BadKind, BadSample};
pub use bench::{bench_loader, BenchOptions, BenchReport};
pub use cache::{
    latent_entry_id, model_identity, text_entry_id, CacheKey, CacheStatus, FeatureCache,
};
pub use config::{CropMode, DataConfig, DataFormat, Resolution};
pub use image::{decode_image, DecodedImage, Preprocessed, Transform};
pub use inspect::{inspect_data, inspect_data_with, DataReport};
pub use loader::{Batch, DataLoader, DataState, EpochStats, TokenCounter};
pub use source::expand_braces;
pub use synth::write_synthetic_dataset;
