//! [`FeatureNetwork`] implementations: DINOv2 and EfficientNet-Lite.
//!
//! Both take images in [-1, 1], resize them (bilinear, antialiased when shrinking;
//! differentiable) to their configured resolution, normalise them as the network was
//! trained, and return one [B, C, N] tensor per tapped level. Weights are frozen; the
//! gradient flows to the images.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

use super::FeatureNetwork;
use crate::models::dinov2::{Dinov2Model, LoadedDinov2};
use crate::models::efficientnet::{self, EfficientNet, LoadedEfficientNet, NUM_STAGES};

/// Which levels of the feature network feed discriminator heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Levels {
    /// StyleGAN-T's ViT hooks (and the paper's five levels, appendix A.2): the patch
    /// embedding (EfficientNet: the stem) plus the tapped blocks (stages); DINOv2
    /// tokens carry the CLS token added as readout.
    #[default]
    PatchAndBlocks,
    /// The tapped blocks (stages) only, DINOv2's CLS token dropped (ablation).
    Blocks,
}

/// ImageNet mean / std (RGB), as DINOv2 was trained with.
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Bilinear resize to `size` x `size` (`align_corners = false`), antialiased when a
/// side shrinks; a no-op when the size already matches. Differentiable.
pub fn resize_bilinear(x: &Tensor, size: i64) -> Tensor {
    let s = x.size();
    let (h, w) = (s[2], s[3]);
    if h == size && w == size {
        x.shallow_clone()
    } else if h > size || w > size {
        x.internal_upsample_bilinear2d_aa([size, size], false, None, None)
    } else {
        x.upsample_bilinear2d([size, size], false, None, None)
    }
}

fn check_images(images: &Tensor, who: &str) {
    let s = images.size();
    assert!(
        s.len() == 4 && s[1] == 3,
        "{who}: images must be [B, 3, H, W] in [-1, 1], found {s:?}"
    );
}

/// Map images in [-1, 1] to ImageNet-normalised values.
pub fn imagenet_normalize(images: &Tensor) -> Tensor {
    let opts = (images.kind(), images.device());
    let mean = Tensor::from_slice(&IMAGENET_MEAN)
        .to_kind(opts.0)
        .to_device(opts.1)
        .view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&IMAGENET_STD)
        .to_kind(opts.0)
        .to_device(opts.1)
        .view([1, 3, 1, 1]);
    ((images + 1.0) * 0.5 - mean) / std
}

/// DINOv2 patch tokens at several transformer blocks.
///
/// Block indices are 0-based layer indices: block `l` is the output of transformer
/// layer `l` (`hidden_states[l + 1]` in transformers' numbering), before the final
/// layernorm. The default `[2, 5, 8, 11]` taps a 12-layer ViT after its 3rd, 6th, 9th
/// and 12th (last) layer.
///
/// With [`Levels::PatchAndBlocks`] (the default) the levels are those of StyleGAN-T's
/// ViT feature hooks (`make_vit_backbone`, `hook_patch = True`, `AddReadout`): the
/// blocks in order, then the patch embedding (the embedding output after the
/// position embeddings, `hidden_states[0]`), and every level is its patch tokens
/// plus its own CLS token (`x[:, 1:] + x[:, 0]`): five levels of [B, D, N_patches]
/// for a 12-layer ViT-S. With [`Levels::Blocks`] the CLS token is dropped and the
/// patch embedding is not tapped.
pub struct DinoFeatures {
    model: Dinov2Model,
    _vs: Option<VarStore>,
    resolution: i64,
    blocks: Vec<usize>,
    levels: Levels,
}

impl DinoFeatures {
    pub const DEFAULT_RESOLUTION: i64 = 224;
    pub const DEFAULT_BLOCKS: [usize; 4] = [2, 5, 8, 11];

    /// Wrap a model (whose variables should already be frozen). `resolution` must be
    /// a multiple of the patch size; every block must be < the number of layers.
    pub fn new(
        model: Dinov2Model,
        vs: Option<VarStore>,
        resolution: i64,
        blocks: &[usize],
        levels: Levels,
    ) -> Result<Self> {
        let p = model.config.patch_size;
        ensure!(
            resolution >= p && resolution % p == 0,
            "DINOv2 feature resolution {resolution} must be a positive multiple of the patch size {p}"
        );
        ensure!(!blocks.is_empty(), "DINOv2 features: no blocks to tap");
        for &b in blocks {
            ensure!(
                b < model.num_layers(),
                "DINOv2 feature block {b} is out of range: the model has {} layers (0-based indices)",
                model.num_layers()
            );
        }
        Ok(Self {
            model,
            _vs: vs,
            resolution,
            blocks: blocks.to_vec(),
            levels,
        })
    }

    /// Load a transformers DINOv2 folder, frozen, with the default resolution, blocks
    /// and levels.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let LoadedDinov2 { vs, model, .. } = Dinov2Model::load(dir, device, kind)?;
        Self::new(
            model,
            Some(vs),
            Self::DEFAULT_RESOLUTION,
            &Self::DEFAULT_BLOCKS,
            Levels::default(),
        )
    }

    pub fn levels(&self) -> Levels {
        self.levels
    }

    pub fn model(&self) -> &Dinov2Model {
        &self.model
    }

    pub fn resolution(&self) -> i64 {
        self.resolution
    }

    pub fn blocks(&self) -> &[usize] {
        &self.blocks
    }
}

impl FeatureNetwork for DinoFeatures {
    fn features(&self, images: &Tensor) -> Vec<Tensor> {
        check_images(images, "DINOv2 features");
        let x = imagenet_normalize(&resize_bilinear(images, self.resolution));
        let depth = self.blocks.iter().max().expect("non-empty") + 1;
        let hs = self
            .model
            .hidden_states(&x, depth)
            .unwrap_or_else(|e| panic!("DINOv2 features: {e:#}"));
        let tokens = |h: &Tensor| {
            let n = h.size()[1];
            let patches = h.narrow(1, 1, n - 1);
            match self.levels {
                // AddReadout(start_index = 1): patch tokens + the CLS token.
                Levels::PatchAndBlocks => patches + h.narrow(1, 0, 1),
                Levels::Blocks => patches,
            }
            .transpose(1, 2)
        };
        let mut out: Vec<Tensor> = self.blocks.iter().map(|&b| tokens(&hs[b + 1])).collect();
        if self.levels == Levels::PatchAndBlocks {
            out.push(tokens(&hs[0]));
        }
        out
    }

    fn channels(&self) -> Vec<i64> {
        let n = self.blocks.len() + usize::from(self.levels == Levels::PatchAndBlocks);
        vec![self.model.config.hidden_size; n]
    }
}

/// EfficientNet-Lite feature maps at the ends of stages, flattened to [B, C, H*W].
///
/// Taps are 0-based stage indices (0..7; stage `i` outputs 16, 24, 40, 80, 112, 192,
/// 320 channels). The default `[1, 2, 4, 6]` (24, 40, 112, 320 channels at strides
/// 4, 8, 16, 32) is the split Projected GAN uses for its EfficientNet-Lite0 features.
///
/// With [`Levels::PatchAndBlocks`] (the default) a fifth level comes first: the stem
/// (3x3 stride-2 convolution, BatchNorm, ReLU6; 32 channels at stride 2), the
/// counterpart of a ViT's patch embedding (the network's first representation,
/// before any block), as StyleGAN-T adds the patch embedding to its four block
/// hooks. A convolutional network has no CLS token, so there is no readout.
pub struct EfficientNetFeatures {
    model: EfficientNet,
    _vs: Option<VarStore>,
    resolution: i64,
    taps: Vec<usize>,
    levels: Levels,
}

impl EfficientNetFeatures {
    pub const DEFAULT_TAPS: [usize; 4] = [1, 2, 4, 6];

    pub fn new(
        model: EfficientNet,
        vs: Option<VarStore>,
        resolution: i64,
        taps: &[usize],
        levels: Levels,
    ) -> Result<Self> {
        ensure!(
            resolution >= 32,
            "EfficientNet feature resolution {resolution} is too small"
        );
        ensure!(!taps.is_empty(), "EfficientNet features: no taps");
        for &t in taps {
            ensure!(
                t < NUM_STAGES,
                "EfficientNet tap {t} is out of range: stages are 0..{NUM_STAGES}"
            );
        }
        Ok(Self {
            model,
            _vs: vs,
            resolution,
            taps: taps.to_vec(),
            levels,
        })
    }

    /// Load a converted checkpoint folder, frozen, at its training resolution with the
    /// default taps and levels.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let LoadedEfficientNet { vs, model, config } = EfficientNet::load(dir, device, kind)?;
        Self::new(
            model,
            Some(vs),
            config.image_size,
            &Self::DEFAULT_TAPS,
            Levels::default(),
        )
    }

    pub fn levels(&self) -> Levels {
        self.levels
    }

    pub fn model(&self) -> &EfficientNet {
        &self.model
    }

    pub fn resolution(&self) -> i64 {
        self.resolution
    }

    pub fn taps(&self) -> &[usize] {
        &self.taps
    }

    /// The 1280-d pooled features of images in [-1, 1] (for evaluation metrics).
    pub fn pooled(&self, images: &Tensor) -> Result<Tensor> {
        self.model.pooled(&self.prepare(images))
    }

    /// Resize and normalise, laid out channels-last ([`crate::models::blocks::channels_last`]).
    fn prepare(&self, images: &Tensor) -> Tensor {
        let x = resize_bilinear(images, self.resolution);
        crate::models::blocks::channels_last(&efficientnet::normalize(&((x + 1.0) * 0.5)))
    }
}

impl FeatureNetwork for EfficientNetFeatures {
    fn features(&self, images: &Tensor) -> Vec<Tensor> {
        check_images(images, "EfficientNet features");
        let stem = self.levels == Levels::PatchAndBlocks;
        let outs = self
            .model
            .tap_outputs(&self.prepare(images), stem, &self.taps)
            .unwrap_or_else(|e| panic!("EfficientNet features: {e:#}"));
        outs.into_iter().map(|t| t.flatten(2, 3)).collect()
    }

    fn channels(&self) -> Vec<i64> {
        let ch = self.model.config.stage_channels();
        let mut out = Vec::new();
        if self.levels == Levels::PatchAndBlocks {
            out.push(efficientnet::STEM_CHANNELS);
        }
        out.extend(self.taps.iter().map(|&t| ch[t]));
        out
    }
}

/// A feature network whose frozen weights are in a reduced precision
/// (`model.frozen_dtype`): the images are cast to its dtype and the features back to
/// the images' dtype (differentiably), so the heads and losses stay float32.
pub struct CastFeatures {
    inner: Box<dyn FeatureNetwork>,
    kind: Kind,
}

impl CastFeatures {
    pub fn new(inner: Box<dyn FeatureNetwork>, kind: Kind) -> Self {
        Self { inner, kind }
    }

    /// The dtype the wrapped network computes in.
    pub fn kind(&self) -> Kind {
        self.kind
    }
}

impl FeatureNetwork for CastFeatures {
    fn features(&self, images: &Tensor) -> Vec<Tensor> {
        self.inner
            .features(&images.to_kind(self.kind))
            .into_iter()
            .map(|f| f.to_kind(images.kind()))
            .collect()
    }

    fn channels(&self) -> Vec<i64> {
        self.inner.channels()
    }
}
