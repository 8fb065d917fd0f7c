//! The discriminator heads on top of a frozen feature network, and their losses.
//!
//! Two variants:
//!
//! * `siamese` (the paper's, Eq. 6): for every tapped level i,
//!   `D_i(x_I) = cos(q_i(h_i(F_i(x_I))), h'_i(F_i(x_0)))`, where `h_i` is a trainable
//!   head (StyleGAN-T's `DiscHead` without the conditioning: blocks at the width of
//!   the features, a 1x1 convolution to 64 output channels, appendix A.2), `q_i` a
//!   trainable BYOL-style predictor with the same architecture on the head's 64
//!   output channels ("similar ... with the input as 64"), and `h'_i` a dual head
//!   with the architecture of `h_i` that is never optimised, only moved towards
//!   `h_i` by [`Discriminator::ema_update`].
//!   The cosine is taken between the flattened per-sample outputs (`[B, 64 * N_i]`),
//!   so it compares whole token maps position by position. The dual's output is a
//!   target: it is computed without gradient (BYOL's stop-gradient).
//!   For the real term of the discriminator loss, `x_I = x_0`: the same real image as
//!   the reference, augmented independently (callers pass the features of both views).
//! * `stylegan_t` (the ablation): StyleGAN-T's conditional heads. Each head ends in
//!   a 1x1 convolution to 64 channels (`cls`); a linear layer (`cmapper`,
//!   StyleGAN's equalised-learning-rate `FullyConnectedLayer`: weights N(0, 1)
//!   scaled by 1/sqrt(text_dim), zero bias) maps the text embedding c to a 64-d
//!   vector, and the logit of each token is `<cls(h)_token, cmapper(c)> / sqrt(64)`.
//!   With `text_dim = 0` the heads are unconditional (`cls` to one channel), as
//!   StyleGAN-T's with `c_dim = 0`. No dual, no predictor.
//!
//! Scores: siamese `[B]` per level (one cosine per sample), stylegan_t `[B, N_i]`
//! per level (one logit per token). Losses, per level the mean over the batch (and
//! the tokens) of the per-score term, summed over levels: discriminator hinge loss
//! (Eq. 9) `sum_i mean ReLU(1 - D_i(x_0)) + mean ReLU(1 + D_i(x_hat_0))` and
//! generator loss (Eq. 8) `-sum_i mean D_i(x_hat_0)`. For stylegan_t the hinge is
//! thus taken per token before averaging, as in StyleGAN-T's loss; StyleGAN-T
//! averages over its levels where Eq. 8/9 sum, so with L levels of equal token
//! count the loss here is L times StyleGAN-T's (the same scale as the siamese
//! variant, so that lambda means the same for both).
//!
//! Parameter stores: [`Discriminator::vs`] holds everything the discriminator
//! optimiser updates (heads phi and predictors eta, plus their BatchNorm /
//! spectral-norm buffers); [`Discriminator::dual_vs`] holds the dual heads phi'
//! (frozen variables, empty for `stylegan_t`).
//!
//! Modes: the heads normalise with [`super::heads::BatchNormLocal`] (statistics of
//! virtual batches of 8, no running statistics), so modes differ only in the
//! spectral-norm state. [`Discriminator::d_loss`] runs the trainable heads in
//! [`Mode::Train`] (one power iteration per weight; real and fake batches go
//! through the heads separately, as in StyleGAN-T), the dual in training mode too
//! (its own power iteration). [`Discriminator::g_loss`] uses [`Mode::Frozen`]: no
//! state change, so a generator step leaves the discriminator as it was (StyleGAN-T
//! also runs a power iteration in its generator pass; here the discriminator state
//! belongs to the discriminator step alone, which makes every generator-side
//! forward of one iteration the same function).
//!
//! EMA (Alg. 1, line 18, after each discriminator step): `phi' <- tau phi' + (1 - tau) phi`
//! for every parameter of the dual. The spectral-norm vectors `u`, `v` are not averaged: they are state of
//! the power method for the dual's own weight matrix, refined by the dual's own
//! power iteration in every discriminator step (averaging two unit vectors would not
//! give a singular-vector estimate of the averaged matrix).

use super::heads::{Head, HeadConfig, Mode};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn::Init;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Which discriminator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscVariant {
    /// The paper's siamese heads with dual and predictor, cosine scores.
    Siamese,
    /// StyleGAN-T's text-conditioned heads with a logit per token.
    StyleganT,
}

/// Discriminator architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscConfig {
    pub variant: DiscVariant,
    /// Width of the heads' convolution blocks; `None`: the width of the features
    /// of each level (StyleGAN-T).
    pub head_channels: Option<i64>,
    /// Output channels of the heads' final 1x1 convolution (StyleGAN-T's
    /// `cmap_dim`, the paper's 64), the width of the predictors.
    pub out_channels: i64,
    /// Kernel size of the residual convolution: 9.
    pub kernel: i64,
    /// Spectral normalisation of every convolution (one power iteration per
    /// training forward).
    pub spectral_norm: bool,
    /// Siamese variant only: end heads and predictors with a linear 1x1 convolution
    /// to `out_channels` (StyleGAN-T's `cls`). Without it the compared
    /// vectors come straight out of a LeakyReLU, are nearly non-negative, and their
    /// cosine can hardly go below 0, so the fake hinge term `ReLU(1 + D)` cannot be
    /// reduced below about 1.
    pub projection: bool,
    /// Samples per normalisation group of BatchNormLocal (StyleGAN-T: 8).
    pub virtual_batch: i64,
    pub bn_eps: f64,
    /// Lower bound on each vector norm in the cosine.
    pub cos_eps: f64,
    /// `stylegan_t` only: width of the text embedding the heads are conditioned on
    /// (0: unconditional heads).
    pub text_dim: i64,
}

impl Default for DiscConfig {
    fn default() -> Self {
        DiscConfig {
            variant: DiscVariant::Siamese,
            head_channels: None,
            out_channels: 64,
            kernel: 9,
            spectral_norm: true,
            projection: true,
            virtual_batch: 8,
            bn_eps: 1e-5,
            cos_eps: 1e-8,
            text_dim: 0,
        }
    }
}

impl DiscConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(c) = self.head_channels.filter(|&c| c <= 0) {
            bail!("discriminator config: head_channels must be positive, got {c}");
        }
        if self.out_channels <= 0 || self.virtual_batch <= 0 || self.text_dim < 0 {
            bail!(
                "discriminator config: out_channels and virtual_batch must be positive and text_dim >= 0, got {}, {} and {}",
                self.out_channels,
                self.virtual_batch,
                self.text_dim
            );
        }
        if self.kernel <= 0 || self.kernel % 2 == 0 {
            bail!(
                "discriminator config: kernel must be odd and positive, got {}",
                self.kernel
            );
        }
        if self.bn_eps.is_nan()
            || self.bn_eps <= 0.0
            || self.cos_eps.is_nan()
            || self.cos_eps <= 0.0
        {
            bail!(
                "discriminator config: bn_eps and cos_eps must be positive, got {} and {}",
                self.bn_eps,
                self.cos_eps
            );
        }
        Ok(())
    }
}

/// Per-sample cosine similarity of `a` and `b` (`[B, ...]`, flattened per sample):
/// `<a, b> / (max(|a|, eps) max(|b|, eps))`, shape `[B]`.
pub fn cosine_score(a: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if a.size() != b.size() || a.dim() < 1 {
        bail!(
            "cosine score: shapes differ or are empty: {:?} vs {:?}",
            a.size(),
            b.size()
        );
    }
    let a = a.flatten(1, -1);
    let b = b.flatten(1, -1).to_kind(a.kind());
    let dot = (&a * &b).sum_dim_intlist([1i64].as_slice(), false, a.kind());
    let na = a
        .square()
        .sum_dim_intlist([1i64].as_slice(), false, a.kind())
        .sqrt()
        .clamp_min(eps);
    let nb = b
        .square()
        .sum_dim_intlist([1i64].as_slice(), false, a.kind())
        .sqrt()
        .clamp_min(eps);
    Ok(dot / (na * nb))
}

fn check_levels(scores: &[Tensor]) -> Result<()> {
    if scores.is_empty() {
        bail!("no discriminator levels");
    }
    Ok(())
}

/// Per-sample scores of each level: `[B]` as given, or the token mean of `[B, N]`.
fn per_sample(scores: &[Tensor]) -> Result<Tensor> {
    check_levels(scores)?;
    let s: Vec<Tensor> = scores
        .iter()
        .map(|t| match t.dim() {
            1 => t.shallow_clone(),
            _ => t
                .flatten(1, -1)
                .mean_dim([1i64].as_slice(), false, t.kind()),
        })
        .collect();
    Ok(Tensor::stack(&s, 0)) // [L, B]
}

/// `sum_i mean(f(score_i))`: each level's term averaged over all its scores (the
/// batch, and the tokens for per-token scores), summed over levels.
fn sum_of_means(scores: &[Tensor], f: impl Fn(&Tensor) -> Tensor) -> Result<Tensor> {
    check_levels(scores)?;
    let mut total: Option<Tensor> = None;
    for s in scores {
        let m = f(s).mean(s.kind());
        total = Some(match total {
            None => m,
            Some(t) => t + m,
        });
    }
    Ok(total.expect("non-empty"))
}

/// Discriminator hinge loss (Eq. 9) from per-level scores (`[B]`, or `[B, N]` with
/// one score per token): `sum_i mean ReLU(1 - real_i) + mean ReLU(1 + fake_i)`, the
/// hinge taken per score before the mean (real and fake batches may differ in
/// size; each term is averaged over its own scores).
pub fn hinge_d_loss(real: &[Tensor], fake: &[Tensor]) -> Result<Tensor> {
    if real.len() != fake.len() {
        bail!(
            "hinge loss: {} real levels vs {} fake levels",
            real.len(),
            fake.len()
        );
    }
    let lr = sum_of_means(real, |r| (r.neg() + 1.0).relu())?;
    let lf = sum_of_means(fake, |f| (f + 1.0).relu())?;
    Ok(lr + lf)
}

/// Generator adversarial loss (Eq. 8): `-sum_i mean fake_i`.
pub fn hinge_g_loss(fake: &[Tensor]) -> Result<Tensor> {
    Ok(-sum_of_means(fake, |f| f.shallow_clone())?)
}

/// Summary of one discriminator loss evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct DStats {
    pub loss: f64,
    /// Mean over the batch of the score summed over levels, real images.
    pub real_score: f64,
    /// The same for the fake images.
    pub fake_score: f64,
    /// Fraction of (real, fake) sample pairs whose level-summed real score exceeds
    /// the fake one.
    pub accuracy: f64,
    /// `(fraction of real scores > 0 + fraction of fake scores < 0) / 2` on the
    /// level-summed scores (the usual accuracy for logits).
    pub sign_accuracy: f64,
    /// Batch-mean score per level, real and fake.
    pub real_per_level: Vec<f64>,
    pub fake_per_level: Vec<f64>,
}

/// Summary of one generator loss evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct GStats {
    pub loss: f64,
    pub fake_score: f64,
    pub fake_per_level: Vec<f64>,
}

fn level_means(scores: &[Tensor]) -> Vec<f64> {
    // The mean over all scores of a level (batch and tokens).
    scores
        .iter()
        .map(|s| {
            s.detach()
                .to_kind(Kind::Double)
                .mean(Kind::Double)
                .double_value(&[])
        })
        .collect()
}

/// Compute [`DStats`] from per-level scores and the loss value.
pub fn d_stats(loss: &Tensor, real: &[Tensor], fake: &[Tensor]) -> Result<DStats> {
    let r = per_sample(real)?
        .detach()
        .to_kind(Kind::Double)
        .sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
    let f = per_sample(fake)?
        .detach()
        .to_kind(Kind::Double)
        .sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
    let pairs = r
        .unsqueeze(1)
        .gt_tensor(&f.unsqueeze(0))
        .to_kind(Kind::Double)
        .mean(Kind::Double);
    let pos = r.gt(0.0).to_kind(Kind::Double).mean(Kind::Double);
    let neg = f.lt(0.0).to_kind(Kind::Double).mean(Kind::Double);
    Ok(DStats {
        loss: loss.detach().double_value(&[]),
        real_score: r.mean(Kind::Double).double_value(&[]),
        fake_score: f.mean(Kind::Double).double_value(&[]),
        accuracy: pairs.double_value(&[]),
        sign_accuracy: 0.5 * (pos.double_value(&[]) + neg.double_value(&[])),
        real_per_level: level_means(real),
        fake_per_level: level_means(fake),
    })
}

/// File names used by [`Discriminator::save`] / [`Discriminator::load_state`].
pub const TRAINABLE_FILE: &str = "discriminator.safetensors";
pub const DUAL_FILE: &str = "discriminator_dual.safetensors";

/// The trainable heads (and, for the siamese variant, predictors and dual heads) of
/// a discriminator over a feature network with the given channels per level.
pub struct Discriminator {
    /// Trainable parameters phi (`heads.{i}.*`) and eta (`predictors.{i}.*`) with
    /// their buffers: give `vs.trainable_variables()` to the discriminator optimiser.
    pub vs: VarStore,
    /// Dual parameters phi' (`heads.{i}.*`), frozen; empty for `stylegan_t`.
    pub dual_vs: VarStore,
    heads: Vec<Head>,
    predictors: Vec<Head>,
    duals: Vec<Head>,
    /// `stylegan_t` with `text_dim > 0`: the text-embedding projections, per level.
    cmappers: Vec<TextMapper>,
    channels: Vec<i64>,
    cfg: DiscConfig,
}

/// StyleGAN-T's `cmapper`: StyleGAN's `FullyConnectedLayer` (linear activation,
/// learning-rate multiplier 1): `y = c W^T / sqrt(in) + b`, W ~ N(0, 1), b = 0.
#[derive(Debug)]
pub struct TextMapper {
    weight: Tensor,
    bias: Tensor,
    in_dim: i64,
}

impl TextMapper {
    pub fn new(p: &tch::nn::Path, in_dim: i64, out_dim: i64) -> TextMapper {
        TextMapper {
            weight: p.var(
                "weight",
                &[out_dim, in_dim],
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            ),
            bias: p.var("bias", &[out_dim], Init::Const(0.0)),
            in_dim,
        }
    }

    /// `[B, in]` -> `[B, out]`.
    pub fn forward(&self, c: &Tensor) -> Result<Tensor> {
        let s = c.size();
        if s.len() != 2 || s[1] != self.in_dim {
            bail!(
                "discriminator text embedding: expected [B, {}], found {s:?}",
                self.in_dim
            );
        }
        let c = c.to_kind(self.weight.kind());
        Ok(c.matmul(&self.weight.tr()) * (1.0 / (self.in_dim as f64).sqrt()) + &self.bias)
    }
}

impl std::fmt::Debug for Discriminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discriminator")
            .field("channels", &self.channels)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Discriminator {
    /// Build heads for feature levels with `channels[i]` channels each, on `device`.
    /// The dual heads start as exact copies of the heads (as BYOL's target network).
    pub fn new(device: Device, channels: &[i64], cfg: &DiscConfig) -> Result<Self> {
        cfg.validate()?;
        if channels.is_empty() {
            bail!("discriminator: the feature network has no levels");
        }
        if let Some(c) = channels.iter().find(|&&c| c <= 0) {
            bail!("discriminator: feature channels must be positive, got {c} in {channels:?}");
        }
        let vs = VarStore::new(device);
        let mut dual_vs = VarStore::new(device);
        let head_cfg = |cin: i64| HeadConfig {
            in_channels: cin,
            channels: cfg.head_channels.unwrap_or(cin),
            kernel: cfg.kernel,
            out_channels: match cfg.variant {
                DiscVariant::StyleganT if cfg.text_dim == 0 => Some(1),
                DiscVariant::StyleganT => Some(cfg.out_channels),
                DiscVariant::Siamese => cfg.projection.then_some(cfg.out_channels),
            },
            spectral_norm: cfg.spectral_norm,
            virtual_batch: cfg.virtual_batch,
            bn_eps: cfg.bn_eps,
        };
        let root = vs.root();
        let mut heads = Vec::new();
        let mut predictors = Vec::new();
        let mut duals = Vec::new();
        let mut cmappers = Vec::new();
        for (i, &c) in channels.iter().enumerate() {
            let head = Head::new(&(&root / "heads" / i), &head_cfg(c))?;
            match cfg.variant {
                DiscVariant::Siamese => {
                    // The predictor: the head's architecture on its output channels.
                    let q = head.output_channels();
                    let pcfg = HeadConfig {
                        channels: cfg.head_channels.unwrap_or(q),
                        ..head_cfg(q)
                    };
                    predictors.push(Head::new(&(&root / "predictors" / i), &pcfg)?);
                    duals.push(Head::new(&(&dual_vs.root() / "heads" / i), &head_cfg(c))?);
                }
                DiscVariant::StyleganT if cfg.text_dim > 0 => {
                    cmappers.push(TextMapper::new(
                        &(&root / "cmappers" / i),
                        cfg.text_dim,
                        cfg.out_channels,
                    ));
                }
                DiscVariant::StyleganT => {}
            }
            heads.push(head);
        }
        dual_vs.freeze();
        let d = Discriminator {
            vs,
            dual_vs,
            heads,
            predictors,
            duals,
            cmappers,
            channels: channels.to_vec(),
            cfg: cfg.clone(),
        };
        // Dual <- copy of the heads, spectral-norm vectors included.
        tch::no_grad(|| d.copy_to_dual(true))?;
        Ok(d)
    }

    pub fn config(&self) -> &DiscConfig {
        &self.cfg
    }

    pub fn channels(&self) -> &[i64] {
        &self.channels
    }

    pub fn levels(&self) -> usize {
        self.channels.len()
    }

    /// The trainable heads h_i, one per level.
    pub fn heads(&self) -> &[Head] {
        &self.heads
    }

    /// The predictors q_i (empty for `stylegan_t`).
    pub fn predictors(&self) -> &[Head] {
        &self.predictors
    }

    /// The dual heads h'_i (empty for `stylegan_t`).
    pub fn duals(&self) -> &[Head] {
        &self.duals
    }

    /// The text-embedding projections (conditional `stylegan_t` only).
    pub fn text_mappers(&self) -> &[TextMapper] {
        &self.cmappers
    }

    /// Whether the scores need a text embedding (conditional `stylegan_t`).
    pub fn needs_text(&self) -> bool {
        !self.cmappers.is_empty()
    }

    fn copy_to_dual(&self, include_sn: bool) -> Result<()> {
        let online = self.vs.variables();
        for (name, d) in self.dual_vs.variables() {
            if !include_sn && is_sn_state(&name) {
                continue;
            }
            let o = online
                .get(&name)
                .with_context(|| format!("dual variable {name} has no counterpart in the heads"))?;
            d.shallow_clone().copy_(o);
        }
        Ok(())
    }

    /// EMA of the dual towards the heads: `phi' <- tau phi' + (1 - tau) phi` for every
    /// dual parameter (not the spectral-norm vectors, see the module documentation).
    /// `tau = 0` copies. No-op for `stylegan_t`.
    pub fn ema_update(&self, tau: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&tau) {
            bail!("EMA decay tau must be in [0, 1], got {tau}");
        }
        let online = self.vs.variables();
        tch::no_grad(|| -> Result<()> {
            for (name, d) in self.dual_vs.variables() {
                if is_sn_state(&name) {
                    continue;
                }
                let o = online.get(&name).with_context(|| {
                    format!("dual variable {name} has no counterpart in the heads")
                })?;
                let new = &d * tau + o * (1.0 - tau);
                d.shallow_clone().copy_(&new);
            }
            Ok(())
        })
    }

    /// Check a feature list: one `[B, C_i, N_i]` per level. Returns B.
    fn check_feats(&self, what: &str, feats: &[Tensor]) -> Result<i64> {
        if feats.len() != self.channels.len() {
            bail!(
                "{what}: {} feature levels, the discriminator has {}",
                feats.len(),
                self.channels.len()
            );
        }
        let mut batch = None;
        for (i, (f, &c)) in feats.iter().zip(&self.channels).enumerate() {
            let s = f.size();
            if s.len() != 3 || s[1] != c {
                bail!("{what}: level {i} features: expected [B, {c}, N], found {s:?}");
            }
            match batch {
                None => batch = Some(s[0]),
                Some(b) if b != s[0] => {
                    bail!("{what}: level {i} has batch {}, level 0 has {b}", s[0])
                }
                _ => {}
            }
        }
        Ok(batch.unwrap_or(0))
    }

    /// The dual's target vectors `h'_i(F_i(x_0))` (no gradient), one per level.
    /// `mode` [`Mode::Train`] also runs the dual's power iteration.
    pub fn reference(&self, feats_ref: &[Tensor], mode: Mode) -> Result<Vec<Tensor>> {
        if self.cfg.variant != DiscVariant::Siamese {
            bail!("reference vectors exist only for the siamese discriminator");
        }
        self.check_feats("reference features", feats_ref)?;
        tch::no_grad(|| {
            self.duals
                .iter()
                .zip(feats_ref)
                .map(|(h, f)| h.forward(f, mode))
                .collect()
        })
    }

    /// Per-level scores of features `feats`. Siamese: `[B]`, the cosine between the
    /// predictor output and `targets` (from [`Self::reference`], same batch size);
    /// `stylegan_t`: `[B, N_i]`, a logit per token, conditioned on the text
    /// embedding `text` `[B, text_dim]` when the heads are conditional (`targets`
    /// ignored, may be `None`).
    pub fn scores(
        &self,
        targets: Option<&[Tensor]>,
        text: Option<&Tensor>,
        feats: &[Tensor],
        mode: Mode,
    ) -> Result<Vec<Tensor>> {
        let b = self.check_feats("features", feats)?;
        let mut out = Vec::with_capacity(feats.len());
        match self.cfg.variant {
            DiscVariant::StyleganT => {
                let cmaps = if self.cmappers.is_empty() {
                    None
                } else {
                    let c = text.context(
                        "the text-conditioned stylegan_t discriminator needs the text embedding",
                    )?;
                    if c.size().first() != Some(&b) {
                        bail!(
                            "text embedding {:?} does not match the batch of {b} images",
                            c.size()
                        );
                    }
                    Some(
                        self.cmappers
                            .iter()
                            .map(|m| m.forward(c))
                            .collect::<Result<Vec<_>>>()?,
                    )
                };
                for (i, (h, f)) in self.heads.iter().zip(feats).enumerate() {
                    let o = h.forward(f, mode)?; // [B, 1 or cmap, N]
                    let logits = match &cmaps {
                        None => o.squeeze_dim(1),
                        Some(cm) => {
                            let cmap = cm[i].unsqueeze(-1); // [B, cmap, 1]
                            (o * cmap).sum_dim_intlist([1i64].as_slice(), false, None::<Kind>)
                                * (1.0 / (self.cfg.out_channels as f64).sqrt())
                        }
                    };
                    out.push(logits); // [B, N]
                }
            }
            DiscVariant::Siamese => {
                let targets =
                    targets.context("siamese discriminator scores need the reference vectors")?;
                if targets.len() != feats.len() {
                    bail!(
                        "{} reference levels for {} feature levels",
                        targets.len(),
                        feats.len()
                    );
                }
                for (i, ((h, q), f)) in self
                    .heads
                    .iter()
                    .zip(&self.predictors)
                    .zip(feats)
                    .enumerate()
                {
                    let z = q.forward(&h.forward(f, mode)?, mode)?;
                    let t = &targets[i];
                    if t.size() != z.size() {
                        bail!(
                            "level {i}: predictor output {:?} and reference vector {:?} differ (batch {b}; the reference images must match the inputs in number and resolution)",
                            z.size(),
                            t.size()
                        );
                    }
                    out.push(cosine_score(&z, t, self.cfg.cos_eps)?);
                }
            }
        }
        Ok(out)
    }

    fn targets(&self, feats_real_ref: &[Tensor], mode: Mode) -> Result<Option<Vec<Tensor>>> {
        match self.cfg.variant {
            DiscVariant::Siamese => Ok(Some(self.reference(feats_real_ref, mode)?)),
            DiscVariant::StyleganT => Ok(None),
        }
    }

    /// Discriminator loss (Eq. 9) for one step, with the heads in training mode.
    ///
    /// `feats_real_ref`: features of the reference view of the real images x_0 (unused
    /// by `stylegan_t`); `text`: the text embedding of the captions (used by the
    /// conditional `stylegan_t` heads only); `feats_real`: features of an independently augmented view of
    /// the same x_0; `feats_fake`: features of the generated x_hat_0 (pass them
    /// detached, or computed without gradient, unless gradients into the generator
    /// are wanted). Only the variables of [`Self::vs`] receive gradients from the
    /// heads; the dual is never differentiated.
    pub fn d_loss(
        &self,
        feats_real_ref: &[Tensor],
        text: Option<&Tensor>,
        feats_real: &[Tensor],
        feats_fake: &[Tensor],
    ) -> Result<(Tensor, DStats)> {
        let targets = self.targets(feats_real_ref, Mode::Train)?;
        let real = self
            .scores(targets.as_deref(), text, feats_real, Mode::Train)
            .context("real images")?;
        let fake = self
            .scores(targets.as_deref(), text, feats_fake, Mode::Train)
            .context("generated images")?;
        let loss = hinge_d_loss(&real, &fake)?;
        let stats = d_stats(&loss, &real, &fake)?;
        Ok((loss, stats))
    }

    /// Generator adversarial loss (Eq. 8) `-sum_i D_i(x_hat_0)`, batch mean, with the
    /// heads frozen (batch statistics, no state change). Differentiable with respect
    /// to `feats_fake`.
    pub fn g_loss(
        &self,
        feats_real_ref: &[Tensor],
        text: Option<&Tensor>,
        feats_fake: &[Tensor],
    ) -> Result<(Tensor, GStats)> {
        let targets = self.targets(feats_real_ref, Mode::Frozen)?;
        let fake = self
            .scores(targets.as_deref(), text, feats_fake, Mode::Frozen)
            .context("generated images")?;
        let loss = hinge_g_loss(&fake)?;
        let per_level = level_means(&fake);
        let stats = GStats {
            loss: loss.detach().double_value(&[]),
            fake_score: per_level.iter().sum(),
            fake_per_level: per_level,
        };
        Ok((loss, stats))
    }

    /// Save the trainable and the dual variables to `dir` ([`TRAINABLE_FILE`],
    /// [`DUAL_FILE`]) in float32.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::weights::save_varstore(&self.vs, &dir.join(TRAINABLE_FILE), Some(Kind::Float))?;
        if self.cfg.variant == DiscVariant::Siamese {
            crate::weights::save_varstore(&self.dual_vs, &dir.join(DUAL_FILE), Some(Kind::Float))?;
        }
        Ok(())
    }

    /// Load variables saved by [`Self::save`] into this discriminator (built with the
    /// same channels and config; any missing, unexpected or mis-shaped tensor is an
    /// error naming it).
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let opts = crate::weights::LoadOptions::default();
        crate::weights::load_into(&mut self.vs, &[dir.join(TRAINABLE_FILE)], &opts)?;
        if self.cfg.variant == DiscVariant::Siamese {
            crate::weights::load_into(&mut self.dual_vs, &[dir.join(DUAL_FILE)], &opts)?;
        }
        Ok(())
    }
}

fn is_sn_state(name: &str) -> bool {
    name.ends_with(".weight_u") || name.ends_with(".weight_v")
}
