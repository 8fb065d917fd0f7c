//! Prefetching: a producer thread lists the epoch's samples in order (reading shards
//! as it goes), decoding threads process them, and the consumer takes the results
//! back in sequence order, so the output is the same whatever the thread timing.

use super::bad::{BadKind, BadSample};
use super::config::DataConfig;
use super::image::{decode_image, Transform};
use super::source::{epoch_order, mix, stream_shard_shuffled, ShardItem, Source};
use anyhow::{anyhow, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::Tensor;

/// Counts the tokens of a caption (for example with the text encoder's tokenizer).
pub type TokenCounter = Arc<dyn Fn(&str) -> usize + Send + Sync>;

/// What the decoding threads do with an image.
#[derive(Clone, Copy)]
pub(crate) enum Mode {
    /// Decode, resize, crop, flip.
    Train(Transform),
    /// Decode only (to validate it and record its size).
    Inspect,
}

pub(crate) struct Shared {
    pub source: Source,
    pub cfg: DataConfig,
    pub mode: Mode,
    pub token_counter: Option<TokenCounter>,
}

enum Payload {
    File(PathBuf),
    Bytes(Vec<u8>),
}

struct Job {
    epoch: u64,
    seq: u64,
    key: String,
    location: String,
    caption: String,
    payload: Payload,
}

/// A usable sample.
pub(crate) struct Good {
    pub key: String,
    pub location: String,
    pub caption: String,
    /// `[3, H, W]` f32; empty in inspect mode.
    pub pixels: Tensor,
    pub original_size: (u32, u32),
    pub crop_top_left: (u32, u32),
    pub flipped: bool,
    /// sha256 of the image file bytes (hex).
    pub content_hash: String,
    /// Caption length in tokens (token counter) or words.
    pub caption_len: usize,
}

pub(crate) enum Body {
    Good(Box<Good>),
    Bad(BadSample),
    EpochEnd,
}

pub(crate) struct Outcome {
    pub epoch: u64,
    pub seq: u64,
    pub body: Body,
}

pub(crate) struct Pipeline {
    results: Option<Receiver<Outcome>>,
    credits: Option<Sender<()>>,
    pending: BTreeMap<(u64, u64), Outcome>,
    threads: Vec<JoinHandle<()>>,
    /// Position of the next outcome to hand out.
    pub epoch: u64,
    pub next_seq: u64,
}

impl Pipeline {
    /// Start reading at (epoch, index). With `single_epoch`, the producer stops after
    /// that epoch's end marker.
    pub fn start(
        shared: Arc<Shared>,
        epoch: u64,
        index: u64,
        single_epoch: bool,
        window: usize,
    ) -> Self {
        let window = window.max(2);
        let workers = shared.cfg.num_workers.max(1);
        let (job_tx, job_rx) = bounded::<Job>(window);
        let (res_tx, res_rx) = bounded::<Outcome>(window);
        let (credit_tx, credit_rx) = bounded::<()>(window);
        for _ in 0..window {
            credit_tx.send(()).expect("credit channel has room");
        }
        // Every worker runs its tensor ops on one thread: libtorch's intra-op threads,
        // multiplied by the workers, would oversubscribe the CPU. The OpenMP thread
        // count is per thread once initialised, but `set_num_threads` also changes the
        // default for threads initialised later, so the caller's value is put back
        // once every worker has set its own.
        let torch_threads = tch::get_num_threads();
        let (ready_tx, ready_rx) = bounded::<()>(workers);
        let mut threads = Vec::new();
        for i in 0..workers {
            let (shared, job_rx, res_tx, ready) = (
                shared.clone(),
                job_rx.clone(),
                res_tx.clone(),
                ready_tx.clone(),
            );
            let t = std::thread::Builder::new()
                .name(format!("adt-data-{i}"))
                .spawn(move || {
                    let _ = tch::get_num_threads();
                    tch::set_num_threads(1);
                    let _ = ready.send(());
                    drop(ready);
                    worker(&shared, job_rx, res_tx)
                })
                .expect("spawning a data worker thread");
            threads.push(t);
        }
        drop(ready_tx);
        for _ in 0..workers {
            let _ = ready_rx.recv();
        }
        tch::set_num_threads(torch_threads);
        drop(job_rx);
        let producer_shared = shared.clone();
        let t = std::thread::Builder::new()
            .name("adt-data-producer".into())
            .spawn(move || {
                producer(
                    &producer_shared,
                    epoch,
                    index,
                    single_epoch,
                    job_tx,
                    res_tx,
                    credit_rx,
                )
            })
            .expect("spawning the data producer thread");
        threads.push(t);
        Pipeline {
            results: Some(res_rx),
            credits: Some(credit_tx),
            pending: BTreeMap::new(),
            threads,
            epoch,
            next_seq: index,
        }
    }

    /// The next outcome in sequence order.
    pub fn next(&mut self) -> Result<Outcome> {
        let want = (self.epoch, self.next_seq);
        let out = loop {
            if let Some(o) = self.pending.remove(&want) {
                break o;
            }
            let rx = self.results.as_ref().expect("pipeline is running");
            let o = rx
                .recv()
                .map_err(|_| anyhow!("the data loading threads stopped unexpectedly"))?;
            if (o.epoch, o.seq) == want {
                break o;
            }
            self.pending.insert((o.epoch, o.seq), o);
        };
        if let Some(c) = &self.credits {
            let _ = c.try_send(());
        }
        if matches!(out.body, Body::EpochEnd) {
            self.epoch += 1;
            self.next_seq = 0;
        } else {
            self.next_seq += 1;
        }
        Ok(out)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // Closing the credit and result channels stops the producer and the workers.
        self.credits.take();
        self.results.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn producer(
    shared: &Shared,
    mut epoch: u64,
    mut skip: u64,
    single_epoch: bool,
    jobs: Sender<Job>,
    results: Sender<Outcome>,
    credits: Receiver<()>,
) {
    let cfg = &shared.cfg;
    loop {
        let mut seq = 0u64;
        // Send one item with the next sequence number; false when the consumer is gone.
        let mut emit = |item: ShardItemOrEntry| -> bool {
            let s = seq;
            seq += 1;
            if s < skip {
                return true;
            }
            if credits.recv().is_err() {
                return false;
            }
            match item {
                ShardItemOrEntry::Job {
                    key,
                    location,
                    caption,
                    payload,
                } => jobs
                    .send(Job {
                        epoch,
                        seq: s,
                        key,
                        location,
                        caption,
                        payload,
                    })
                    .is_ok(),
                ShardItemOrEntry::Bad(b) => results
                    .send(Outcome {
                        epoch,
                        seq: s,
                        body: Body::Bad(b),
                    })
                    .is_ok(),
            }
        };
        let go_on = match &shared.source {
            Source::Indexed(entries) => {
                let order = epoch_order(entries.len(), cfg.shuffle, cfg.seed, epoch);
                let mut ok = true;
                for &i in &order {
                    let e = &entries[i];
                    ok = emit(ShardItemOrEntry::Job {
                        key: e.key.clone(),
                        location: e.image.display().to_string(),
                        caption: e.caption.clone(),
                        payload: Payload::File(e.image.clone()),
                    });
                    if !ok {
                        break;
                    }
                }
                ok
            }
            Source::Shards(shards) => {
                let order = epoch_order(shards.len(), cfg.shuffle, cfg.seed, epoch);
                let buffer = if cfg.shuffle { cfg.shuffle_buffer } else { 0 };
                let mut ok = true;
                for (pos, &i) in order.iter().enumerate() {
                    let rng_seed = mix(cfg.seed ^ 0x5348_5546, epoch, pos as u64);
                    ok = stream_shard_shuffled(
                        &shards[i],
                        cfg.caption_column.as_deref(),
                        buffer,
                        rng_seed,
                        &mut |item| {
                            emit(match item {
                                ShardItem::Sample {
                                    key,
                                    location,
                                    caption,
                                    bytes,
                                } => ShardItemOrEntry::Job {
                                    key,
                                    location,
                                    caption,
                                    payload: Payload::Bytes(bytes),
                                },
                                ShardItem::Bad(b) => ShardItemOrEntry::Bad(b),
                            })
                        },
                    );
                    if !ok {
                        break;
                    }
                }
                ok
            }
        };
        if !go_on || credits.recv().is_err() {
            return;
        }
        if results
            .send(Outcome {
                epoch,
                seq: seq.max(skip),
                body: Body::EpochEnd,
            })
            .is_err()
        {
            return;
        }
        if single_epoch {
            return;
        }
        epoch += 1;
        skip = 0;
    }
}

enum ShardItemOrEntry {
    Job {
        key: String,
        location: String,
        caption: String,
        payload: Payload,
    },
    Bad(BadSample),
}

fn worker(shared: &Shared, jobs: Receiver<Job>, results: Sender<Outcome>) {
    while let Ok(job) = jobs.recv() {
        let (epoch, seq, location) = (job.epoch, job.seq, job.location.clone());
        let body = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| process(shared, job)))
            .unwrap_or_else(|_| {
                Body::Bad(BadSample::new(
                    BadKind::Corrupt,
                    location,
                    "the image decoder panicked",
                ))
            });
        if results.send(Outcome { epoch, seq, body }).is_err() {
            return;
        }
    }
}

fn process(shared: &Shared, job: Job) -> Body {
    let bytes = match job.payload {
        Payload::Bytes(b) => b,
        Payload::File(path) => match super::paths::read_regular(&path) {
            Ok(b) => b,
            Err(e) => {
                let kind = if e.kind() == std::io::ErrorKind::NotFound {
                    BadKind::MissingFile
                } else {
                    BadKind::Unreadable
                };
                return Body::Bad(BadSample::new(kind, job.location, e.to_string()));
            }
        },
    };
    let img = match decode_image(&bytes, shared.cfg.max_pixels) {
        Ok(i) => i,
        Err((kind, detail)) => return Body::Bad(BadSample::new(kind, job.location, detail)),
    };
    let caption_len = match &shared.token_counter {
        Some(count) => count(&job.caption),
        None => job.caption.split_whitespace().count(),
    };
    let content_hash = super::source::hex(&Sha256::digest(&bytes));
    drop(bytes);
    let good = match shared.mode {
        Mode::Inspect => Good {
            key: job.key,
            location: job.location,
            caption: job.caption,
            pixels: Tensor::new(),
            original_size: img.size(),
            crop_top_left: (0, 0),
            flipped: false,
            content_hash,
            caption_len,
        },
        Mode::Train(t) => {
            let mut rng =
                ChaCha8Rng::seed_from_u64(super::source::mix(shared.cfg.seed, job.epoch, job.seq));
            let p = t.apply(&img, &mut rng);
            Good {
                key: job.key,
                location: job.location,
                caption: job.caption,
                pixels: p.pixels,
                original_size: p.original_size,
                crop_top_left: p.crop_top_left,
                flipped: p.flipped,
                content_hash,
                caption_len,
            }
        }
    };
    Body::Good(Box::new(good))
}
