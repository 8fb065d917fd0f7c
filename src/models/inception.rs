//! The Inception-v3 of FID: pytorch-fid's `InceptionV3` with `use_fid_inception=True`,
//! a port of the TensorFlow graph (`inception-2015-12-05`) that the original FID code
//! uses. Its weights, `pt_inception-2015-12-05-6726825d.pth`, are turned into
//! `model.safetensors` + `config.json` by `scripts/convert_inception.py`; tensor names are
//! pytorch-fid's (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch_pool.bn.running_mean`, ...).
//!
//! It differs from torchvision's Inception-v3 in the FID-specific blocks:
//! * the average pooling of the `branch_pool` of the A (`Mixed_5b..5d`), C (`Mixed_6b..6e`)
//!   and first E (`Mixed_7b`) blocks leaves the zero padding out of the average
//!   (`count_include_pad=False`, as TensorFlow does);
//! * the last E block (`Mixed_7c`) max-pools instead of average-pooling in its `branch_pool`;
//! * 1008 classes (the unused classifier `fc` is not loaded).
//!
//! Every convolution is followed by BatchNorm (eps 0.001, running statistics) and ReLU.
//! Input: images in [0, 1], resized to 299 x 299 (bilinear, `align_corners=False`, no
//! antialiasing) and mapped to [-1, 1] by `2 x - 1` ([`preprocess`]). Output: the 2048-d
//! "pool3" features (global average pool after `Mixed_7c`).

use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

use crate::weights::{self, LoadOptions};

/// Side of the square network input (pytorch-fid `resize_input=True`).
pub const INPUT_SIZE: i64 = 299;
/// Size of the pool3 features.
pub const FEATURE_DIM: i64 = 2048;
/// BatchNorm epsilon of every layer.
pub const BATCH_NORM_EPS: f64 = 1e-3;
/// `model_type` of the `config.json` written by `scripts/convert_inception.py`.
pub const MODEL_TYPE: &str = "pytorch_fid_inception_v3";

/// Tensors of the weights file that the feature network does not use.
const UNUSED: [&str; 3] = ["fc.weight", "fc.bias", "*.num_batches_tracked"];

/// pytorch-fid's input transform for images `[N, 3, H, W]` in [0, 1]: bilinear resize to
/// 299 x 299 (`align_corners=False`, no antialiasing, also when shrinking), then `2 x - 1`.
pub fn preprocess(images01: &Tensor) -> Result<Tensor> {
    let s = images01.size();
    ensure!(
        s.len() == 4 && s[1] == 3,
        "Inception-v3 expects images [N, 3, H, W], found {s:?}"
    );
    let x = images01.upsample_bilinear2d([INPUT_SIZE, INPUT_SIZE], false, None, None);
    Ok(x * 2.0 - 1.0)
}

/// Batch norm in inference mode (running statistics).
#[derive(Debug)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl BatchNorm {
    fn new(p: nn::Path, c: i64) -> Self {
        Self {
            weight: p.var("weight", &[c], nn::Init::Const(1.0)),
            bias: p.var("bias", &[c], nn::Init::Const(0.0)),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            false,
            0.0,
            BATCH_NORM_EPS,
            true,
        )
    }
}

/// torchvision's `BasicConv2d`: convolution without bias, BatchNorm, ReLU.
#[derive(Debug)]
struct BasicConv2d {
    weight: Tensor,
    bn: BatchNorm,
    stride: i64,
    padding: [i64; 2],
}

impl BasicConv2d {
    /// `kernel` and `padding` are (height, width).
    fn new(
        p: nn::Path,
        c_in: i64,
        c_out: i64,
        kernel: [i64; 2],
        stride: i64,
        padding: [i64; 2],
    ) -> Self {
        let fan_in = c_in * kernel[0] * kernel[1];
        let weight = (&p / "conv").var(
            "weight",
            &[c_out, c_in, kernel[0], kernel[1]],
            nn::Init::Randn {
                mean: 0.0,
                stdev: (2.0 / fan_in as f64).sqrt(),
            },
        );
        Self {
            weight,
            bn: BatchNorm::new(&p / "bn", c_out),
            stride,
            padding,
        }
    }

    /// A square `k` x `k` convolution with stride 1 and padding `pad` on every side.
    fn square(p: nn::Path, c_in: i64, c_out: i64, k: i64, pad: i64) -> Self {
        Self::new(p, c_in, c_out, [k, k], 1, [pad, pad])
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.conv2d(
            &self.weight,
            None::<Tensor>,
            [self.stride, self.stride],
            self.padding,
            [1, 1],
            1,
        );
        self.bn.forward(&y).relu()
    }
}

/// 3 x 3 average pooling, stride 1, padding 1, the padding left out of the average.
fn avg_pool_3x3_exclude_pad(x: &Tensor) -> Tensor {
    x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None)
}

/// 3 x 3 max pooling, stride 2, no padding.
fn max_pool_3x3_s2(x: &Tensor) -> Tensor {
    x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

/// FIDInceptionA (`Mixed_5b`, `Mixed_5c`, `Mixed_5d`).
#[derive(Debug)]
struct InceptionA {
    branch1x1: BasicConv2d,
    branch5x5_1: BasicConv2d,
    branch5x5_2: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
    branch_pool: BasicConv2d,
}

impl InceptionA {
    fn new(p: nn::Path, c_in: i64, pool_features: i64) -> Self {
        Self {
            branch1x1: BasicConv2d::square(&p / "branch1x1", c_in, 64, 1, 0),
            branch5x5_1: BasicConv2d::square(&p / "branch5x5_1", c_in, 48, 1, 0),
            branch5x5_2: BasicConv2d::square(&p / "branch5x5_2", 48, 64, 5, 2),
            branch3x3dbl_1: BasicConv2d::square(&p / "branch3x3dbl_1", c_in, 64, 1, 0),
            branch3x3dbl_2: BasicConv2d::square(&p / "branch3x3dbl_2", 64, 96, 3, 1),
            branch3x3dbl_3: BasicConv2d::square(&p / "branch3x3dbl_3", 96, 96, 3, 1),
            branch_pool: BasicConv2d::square(&p / "branch_pool", c_in, pool_features, 1, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b1 = self.branch1x1.forward(x);
        let b5 = self.branch5x5_2.forward(&self.branch5x5_1.forward(x));
        let b3 = self
            .branch3x3dbl_3
            .forward(&self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x)));
        let bp = self.branch_pool.forward(&avg_pool_3x3_exclude_pad(x));
        Tensor::cat(&[b1, b5, b3, bp], 1)
    }
}

/// InceptionB (`Mixed_6a`), unchanged from torchvision.
#[derive(Debug)]
struct InceptionB {
    branch3x3: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
}

impl InceptionB {
    fn new(p: nn::Path, c_in: i64) -> Self {
        Self {
            branch3x3: BasicConv2d::new(&p / "branch3x3", c_in, 384, [3, 3], 2, [0, 0]),
            branch3x3dbl_1: BasicConv2d::square(&p / "branch3x3dbl_1", c_in, 64, 1, 0),
            branch3x3dbl_2: BasicConv2d::square(&p / "branch3x3dbl_2", 64, 96, 3, 1),
            branch3x3dbl_3: BasicConv2d::new(&p / "branch3x3dbl_3", 96, 96, [3, 3], 2, [0, 0]),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b3 = self.branch3x3.forward(x);
        let bd = self
            .branch3x3dbl_3
            .forward(&self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x)));
        Tensor::cat(&[b3, bd, max_pool_3x3_s2(x)], 1)
    }
}

/// FIDInceptionC (`Mixed_6b` .. `Mixed_6e`).
#[derive(Debug)]
struct InceptionC {
    branch1x1: BasicConv2d,
    branch7x7: [BasicConv2d; 3],
    branch7x7dbl: [BasicConv2d; 5],
    branch_pool: BasicConv2d,
}

impl InceptionC {
    fn new(p: nn::Path, c_in: i64, c7: i64) -> Self {
        let row =
            |name: &str, ci: i64, co: i64| BasicConv2d::new(&p / name, ci, co, [1, 7], 1, [0, 3]);
        let col =
            |name: &str, ci: i64, co: i64| BasicConv2d::new(&p / name, ci, co, [7, 1], 1, [3, 0]);
        Self {
            branch1x1: BasicConv2d::square(&p / "branch1x1", c_in, 192, 1, 0),
            branch7x7: [
                BasicConv2d::square(&p / "branch7x7_1", c_in, c7, 1, 0),
                row("branch7x7_2", c7, c7),
                col("branch7x7_3", c7, 192),
            ],
            branch7x7dbl: [
                BasicConv2d::square(&p / "branch7x7dbl_1", c_in, c7, 1, 0),
                col("branch7x7dbl_2", c7, c7),
                row("branch7x7dbl_3", c7, c7),
                col("branch7x7dbl_4", c7, c7),
                row("branch7x7dbl_5", c7, 192),
            ],
            branch_pool: BasicConv2d::square(&p / "branch_pool", c_in, 192, 1, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let chain = |convs: &[BasicConv2d]| {
            convs
                .iter()
                .fold(x.shallow_clone(), |h, conv| conv.forward(&h))
        };
        let b1 = self.branch1x1.forward(x);
        let b7 = chain(&self.branch7x7);
        let bd = chain(&self.branch7x7dbl);
        let bp = self.branch_pool.forward(&avg_pool_3x3_exclude_pad(x));
        Tensor::cat(&[b1, b7, bd, bp], 1)
    }
}

/// InceptionD (`Mixed_7a`), unchanged from torchvision.
#[derive(Debug)]
struct InceptionD {
    branch3x3_1: BasicConv2d,
    branch3x3_2: BasicConv2d,
    branch7x7x3: [BasicConv2d; 4],
}

impl InceptionD {
    fn new(p: nn::Path, c_in: i64) -> Self {
        Self {
            branch3x3_1: BasicConv2d::square(&p / "branch3x3_1", c_in, 192, 1, 0),
            branch3x3_2: BasicConv2d::new(&p / "branch3x3_2", 192, 320, [3, 3], 2, [0, 0]),
            branch7x7x3: [
                BasicConv2d::square(&p / "branch7x7x3_1", c_in, 192, 1, 0),
                BasicConv2d::new(&p / "branch7x7x3_2", 192, 192, [1, 7], 1, [0, 3]),
                BasicConv2d::new(&p / "branch7x7x3_3", 192, 192, [7, 1], 1, [3, 0]),
                BasicConv2d::new(&p / "branch7x7x3_4", 192, 192, [3, 3], 2, [0, 0]),
            ],
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b3 = self.branch3x3_2.forward(&self.branch3x3_1.forward(x));
        let b7 = self
            .branch7x7x3
            .iter()
            .fold(x.shallow_clone(), |h, conv| conv.forward(&h));
        Tensor::cat(&[b3, b7, max_pool_3x3_s2(x)], 1)
    }
}

/// FIDInceptionE_1 (`Mixed_7b`, average pooling without the padding) and
/// FIDInceptionE_2 (`Mixed_7c`, max pooling) in their `branch_pool`.
#[derive(Debug)]
struct InceptionE {
    branch1x1: BasicConv2d,
    branch3x3_1: BasicConv2d,
    branch3x3_2a: BasicConv2d,
    branch3x3_2b: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3a: BasicConv2d,
    branch3x3dbl_3b: BasicConv2d,
    branch_pool: BasicConv2d,
    max_pool: bool,
}

impl InceptionE {
    fn new(p: nn::Path, c_in: i64, max_pool: bool) -> Self {
        let row = |name: &str| BasicConv2d::new(&p / name, 384, 384, [1, 3], 1, [0, 1]);
        let col = |name: &str| BasicConv2d::new(&p / name, 384, 384, [3, 1], 1, [1, 0]);
        Self {
            branch1x1: BasicConv2d::square(&p / "branch1x1", c_in, 320, 1, 0),
            branch3x3_1: BasicConv2d::square(&p / "branch3x3_1", c_in, 384, 1, 0),
            branch3x3_2a: row("branch3x3_2a"),
            branch3x3_2b: col("branch3x3_2b"),
            branch3x3dbl_1: BasicConv2d::square(&p / "branch3x3dbl_1", c_in, 448, 1, 0),
            branch3x3dbl_2: BasicConv2d::square(&p / "branch3x3dbl_2", 448, 384, 3, 1),
            branch3x3dbl_3a: row("branch3x3dbl_3a"),
            branch3x3dbl_3b: col("branch3x3dbl_3b"),
            branch_pool: BasicConv2d::square(&p / "branch_pool", c_in, 192, 1, 0),
            max_pool,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b1 = self.branch1x1.forward(x);
        let h = self.branch3x3_1.forward(x);
        let b3 = Tensor::cat(
            &[self.branch3x3_2a.forward(&h), self.branch3x3_2b.forward(&h)],
            1,
        );
        let h = self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x));
        let bd = Tensor::cat(
            &[
                self.branch3x3dbl_3a.forward(&h),
                self.branch3x3dbl_3b.forward(&h),
            ],
            1,
        );
        let pooled = if self.max_pool {
            x.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false)
        } else {
            avg_pool_3x3_exclude_pad(x)
        };
        let bp = self.branch_pool.forward(&pooled);
        Tensor::cat(&[b1, b3, bd, bp], 1)
    }
}

/// pytorch-fid's FID Inception-v3 up to the pool3 features.
#[derive(Debug)]
pub struct InceptionV3 {
    conv_1a: BasicConv2d,
    conv_2a: BasicConv2d,
    conv_2b: BasicConv2d,
    conv_3b: BasicConv2d,
    conv_4a: BasicConv2d,
    mixed_5: [InceptionA; 3],
    mixed_6a: InceptionB,
    mixed_6: [InceptionC; 4],
    mixed_7a: InceptionD,
    mixed_7b: InceptionE,
    mixed_7c: InceptionE,
}

/// A loaded FID Inception: its variables (frozen), the model, and the weights file.
pub struct LoadedInception {
    pub vs: nn::VarStore,
    pub model: InceptionV3,
    pub weights: PathBuf,
}

impl InceptionV3 {
    /// The graph with randomly initialised variables under pytorch-fid's names.
    pub fn new(p: &nn::Path) -> Self {
        Self {
            conv_1a: BasicConv2d::new(p / "Conv2d_1a_3x3", 3, 32, [3, 3], 2, [0, 0]),
            conv_2a: BasicConv2d::square(p / "Conv2d_2a_3x3", 32, 32, 3, 0),
            conv_2b: BasicConv2d::square(p / "Conv2d_2b_3x3", 32, 64, 3, 1),
            conv_3b: BasicConv2d::square(p / "Conv2d_3b_1x1", 64, 80, 1, 0),
            conv_4a: BasicConv2d::square(p / "Conv2d_4a_3x3", 80, 192, 3, 0),
            mixed_5: [
                InceptionA::new(p / "Mixed_5b", 192, 32),
                InceptionA::new(p / "Mixed_5c", 256, 64),
                InceptionA::new(p / "Mixed_5d", 288, 64),
            ],
            mixed_6a: InceptionB::new(p / "Mixed_6a", 288),
            mixed_6: [
                InceptionC::new(p / "Mixed_6b", 768, 128),
                InceptionC::new(p / "Mixed_6c", 768, 160),
                InceptionC::new(p / "Mixed_6d", 768, 160),
                InceptionC::new(p / "Mixed_6e", 768, 192),
            ],
            mixed_7a: InceptionD::new(p / "Mixed_7a", 768),
            mixed_7b: InceptionE::new(p / "Mixed_7b", 1280, false),
            mixed_7c: InceptionE::new(p / "Mixed_7c", 2048, true),
        }
    }

    /// Load `model.safetensors` from `path` (a folder written by
    /// `scripts/convert_inception.py`, or the .safetensors file itself), strictly: every
    /// tensor of the graph must be present with its shape, and every tensor of the file
    /// must be used (except the classifier `fc.*` and `num_batches_tracked` counters).
    /// A `config.json` beside it, if any, must name this model type.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<LoadedInception> {
        let (dir, files) = if path.is_file() {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            (dir, vec![path.to_path_buf()])
        } else if path.is_dir() {
            let files = weights::find_weight_files(path, &["model"], None)
                .context("no Inception-v3 weights: convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth with scripts/convert_inception.py")?;
            (path.to_path_buf(), files)
        } else {
            bail!(
                "Inception-v3 weights {} do not exist: convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth with scripts/convert_inception.py",
                path.display()
            );
        };
        let config = dir.join("config.json");
        if config.is_file() {
            let v = crate::models::config::read_json(&config)?;
            match v.get("model_type").and_then(|m| m.as_str()) {
                Some(MODEL_TYPE) => {}
                other => bail!(
                    "{}: model_type is {}, expected {MODEL_TYPE:?} (the output of scripts/convert_inception.py)",
                    config.display(),
                    other.map_or("missing".to_string(), |m| format!("{m:?}"))
                ),
            }
        }
        let mut vs = nn::VarStore::new(device);
        let model = Self::new(&vs.root());
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        let opts = LoadOptions {
            ignore: UNUSED.iter().map(|s| s.to_string()).collect(),
            rename: vec![],
        };
        weights::load_into(&mut vs, &files, &opts)?;
        vs.freeze();
        Ok(LoadedInception {
            vs,
            model,
            weights: files[0].clone(),
        })
    }

    /// The outputs of pytorch-fid's four blocks for a network input `x` (already
    /// [`preprocess`]ed, [N, 3, H, W]): after the first max pool [N, 64, ..], after the
    /// second max pool [N, 192, ..], after `Mixed_6e` [N, 768, ..], and the pool3
    /// features [N, 2048].
    pub fn blocks(&self, x: &Tensor) -> Result<[Tensor; 4]> {
        let s = x.size();
        ensure!(
            s.len() == 4 && s[1] == 3,
            "Inception-v3 input must be [N, 3, H, W], found {s:?}"
        );
        ensure!(
            s[2] >= 75 && s[3] >= 75,
            "Inception-v3 input {}x{} is too small (at least 75x75; preprocess resizes to 299)",
            s[2],
            s[3]
        );
        let h = self.conv_1a.forward(x);
        let h = self.conv_2b.forward(&self.conv_2a.forward(&h));
        let b0 = max_pool_3x3_s2(&h);
        let h = self.conv_4a.forward(&self.conv_3b.forward(&b0));
        let b1 = max_pool_3x3_s2(&h);
        let mut h = b1.shallow_clone();
        for m in &self.mixed_5 {
            h = m.forward(&h);
        }
        h = self.mixed_6a.forward(&h);
        for m in &self.mixed_6 {
            h = m.forward(&h);
        }
        let b2 = h.shallow_clone();
        let h = self.mixed_7a.forward(&h);
        let h = self.mixed_7c.forward(&self.mixed_7b.forward(&h));
        let pool3 = h.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
        Ok([b0, b1, b2, pool3])
    }

    /// The pool3 features [N, 2048] of a network input (already [`preprocess`]ed).
    pub fn pool3(&self, x: &Tensor) -> Result<Tensor> {
        let [_, _, _, pool3] = self.blocks(x)?;
        Ok(pool3)
    }

    /// The FID features [N, 2048] of images [N, 3, H, W] in [0, 1], as pytorch-fid's
    /// `InceptionV3([3], resize_input=True, normalize_input=True)` computes them.
    pub fn features01(&self, images01: &Tensor) -> Result<Tensor> {
        self.pool3(&preprocess(images01)?)
    }
}

/// Developer entry point of `adt forward` (`component` = `inception`): input `images`
/// ([N, 3, H, W] in [0, 1]); outputs `input` (after [`preprocess`]), `block0`, `block1`,
/// `block2` and `pool3`.
pub fn run_forward(
    component: &str,
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    if component != "inception" {
        bail!("unknown Inception component {component:?} (expected inception)");
    }
    let loaded = InceptionV3::load(model_dir, Device::Cpu, Kind::Float)?;
    let images = crate::models::forward_input(inputs, "images", component)?.to_kind(Kind::Float);
    tch::no_grad(|| {
        let x = preprocess(&images)?;
        let [b0, b1, b2, pool3] = loaded.model.blocks(&x)?;
        Ok(HashMap::from([
            ("input".to_string(), x),
            ("block0".to_string(), b0),
            ("block1".to_string(), b1),
            ("block2".to_string(), b2),
            ("pool3".to_string(), pool3),
        ]))
    })
}
