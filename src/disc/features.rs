//! [`FeatureNetwork`] implementations: DINOv2 and EfficientNet-Lite.
//!
//! Both take images in [-1, 1], resize them (bilinear, antialiased when shrinking;
//! differentiable) to their configured resolution, normalise them as the network was
//! trained, and return one [B, C, N] tensor per tapped level. Weights are frozen; the
//! gradient flows to the images.

use anyhow::{ensure, Result};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

use super::FeatureNetwork;
use crate::models::dinov2::{Dinov2Model, LoadedDinov2};
use crate::models::efficientnet::{self, EfficientNet, LoadedEfficientNet, NUM_STAGES};

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
/// and 12th (last) layer. The CLS token is dropped: each level is [B, D, N_patches].
pub struct DinoFeatures {
    model: Dinov2Model,
    _vs: Option<VarStore>,
    resolution: i64,
    blocks: Vec<usize>,
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
        })
    }

    /// Load a transformers DINOv2 folder, frozen, with the default resolution and blocks.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let LoadedDinov2 { vs, model, .. } = Dinov2Model::load(dir, device, kind)?;
        Self::new(
            model,
            Some(vs),
            Self::DEFAULT_RESOLUTION,
            &Self::DEFAULT_BLOCKS,
        )
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
        self.blocks
            .iter()
            .map(|&b| {
                let h = &hs[b + 1];
                let n = h.size()[1];
                h.narrow(1, 1, n - 1).transpose(1, 2)
            })
            .collect()
    }

    fn channels(&self) -> Vec<i64> {
        vec![self.model.config.hidden_size; self.blocks.len()]
    }
}

/// EfficientNet-Lite feature maps at the ends of stages, flattened to [B, C, H*W].
///
/// Taps are 0-based stage indices (0..7; stage `i` outputs 16, 24, 40, 80, 112, 192,
/// 320 channels). The default `[1, 2, 4, 6]` (24, 40, 112, 320 channels at strides
/// 4, 8, 16, 32) is the split Projected GAN uses for its EfficientNet-Lite0 features.
pub struct EfficientNetFeatures {
    model: EfficientNet,
    _vs: Option<VarStore>,
    resolution: i64,
    taps: Vec<usize>,
}

impl EfficientNetFeatures {
    pub const DEFAULT_TAPS: [usize; 4] = [1, 2, 4, 6];

    pub fn new(
        model: EfficientNet,
        vs: Option<VarStore>,
        resolution: i64,
        taps: &[usize],
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
        })
    }

    /// Load a converted checkpoint folder, frozen, at its training resolution with the default taps.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let LoadedEfficientNet { vs, model, config } = EfficientNet::load(dir, device, kind)?;
        Self::new(model, Some(vs), config.image_size, &Self::DEFAULT_TAPS)
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

    fn prepare(&self, images: &Tensor) -> Tensor {
        let x = resize_bilinear(images, self.resolution);
        efficientnet::normalize(&((x + 1.0) * 0.5))
    }
}

impl FeatureNetwork for EfficientNetFeatures {
    fn features(&self, images: &Tensor) -> Vec<Tensor> {
        check_images(images, "EfficientNet features");
        let outs = self
            .model
            .stage_outputs(&self.prepare(images), &self.taps)
            .unwrap_or_else(|e| panic!("EfficientNet features: {e:#}"));
        outs.into_iter().map(|t| t.flatten(2, 3)).collect()
    }

    fn channels(&self) -> Vec<i64> {
        let ch = self.model.config.stage_channels();
        self.taps.iter().map(|&t| ch[t]).collect()
    }
}
