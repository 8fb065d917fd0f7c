//! The training data loader: seeded per-epoch order, prefetching, batching,
//! resumable position and bad-sample policy.

use super::bad::{BadCounts, BadKind, BadSample};
use super::config::{DataConfig, DataFormat};
use super::image::Transform;
use super::pipeline::{Body, Good, Mode, Pipeline, Shared};
use super::source::{self, Source};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;
use tch::Tensor;

pub use super::pipeline::TokenCounter;

/// A batch of preprocessed samples.
#[derive(Debug)]
pub struct Batch {
    /// `[B, 3, H, W]` f32 in [-1, 1], on the CPU.
    pub images: Tensor,
    pub captions: Vec<String>,
    /// (height, width) of each upright source image.
    pub original_sizes: Vec<(u32, u32)>,
    /// (top, left) of each crop in the resized image (SDXL micro-conditioning).
    pub crop_top_lefts: Vec<(u32, u32)>,
    /// (height, width) of the training resolution.
    pub target_size: (u32, u32),
    /// The epoch the samples come from.
    pub epoch: u64,
    /// Sample identifiers: path relative to the dataset, or `shard/key`.
    pub keys: Vec<String>,
    /// sha256 of each image file's bytes (hex), for content-keyed caches.
    pub content_hashes: Vec<String>,
    pub flipped: Vec<bool>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// SDXL `add_time_ids`: `[B, 6]` f32 rows of
    /// (original h, original w, crop top, crop left, target h, target w).
    pub fn add_time_ids(&self) -> Tensor {
        let mut v = Vec::with_capacity(self.len() * 6);
        for (o, c) in self.original_sizes.iter().zip(&self.crop_top_lefts) {
            v.extend(
                [o.0, o.1, c.0, c.1, self.target_size.0, self.target_size.1].map(|x| x as f32),
            );
        }
        Tensor::from_slice(&v).view([self.len() as i64, 6])
    }
}

/// Where the loader is in the data: enough to resume the identical sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataState {
    pub epoch: u64,
    /// Items of this epoch already consumed (usable and bad).
    pub index: u64,
    pub seed: u64,
    /// Fingerprint of the dataset listing; a changed dataset cannot be resumed.
    pub fingerprint: String,
}

/// What one epoch (so far) contained.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: u64,
    /// The index this epoch was started (or resumed) at.
    pub started_at: u64,
    pub samples: u64,
    pub batches: u64,
    pub bad: BadCounts,
    /// Captions longer than `max_caption_tokens` (the text encoder will truncate them).
    pub captions_truncated: u64,
}

/// Batches of preprocessed samples, decoded ahead on worker threads.
pub struct DataLoader {
    shared: Arc<Shared>,
    batch_size: usize,
    target: (u32, u32),
    pipeline: Option<Pipeline>,
    epoch: u64,
    index: u64,
    stats: EpochStats,
    last_epoch: Option<EpochStats>,
    warned: HashSet<BadKind>,
    truncation_warned: bool,
    epoch_end_pending: bool,
    index_bad: Vec<BadSample>,
    description: String,
    fingerprint: String,
    format: DataFormat,
}

impl DataLoader {
    /// List the dataset (errors on an unusable configuration or a dataset without
    /// usable samples). Decoding threads start with the first batch.
    pub fn new(cfg: &DataConfig, batch_size: usize) -> Result<Self> {
        if batch_size == 0 {
            bail!("batch size must be positive, found 0");
        }
        let opened = source::open(cfg)?;
        if let Source::Indexed(entries) = &opened.source {
            if cfg.drop_last && entries.len() < batch_size {
                bail!(
                    "{}: {} usable samples, fewer than one batch of {batch_size} (drop_last = true)",
                    opened.description,
                    entries.len()
                );
            }
        }
        let (h, w) = cfg.resolution.hw();
        let transform = Transform {
            height: h,
            width: w,
            crop: cfg.crop,
            flip: cfg.flip,
        };
        let mut warned = HashSet::new();
        if !opened.index_bad.is_empty() {
            let mut counts = BadCounts::default();
            for b in &opened.index_bad {
                counts.add(b.kind);
                if warned.insert(b.kind) {
                    tracing::warn!("skipping bad sample: {b} (further {} are counted)", b.kind);
                }
            }
            tracing::warn!("{}: skipped while listing: {counts}", opened.description);
        }
        tracing::info!("data: {}", opened.description);
        Ok(DataLoader {
            shared: Arc::new(Shared {
                source: opened.source,
                cfg: cfg.clone(),
                mode: Mode::Train(transform),
                token_counter: None,
            }),
            batch_size,
            target: (h, w),
            pipeline: None,
            epoch: 0,
            index: 0,
            stats: EpochStats::default(),
            last_epoch: None,
            warned,
            truncation_warned: false,
            epoch_end_pending: false,
            index_bad: opened.index_bad,
            description: opened.description,
            fingerprint: opened.fingerprint,
            format: opened.format,
        })
    }

    /// Count caption lengths with `counter` (for example the text encoder's tokenizer)
    /// instead of words when checking `max_caption_tokens`.
    pub fn with_token_counter(mut self, counter: TokenCounter) -> Self {
        // Stopping the threads leaves this loader the only holder of the shared state.
        self.pipeline = None;
        Arc::get_mut(&mut self.shared)
            .expect("no thread holds the dataset")
            .token_counter = Some(counter);
        self
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Number of listed samples, when known without streaming (not for shards).
    pub fn len_hint(&self) -> Option<usize> {
        match &self.shared.source {
            Source::Indexed(e) => Some(e.len()),
            Source::Shards(_) => None,
        }
    }

    /// The layout in use (`auto` resolved).
    pub fn format(&self) -> DataFormat {
        self.format
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Bad samples found while listing the dataset (already excluded).
    pub fn index_bad(&self) -> &[BadSample] {
        &self.index_bad
    }

    /// The current epoch so far.
    pub fn epoch_stats(&self) -> &EpochStats {
        &self.stats
    }

    /// The last completed epoch.
    pub fn last_epoch_stats(&self) -> Option<&EpochStats> {
        self.last_epoch.as_ref()
    }

    /// The position after the last batch handed out.
    pub fn state(&self) -> DataState {
        DataState {
            epoch: self.epoch,
            index: self.index,
            seed: self.shared.cfg.seed,
            fingerprint: self.fingerprint.clone(),
        }
    }

    /// Continue from a saved position: the following batches are the ones that
    /// followed it when it was saved.
    pub fn restore(&mut self, state: &DataState) -> Result<()> {
        if state.seed != self.shared.cfg.seed {
            bail!(
                "data state was saved with seed {}, the configuration has data.seed = {}",
                state.seed,
                self.shared.cfg.seed
            );
        }
        if state.fingerprint != self.fingerprint {
            bail!(
                "data state was saved for a different dataset listing (fingerprint {} , now {}): {} changed since",
                short_hash(&state.fingerprint),
                short_hash(&self.fingerprint),
                self.description
            );
        }
        self.pipeline = None;
        self.epoch_end_pending = false;
        self.epoch = state.epoch;
        self.index = state.index;
        self.stats = EpochStats {
            epoch: state.epoch,
            started_at: state.index,
            ..Default::default()
        };
        Ok(())
    }

    fn record_bad(&mut self, b: BadSample) -> Result<()> {
        if self.shared.cfg.strict {
            bail!("bad sample (strict mode): {b}");
        }
        self.stats.bad.add(b.kind);
        if self.warned.insert(b.kind) {
            tracing::warn!(
                "skipping bad sample: {b} (further samples of this kind are skipped silently; see the epoch summary)"
            );
        }
        Ok(())
    }

    fn finish_epoch(&mut self) -> Result<()> {
        let s = std::mem::take(&mut self.stats);
        if s.started_at == 0 && s.samples == 0 {
            bail!(
                "no usable samples in {} (bad samples: {}); nothing to train on",
                self.description,
                s.bad
            );
        }
        if s.started_at == 0 && self.shared.cfg.drop_last && s.samples < self.batch_size as u64 {
            bail!(
                "{}: {} usable samples, fewer than one batch of {} (drop_last = true)",
                self.description,
                s.samples,
                self.batch_size
            );
        }
        if s.bad.total() > 0 || s.captions_truncated > 0 {
            tracing::warn!(
                "data epoch {} done: {} samples in {} batches; skipped {} bad ({}); {} captions longer than the token window",
                s.epoch,
                s.samples,
                s.batches,
                s.bad.total(),
                s.bad,
                s.captions_truncated
            );
        } else {
            tracing::info!(
                "data epoch {} done: {} samples in {} batches",
                s.epoch,
                s.samples,
                s.batches
            );
        }
        self.epoch += 1;
        self.index = 0;
        self.stats = EpochStats {
            epoch: self.epoch,
            ..Default::default()
        };
        self.last_epoch = Some(s);
        Ok(())
    }

    /// The next batch; epochs follow each other without end (a new seeded order each).
    pub fn next_batch(&mut self) -> Result<Batch> {
        self.epoch_end_pending = false;
        Ok(self
            .fill(false)?
            .expect("batches are produced until one is full"))
    }

    /// The next batch of the current epoch, or None once the epoch is over (the call
    /// after that starts the next epoch).
    pub fn next_in_epoch(&mut self) -> Result<Option<Batch>> {
        if std::mem::take(&mut self.epoch_end_pending) {
            return Ok(None);
        }
        self.fill(true)
    }

    fn fill(&mut self, stop_at_epoch_end: bool) -> Result<Option<Batch>> {
        let mut items: Vec<Good> = Vec::with_capacity(self.batch_size);
        let window = self.batch_size * self.shared.cfg.prefetch_batches.max(1)
            + 2 * self.shared.cfg.num_workers.max(1);
        let epoch = self.epoch;
        loop {
            if self.pipeline.is_none() {
                self.pipeline = Some(Pipeline::start(
                    self.shared.clone(),
                    self.epoch,
                    self.index,
                    false,
                    window,
                ));
            }
            let outcome = self.pipeline.as_mut().expect("started above").next()?;
            match outcome.body {
                Body::Good(g) => {
                    self.index += 1;
                    self.stats.samples += 1;
                    if let Some(max) = self.shared.cfg.max_caption_tokens {
                        if g.caption_len > max {
                            self.stats.captions_truncated += 1;
                            if !self.truncation_warned {
                                self.truncation_warned = true;
                                tracing::warn!(
                                    "caption of {} has {} tokens, more than max_caption_tokens = {max}; the text encoder truncates it (further cases are counted)",
                                    g.location,
                                    g.caption_len
                                );
                            }
                        }
                    }
                    items.push(*g);
                    if items.len() == self.batch_size {
                        break;
                    }
                }
                Body::Bad(b) => {
                    self.index += 1;
                    self.record_bad(b)?;
                }
                Body::EpochEnd => {
                    let partial = !items.is_empty() && !self.shared.cfg.drop_last;
                    if partial {
                        // Counted in the epoch it belongs to.
                        self.stats.batches += 1;
                    }
                    self.finish_epoch()?;
                    if partial {
                        self.epoch_end_pending = stop_at_epoch_end;
                        return Ok(Some(self.assemble(items, epoch)));
                    }
                    items.clear();
                    if stop_at_epoch_end {
                        return Ok(None);
                    }
                }
            }
        }
        self.stats.batches += 1;
        Ok(Some(self.assemble(items, self.epoch)))
    }

    fn assemble(&self, items: Vec<Good>, epoch: u64) -> Batch {
        let mut images = Vec::with_capacity(items.len());
        let mut batch = Batch {
            images: Tensor::new(),
            captions: Vec::with_capacity(items.len()),
            original_sizes: Vec::with_capacity(items.len()),
            crop_top_lefts: Vec::with_capacity(items.len()),
            target_size: self.target,
            epoch,
            keys: Vec::with_capacity(items.len()),
            content_hashes: Vec::with_capacity(items.len()),
            flipped: Vec::with_capacity(items.len()),
        };
        for g in items {
            images.push(g.pixels);
            batch.captions.push(g.caption);
            batch.original_sizes.push(g.original_size);
            batch.crop_top_lefts.push(g.crop_top_left);
            batch.keys.push(g.key);
            batch.content_hashes.push(g.content_hash);
            batch.flipped.push(g.flipped);
        }
        batch.images = Tensor::stack(&images, 0);
        batch
    }
}

fn short_hash(h: &str) -> &str {
    &h[..h.len().min(12)]
}
