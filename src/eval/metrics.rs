//! `adt eval`: compare a folder of generated images with a reference folder.
//!
//! Both sets are folders of images (PNG, JPEG, WebP), or imagefolder datasets whose
//! `metadata.jsonl` lists them (`file_name` column). Images are read as RGB in [0, 1];
//! an alpha channel is composited on white.
//!
//! Metrics (see [`EvalReport`]):
//! * Frechet distance (FD) and KID (see [`super::fd`]) in a feature space chosen by
//!   [`FeatureSpace`]: the 1280-d pooled features of EfficientNet-Lite1 (default),
//!   Lite0 or Lite2 (ImageNet weights converted by `scripts/setup_efficientnet.sh`), or the CLS
//!   output (after the final layernorm) of a user-supplied DINOv2 transformers folder.
//!   Each image is resized to the network's square input (bicubic, antialiased when
//!   shrinking; the whole image, no crop unless [`EvalOptions::center_crop`]) and
//!   normalised as the network was trained. Or the standard FID space: the 2048-d pool3
//!   features of pytorch-fid's FID Inception-v3 (user-supplied weights converted by
//!   `scripts/convert_inception.py`), with pytorch-fid's own input transform (bilinear
//!   resize to 299 x 299 without antialiasing, then `2 x - 1`).
//! * A colour-histogram distance: L1 between the sets' normalised 3-D RGB histograms
//!   (`bins` per channel; every image weighs the same), in [0, 2]; and each set's mean
//!   colour. These catch global colour drift that the feature distances may
//!   underweight.
//! * With a CLIP model ([`EvalOptions::clip`]), the CLIP score of the generated
//!   images against their prompts (see [`super::clip_score`]).

use anyhow::{bail, ensure, Context, Result};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use super::fd;
use crate::disc::features::imagenet_normalize;
use crate::models::dinov2::{Dinov2Model, LoadedDinov2};
use crate::models::efficientnet::{self, EfficientNet, LoadedEfficientNet};
use crate::models::inception::{self, InceptionV3, LoadedInception};

/// Image file extensions read from a plain folder.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// Feature network of the FD / KID metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeatureSpace {
    #[serde(rename = "efficientnet-lite1")]
    EfficientNetLite1,
    #[serde(rename = "efficientnet-lite0")]
    EfficientNetLite0,
    #[serde(rename = "efficientnet-lite2")]
    EfficientNetLite2,
    #[serde(rename = "dinov2")]
    Dinov2,
    /// pytorch-fid's FID Inception-v3 (pool3): the standard FID.
    #[serde(rename = "inception-v3")]
    InceptionV3,
}

impl FeatureSpace {
    pub const ALL: [FeatureSpace; 5] = [
        FeatureSpace::EfficientNetLite1,
        FeatureSpace::EfficientNetLite0,
        FeatureSpace::EfficientNetLite2,
        FeatureSpace::Dinov2,
        FeatureSpace::InceptionV3,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            FeatureSpace::EfficientNetLite1 => "efficientnet-lite1",
            FeatureSpace::EfficientNetLite0 => "efficientnet-lite0",
            FeatureSpace::EfficientNetLite2 => "efficientnet-lite2",
            FeatureSpace::Dinov2 => "dinov2",
            FeatureSpace::InceptionV3 => "inception-v3",
        }
    }

    /// Folder the weights are looked for in when no path is given: the conversion
    /// script's output for EfficientNet; none for DINOv2 (user-supplied).
    pub fn default_path(&self) -> Option<PathBuf> {
        let sub = match self {
            FeatureSpace::EfficientNetLite1 => "efficientnet-lite1",
            FeatureSpace::EfficientNetLite0 => "efficientnet-lite0",
            FeatureSpace::EfficientNetLite2 => "efficientnet-lite2",
            FeatureSpace::Dinov2 | FeatureSpace::InceptionV3 => return None,
        };
        let local = Path::new(".cache").join("weights").join(sub);
        if local.is_dir() {
            return Some(local);
        }
        let in_crate = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".cache")
            .join("weights")
            .join(sub);
        Some(if in_crate.is_dir() { in_crate } else { local })
    }
}

impl fmt::Display for FeatureSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FeatureSpace {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        if let Some(f) = Self::ALL.iter().find(|f| f.name() == lower) {
            return Ok(*f);
        }
        match lower.as_str() {
            "lite1" | "efficientnet" => Ok(FeatureSpace::EfficientNetLite1),
            "lite0" => Ok(FeatureSpace::EfficientNetLite0),
            "lite2" => Ok(FeatureSpace::EfficientNetLite2),
            "inception" | "fid" => Ok(FeatureSpace::InceptionV3),
            _ => bail!(
                "unknown feature space {s:?}: expected one of efficientnet-lite1, efficientnet-lite0, efficientnet-lite2, dinov2, inception-v3"
            ),
        }
    }
}

/// Options of [`evaluate`].
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Folder (or imagefolder dataset) of generated images.
    pub generated: PathBuf,
    /// Folder (or imagefolder dataset) of reference images.
    pub reference: PathBuf,
    pub features: FeatureSpace,
    /// Weights folder of the feature network; default: [`FeatureSpace::default_path`]
    /// (required for DINOv2).
    pub features_path: Option<PathBuf>,
    /// Square input size of the feature network; default its training resolution
    /// (EfficientNet config `image_size`: 240 for Lite1, 224 for Lite0, 260 for Lite2; 224 for DINOv2).
    pub resolution: Option<i64>,
    /// Centre-crop `resolution / (resolution + 32)` of the shorter side before the
    /// resize (the TF EfficientNet eval recipe, EfficientNet only). Default off: small
    /// images such as emoji would lose their borders.
    pub center_crop: bool,
    /// Use at most this many images of each set: a seeded random subset (kept in
    /// file order) when a set is larger.
    pub max_images: Option<usize>,
    pub batch_size: usize,
    pub device: Device,
    /// KID: number of subsets and their size (capped at the smaller set).
    pub kid_subsets: usize,
    pub kid_subset_size: i64,
    /// Histogram bins per RGB channel.
    pub histogram_bins: i64,
    /// Seed of the subset selection and of KID's subsets.
    pub seed: u64,
    /// A transformers `CLIPModel` folder: also compute the CLIP score of the
    /// generated images against their prompts.
    pub clip: Option<PathBuf>,
}

impl EvalOptions {
    pub fn new(generated: impl Into<PathBuf>, reference: impl Into<PathBuf>) -> Self {
        Self {
            generated: generated.into(),
            reference: reference.into(),
            features: FeatureSpace::EfficientNetLite1,
            features_path: None,
            resolution: None,
            center_crop: false,
            max_images: None,
            batch_size: 32,
            device: Device::cuda_if_available(),
            kid_subsets: 100,
            kid_subset_size: 1000,
            histogram_bins: 8,
            seed: 0,
            clip: None,
        }
    }
}

/// Summary of one image set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetSummary {
    pub path: String,
    /// Images used.
    pub count: usize,
    /// Images found (before `max_images`).
    pub available: usize,
    /// Distinct image sizes, as "WxH" strings.
    pub sizes: Vec<String>,
    /// Mean colour (RGB in [0, 1], every image weighs the same).
    pub mean_rgb: [f64; 3],
}

/// Result of [`evaluate`]; serialisable to JSON, printed as a table by `Display`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub generated: SetSummary,
    pub reference: SetSummary,
    pub features: FeatureSpace,
    pub features_path: String,
    pub feature_dim: i64,
    pub resolution: i64,
    pub center_crop: bool,
    /// Frechet distance and its parts `|mu1 - mu2|^2` and the covariance term.
    pub fd: f64,
    pub fd_mean_term: f64,
    pub fd_cov_term: f64,
    /// KID (unbiased polynomial-kernel MMD^2): mean and std over subsets.
    pub kid: f64,
    pub kid_std: f64,
    pub kid_subsets: usize,
    pub kid_subset_size: i64,
    /// L1 distance between normalised RGB histograms, in [0, 2].
    pub histogram_l1: f64,
    pub histogram_bins: i64,
    pub seed: u64,
    pub seconds: f64,
    /// Mean CLIP score (100 * max(cos, 0)) of the generated images, when a CLIP
    /// model was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_score: Option<f64>,
    /// Cautions about the numbers (too few images for a stable FD).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Warnings for sample counts too small for the statistics: below `dim` images per
/// set the feature covariance is rank-deficient, and FD (biased upward at any finite
/// count) changes strongly with the count, so values are comparable only at one
/// count and stable only from about `dim` images up.
pub fn sample_count_warnings(
    n_gen: usize,
    n_ref: usize,
    dim: i64,
    kid_subset_size: i64,
) -> Vec<String> {
    let n = n_gen.min(n_ref);
    let mut w = Vec::new();
    if (n as i64) < dim {
        w.push(format!(
            "FD from {n} images (generated {n_gen}, reference {n_ref}): fewer than the {dim} feature \
             dimensions, so the covariances are rank-deficient and FD depends strongly on the count; \
             use at least {dim} images per set for a stable FD, and compare FDs only at equal counts"
        ));
    }
    if (n as i64) < kid_subset_size {
        w.push(format!(
            "KID from subsets of {n} images (fewer than the configured {kid_subset_size}): its mean and \
             spread are noisy at this count"
        ));
    }
    w
}

impl EvalReport {
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).context("serialising the evaluation report")
    }

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).context("parsing an evaluation report")
    }

    /// Write the report as pretty JSON (atomically).
    pub fn save_json(&self, path: &Path) -> Result<()> {
        let text = self.to_json()?;
        crate::weights::atomic_write(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rgb = |c: &[f64; 3]| format!("({:.3}, {:.3}, {:.3})", c[0], c[1], c[2]);
        writeln!(f, "{:<22} {:<40} {:<40}", "", "generated", "reference")?;
        writeln!(
            f,
            "{:<22} {:<40} {:<40}",
            "folder", self.generated.path, self.reference.path
        )?;
        writeln!(
            f,
            "{:<22} {:<40} {:<40}",
            "images (used / found)",
            format!("{} / {}", self.generated.count, self.generated.available),
            format!("{} / {}", self.reference.count, self.reference.available)
        )?;
        writeln!(
            f,
            "{:<22} {:<40} {:<40}",
            "sizes",
            self.generated.sizes.join(" "),
            self.reference.sizes.join(" ")
        )?;
        writeln!(
            f,
            "{:<22} {:<40} {:<40}",
            "mean RGB",
            rgb(&self.generated.mean_rgb),
            rgb(&self.reference.mean_rgb)
        )?;
        writeln!(
            f,
            "features               {} at {}x{}{} ({}-d, {})",
            self.features,
            self.resolution,
            self.resolution,
            if self.center_crop {
                ", centre crop"
            } else {
                ""
            },
            self.feature_dim,
            self.features_path
        )?;
        writeln!(
            f,
            "FD                     {:.4}  (mean term {:.4}, covariance term {:.4})",
            self.fd, self.fd_mean_term, self.fd_cov_term
        )?;
        writeln!(
            f,
            "KID                    {:.6} +- {:.6}  ({} subsets of {})",
            self.kid, self.kid_std, self.kid_subsets, self.kid_subset_size
        )?;
        writeln!(
            f,
            "colour histogram L1    {:.4}  ({} bins per channel; 0 = same, 2 = disjoint)",
            self.histogram_l1, self.histogram_bins
        )?;
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        if let Some(c) = self.clip_score {
            writeln!(
                f,
                "CLIP score             {c:.4}  (mean of 100 * max(cos, 0))"
            )?;
        }
        write!(f, "seed {}, {:.1} s", self.seed, self.seconds)
    }
}

/// Image files of a set: the `file_name` entries of `metadata.jsonl` if the folder
/// has one, else the image files directly in the folder, sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    ensure!(
        dir.is_dir(),
        "image folder {} does not exist or is not a folder",
        dir.display()
    );
    let meta = dir.join("metadata.jsonl");
    let files = if meta.is_file() {
        let text = std::fs::read_to_string(&meta)
            .with_context(|| format!("reading {}", meta.display()))?;
        let mut files = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: invalid JSON", meta.display(), i + 1))?;
            let name = v
                .get("file_name")
                .and_then(|n| n.as_str())
                .with_context(|| {
                    format!(
                        "{} line {}: no string field \"file_name\"",
                        meta.display(),
                        i + 1
                    )
                })?;
            files.push(dir.join(name));
        }
        files
    } else {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            let is_image = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            if is_image && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        files
    };
    ensure!(
        !files.is_empty(),
        "no images in {} (expected {} files or a metadata.jsonl)",
        dir.display(),
        IMAGE_EXTENSIONS.join("/")
    );
    Ok(files)
}

/// Read an image as RGB `[3, H, W]` float in [0, 1] (alpha composited on white).
pub fn load_image01(path: &Path) -> Result<Tensor> {
    let img = image::open(path).with_context(|| format!("cannot read image {}", path.display()))?;
    let (w, h) = (img.width() as i64, img.height() as i64);
    ensure!(w > 0 && h > 0, "image {} is empty", path.display());
    let x = if img.color().has_alpha() {
        let rgba = img.to_rgba32f();
        let t = Tensor::from_slice(rgba.as_raw()).view([h, w, 4]);
        let a = t.narrow(2, 3, 1);
        t.narrow(2, 0, 3) * &a + (1.0 - &a)
    } else {
        let rgb = img.to_rgb32f();
        Tensor::from_slice(rgb.as_raw()).view([h, w, 3])
    };
    Ok(x.permute([2, 0, 1]).clamp(0.0, 1.0).contiguous())
}

/// Normalised 3-D RGB histogram `[bins^3]` (sums to 1) of an image `[3, H, W]` in
/// [0, 1]. Values are quantised to 8 bits first; bin = floor(v8 * bins / 256).
pub fn color_histogram(image01: &Tensor, bins: i64) -> Result<Tensor> {
    let s = image01.size();
    ensure!(
        s.len() == 3 && s[0] == 3,
        "colour histogram: expected an image [3, H, W], found {s:?}"
    );
    ensure!(
        (1..=256).contains(&bins),
        "colour histogram: bins per channel must be in 1..=256, found {bins}"
    );
    let q = (image01.to_device(Device::Cpu).to_kind(Kind::Double) * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Int64)
        * bins;
    let q = q.floor_divide_scalar(256);
    let q = q.flatten(1, 2);
    let idx = q.get(0) * (bins * bins) + q.get(1) * bins + q.get(2);
    let counts = idx
        .f_bincount::<Tensor>(None, bins * bins * bins)
        .context("colour histogram")?;
    let n = (s[1] * s[2]) as f64;
    Ok(counts.to_kind(Kind::Double) / n)
}

/// L1 distance between two histograms (each summing to 1): 0 for equal, 2 for disjoint.
pub fn histogram_l1(a: &Tensor, b: &Tensor) -> Result<f64> {
    ensure!(
        a.size() == b.size(),
        "histogram distance: histograms of different sizes {:?} and {:?}",
        a.size(),
        b.size()
    );
    Ok((a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .sum(Kind::Double)
        .double_value(&[]))
}

/// Resize an image `[1, 3, H, W]` in [0, 1] to `size` x `size` (bicubic, antialiased
/// when a side shrinks), clamped to [0, 1].
pub fn resize_square(x: &Tensor, size: i64) -> Tensor {
    let s = x.size();
    let (h, w) = (s[2], s[3]);
    let y = if h == size && w == size {
        return x.shallow_clone();
    } else if h > size || w > size {
        x.internal_upsample_bicubic2d_aa([size, size], false, None, None)
    } else {
        x.upsample_bicubic2d([size, size], false, None, None)
    };
    y.clamp(0.0, 1.0)
}

enum Network {
    EfficientNet(Box<LoadedEfficientNet>),
    Dinov2(Box<LoadedDinov2>),
    Inception(Box<LoadedInception>),
}

/// A frozen feature network with its preprocessing, giving one vector per image.
pub struct FeatureExtractor {
    network: Network,
    space: FeatureSpace,
    path: PathBuf,
    resolution: i64,
    center_crop: bool,
    device: Device,
}

impl FeatureExtractor {
    /// Load the network of `space` from `path` (default: [`FeatureSpace::default_path`]).
    pub fn load(
        space: FeatureSpace,
        path: Option<&Path>,
        resolution: Option<i64>,
        center_crop: bool,
        device: Device,
    ) -> Result<Self> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => space.default_path().with_context(|| match space {
                FeatureSpace::InceptionV3 => format!(
                    "the {space} feature space needs a weights folder (--features-path): convert pytorch-fid's \
                     pt_inception-2015-12-05-6726825d.pth with `python3 scripts/convert_inception.py FILE.pth DIR`"
                ),
                _ => format!("the {space} feature space needs a weights folder (--features-path): a transformers DINOv2 checkpoint"),
            })?,
        };
        let (network, default_res) = match space {
            FeatureSpace::EfficientNetLite1
            | FeatureSpace::EfficientNetLite0
            | FeatureSpace::EfficientNetLite2 => {
                ensure!(
                    path.join("config.json").is_file(),
                    "{space} weights not found in {}: run scripts/setup_efficientnet.sh, or pass --features-path",
                    path.display()
                );
                let loaded = EfficientNet::load(&path, device, Kind::Float)
                    .with_context(|| format!("loading {space} from {}", path.display()))?;
                let (want_w, want_d) = match space {
                    FeatureSpace::EfficientNetLite1 => (1.0, 1.1),
                    FeatureSpace::EfficientNetLite2 => (1.1, 1.2),
                    _ => (1.0, 1.0),
                };
                ensure!(
                    (loaded.config.depth_coefficient - want_d).abs() < 1e-9
                        && (loaded.config.width_coefficient - want_w).abs() < 1e-9,
                    "{}: width_coefficient {} / depth_coefficient {} do not match {space} (expected {want_w} / {want_d})",
                    path.join("config.json").display(),
                    loaded.config.width_coefficient,
                    loaded.config.depth_coefficient
                );
                let res = loaded.config.image_size;
                (Network::EfficientNet(Box::new(loaded)), res)
            }
            FeatureSpace::Dinov2 => {
                ensure!(
                    !center_crop,
                    "center_crop is only supported for the EfficientNet feature spaces"
                );
                let loaded = Dinov2Model::load(&path, device, Kind::Float)
                    .with_context(|| format!("loading DINOv2 from {}", path.display()))?;
                (Network::Dinov2(Box::new(loaded)), 224)
            }
            FeatureSpace::InceptionV3 => {
                ensure!(
                    !center_crop,
                    "center_crop is only supported for the EfficientNet feature spaces"
                );
                ensure!(
                    resolution.is_none_or(|r| r == inception::INPUT_SIZE),
                    "the {space} features take {0}x{0} inputs (pytorch-fid); resolution {resolution:?} is not supported",
                    inception::INPUT_SIZE
                );
                let loaded = InceptionV3::load(&path, device, Kind::Float)
                    .with_context(|| format!("loading {space} from {}", path.display()))?;
                (Network::Inception(Box::new(loaded)), inception::INPUT_SIZE)
            }
        };
        let resolution = resolution.unwrap_or(default_res);
        ensure!(
            resolution >= 32,
            "feature resolution {resolution} is too small (at least 32)"
        );
        if let Network::Dinov2(d) = &network {
            let p = d.config.patch_size;
            ensure!(
                resolution % p == 0,
                "DINOv2 resolution {resolution} must be a multiple of the patch size {p}"
            );
        }
        Ok(Self {
            network,
            space,
            path,
            resolution,
            center_crop,
            device,
        })
    }

    pub fn space(&self) -> FeatureSpace {
        self.space
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn resolution(&self) -> i64 {
        self.resolution
    }

    /// Feature dimension.
    pub fn dim(&self) -> i64 {
        match &self.network {
            Network::EfficientNet(_) => efficientnet::HEAD_CHANNELS,
            Network::Dinov2(d) => d.config.hidden_size,
            Network::Inception(_) => inception::FEATURE_DIM,
        }
    }

    /// Network input `[1, 3, R, R]` for one image `[3, H, W]` in [0, 1].
    pub fn preprocess(&self, image01: &Tensor) -> Result<Tensor> {
        let s = image01.size();
        ensure!(
            s.len() == 3 && s[0] == 3,
            "expected an image [3, H, W], found {s:?}"
        );
        let x = image01.to_kind(Kind::Float).to_device(self.device);
        match &self.network {
            Network::EfficientNet(_) if self.center_crop => {
                efficientnet::preprocess_eval(&x, self.resolution)
            }
            Network::EfficientNet(_) => Ok(efficientnet::normalize(&resize_square(
                &x.unsqueeze(0),
                self.resolution,
            ))),
            Network::Inception(_) => inception::preprocess(&x.unsqueeze(0)),
            Network::Dinov2(_) => Ok(imagenet_normalize(
                &(resize_square(&x.unsqueeze(0), self.resolution) * 2.0 - 1.0),
            )),
        }
    }

    /// Features `[N, D]` (float32, on the extractor's device) of images `[3, H, W]` in [0, 1].
    pub fn features(&self, images01: &[Tensor]) -> Result<Tensor> {
        ensure!(!images01.is_empty(), "no images to compute features of");
        let x = Tensor::cat(
            &images01
                .iter()
                .map(|i| self.preprocess(i))
                .collect::<Result<Vec<_>>>()?,
            0,
        );
        tch::no_grad(|| match &self.network {
            Network::EfficientNet(e) => e.model.pooled(&crate::models::blocks::channels_last(&x)),
            Network::Dinov2(d) => Ok(d.model.forward(&x)?.pooler_output),
            Network::Inception(m) => m.model.pool3(&x),
        })
    }
}

/// Features, histogram and colour statistics of one image set.
pub struct SetStats {
    pub summary: SetSummary,
    /// `[N, D]` float32 on the CPU.
    pub features: Tensor,
    /// Mean of the per-image normalised histograms, `[bins^3]`.
    pub histogram: Tensor,
}

fn select_subset(files: Vec<PathBuf>, max: Option<usize>, seed: u64) -> Vec<PathBuf> {
    match max {
        Some(m) if m < files.len() => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut idx = rand::seq::index::sample(&mut rng, files.len(), m).into_vec();
            idx.sort_unstable();
            idx.into_iter().map(|i| files[i].clone()).collect()
        }
        _ => files,
    }
}

/// The images of a set that an evaluation uses: [`list_images`], then a seeded
/// random subset of `max_images` (kept in file order) if the set is larger. Returns
/// the files and the number found.
pub fn select_images(
    dir: &Path,
    max_images: Option<usize>,
    seed: u64,
) -> Result<(Vec<PathBuf>, usize)> {
    let all = list_images(dir)?;
    let available = all.len();
    let files = select_subset(all, max_images, seed);
    ensure!(
        files.len() >= 2,
        "{}: FD and KID need at least 2 images, found {}",
        dir.display(),
        files.len()
    );
    Ok((files, available))
}

/// Read the images `files` of the set in `dir` (found: `available` images) and
/// compute their features, histogram and mean colour.
pub fn set_stats(
    dir: &Path,
    files: &[PathBuf],
    available: usize,
    extractor: &FeatureExtractor,
    opts: &EvalOptions,
) -> Result<SetStats> {
    ensure!(
        files.len() >= 2,
        "{}: FD and KID need at least 2 images, found {}",
        dir.display(),
        files.len()
    );
    let bs = opts.batch_size.max(1);
    let bins = opts.histogram_bins;
    let mut feats = Vec::new();
    let mut hist = Tensor::zeros([bins * bins * bins], (Kind::Double, Device::Cpu));
    let mut mean = [0f64; 3];
    let mut sizes = std::collections::BTreeSet::new();
    let name: Vec<String> = dir
        .components()
        .rev()
        .take(2)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let mut progress = crate::progress::Progress::new(
        format!(
            "features of {}",
            name.into_iter().rev().collect::<Vec<_>>().join("/")
        ),
        files.len() as u64,
    );
    for chunk in files.chunks(bs) {
        let mut images = Vec::with_capacity(chunk.len());
        for path in chunk {
            let img = load_image01(path)?;
            let s = img.size();
            sizes.insert((s[2], s[1]));
            hist += color_histogram(&img, bins)?;
            let m = img.mean_dim([1i64, 2].as_slice(), false, Kind::Double);
            for (c, v) in mean.iter_mut().enumerate() {
                *v += m.double_value(&[c as i64]);
            }
            images.push(img);
        }
        let f = extractor
            .features(&images)
            .with_context(|| format!("computing features of images in {}", dir.display()))?;
        feats.push(f.to_device(Device::Cpu));
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    let n = files.len() as f64;
    let features = Tensor::cat(&feats, 0);
    let finite = features.isfinite().all().int64_value(&[]) != 0;
    ensure!(
        finite,
        "{}: the {} features contain non-finite values",
        dir.display(),
        extractor.space()
    );
    Ok(SetStats {
        summary: SetSummary {
            path: dir.display().to_string(),
            count: files.len(),
            available,
            sizes: sizes.iter().map(|(w, h)| format!("{w}x{h}")).collect(),
            mean_rgb: mean.map(|v| v / n),
        },
        features,
        histogram: hist / n,
    })
}

/// Compare a set of generated images with a reference set (see the module docs).
pub fn evaluate(opts: &EvalOptions) -> Result<EvalReport> {
    let start = Instant::now();
    ensure!(
        opts.kid_subsets >= 1,
        "kid_subsets must be at least 1, found {}",
        opts.kid_subsets
    );
    ensure!(
        opts.kid_subset_size >= 2,
        "kid_subset_size must be at least 2, found {}",
        opts.kid_subset_size
    );
    ensure!(
        (1..=256).contains(&opts.histogram_bins),
        "histogram_bins must be in 1..=256, found {}",
        opts.histogram_bins
    );
    // Both folders are listed before the network is loaded, so that a wrong path fails fast.
    let (gen_files, gen_found) = select_images(&opts.generated, opts.max_images, opts.seed)?;
    let (ref_files, ref_found) = select_images(&opts.reference, opts.max_images, opts.seed)?;
    let clip_score = match &opts.clip {
        Some(c) => Some(
            super::clip_score::clip_score_files(
                c,
                &opts.generated,
                &gen_files,
                opts.device,
                opts.batch_size,
            )?
            .mean,
        ),
        None => None,
    };
    let extractor = FeatureExtractor::load(
        opts.features,
        opts.features_path.as_deref(),
        opts.resolution,
        opts.center_crop,
        opts.device,
    )?;
    let gen = set_stats(&opts.generated, &gen_files, gen_found, &extractor, opts)?;
    let reference = set_stats(&opts.reference, &ref_files, ref_found, &extractor, opts)?;
    let mut report = compare(&gen, &reference, &extractor, opts)?;
    report.clip_score = clip_score;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// The report for two sets whose statistics are already computed (with the same
/// extractor and histogram bins); `seconds` is left at 0.
pub fn compare(
    gen: &SetStats,
    reference: &SetStats,
    extractor: &FeatureExtractor,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    let fd = fd::frechet_distance_parts(
        &fd::GaussianStats::from_features(&gen.features)?,
        &fd::GaussianStats::from_features(&reference.features)?,
    )?;
    tch::manual_seed(opts.seed as i64);
    let kid = fd::kid(
        &gen.features,
        &reference.features,
        opts.kid_subsets,
        opts.kid_subset_size,
    )?;
    let histogram_l1 = histogram_l1(&gen.histogram, &reference.histogram)?;
    Ok(EvalReport {
        generated: gen.summary.clone(),
        reference: reference.summary.clone(),
        features: extractor.space(),
        features_path: extractor.path().display().to_string(),
        feature_dim: extractor.dim(),
        resolution: extractor.resolution(),
        center_crop: opts.center_crop,
        fd: fd.fd,
        fd_mean_term: fd.mean_term,
        fd_cov_term: fd.cov_term,
        kid: kid.mean,
        kid_std: kid.std,
        kid_subsets: kid.subsets,
        kid_subset_size: kid.subset_size,
        histogram_l1,
        histogram_bins: opts.histogram_bins,
        seed: opts.seed,
        seconds: 0.0,
        clip_score: None,
        warnings: sample_count_warnings(
            gen.summary.count,
            reference.summary.count,
            extractor.dim(),
            opts.kid_subset_size,
        ),
    })
}
