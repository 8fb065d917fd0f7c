//! The model-level denoiser interface: a network that predicts noise (epsilon, v or
//! velocity) from latents, timesteps and a text conditioning, the adapters of the
//! backbones (the SD1.x/SDXL UNet here, SD3's transformer in `mmdit`), and the
//! classifier-free guided output that samplers and the trainer share.

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::models::unet::UNet2DConditionModel;
use crate::schedule::cfg_combine;

/// Conditioning handed to the denoiser.
pub struct Cond {
    /// Token states [B, L, D] (cross-attention context).
    pub context: Tensor,
    /// Pooled text embedding [B, P] (SDXL `text_embeds`, SD3 `pooled_projections`).
    pub pooled: Option<Tensor>,
    /// SDXL micro-conditioning [B, 6].
    pub time_ids: Option<Tensor>,
}

impl Cond {
    pub fn new(context: Tensor) -> Cond {
        Cond {
            context,
            pooled: None,
            time_ids: None,
        }
    }

    /// Concatenate along the batch (for batched unconditional + conditional CFG).
    pub fn cat(a: &Cond, b: &Cond) -> Cond {
        let cat2 = |x: &Option<Tensor>, y: &Option<Tensor>| match (x, y) {
            (Some(x), Some(y)) => Some(Tensor::cat(&[x, y], 0)),
            _ => None,
        };
        Cond {
            context: Tensor::cat(&[&a.context, &b.context], 0),
            pooled: cat2(&a.pooled, &b.pooled),
            time_ids: cat2(&a.time_ids, &b.time_ids),
        }
    }

    pub fn detach(&self) -> Cond {
        Cond {
            context: self.context.detach(),
            pooled: self.pooled.as_ref().map(|t| t.detach()),
            time_ids: self.time_ids.as_ref().map(|t| t.detach()),
        }
    }

    /// The conditioning on `device` (a no-op where it already is).
    pub fn to_device(&self, device: tch::Device) -> Cond {
        Cond {
            context: self.context.to_device(device),
            pooled: self.pooled.as_ref().map(|t| t.to_device(device)),
            time_ids: self.time_ids.as_ref().map(|t| t.to_device(device)),
        }
    }

    pub fn to_kind(&self, kind: Kind) -> Cond {
        Cond {
            context: self.context.to_kind(kind),
            pooled: self.pooled.as_ref().map(|t| t.to_kind(kind)),
            time_ids: self.time_ids.as_ref().map(|t| t.to_kind(kind)),
        }
    }
}

/// A noise-prediction network: raw output (epsilon, v or velocity) for latents x
/// [B, C, h, w] at timesteps t [B] (float) under a conditioning.
pub trait Denoiser {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Cond) -> Result<Tensor>;
}

impl<F: Fn(&Tensor, &Tensor, &Cond) -> Result<Tensor>> Denoiser for F {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Cond) -> Result<Tensor> {
        self(x, t, cond)
    }
}

/// Unconditional and conditional embeddings, and the guidance scale.
pub struct Guidance<'a> {
    pub uncond: &'a Cond,
    pub cond: &'a Cond,
    /// Pre-concatenated [uncond; cond] for batched CFG.
    pub both: Option<Cond>,
    pub scale: f64,
}

impl<'a> Guidance<'a> {
    pub fn new(uncond: &'a Cond, cond: &'a Cond, scale: f64) -> Guidance<'a> {
        let both = if scale != 1.0 {
            Some(Cond::cat(uncond, cond))
        } else {
            None
        };
        Guidance {
            uncond,
            cond,
            both,
            scale,
        }
    }
}

/// Guided output at timestep value `t` and the conditional branch alone.
pub fn guided_output(
    model: &dyn Denoiser,
    x: &Tensor,
    t: f64,
    g: &Guidance,
) -> Result<(Tensor, Tensor)> {
    let b = x.size()[0];
    match &g.both {
        None => {
            let tt = Tensor::full([b], t, (Kind::Float, x.device()));
            let out = model.predict(x, &tt, g.cond)?;
            Ok((out.shallow_clone(), out))
        }
        Some(both) => {
            let tt = Tensor::full([2 * b], t, (Kind::Float, x.device()));
            let out = model.predict(&Tensor::cat(&[x, x], 0), &tt, both)?;
            let parts = out.split(b, 0);
            let (u, c) = (&parts[0], &parts[1]);
            Ok((cfg_combine(u, c, g.scale), c.shallow_clone()))
        }
    }
}

/// The UNet as a [`Denoiser`].
pub struct UNetDenoiser<'a>(pub &'a UNet2DConditionModel);

impl Denoiser for UNetDenoiser<'_> {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Cond) -> Result<Tensor> {
        let added = match (&cond.pooled, &cond.time_ids) {
            (Some(p), Some(ids)) => Some((p, ids)),
            _ => None,
        };
        self.0.forward(x, t, &cond.context, added)
    }
}
