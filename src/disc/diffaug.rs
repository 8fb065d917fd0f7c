//! Differentiable augmentation (DiffAugment, Zhao et al. 2020, "Differentiable
//! Augmentation for Data-Efficient GAN Training") for images in [-1, 1] of shape
//! `[B, C, H, W]`.
//!
//! Policy "color,translation,cutout" with the paper's defaults, parameters drawn
//! independently per sample:
//! - color: brightness `x + b`, b ~ U[-0.5, 0.5); saturation
//!   `(x - mean_c) * s + mean_c` (mean over channels per pixel), s ~ U[0, 2);
//!   contrast `(x - mean) * c + mean` (mean over the whole image), c ~ U[0.5, 1.5);
//! - translation: shift by integers (ty, tx), |ty| <= round(0.125 H),
//!   |tx| <= round(0.125 W), uniform; pixels moved in from outside are zero;
//! - cutout: a zero square of size round(0.5 H) x round(0.5 W) centred at a uniform
//!   random position, clipped at the borders.
//!
//! Every operation is differentiable with respect to the images (the random
//! parameters are constants). The parameters are drawn on the CPU from tch's global
//! generator (seed it with `tch::manual_seed`), so a seed gives the same
//! augmentation on every device and float kind.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// Which augmentations to apply, with their strengths.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub color: bool,
    pub translation: bool,
    pub cutout: bool,
    /// Maximum shift as a fraction of the image size (0.125).
    pub translation_ratio: f64,
    /// Side of the cutout square as a fraction of the image size (0.5).
    pub cutout_ratio: f64,
}

impl Default for Policy {
    /// "color,translation,cutout" with the default strengths.
    fn default() -> Self {
        Policy {
            color: true,
            translation: true,
            cutout: true,
            translation_ratio: 0.125,
            cutout_ratio: 0.5,
        }
    }
}

impl Policy {
    /// No augmentation at all.
    pub fn none() -> Self {
        Policy {
            color: false,
            translation: false,
            cutout: false,
            ..Policy::default()
        }
    }

    /// Parse a comma-separated list of "color", "translation", "cutout" (empty or
    /// "none": no augmentation), with the default strengths.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut p = Policy::none();
        let spec = spec.trim();
        if spec.is_empty() || spec == "none" {
            return Ok(p);
        }
        for item in spec.split(',').map(str::trim) {
            match item {
                "color" => p.color = true,
                "translation" => p.translation = true,
                "cutout" => p.cutout = true,
                other => bail!(
                    "DiffAugment policy {spec:?}: unknown augmentation {other:?} (expected color, translation, cutout)"
                ),
            }
        }
        Ok(p)
    }

    /// The colour op alone.
    pub fn color_only(&self) -> Self {
        Policy {
            color: self.color,
            translation: false,
            cutout: false,
            ..self.clone()
        }
    }

    /// Everything but the colour op.
    pub fn without_color(&self) -> Self {
        Policy {
            color: false,
            ..self.clone()
        }
    }

    pub fn is_identity(&self) -> bool {
        !(self.color || self.translation || self.cutout)
    }

    /// Maximum |shift| in rows and columns for an `h` x `w` image.
    pub fn max_shift(&self, h: i64, w: i64) -> (i64, i64) {
        (
            round_half_up(h as f64 * self.translation_ratio),
            round_half_up(w as f64 * self.translation_ratio),
        )
    }

    /// Cutout square size (rows, columns) for an `h` x `w` image.
    pub fn cutout_size(&self, h: i64, w: i64) -> (i64, i64) {
        (
            round_half_up(h as f64 * self.cutout_ratio),
            round_half_up(w as f64 * self.cutout_ratio),
        )
    }
}

fn round_half_up(x: f64) -> i64 {
    (x + 0.5).floor() as i64
}

/// Per-sample random parameters of one augmentation call.
#[derive(Clone, Debug, PartialEq)]
pub struct AugParams {
    /// Additive brightness offsets in [-0.5, 0.5).
    pub brightness: Option<Vec<f64>>,
    /// Saturation factors in [0, 2).
    pub saturation: Option<Vec<f64>>,
    /// Contrast factors in [0.5, 1.5).
    pub contrast: Option<Vec<f64>>,
    /// Shifts (rows, columns): output pixel (i, j) takes input pixel (i + ty, j + tx).
    pub translation: Option<Vec<(i64, i64)>>,
    /// Top-left corner (row, column) of the cutout square, possibly outside the image.
    pub cutout: Option<Vec<(i64, i64)>>,
    /// Size (rows, columns) of the cutout square.
    pub cutout_size: (i64, i64),
}

fn uniform(n: i64, lo: f64, hi: f64) -> Vec<f64> {
    let t = Tensor::rand([n], (Kind::Double, Device::Cpu)) * (hi - lo) + lo;
    Vec::<f64>::try_from(&t).expect("CPU double tensor to Vec")
}

fn randint(n: i64, lo: i64, hi_exclusive: i64) -> Vec<i64> {
    let t = Tensor::randint_low(lo, hi_exclusive, [n], (Kind::Int64, Device::Cpu));
    Vec::<i64>::try_from(&t).expect("CPU int64 tensor to Vec")
}

impl AugParams {
    /// Draw parameters for `batch` images of `h` x `w` pixels from tch's global
    /// generator.
    pub fn sample(policy: &Policy, batch: i64, h: i64, w: i64) -> Self {
        let mut p = AugParams {
            brightness: None,
            saturation: None,
            contrast: None,
            translation: None,
            cutout: None,
            cutout_size: policy.cutout_size(h, w),
        };
        if policy.color {
            p.brightness = Some(uniform(batch, -0.5, 0.5));
            p.saturation = Some(uniform(batch, 0.0, 2.0));
            p.contrast = Some(uniform(batch, 0.5, 1.5));
        }
        if policy.translation {
            let (sh, sw) = policy.max_shift(h, w);
            let ty = randint(batch, -sh, sh + 1);
            let tx = randint(batch, -sw, sw + 1);
            p.translation = Some(ty.into_iter().zip(tx).collect());
        }
        if policy.cutout {
            let (ch, cw) = p.cutout_size;
            // Centres uniform over the image (for even sizes also one past the end),
            // as in the reference implementation.
            let cy = randint(batch, 0, h + (1 - ch % 2));
            let cx = randint(batch, 0, w + (1 - cw % 2));
            p.cutout = Some(
                cy.into_iter()
                    .zip(cx)
                    .map(|(y, x)| (y - ch / 2, x - cw / 2))
                    .collect(),
            );
        }
        p
    }
}

fn check_len<T>(name: &str, v: &[T], batch: i64) -> Result<()> {
    if v.len() as i64 != batch {
        bail!(
            "DiffAugment: {name} parameters for {} samples, the images have {batch}",
            v.len()
        );
    }
    Ok(())
}

fn per_sample(v: &[f64], x: &Tensor) -> Tensor {
    Tensor::from_slice(v)
        .to_kind(x.kind())
        .to_device(x.device())
        .view([-1, 1, 1, 1])
}

/// Apply `params` to images `x` `[B, C, H, W]`.
pub fn apply(x: &Tensor, params: &AugParams) -> Result<Tensor> {
    let size = x.size();
    if size.len() != 4 {
        bail!("DiffAugment: expected images [B, C, H, W], found {size:?}");
    }
    let (b, h, w) = (size[0], size[2], size[3]);
    let mut x = x.shallow_clone();
    if let Some(v) = &params.brightness {
        check_len("brightness", v, b)?;
        x = &x + per_sample(v, &x);
    }
    if let Some(v) = &params.saturation {
        check_len("saturation", v, b)?;
        let mean = x.mean_dim([1i64].as_slice(), true, x.kind());
        x = (&x - &mean) * per_sample(v, &x) + &mean;
    }
    if let Some(v) = &params.contrast {
        check_len("contrast", v, b)?;
        let mean = x.mean_dim([1i64, 2, 3].as_slice(), true, x.kind());
        x = (&x - &mean) * per_sample(v, &x) + &mean;
    }
    if let Some(t) = &params.translation {
        check_len("translation", t, b)?;
        let sh = t.iter().map(|s| s.0.abs()).max().unwrap_or(0);
        let sw = t.iter().map(|s| s.1.abs()).max().unwrap_or(0);
        let padded = x.constant_pad_nd([sw, sw, sh, sh]);
        let rows: Vec<Tensor> = t
            .iter()
            .enumerate()
            .map(|(i, &(ty, tx))| {
                padded
                    .narrow(0, i as i64, 1)
                    .narrow(2, sh + ty, h)
                    .narrow(3, sw + tx, w)
            })
            .collect();
        x = Tensor::cat(&rows, 0);
    }
    if let Some(c) = &params.cutout {
        check_len("cutout", c, b)?;
        let (ch, cw) = params.cutout_size;
        let dev = x.device();
        let top = Tensor::from_slice(&c.iter().map(|p| p.0).collect::<Vec<_>>())
            .to_device(dev)
            .view([-1, 1]);
        let left = Tensor::from_slice(&c.iter().map(|p| p.1).collect::<Vec<_>>())
            .to_device(dev)
            .view([-1, 1]);
        let r = Tensor::arange(h, (Kind::Int64, dev)).view([1, -1]);
        let q = Tensor::arange(w, (Kind::Int64, dev)).view([1, -1]);
        let in_rows = r.ge_tensor(&top).logical_and(&r.lt_tensor(&(&top + ch)));
        let in_cols = q.ge_tensor(&left).logical_and(&q.lt_tensor(&(&left + cw)));
        let cut = in_rows
            .view([b, 1, h, 1])
            .logical_and(&in_cols.view([b, 1, 1, w]));
        let keep = cut.logical_not().to_kind(x.kind());
        x = &x * keep;
    }
    Ok(x)
}

/// Draw fresh parameters and apply them: `DiffAugment(x)` for one batch.
pub fn diff_augment(x: &Tensor, policy: &Policy) -> Result<Tensor> {
    if policy.is_identity() {
        return Ok(x.shallow_clone());
    }
    let size = x.size();
    if size.len() != 4 {
        bail!("DiffAugment: expected images [B, C, H, W], found {size:?}");
    }
    let params = AugParams::sample(policy, size[0], size[2], size[3]);
    apply(x, &params)
}

/// DiffAugment with the colour op's parameters given: `color` (drawn by the caller with
/// [`Policy::color_only`], and shared by views that are compared with each other), then
/// fresh parameters for the policy's other ops. `color = None`: [`diff_augment`].
pub fn diff_augment_with_color(
    x: &Tensor,
    policy: &Policy,
    color: Option<&AugParams>,
) -> Result<Tensor> {
    match color {
        None => diff_augment(x, policy),
        Some(c) => diff_augment(&apply(x, c)?, &policy.without_color()),
    }
}
