//! `adt inspect-data`: decode every sample once and summarise the dataset.

use super::bad::{BadCounts, BadSample};
use super::config::DataConfig;
use super::pipeline::{Body, Mode, Pipeline, Shared};
use super::source;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Minimum, median and maximum of some values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    pub min: u64,
    pub median: u64,
    pub max: u64,
}

impl Spread {
    fn of(values: &mut [u64]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        values.sort_unstable();
        Some(Spread {
            min: values[0],
            median: values[values.len() / 2],
            max: values[values.len() - 1],
        })
    }
}

/// Summary of a dataset.
#[derive(Debug, Clone)]
pub struct DataReport {
    pub path: String,
    pub description: String,
    pub usable: u64,
    pub bad: BadCounts,
    /// Up to three examples of every bad kind.
    pub bad_examples: Vec<BadSample>,
    pub width: Option<Spread>,
    pub height: Option<Spread>,
    /// Usable images by shortest side.
    pub short_side_buckets: Vec<(String, u64)>,
    /// Usable images by aspect ratio (width / height).
    pub aspect_buckets: Vec<(String, u64)>,
    /// Caption lengths in words.
    pub caption_words: Option<Spread>,
    pub caption_histogram: Vec<(String, u64)>,
}

fn bucket(value: u64, edges: &[u64]) -> usize {
    edges.iter().position(|&e| value < e).unwrap_or(edges.len())
}

fn labels(edges: &[u64], unit: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lo = 0;
    for &e in edges {
        out.push(format!("{lo}-{}{unit}", e - 1));
        lo = e;
    }
    out.push(format!(">={lo}{unit}"));
    out
}

/// Decode every sample of the dataset at `path` (format detected) and report sizes,
/// caption lengths and bad samples. With `strict`, the first bad sample is an error.
pub fn inspect_data(path: &Path, strict: bool) -> Result<DataReport> {
    inspect_data_with(path, strict, false)
}

/// [`inspect_data`], optionally following symbolic links that stay inside the
/// dataset (`data.follow_symlinks`).
pub fn inspect_data_with(path: &Path, strict: bool, follow_symlinks: bool) -> Result<DataReport> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(8);
    let cfg = DataConfig {
        path: path.to_string_lossy().into_owned(),
        strict,
        follow_symlinks,
        shuffle: false,
        num_workers: threads,
        ..Default::default()
    };
    let opened = source::open(&cfg)?;
    let mut bad = BadCounts::default();
    let mut bad_examples: Vec<BadSample> = Vec::new();
    let mut note_bad = |b: BadSample, bad: &mut BadCounts| {
        bad.add(b.kind);
        if bad_examples.iter().filter(|x| x.kind == b.kind).count() < 3 {
            bad_examples.push(b);
        }
    };
    for b in opened.index_bad {
        note_bad(b, &mut bad);
    }
    let description = opened.description.clone();
    let shared = Arc::new(Shared {
        source: opened.source,
        cfg,
        mode: Mode::Inspect,
        token_counter: None,
    });
    let mut pipeline = Pipeline::start(shared, 0, 0, true, 8 * threads);
    let (mut widths, mut heights, mut words) = (Vec::new(), Vec::new(), Vec::new());
    let side_edges = [256, 512, 768, 1024, 2048];
    let mut side_counts = vec![0u64; side_edges.len() + 1];
    // Aspect ratio in hundredths.
    let aspect_edges = [50, 80, 95, 106, 126, 200];
    let mut aspect_counts = vec![0u64; aspect_edges.len() + 1];
    let word_edges = [1, 5, 10, 20, 40, 77];
    let mut word_counts = vec![0u64; word_edges.len() + 1];
    loop {
        match pipeline.next()?.body {
            Body::Good(g) => {
                let (h, w) = (g.original_size.0 as u64, g.original_size.1 as u64);
                heights.push(h);
                widths.push(w);
                side_counts[bucket(h.min(w), &side_edges)] += 1;
                aspect_counts[bucket(w * 100 / h.max(1), &aspect_edges)] += 1;
                let n = g.caption_len as u64;
                words.push(n);
                word_counts[bucket(n, &word_edges)] += 1;
            }
            Body::Bad(b) => {
                if strict {
                    bail!("bad sample (strict mode): {b}");
                }
                note_bad(b, &mut bad);
            }
            Body::EpochEnd => break,
        }
    }
    let aspect_labels = [
        "<0.50",
        "0.50-0.79",
        "0.80-0.94",
        "0.95-1.05 (square)",
        "1.06-1.25",
        "1.26-1.99",
        ">=2.00",
    ];
    Ok(DataReport {
        path: path.display().to_string(),
        description,
        usable: heights.len() as u64,
        bad,
        bad_examples,
        width: Spread::of(&mut widths),
        height: Spread::of(&mut heights),
        short_side_buckets: labels(&side_edges, " px")
            .into_iter()
            .zip(side_counts)
            .collect(),
        aspect_buckets: aspect_labels
            .iter()
            .map(|s| s.to_string())
            .zip(aspect_counts)
            .collect(),
        caption_words: Spread::of(&mut words),
        caption_histogram: labels(&word_edges, " words")
            .into_iter()
            .zip(word_counts)
            .collect(),
    })
}

fn bar(n: u64, max: u64) -> String {
    let width = if max == 0 {
        0
    } else {
        (n * 30).div_ceil(max) as usize
    };
    "#".repeat(width)
}

fn write_buckets(
    f: &mut fmt::Formatter<'_>,
    title: &str,
    buckets: &[(String, u64)],
) -> fmt::Result {
    writeln!(f, "{title}:")?;
    let max = buckets.iter().map(|b| b.1).max().unwrap_or(0);
    for (label, n) in buckets {
        writeln!(f, "  {label:>20} {n:>8} {}", bar(*n, max))?;
    }
    Ok(())
}

impl fmt::Display for DataReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dataset: {}", self.path)?;
        writeln!(f, "layout: {}", self.description)?;
        writeln!(f, "usable samples: {}", self.usable)?;
        writeln!(f, "bad samples: {} ({})", self.bad.total(), self.bad)?;
        if let (Some(w), Some(h)) = (self.width, self.height) {
            writeln!(
                f,
                "width  min {} / median {} / max {}",
                w.min, w.median, w.max
            )?;
            writeln!(
                f,
                "height min {} / median {} / max {}",
                h.min, h.median, h.max
            )?;
            write_buckets(f, "shortest side", &self.short_side_buckets)?;
            write_buckets(f, "aspect ratio (w/h)", &self.aspect_buckets)?;
        }
        if let Some(c) = self.caption_words {
            writeln!(
                f,
                "caption words min {} / median {} / max {}",
                c.min, c.median, c.max
            )?;
            write_buckets(f, "caption length", &self.caption_histogram)?;
        }
        if !self.bad_examples.is_empty() {
            let mut by_kind: BTreeMap<_, Vec<&BadSample>> = BTreeMap::new();
            for b in &self.bad_examples {
                by_kind.entry(b.kind).or_default().push(b);
            }
            writeln!(f, "bad samples by kind:")?;
            for (kind, examples) in by_kind {
                writeln!(f, "  {kind}: {}", self.bad.get(kind))?;
                for b in examples {
                    writeln!(f, "    {}: {}", b.location, b.detail)?;
                }
            }
        }
        Ok(())
    }
}
