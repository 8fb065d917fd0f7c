//! The memory account of the training state (`adt bench --account`): what a training
//! configuration holds on the device, computed from the parameter counts of the real
//! models (built here, on the CPU, in half precision to count them), not measured.
//!
//! Each column is the configuration meant to meet one of the targets, as `adt train`
//! runs it with those options:
//!
//! * SD1.5 full fine-tuning: float32 master weights and gradients, AdamW moments in
//!   float32 (8 bytes per parameter) or 8-bit (`train.optimizer_state = "8bit"`), a
//!   bfloat16 trajectory copy of the UNet (`train.bf16_trajectory`), the frozen
//!   networks (VAE, text encoder, DINOv2 features) in float32.
//! * LoRA (rank 16 on the default targets): the base frozen in bfloat16
//!   (`train.base_dtype = "bf16"`), which is also the trajectory model (no copy); the
//!   float32 adapters with their gradients and moments; the frozen networks in
//!   bfloat16 (`model.frozen_dtype = "bf16"`). SD3-medium also keeps its three text
//!   encoders on the host (`model.text_device = "cpu"`): nothing of them on the device,
//!   their size is reported as host memory.
//!
//! Activations cannot be counted without running the model. For SD1.5 at 512 px the
//! account uses the one measured figure: the H200 peak of the float32 G+D iteration at
//! K = 3 with the per-step decomposition (19.5 GiB, `assets/bench-h200/memory.json`)
//! less the state this account computes for that run (no trajectory copy: 13.7 GiB),
//! about 5.8 GiB of activations and workspace, a float32 figure that the LoRA column
//! reuses as it is (its recomputation runs in bfloat16 there). For SDXL and SD3-medium
//! at 1024 px no such measurement exists: their activations are left out (to be
//! measured on a GPU).

use anyhow::Result;
use std::fmt;
use tch::{Device, Kind};

use crate::models::clip::ClipTextConfig;
use crate::models::dinov2::Dinov2Config;
use crate::models::lora::{default_targets, LoraSpec};
use crate::models::mmdit::{LoadedSd3Transformer, Sd3Config};
use crate::models::unet::{LoadedUNet, UNetConfig};
use crate::train::config::{TextDevice, WeightDtype};
use crate::train::optim::MomentStorage;

const GIB: f64 = (1u64 << 30) as f64;

/// Published parameter counts of the frozen text encoders too large to build here:
/// SDXL / SD3 `text_encoder_2` (OpenCLIP ViT-bigG/14 text tower with projection) and
/// SD3's `text_encoder_3` (T5-XXL encoder).
pub const CLIP_G_PARAMS: i64 = 694_659_840;
pub const T5_XXL_PARAMS: i64 = 4_762_310_656;
/// Parameters of the discriminator heads on DINOv2 ViT-S/14 (`adt bench --config sd15`).
pub const HEAD_PARAMS: i64 = 456_448;
/// Activation bytes of the SD1.5 G+D iteration at 512 px (see the module notes).
pub const SD15_ACTIVATION_BYTES: f64 = 5.8 * GIB;

/// One of the targets: a model, full or LoRA fine-tuning, a resolution, the memory
/// aimed for, and the training options meant to meet it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryTarget {
    pub name: &'static str,
    pub model: TargetModel,
    pub lora: bool,
    /// Storage of the AdamW moments (`train.optimizer_state`).
    pub moments: MomentStorage,
    /// Dtype of the frozen LoRA base (`train.base_dtype`; LoRA only).
    pub base: WeightDtype,
    /// Dtype of the VAE, text encoders and feature network (`model.frozen_dtype`).
    pub frozen: WeightDtype,
    /// Where the text encoders live (`model.text_device`).
    pub text: TextDevice,
    /// A bfloat16 copy of the backbone runs the trajectory (`train.bf16_trajectory`;
    /// a bfloat16 LoRA base runs it itself).
    pub trajectory_copy: bool,
    /// `train.gradient_checkpointing`: the activations are at most those measured
    /// without it (an upper bound; not measured with it on a GPU).
    pub checkpointing: bool,
    pub resolution: i64,
    pub target_gib: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetModel {
    Sd15,
    Sdxl,
    Sd3Medium,
}

const FULL_SD15: MemoryTarget = MemoryTarget {
    name: "SD1.5 full, 512 px",
    model: TargetModel::Sd15,
    lora: false,
    moments: MomentStorage::Fp32,
    base: WeightDtype::Fp32,
    frozen: WeightDtype::Fp32,
    text: TextDevice::Train,
    trajectory_copy: true,
    checkpointing: false,
    resolution: 512,
    target_gib: 12.0,
};

const LORA_SD15: MemoryTarget = MemoryTarget {
    name: "SD1.5 LoRA r16, 512 px",
    lora: true,
    base: WeightDtype::Bf16,
    frozen: WeightDtype::Bf16,
    checkpointing: true,
    target_gib: 8.0,
    ..FULL_SD15
};

/// The four targets (batch 1, CFG, K = 3): SD1.5 full at most 12 GiB (with the
/// defaults, and with 8-bit AdamW moments, bf16 frozen networks, no trajectory copy
/// and gradient checkpointing), SD1.5 LoRA 8, SDXL LoRA 20, SD3-medium LoRA 24.
pub const TARGETS: [MemoryTarget; 5] = [
    FULL_SD15,
    MemoryTarget {
        name: "SD1.5 full, low memory",
        moments: MomentStorage::Int8Blockwise,
        frozen: WeightDtype::Bf16,
        trajectory_copy: false,
        checkpointing: true,
        ..FULL_SD15
    },
    LORA_SD15,
    MemoryTarget {
        name: "SDXL LoRA r16, 1024 px",
        model: TargetModel::Sdxl,
        resolution: 1024,
        target_gib: 20.0,
        ..LORA_SD15
    },
    MemoryTarget {
        name: "SD3-medium LoRA r16, 1024 px",
        model: TargetModel::Sd3Medium,
        text: TextDevice::Cpu,
        resolution: 1024,
        target_gib: 24.0,
        ..LORA_SD15
    },
];

/// Parameter counts of one model family.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ModelSizes {
    /// Backbone (UNet / MMDiT) parameters, without adapters.
    pub backbone: i64,
    /// Parameters of rank-16 adapters on the default targets.
    pub lora_r16: i64,
    pub vae: i64,
    /// All text encoders.
    pub text: i64,
    /// Of which T5 (SD3; `model.use_t5 = false` leaves it out).
    pub t5: i64,
    pub features: i64,
    pub heads: i64,
    /// VAE downscale factor.
    pub vae_scale: i64,
}

/// The account of one configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountRow {
    pub target: MemoryTarget,
    pub sizes: ModelSizes,
    /// The training state on the device: (what, bytes).
    pub lines: Vec<(String, f64)>,
    /// Activations and workspace, where measured (SD1.5 at 512 px only).
    pub activations: Option<f64>,
    /// Host memory the configuration holds instead (text encoders on the host), bytes.
    pub host: f64,
}

impl AccountRow {
    /// The training state without activations, GiB.
    pub fn state_gib(&self) -> f64 {
        self.lines.iter().map(|(_, b)| b).sum::<f64>() / GIB
    }

    /// State plus activations, GiB (None where the activations are unknown).
    pub fn total_gib(&self) -> Option<f64> {
        self.activations.map(|a| self.state_gib() + a / GIB)
    }

    /// Bytes of the line `name`, if the configuration has it.
    pub fn line(&self, name: &str) -> Option<f64> {
        self.lines.iter().find(|(k, _)| k == name).map(|(_, b)| *b)
    }
}

fn bytes_of(d: WeightDtype) -> f64 {
    match d {
        WeightDtype::Fp32 => 4.0,
        WeightDtype::Bf16 | WeightDtype::Fp16 => 2.0,
    }
}

/// The account of `target` for models of `sizes`.
pub fn account(target: MemoryTarget, sizes: ModelSizes) -> AccountRow {
    let p = sizes.backbone as f64;
    let trainable = if target.lora {
        sizes.lora_r16 as f64
    } else {
        p
    };
    let activations = (target.model == TargetModel::Sd15 && target.resolution == 512)
        .then_some(SD15_ACTIVATION_BYTES);
    let mut lines = vec![
        ("trainable weights (fp32)".to_string(), 4.0 * trainable),
        ("gradients (fp32)".to_string(), 4.0 * trainable),
        (
            "AdamW moments".to_string(),
            match target.moments {
                MomentStorage::Fp32 => 8.0,
                MomentStorage::Bf16 => 4.0,
                // One byte per moment value plus a float32 scale per block of 2048.
                MomentStorage::Int8Blockwise => 2.0 * (1.0 + 4.0 / 2048.0),
            } * trainable,
        ),
    ];
    let base_bf16 = target.lora && target.base != WeightDtype::Fp32;
    if target.lora {
        lines.push((
            format!("frozen base weights ({})", target.base.name()),
            bytes_of(target.base) * p,
        ));
    }
    if !base_bf16 && target.trajectory_copy {
        // A bfloat16 base is its own trajectory model; otherwise a bf16 copy of the
        // backbone (with the adapters) runs the trajectory.
        lines.push((
            "bf16 trajectory copy".to_string(),
            2.0 * (p + if target.lora { trainable } else { 0.0 }),
        ));
    }
    let fb = bytes_of(target.frozen);
    let f = target.frozen.name();
    let text = fb * sizes.text as f64;
    lines.push((format!("VAE ({f})"), fb * sizes.vae as f64));
    let host = match target.text {
        TextDevice::Train => {
            lines.push((format!("text encoders ({f})"), text));
            0.0
        }
        TextDevice::Cpu => {
            lines.push((format!("text encoders ({f}, on the host)"), 0.0));
            text
        }
    };
    lines.extend([
        (format!("DINOv2 features ({f})"), fb * sizes.features as f64),
        (
            "discriminator heads + AdamW".to_string(),
            16.0 * sizes.heads as f64,
        ),
    ]);
    AccountRow {
        target,
        sizes,
        lines,
        activations,
        host,
    }
}

fn count(vs: &tch::nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

fn lora_params(slots: &crate::models::lora::LoraSlots, root: &tch::nn::Path) -> Result<i64> {
    let spec = LoraSpec {
        rank: 16,
        alpha: 16.0,
        dropout: 0.0,
        targets: default_targets(),
    };
    slots.attach_new(root, &spec)?;
    Ok(slots
        .adapters()
        .iter()
        .map(|(_, a, b)| (a.numel() + b.numel()) as i64)
        .sum())
}

/// Build the real-size models of `model` on the CPU (in half precision, one at a time)
/// and count their parameters. SDXL's UNet takes about 5 GB of memory for this.
pub fn model_sizes(model: TargetModel) -> Result<ModelSizes> {
    let dev = Device::Cpu;
    let half_vs = || {
        let mut vs = tch::nn::VarStore::new(dev);
        vs.set_kind(Kind::Half);
        vs
    };
    let count_vae = |c: crate::models::vae::VaeConfig| -> Result<i64> {
        let vs = half_vs();
        let _m = crate::models::vae::AutoencoderKL::new(&vs.root(), &c)?;
        Ok(count(&vs))
    };
    let dino = {
        let vs = half_vs();
        let _m = crate::models::dinov2::Dinov2Model::new(&vs.root(), &Dinov2Config::vit_s14())?;
        count(&vs)
    };
    let clip_l = {
        let vs = half_vs();
        let _m =
            crate::models::clip::ClipTextModel::new(&vs.root(), &ClipTextConfig::sd15(), false)?;
        count(&vs)
    };
    let (backbone, lora_r16, vae, text, t5) = match model {
        TargetModel::Sd15 | TargetModel::Sdxl => {
            let cfg = if model == TargetModel::Sd15 {
                UNetConfig::sd15()
            } else {
                UNetConfig::sdxl()
            };
            let u = LoadedUNet::from_config(&cfg, dev, Kind::Half)?;
            let n = count(&u.vs);
            let l = lora_params(&u.model.lora, &u.vs.root())?;
            let text = if model == TargetModel::Sd15 {
                clip_l
            } else {
                clip_l + CLIP_G_PARAMS
            };
            (n, l, count_vae(super::models::sd15_vae_config()?)?, text, 0)
        }
        TargetModel::Sd3Medium => {
            let t = LoadedSd3Transformer::from_config(&Sd3Config::medium(), dev, Kind::Half)?;
            let n = count(&t.vs);
            let l = lora_params(&t.model.lora, &t.vs.root())?;
            (
                n,
                l,
                count_vae(super::models::sd3_vae_config()?)?,
                clip_l + CLIP_G_PARAMS + T5_XXL_PARAMS,
                T5_XXL_PARAMS,
            )
        }
    };
    Ok(ModelSizes {
        backbone,
        lora_r16,
        vae,
        text,
        t5,
        features: dino,
        heads: HEAD_PARAMS,
        vae_scale: 8,
    })
}

/// The account of every target (builds each model family once).
pub fn memory_account() -> Result<Vec<AccountRow>> {
    let mut out = Vec::new();
    let mut cache: Vec<(TargetModel, ModelSizes)> = Vec::new();
    for t in TARGETS {
        let sizes = match cache.iter().find(|(m, _)| *m == t.model) {
            Some((_, s)) => *s,
            None => {
                let s = model_sizes(t.model)?;
                cache.push((t.model, s));
                s
            }
        };
        out.push(account(t, sizes));
    }
    Ok(out)
}

/// A parameter count of a model family (the flag: LoRA).
type ParamOf = fn(&ModelSizes, bool) -> i64;

/// A training option's value in a configuration, as written in the table.
type OptionOf = fn(&MemoryTarget) -> String;

/// The account as a table: one column per target, GiB.
pub struct AccountTable<'a>(pub &'a [AccountRow]);

impl fmt::Display for AccountTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = self.0;
        writeln!(
            f,
            "memory account of the training state (computed from parameter counts, not measured; GiB)"
        )?;
        write!(f, "{:<34}", "")?;
        for r in rows {
            write!(f, " | {:>28}", r.target.name)?;
        }
        writeln!(f)?;
        let m = |n: i64| format!("{:.1} M", n as f64 / 1e6);
        let param_lines: [(&str, ParamOf); 2] = [
            ("backbone parameters", |s, _| s.backbone),
            ("trainable parameters", |s, lora| {
                if lora {
                    s.lora_r16
                } else {
                    s.backbone
                }
            }),
        ];
        for (name, get) in param_lines {
            write!(f, "{name:<34}")?;
            for r in rows {
                write!(f, " | {:>28}", m(get(&r.sizes, r.target.lora)))?;
            }
            writeln!(f)?;
        }
        let options: [(&str, OptionOf); 6] = [
            ("train.optimizer_state", |t| {
                match t.moments {
                    MomentStorage::Fp32 => "fp32",
                    MomentStorage::Bf16 => "bf16",
                    MomentStorage::Int8Blockwise => "8bit",
                }
                .to_string()
            }),
            ("train.base_dtype (LoRA)", |t| {
                if t.lora {
                    t.base.name().to_string()
                } else {
                    "-".to_string()
                }
            }),
            ("model.frozen_dtype", |t| t.frozen.name().to_string()),
            ("train.bf16_trajectory", |t| {
                if t.lora && t.base != WeightDtype::Fp32 {
                    "- (the base)".to_string()
                } else {
                    t.trajectory_copy.to_string()
                }
            }),
            ("train.gradient_checkpointing", |t| {
                t.checkpointing.to_string()
            }),
            ("model.text_device", |t| {
                match t.text {
                    TextDevice::Train => "train",
                    TextDevice::Cpu => "cpu",
                }
                .to_string()
            }),
        ];
        for (name, get) in options {
            write!(f, "{name:<34}")?;
            for r in rows {
                write!(f, " | {:>28}", get(&r.target))?;
            }
            writeln!(f)?;
        }
        let names: Vec<&str> = {
            let mut v: Vec<&str> = Vec::new();
            for r in rows {
                for (n, _) in &r.lines {
                    if !v.contains(&n.as_str()) {
                        v.push(n);
                    }
                }
            }
            v
        };
        for n in names {
            write!(f, "{n:<34}")?;
            for r in rows {
                match r.line(n) {
                    Some(b) => write!(f, " | {:>28.2}", b / GIB)?,
                    None => write!(f, " | {:>28}", "-")?,
                }
            }
            writeln!(f)?;
        }
        write!(f, "{:<34}", "state total")?;
        for r in rows {
            write!(f, " | {:>28.2}", r.state_gib())?;
        }
        writeln!(f)?;
        write!(f, "{:<34}", "activations (SD1.5 full: H200)")?;
        // With gradient checkpointing the H200 figure (measured without it) bounds
        // the activations from above.
        let bound = |r: &AccountRow| if r.target.checkpointing { "<= " } else { "" };
        for r in rows {
            match r.activations {
                Some(a) => write!(f, " | {:>28}", format!("{}{:.2}", bound(r), a / GIB))?,
                None => write!(f, " | {:>28}", "not measured")?,
            }
        }
        writeln!(f)?;
        write!(f, "{:<34}", "total")?;
        for r in rows {
            match r.total_gib() {
                Some(t) => write!(f, " | {:>28}", format!("{}{t:.2}", bound(r)))?,
                None => write!(f, " | {:>28}", format!(">= {:.2}", r.state_gib()))?,
            }
        }
        writeln!(f)?;
        write!(f, "{:<34}", "target")?;
        for r in rows {
            write!(f, " | {:>28.1}", r.target.target_gib)?;
        }
        writeln!(f)?;
        write!(f, "{:<34}", "host memory (text encoders)")?;
        for r in rows {
            write!(f, " | {:>28.2}", r.host / GIB)?;
        }
        writeln!(f)?;
        write!(f, "{:<34}", "T5-XXL, fp32 (use_t5 = false)")?;
        for r in rows {
            write!(f, " | {:>28.2}", 4.0 * r.sizes.t5 as f64 / GIB)?;
        }
        writeln!(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_lines_are_bytes_per_parameter() {
        let sizes = ModelSizes {
            backbone: 1000,
            lora_r16: 10,
            vae: 100,
            text: 50,
            t5: 0,
            features: 20,
            heads: 5,
            vae_scale: 8,
        };
        let get = |r: &AccountRow, n: &str| r.line(n).unwrap_or_else(|| panic!("no line {n}"));
        let full = account(TARGETS[0], sizes);
        assert_eq!(get(&full, "trainable weights (fp32)"), 4000.0);
        assert_eq!(get(&full, "AdamW moments"), 8000.0);
        assert_eq!(get(&full, "bf16 trajectory copy"), 2000.0);
        assert_eq!(get(&full, "VAE (fp32)"), 400.0);
        assert_eq!(get(&full, "text encoders (fp32)"), 200.0);
        assert!(!full.lines.iter().any(|(k, _)| k.starts_with("frozen base")));
        let low = account(TARGETS[1], sizes);
        assert_eq!(get(&low, "AdamW moments"), 2000.0 * (1.0 + 4.0 / 2048.0));
        // Low-memory full fine-tuning: no trajectory copy, bf16 frozen networks.
        assert_eq!(low.line("bf16 trajectory copy"), None);
        assert_eq!(get(&low, "VAE (bf16)"), 200.0);
        assert!(low.target.checkpointing && !full.target.checkpointing);
        let table = AccountTable(&[full.clone(), low.clone()]).to_string();
        let total = table.lines().find(|l| l.starts_with("total")).unwrap();
        assert!(total.contains("<= "), "{total}");
        assert_eq!(total.matches("<= ").count(), 1, "{total}");
        assert!(!total.contains(">= "), "{total}");
        // LoRA with a bf16 base and bf16 frozen networks: no trajectory copy.
        let lora = account(TARGETS[2], sizes);
        assert_eq!(get(&lora, "gradients (fp32)"), 40.0);
        assert_eq!(get(&lora, "frozen base weights (bf16)"), 2000.0);
        assert_eq!(lora.line("bf16 trajectory copy"), None);
        assert_eq!(get(&lora, "VAE (bf16)"), 200.0);
        assert_eq!(get(&lora, "text encoders (bf16)"), 100.0);
        assert_eq!(get(&lora, "DINOv2 features (bf16)"), 40.0);
        let state: f64 = lora.lines.iter().map(|(_, b)| b).sum();
        assert_eq!(
            state,
            40.0 + 40.0 + 80.0 + 2000.0 + 100.0 + 200.0 + 40.0 + 80.0
        );
        assert_eq!(
            (lora.activations, lora.host),
            (Some(SD15_ACTIVATION_BYTES), 0.0)
        );
        assert_eq!(account(TARGETS[3], sizes).activations, None);
        // A float32 LoRA base keeps the trajectory copy (with the adapters).
        let lora32 = account(
            MemoryTarget {
                base: WeightDtype::Fp32,
                ..TARGETS[2]
            },
            sizes,
        );
        assert_eq!(get(&lora32, "frozen base weights (fp32)"), 4000.0);
        assert_eq!(get(&lora32, "bf16 trajectory copy"), 2020.0);
        // Text encoders on the host: nothing on the device, their bytes as host memory.
        let sd3 = account(TARGETS[4], sizes);
        assert_eq!(get(&sd3, "text encoders (bf16, on the host)"), 0.0);
        assert_eq!(sd3.host, 100.0);
    }
}
