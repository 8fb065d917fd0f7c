//! The `[data]` section of the training configuration.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Dataset layout. `Auto` picks one from what `path` points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    #[default]
    Auto,
    /// A folder of images with `metadata.jsonl` / `metadata.csv` or same-name `.txt` captions.
    Imagefolder,
    /// WebDataset tar shards (a shard, a folder of shards, or a brace pattern).
    Webdataset,
    /// A CSV, TSV or JSONL file listing image paths and captions.
    Manifest,
}

/// How the resized image is cropped to the training resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CropMode {
    #[default]
    Center,
    Random,
}

/// Training resolution: a number for square images or `[height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Resolution {
    Square(u32),
    HeightWidth([u32; 2]),
}

impl Default for Resolution {
    fn default() -> Self {
        Resolution::Square(512)
    }
}

impl Resolution {
    /// (height, width) in pixels.
    pub fn hw(&self) -> (u32, u32) {
        match *self {
            Resolution::Square(s) => (s, s),
            Resolution::HeightWidth([h, w]) => (h, w),
        }
    }
}

/// Dataset settings, embedded in the trainer configuration under `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Image folder, manifest file, shard file, shard folder or shard brace pattern
    /// (`data/{000000..000009}.tar`).
    pub path: String,
    /// Explicit WebDataset shard list (used instead of, or in addition to, `path`).
    pub shards: Vec<PathBuf>,
    pub format: DataFormat,
    pub resolution: Resolution,
    pub crop: CropMode,
    /// Random horizontal flip with probability 1/2.
    pub flip: bool,
    /// The first bad sample is an error instead of being skipped and counted.
    pub strict: bool,
    /// Images with more pixels than this are refused from their header, before decoding.
    pub max_pixels: u64,
    /// Shuffle the sample order every epoch (seeded by `seed` and the epoch number).
    pub shuffle: bool,
    pub seed: u64,
    /// Decoding threads.
    pub num_workers: usize,
    /// Batches decoded ahead of the trainer.
    pub prefetch_batches: usize,
    /// Samples held in the shuffle buffer of each WebDataset shard.
    pub shuffle_buffer: usize,
    /// Drop the last incomplete batch of every epoch.
    pub drop_last: bool,
    /// Caption field (manifest / metadata column, or WebDataset `.json` field).
    /// Default: the first of `text`, `caption`, `prompt` that exists.
    pub caption_column: Option<String>,
    /// Image path column of a manifest. Default: the first of `file_name`, `image`,
    /// `path`, `image_path`, `filename`, `file` that exists.
    pub image_column: Option<String>,
    /// Captions longer than this (in tokens of the loader's token counter, or in words
    /// without one) are counted as truncated by the text encoder's window.
    pub max_caption_tokens: Option<usize>,
    /// Follow symbolic links inside the dataset (their targets must still lie in the
    /// dataset folder). Off: a link is refused as a bad sample.
    pub follow_symlinks: bool,
    /// For a manifest: the folder every path it names must stay in (default: the
    /// manifest's own folder). Paths stay relative to the manifest.
    pub root: Option<PathBuf>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            path: String::new(),
            shards: Vec::new(),
            format: DataFormat::Auto,
            resolution: Resolution::default(),
            crop: CropMode::Center,
            flip: false,
            strict: false,
            // The decompression-bomb threshold Pillow uses.
            max_pixels: 89_478_485,
            shuffle: true,
            seed: 0,
            num_workers: 4,
            prefetch_batches: 4,
            shuffle_buffer: 256,
            drop_last: true,
            caption_column: None,
            image_column: None,
            max_caption_tokens: None,
            follow_symlinks: false,
            root: None,
        }
    }
}

impl DataConfig {
    /// A configuration for `path` with every other field at its default.
    pub fn for_path(path: impl Into<String>) -> Self {
        DataConfig {
            path: path.into(),
            ..Default::default()
        }
    }

    /// Check values that no dataset could work with.
    pub fn validate(&self) -> Result<()> {
        if self.path.is_empty() && self.shards.is_empty() {
            bail!("data.path is empty (and no data.shards given): set it to an image folder, manifest or shard pattern");
        }
        let (h, w) = self.resolution.hw();
        if h == 0 || w == 0 {
            bail!("data.resolution must be positive, found {h}x{w}");
        }
        if self.max_pixels == 0 {
            bail!("data.max_pixels must be positive, found 0");
        }
        if self.max_caption_tokens == Some(0) {
            bail!("data.max_caption_tokens must be positive when set, found 0");
        }
        Ok(())
    }
}
