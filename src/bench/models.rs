//! Randomly initialised models of the real sizes (SD1.5, SD3-medium) for the benchmark.

use anyhow::Result;
use tch::{nn, Device, Kind};

use crate::disc::features::DinoFeatures;
use crate::disc::FeatureNetwork;
use crate::models::clip::ClipTextConfig;
use crate::models::clip::{ClipTextModel, LoadedClipText};
use crate::models::dinov2::{Dinov2Config, Dinov2Model};
use crate::models::mmdit::{LoadedSd3Transformer, Sd3Config};
use crate::models::pipeline::{
    builtin_tokenizer_dir, Backbone, Family, Pipeline, RandomSpec, TextStack, UnetSpec,
};
use crate::models::sd3_text::{ClipBranch, Sd3TextEncoders, T5Branch, T5Tokenizer};
use crate::models::t5::{LoadedT5, T5Config, T5EncoderModel};
use crate::models::tokenizer::{ClipTokenizer, Pad};
use crate::models::unet::UNetConfig;
use crate::models::vae::{AutoencoderKL, LoadedVae, VaeConfig};
use crate::schedule::ScheduleConfig;

pub(crate) fn sd15_vae_config() -> Result<VaeConfig> {
    VaeConfig::from_value(&serde_json::json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215
    }))
}

/// A randomly initialised SD1.5 pipeline (UNet trainable, the rest frozen).
pub fn sd15_random_pipeline(device: Device, seed: i64) -> Result<Pipeline> {
    let spec = RandomSpec::Unet(UnetSpec {
        unet: UNetConfig::sd15(),
        clip: ClipTextConfig::sd15(),
        vae: Some(sd15_vae_config()?),
        schedule: ScheduleConfig::sd15(),
    });
    Pipeline::random(&spec, device, seed)
}

/// SD3's VAE (`vae/config.json` of the SD3 pipelines): 16 latent channels, no
/// quant convs, scaling 1.5305 and shift 0.0609.
pub(crate) fn sd3_vae_config() -> Result<VaeConfig> {
    VaeConfig::from_value(&serde_json::json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": false,
        "use_post_quant_conv": false
    }))
}

/// A stand-in for SD3's frozen text encoders with the real output widths: tiny
/// random CLIP-L / CLIP-G towers (widths 8 and 16) projecting to the real pooled
/// widths 768 + 1280 = 2048, and a one-layer random T5 of the real width 4096 over
/// 77 tokens. The conditioning has the shapes of the real stack with 77 T5 tokens
/// (context [B, 77 + 77, 4096], pooled [B, 2048]) at a negligible cost: the bench
/// measures the transformer, the VAE and the discriminator, not the text encoders.
pub fn sd3_stand_in_text(device: Device, seed: i64) -> Result<Sd3TextEncoders> {
    tch::manual_seed(seed);
    let clip = |hidden: i64, proj: i64, act: &str, pad: Pad| -> Result<ClipBranch> {
        let config = ClipTextConfig {
            hidden_size: hidden,
            intermediate_size: 2 * hidden,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            hidden_act: act.to_string(),
            projection_dim: proj,
            ..ClipTextConfig::tiny()
        };
        let mut vs = nn::VarStore::new(device);
        let model = ClipTextModel::new(&vs.root(), &config, true)?;
        vs.freeze();
        Ok(ClipBranch {
            tokenizer: ClipTokenizer::from_dir(&builtin_tokenizer_dir())?,
            pad,
            encoder: LoadedClipText { vs, model, config },
        })
    };
    let clip_l = clip(8, 768, "quick_gelu", Pad::Eos)?;
    let clip_g = clip(16, 1280, "gelu", Pad::Zero)?;
    let t5_cfg = T5Config {
        d_model: 4096,
        d_kv: 8,
        d_ff: 16,
        num_layers: 1,
        num_heads: 2,
        ..T5Config::tiny()
    };
    let mut vs = nn::VarStore::new(device);
    let model = T5EncoderModel::new(&vs.root(), &t5_cfg)?;
    vs.freeze();
    let t5 = T5Branch {
        tokenizer: T5Tokenizer::tiny(77)?,
        encoder: LoadedT5 {
            vs,
            model,
            config: t5_cfg,
        },
    };
    Ok(Sd3TextEncoders {
        clip_l,
        clip_g,
        t5: Some(t5),
        context_dim: 4096,
        max_sequence_length: 77,
        device,
    })
}

/// A randomly initialised SD3-medium pipeline (transformer trainable, the rest
/// frozen) with the stand-in text encoders of [`sd3_stand_in_text`].
pub fn sd3_medium_random_pipeline(device: Device, seed: i64) -> Result<Pipeline> {
    tch::manual_seed(seed);
    let transformer = LoadedSd3Transformer::from_config(&Sd3Config::medium(), device, Kind::Float)?;
    let vcfg = sd3_vae_config()?;
    let mut vs = nn::VarStore::new(device);
    let model = AutoencoderKL::new(&vs.root(), &vcfg)?;
    vs.freeze();
    let vae = LoadedVae {
        vs,
        model,
        config: vcfg,
    };
    let text = sd3_stand_in_text(device, seed.wrapping_add(1))?;
    Ok(Pipeline {
        dir: None,
        family: Family::Sd3,
        backbone: Backbone::Sd3(Box::new(transformer)),
        vae: Some(vae),
        text: TextStack::Sd3(Box::new(text)),
        schedule: ScheduleConfig::sd3(),
        device,
        backbone_file_kind: Kind::Float,
    })
}

/// Randomly initialised, frozen DINOv2 features at `resolution` px tapping the
/// default blocks 2, 5, 8, 11 (clamped to the last layer of a smaller model) with
/// the patch embedding (the default levels), and
/// the parameter count.
pub(crate) fn dino_features(
    device: Device,
    config: Dinov2Config,
    resolution: i64,
) -> Result<(Box<dyn FeatureNetwork>, i64)> {
    let mut vs = nn::VarStore::new(device);
    let model = Dinov2Model::new(&vs.root(), &config)?;
    vs.freeze();
    let n = count(&vs);
    let last = config.num_hidden_layers as usize - 1;
    let blocks: Vec<usize> = DinoFeatures::DEFAULT_BLOCKS
        .iter()
        .map(|&b| b.min(last))
        .collect();
    let f = DinoFeatures::new(model, Some(vs), resolution, &blocks, Default::default())?;
    Ok((Box::new(f), n))
}

pub(crate) fn count(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}
