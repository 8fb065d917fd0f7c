//! Content-keyed caches of text-encoder outputs and VAE latents.
//!
//! A cache lives in `root/<kind>/`: `cache_key.json` records the [`CacheKey`] it was
//! built for, and every entry is a safetensors file whose metadata repeats the key's
//! digest and the entry id. Opening a cache with a different key (another model,
//! resolution, dataset, ...) wipes the stale entries: they are rebuilt, never reused.

use super::source::hex;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tch::Tensor;

const KEY_FILE: &str = "cache_key.json";
const ENTRIES: &str = "entries";

/// What a cache was computed from. Any difference makes the cache stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheKey {
    /// What is cached, e.g. "text_embeddings" or "vae_latents" (also the folder name).
    pub kind: String,
    /// Fingerprint of the dataset (e.g. [`crate::data::DataLoader::fingerprint`]).
    pub dataset_hash: String,
    /// Identity of the model that computed the values (e.g. [`model_identity`]).
    pub model_id: String,
    /// (height, width) of the training resolution (latents depend on it).
    pub resolution: (u32, u32),
    /// Storage dtype, e.g. "f16".
    pub dtype: String,
    /// Anything else the values depend on (tokenizer max length, scaling factor, ...).
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

impl CacheKey {
    /// sha256 of the canonical JSON form.
    pub fn digest(&self) -> String {
        let json = serde_json::to_string(self).expect("a cache key serialises");
        hex(&Sha256::digest(json.as_bytes()))
    }

    /// Human-readable list of the fields that differ from `other`.
    pub fn differences(&self, other: &CacheKey) -> Vec<String> {
        let mut d = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                d.push(format!("{name}: {a} -> {b}"));
            }
        };
        cmp("kind", other.kind.clone(), self.kind.clone());
        cmp(
            "dataset_hash",
            other.dataset_hash.clone(),
            self.dataset_hash.clone(),
        );
        cmp("model_id", other.model_id.clone(), self.model_id.clone());
        cmp(
            "resolution",
            format!("{:?}", other.resolution),
            format!("{:?}", self.resolution),
        );
        cmp("dtype", other.dtype.clone(), self.dtype.clone());
        cmp(
            "extra",
            format!("{:?}", other.extra),
            format!("{:?}", self.extra),
        );
        d
    }
}

/// How [`FeatureCache::open`] found the cache folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// No cache existed; an empty one was created.
    Created,
    /// A cache for the same key, with this many entries, is reused.
    Reused { entries: usize },
    /// A cache for another key was found and wiped; `reason` lists what differed.
    Rebuilt { reason: String },
}

/// A cache folder for one [`CacheKey`].
#[derive(Debug)]
pub struct FeatureCache {
    dir: PathBuf,
    key: CacheKey,
    digest: String,
}

fn valid_kind(kind: &str) -> bool {
    !kind.is_empty()
        && kind
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl FeatureCache {
    /// Open (or create) the cache for `key` under `root`. A cache built for a different
    /// key is wiped and started afresh.
    pub fn open(root: &Path, key: CacheKey) -> Result<(Self, CacheStatus)> {
        if !valid_kind(&key.kind) {
            bail!(
                "cache kind {:?} must be non-empty and use only letters, digits, '_' and '-'",
                key.kind
            );
        }
        let dir = root.join(&key.kind);
        let key_path = dir.join(KEY_FILE);
        let digest = key.digest();
        let status = if key_path.is_file() {
            let text = std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?;
            match serde_json::from_str::<CacheKey>(&text) {
                Ok(old) if old == key => None,
                Ok(old) => Some(key.differences(&old).join("; ")),
                Err(e) => Some(format!("unreadable {}: {e}", key_path.display())),
            }
            .map(|reason| CacheStatus::Rebuilt { reason })
        } else {
            Some(CacheStatus::Created)
        };
        let cache = FeatureCache { dir, key, digest };
        let status = match status {
            None => CacheStatus::Reused {
                entries: cache.len()?,
            },
            Some(s) => {
                let entries = cache.dir.join(ENTRIES);
                if entries.exists() {
                    std::fs::remove_dir_all(&entries).with_context(|| {
                        format!("removing stale cache entries {}", entries.display())
                    })?;
                }
                let json = serde_json::to_string_pretty(&cache.key)?;
                crate::weights::atomic_write(&key_path, json.as_bytes())?;
                if let CacheStatus::Rebuilt { reason } = &s {
                    tracing::warn!(
                        "cache {} is stale ({reason}); rebuilding it",
                        cache.dir.display()
                    );
                }
                s
            }
        };
        std::fs::create_dir_all(cache.dir.join(ENTRIES))
            .with_context(|| format!("creating {}", cache.dir.join(ENTRIES).display()))?;
        Ok((cache, status))
    }

    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, id: &str) -> PathBuf {
        let h = hex(&Sha256::digest(id.as_bytes()));
        self.dir
            .join(ENTRIES)
            .join(&h[..2])
            .join(format!("{h}.safetensors"))
    }

    /// The stored tensors of entry `id`, or None when absent (or written for another key).
    pub fn get(&self, id: &str) -> Result<Option<Vec<(String, Tensor)>>> {
        let path = self.entry_path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("reading cache entry {}", path.display()))
            }
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("parsing cache entry {}", path.display()))?;
        let m = meta.metadata().clone().unwrap_or_default();
        if m.get("cache_key").map(String::as_str) != Some(self.digest.as_str())
            || m.get("entry").map(String::as_str) != Some(id)
        {
            return Ok(None);
        }
        let tensors = crate::weights::parse_safetensors(&bytes)
            .with_context(|| format!("parsing cache entry {}", path.display()))?;
        Ok(Some(tensors))
    }

    pub fn contains(&self, id: &str) -> Result<bool> {
        Ok(self.get(id)?.is_some())
    }

    /// Store the tensors of entry `id` (atomically; floats stored as given).
    pub fn put(&self, id: &str, tensors: &[(String, Tensor)]) -> Result<()> {
        let meta = HashMap::from([
            ("cache_key".to_string(), self.digest.clone()),
            ("entry".to_string(), id.to_string()),
        ]);
        crate::weights::save_safetensors(tensors, &self.entry_path(id), None, Some(meta))
    }

    /// Number of entry files.
    pub fn len(&self) -> Result<usize> {
        let root = self.dir.join(ENTRIES);
        if !root.exists() {
            return Ok(0);
        }
        let mut n = 0;
        for sub in
            std::fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))?
        {
            let sub = sub?.path();
            if sub.is_dir() {
                n += std::fs::read_dir(&sub)?
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                    .count();
            }
        }
        Ok(n)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// Entry id of a caption's text-encoder output.
pub fn text_entry_id(caption: &str) -> String {
    format!("text:{}", hex(&Sha256::digest(caption.as_bytes())))
}

/// Entry id of an image's latent: its content hash and the crop / flip it was taken with.
pub fn latent_entry_id(content_hash: &str, crop_top_left: (u32, u32), flipped: bool) -> String {
    format!(
        "latent:{content_hash}:{}:{}:{}",
        crop_top_left.0,
        crop_top_left.1,
        u8::from(flipped)
    )
}

/// Identity of a model folder: its config files and, for each weight file, its name,
/// size and samples of its bytes (header, first and last MiB of data), hashed. Any
/// fine-tune changes the sampled bytes while keeping names and shapes.
pub fn model_identity(dir: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing model folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n.ends_with(".json") || n.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "model folder {}: no .json or .safetensors files to identify it by",
            dir.display()
        );
    }
    let mut h = Sha256::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        h.update(name.as_bytes());
        let mut file =
            std::fs::File::open(&f).with_context(|| format!("opening {}", f.display()))?;
        let len = file.metadata()?.len();
        h.update(len.to_le_bytes());
        const SAMPLE: u64 = 1 << 20;
        let mut buf = Vec::new();
        if name.ends_with(".json") || len <= 3 * SAMPLE {
            file.read_to_end(&mut buf)
                .with_context(|| format!("reading {}", f.display()))?;
            h.update(&buf);
        } else {
            for start in [0, len / 2 - SAMPLE / 2, len - SAMPLE] {
                buf.resize(SAMPLE as usize, 0);
                file.seek(SeekFrom::Start(start))?;
                file.read_exact(&mut buf)
                    .with_context(|| format!("reading {}", f.display()))?;
                h.update(&buf);
            }
        }
    }
    Ok(hex(&h.finalize()))
}
