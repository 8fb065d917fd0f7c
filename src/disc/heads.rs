//! Convolutional discriminator heads on token sequences `[B, C, N]`, as StyleGAN-T's
//! `DiscHead` (Sauer et al. 2023, `networks/discriminator.py`): spectral-normalised
//! 1-D convolutions, `BatchNormLocal` (batch normalisation over virtual batches) and
//! LeakyReLU(0.2).
//!
//! A [`Head`] is
//!
//! ```text
//! x [B, C_in, N]
//!   -> block(1x1 conv C_in -> C, BatchNormLocal, LeakyReLU 0.2)               "main.0"
//!   -> (block(kernel-k conv C -> C, circular padding, BNL, LReLU)(y) + y) / sqrt(2)   "main.1"
//!   -> optional 1x1 conv C -> C_out without normalisation or activation  "out"
//! ```
//!
//! StyleGAN-T runs the blocks at the width of the features (C = C_in, 384 for
//! DINOv2 ViT-S) and ends with a 1x1 convolution to its 64-channel conditioning
//! space (`cls`); [`HeadConfig`] allows another width. The kernel-k convolution pads
//! circularly, as StyleGAN-T does, so the token count is preserved. The residual sum
//! is scaled by 1/sqrt(2), also as in StyleGAN-T.
//!
//! [`BatchNormLocal`] normalises each channel over groups of `virtual_batch`
//! consecutive samples and all tokens (biased variance, no running statistics: it
//! behaves the same in training and evaluation, as StyleGAN-T's does).
//!
//! Spectral normalisation (Miyato et al. 2018) divides the weight, viewed as a matrix
//! `[out, in * k]`, by an estimate of its largest singular value
//! `sigma = u^T W v`. The vectors `u` and `v` are buffers (`weight_u`, `weight_v`,
//! saved with the weights, the parameter itself is `weight_orig`, PyTorch's naming).
//! A forward in [`Mode::Train`] first runs one power iteration (without gradient)
//! and stores the new vectors; other modes use the stored vectors. The gradient
//! flows through `W` in `sigma`, as in PyTorch.

use anyhow::{bail, Result};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// How a forward treats the spectral-norm state ([`BatchNormLocal`] has none: it
/// always normalises with the statistics of the batch it is given).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Discriminator step: one power iteration per spectral-normalised weight.
    Train,
    /// No state changes at all (used for the generator step).
    Frozen,
    /// Stored spectral vectors, no state changes (evaluation; the same as
    /// `Frozen`).
    Eval,
}

/// Negative slope of the LeakyReLU activations.
pub const LEAKY_SLOPE: f64 = 0.2;
/// Iterations of the power method run once when a spectral-normalised weight is
/// created, so that `sigma` is accurate from the first step.
pub const SN_INIT_ITERS: usize = 15;
const SN_EPS: f64 = 1e-12;

fn path_name(p: &nn::Path) -> String {
    p.components().collect::<Vec<_>>().join(".")
}

/// LeakyReLU with slope [`LEAKY_SLOPE`] (gradient 0.2 at 0, as PyTorch). One fused
/// kernel: PReLU with a constant slope (tch's `leaky_relu` has no slope argument).
pub fn leaky_relu(x: &Tensor) -> Tensor {
    let slope = Tensor::from_slice(&[LEAKY_SLOPE])
        .to_kind(x.kind())
        .to_device(x.device());
    x.prelu(&slope)
}

fn normalize(v: &Tensor) -> Tensor {
    v / v.square().sum(Kind::Float).sqrt().clamp_min(SN_EPS)
}

/// A 1-D convolution, optionally spectral-normalised.
#[derive(Debug)]
pub struct Conv1d {
    weight: Tensor,
    bias: Tensor,
    u: Option<Tensor>,
    v: Option<Tensor>,
    kernel: i64,
    in_channels: i64,
    out_channels: i64,
}

impl Conv1d {
    /// Variables: `weight` (or `weight_orig`, `weight_u`, `weight_v` when
    /// `spectral`) of shape `[out, in, kernel]` and `bias` `[out]`. Initialised as
    /// PyTorch's `Conv1d` (Kaiming-uniform with a = sqrt(5), i.e. bound
    /// 1/sqrt(fan_in), for both weight and bias).
    pub fn new(
        p: &nn::Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        spectral: bool,
    ) -> Result<Self> {
        if in_channels <= 0 || out_channels <= 0 {
            bail!(
                "{}: conv channels must be positive, got in {in_channels}, out {out_channels}",
                path_name(p)
            );
        }
        if kernel <= 0 || kernel % 2 == 0 {
            bail!("{}: conv kernel size must be odd and positive (to keep the token count), got {kernel}", path_name(p));
        }
        let fan_in = (in_channels * kernel) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let dims = [out_channels, in_channels, kernel];
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let (weight, u, v) = if spectral {
            let weight = p.var("weight_orig", &dims, init);
            let mut u = p.zeros_no_train("weight_u", &[out_channels]);
            let mut v = p.zeros_no_train("weight_v", &[in_channels * kernel]);
            tch::no_grad(|| {
                u.copy_(&normalize(&Tensor::randn(
                    [out_channels],
                    (Kind::Float, weight.device()),
                )));
                v.copy_(&normalize(&Tensor::randn(
                    [in_channels * kernel],
                    (Kind::Float, weight.device()),
                )));
            });
            let conv = Conv1d {
                weight,
                bias: Tensor::new(),
                u: Some(u),
                v: Some(v),
                kernel,
                in_channels,
                out_channels,
            };
            for _ in 0..SN_INIT_ITERS {
                conv.power_iteration();
            }
            (conv.weight, conv.u, conv.v)
        } else {
            (p.var("weight", &dims, init), None, None)
        };
        let bias = p.var(
            "bias",
            &[out_channels],
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        Ok(Conv1d {
            weight,
            bias,
            u,
            v,
            kernel,
            in_channels,
            out_channels,
        })
    }

    /// The raw weight (`weight_orig` when spectral-normalised), `[out, in, kernel]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The spectral-norm vectors `(u, v)`, if any.
    pub fn sn_vectors(&self) -> Option<(&Tensor, &Tensor)> {
        self.u.as_ref().zip(self.v.as_ref())
    }

    pub fn is_spectral(&self) -> bool {
        self.u.is_some()
    }

    pub fn in_channels(&self) -> i64 {
        self.in_channels
    }

    pub fn out_channels(&self) -> i64 {
        self.out_channels
    }

    /// One step of the power method on the stored vectors (no gradient).
    fn power_iteration(&self) {
        if let (Some(u), Some(v)) = (&self.u, &self.v) {
            tch::no_grad(|| {
                let w = self
                    .weight
                    .reshape([self.out_channels, -1])
                    .to_kind(u.kind());
                let new_v = normalize(&w.transpose(0, 1).mv(u));
                let new_u = normalize(&w.mv(&new_v));
                v.shallow_clone().copy_(&new_v);
                u.shallow_clone().copy_(&new_u);
            });
        }
    }

    /// The spectral-norm estimate `u^T W v` with the stored vectors (differentiable
    /// with respect to `W`), or `None` for a plain convolution.
    pub fn sigma(&self) -> Option<Tensor> {
        match (&self.u, &self.v) {
            (Some(u), Some(v)) => {
                let w = self.weight.reshape([self.out_channels, -1]);
                // Copies: a later training forward updates the buffers in place, which
                // must not touch the values saved for this graph's backward.
                let u = u.to_kind(w.kind()).copy();
                let v = v.to_kind(w.kind()).copy();
                Some(u.dot(&w.mv(&v)))
            }
            _ => None,
        }
    }

    /// The effective weight `W / sigma` (or `W`) after the power iteration `mode`
    /// asks for.
    pub fn effective_weight(&self, mode: Mode) -> Tensor {
        if mode == Mode::Train {
            self.power_iteration();
        }
        match self.sigma() {
            Some(s) => &self.weight / s,
            None => self.weight.shallow_clone(),
        }
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Tensor {
        let w = self.effective_weight(mode);
        let pad = self.kernel / 2;
        let x = if pad > 0 {
            x.pad([pad, pad], "circular", None)
        } else {
            x.shallow_clone()
        };
        x.conv1d(&w, Some(&self.bias), [1], [0], [1], 1)
    }
}

/// StyleGAN-T's `BatchNormLocal` on `[B, C, N]`: the batch is split into
/// `G = ceil(B / virtual_batch)` groups of consecutive samples (`Tensor::chunk`, so
/// the groups are `B / G` samples when G divides B, as StyleGAN-T's `view`), and
/// each channel is normalised with the mean and biased variance over its group's
/// samples and tokens, then scaled and shifted by `weight` and `bias`. No running
/// statistics.
#[derive(Debug)]
pub struct BatchNormLocal {
    weight: Tensor,
    bias: Tensor,
    virtual_batch: i64,
    eps: f64,
}

impl BatchNormLocal {
    pub fn new(p: &nn::Path, channels: i64, virtual_batch: i64, eps: f64) -> Result<Self> {
        if virtual_batch <= 0 {
            bail!(
                "{}: virtual batch size must be positive, got {virtual_batch}",
                path_name(p)
            );
        }
        Ok(BatchNormLocal {
            weight: p.var("weight", &[channels], Init::Const(1.0)),
            bias: p.var("bias", &[channels], Init::Const(0.0)),
            virtual_batch,
            eps,
        })
    }

    pub fn virtual_batch(&self) -> i64 {
        self.virtual_batch
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let b = x.size()[0];
        let groups = (b + self.virtual_batch - 1) / self.virtual_batch;
        // Each group is a plain training-mode batch norm over (samples, tokens)
        // without running statistics: one fused kernel forward and backward.
        let norm = |g: &Tensor| {
            Tensor::batch_norm(
                g,
                Some(&self.weight),
                Some(&self.bias),
                None::<&Tensor>,
                None::<&Tensor>,
                true,
                0.0,
                self.eps,
                false,
            )
        };
        if groups <= 1 {
            return norm(x);
        }
        let normed: Vec<Tensor> = x.chunk(groups, 0).iter().map(norm).collect();
        Tensor::cat(&normed, 0)
    }
}

/// Convolution, [`BatchNormLocal`] and LeakyReLU(0.2).
#[derive(Debug)]
pub struct ConvBlock {
    pub conv: Conv1d,
    pub norm: BatchNormLocal,
}

impl ConvBlock {
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Tensor {
        leaky_relu(&self.norm.forward(&self.conv.forward(x, mode)))
    }
}

/// Architecture of one [`Head`].
#[derive(Clone, Debug, PartialEq)]
pub struct HeadConfig {
    /// Channels of the input token sequence.
    pub in_channels: i64,
    /// Width of the two convolution blocks (StyleGAN-T: the input width).
    pub channels: i64,
    /// Kernel size of the residual block's convolution (9 in StyleGAN-T).
    pub kernel: i64,
    /// Channels of the final linear 1x1 convolution; `None` ends with the residual block.
    pub out_channels: Option<i64>,
    /// Spectral normalisation of every convolution.
    pub spectral_norm: bool,
    /// Samples per normalisation group of [`BatchNormLocal`] (8 in StyleGAN-T).
    pub virtual_batch: i64,
    pub bn_eps: f64,
}

/// A discriminator head (see the module documentation).
#[derive(Debug)]
pub struct Head {
    pub blocks: [ConvBlock; 2],
    pub out: Option<Conv1d>,
    cfg: HeadConfig,
}

impl Head {
    /// Variables under `p`: `main.0.conv.*`, `main.0.norm.*`, `main.1.conv.*`,
    /// `main.1.norm.*` and, with `out_channels`, `out.*`.
    pub fn new(p: &nn::Path, cfg: &HeadConfig) -> Result<Self> {
        if cfg.channels <= 0 {
            bail!(
                "{}: head width must be positive, got {}",
                path_name(p),
                cfg.channels
            );
        }
        if let Some(c) = cfg.out_channels {
            if c <= 0 {
                bail!(
                    "{}: head output channels must be positive, got {c}",
                    path_name(p)
                );
            }
        }
        let block = |q: nn::Path, cin: i64, k: i64| -> Result<ConvBlock> {
            Ok(ConvBlock {
                conv: Conv1d::new(&(&q / "conv"), cin, cfg.channels, k, cfg.spectral_norm)?,
                norm: BatchNormLocal::new(
                    &(&q / "norm"),
                    cfg.channels,
                    cfg.virtual_batch,
                    cfg.bn_eps,
                )?,
            })
        };
        let main = p / "main";
        let b0 = block(&main / "0", cfg.in_channels, 1)?;
        let b1 = block(&main / "1", cfg.channels, cfg.kernel)?;
        let out = match cfg.out_channels {
            Some(c) => Some(Conv1d::new(
                &(p / "out"),
                cfg.channels,
                c,
                1,
                cfg.spectral_norm,
            )?),
            None => None,
        };
        Ok(Head {
            blocks: [b0, b1],
            out,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }

    /// Output channels: `out_channels` or the block width.
    pub fn output_channels(&self) -> i64 {
        self.cfg.out_channels.unwrap_or(self.cfg.channels)
    }

    /// `[B, C_in, N]` -> `[B, C_out, N]`. Inputs of another float kind are converted
    /// to the head's kind (differentiably).
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let size = x.size();
        if size.len() != 3 || size[1] != self.cfg.in_channels {
            bail!(
                "head input: expected [B, {}, N], found {:?}",
                self.cfg.in_channels,
                size
            );
        }
        if size[0] * size[2] < 2 && mode != Mode::Eval {
            bail!("head input {size:?}: batch statistics need at least two values per channel (B * N >= 2)");
        }
        let kernel = self.blocks.iter().map(|b| b.conv.kernel).max().unwrap_or(1);
        let pad = kernel / 2;
        if size[2] < pad.max(1) {
            bail!(
                "head input {size:?}: {} feature tokens, fewer than the circular padding ({pad}) of the \
                 kernel-{kernel} convolution; the feature map is too small (raise disc.resolution)",
                size[2]
            );
        }
        let x = x.to_kind(self.blocks[0].conv.weight.kind());
        let h = self.blocks[0].forward(&x, mode);
        let h = (self.blocks[1].forward(&h, mode) + &h) * std::f64::consts::FRAC_1_SQRT_2;
        Ok(match &self.out {
            Some(out) => out.forward(&h, mode),
            None => h,
        })
    }
}
