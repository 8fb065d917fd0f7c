//! Kinds of bad input and their counts.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Why a sample could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadKind {
    /// The image file named by the dataset does not exist.
    MissingFile,
    /// The file exists but could not be read (permissions, a directory, I/O error).
    Unreadable,
    /// The file is empty.
    ZeroByte,
    /// The content is not a supported image format (whatever its extension says).
    NotAnImage,
    /// The image header or data is damaged or truncated.
    Corrupt,
    /// The header announces more pixels than `max_pixels`.
    TooLarge,
    /// No caption for the image.
    MissingCaption,
    /// The caption is empty or only whitespace.
    EmptyCaption,
    /// A WebDataset sample without an image member.
    MissingImage,
    /// A manifest / metadata line that could not be parsed.
    BadRecord,
    /// A shard that does not exist.
    MissingShard,
    /// A shard that is not a readable tar archive (the rest of it is skipped).
    CorruptShard,
    /// A key that appears twice in a shard (the later sample is skipped).
    DuplicateKey,
    /// A path that leads outside the dataset folder (absolute, `..`, or a symbolic
    /// link without `data.follow_symlinks`).
    OutsideDataset,
}

impl BadKind {
    pub fn name(&self) -> &'static str {
        match self {
            BadKind::MissingFile => "missing file",
            BadKind::Unreadable => "unreadable file",
            BadKind::ZeroByte => "zero-byte file",
            BadKind::NotAnImage => "not an image",
            BadKind::Corrupt => "corrupt image",
            BadKind::TooLarge => "image too large",
            BadKind::MissingCaption => "missing caption",
            BadKind::EmptyCaption => "empty caption",
            BadKind::MissingImage => "missing image",
            BadKind::BadRecord => "bad record",
            BadKind::MissingShard => "missing shard",
            BadKind::CorruptShard => "corrupt shard",
            BadKind::DuplicateKey => "duplicate key",
            BadKind::OutsideDataset => "outside the dataset",
        }
    }
}

impl fmt::Display for BadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One bad sample: its kind, where it is (a file, or a shard and member) and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadSample {
    pub kind: BadKind,
    pub location: String,
    pub detail: String,
}

impl BadSample {
    pub fn new(kind: BadKind, location: impl Into<String>, detail: impl Into<String>) -> Self {
        BadSample {
            kind,
            location: location.into(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for BadSample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}: {}", self.kind, self.location, self.detail)
    }
}

impl std::error::Error for BadSample {}

/// Bad samples counted by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadCounts(pub BTreeMap<BadKind, u64>);

impl BadCounts {
    pub fn add(&mut self, kind: BadKind) {
        *self.0.entry(kind).or_default() += 1;
    }
    pub fn get(&self, kind: BadKind) -> u64 {
        self.0.get(&kind).copied().unwrap_or(0)
    }
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
    pub fn merge(&mut self, other: &BadCounts) {
        for (k, v) in &other.0 {
            *self.0.entry(*k).or_default() += v;
        }
    }
}

impl fmt::Display for BadCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        f.write_str(&parts.join(", "))
    }
}
