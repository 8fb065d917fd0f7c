//! The discriminator as the paper (appendix A.2) and StyleGAN-T describe it: five
//! feature levels with the CLS readout, heads at the feature width with
//! BatchNormLocal and 64 outputs, the predictor on 64 channels, and the StyleGAN-T
//! ablation with text-conditioned heads and a hinge loss per token.

use adt::disc::features::{DinoFeatures, EfficientNetFeatures, Levels};
use adt::disc::heads::{BatchNormLocal, Mode};
use adt::disc::siamese::{hinge_d_loss, hinge_g_loss, DiscConfig, DiscVariant, Discriminator};
use adt::disc::FeatureNetwork;
use adt::models::dinov2::Dinov2Model;
use adt::models::efficientnet::{EfficientNet, EfficientNetConfig};
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn vals(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.detach().to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    (a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-300)
}

/// BatchNormLocal by hand: each group of `B / ceil(B / 8)` consecutive samples is
/// normalised per channel over its samples and tokens (biased variance), then
/// scaled and shifted; the same in every mode (no running statistics).
#[test]
fn batch_norm_local_matches_hand_computation() {
    let vs = VarStore::new(Device::Cpu);
    let bn = BatchNormLocal::new(&vs.root(), 3, 8, 1e-5).unwrap();
    tch::no_grad(|| {
        let v = vs.variables();
        v["weight"]
            .shallow_clone()
            .copy_(&Tensor::from_slice(&[1.5f32, -0.5, 2.0]));
        v["bias"]
            .shallow_clone()
            .copy_(&Tensor::from_slice(&[0.1f32, 0.2, -0.3]));
    });
    // B = 12: two groups of 6 (StyleGAN-T's view(G, -1, C, N)); B = 5: one group.
    for (b, group) in [(12i64, 6i64), (5, 5), (16, 8)] {
        let x = Tensor::randn([b, 3, 4], (Kind::Float, Device::Cpu)) * 3.0 + 1.0;
        let y = vals(&bn.forward(&x));
        let xv = vals(&x);
        let (w, bias) = ([1.5, -0.5, 2.0], [0.1, 0.2, -0.3]);
        for g0 in (0..b).step_by(group as usize) {
            for c in 0..3 {
                let idx = |s: i64, n: i64| ((s * 3 + c) * 4 + n) as usize;
                let members: Vec<f64> = (g0..g0 + group)
                    .flat_map(|s| (0..4).map(move |n| (s, n)))
                    .map(|(s, n)| xv[idx(s, n)])
                    .collect();
                let m = members.iter().sum::<f64>() / members.len() as f64;
                let var =
                    members.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / members.len() as f64;
                for s in g0..g0 + group {
                    for n in 0..4 {
                        let hand = (xv[idx(s, n)] - m) / (var + 1e-5).sqrt() * w[c as usize]
                            + bias[c as usize];
                        let ours = y[idx(s, n)];
                        assert!(
                            (ours - hand).abs() < 1e-4,
                            "B {b} sample {s} channel {c} token {n}: {ours} vs {hand}"
                        );
                    }
                }
            }
        }
    }
    // Only the affine parameters: no running statistics to drift.
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    assert_eq!(names, ["bias", "weight"]);
}

/// Appendix A.2 / StyleGAN-T's `DiscHead`: a 1x1 block and a residual k = 9 block at
/// the width of the features, a 1x1 convolution to 64 channels; the predictor the
/// same on 64 input channels; BatchNormLocal (virtual batch 8) everywhere.
#[test]
fn heads_follow_stylegan_t_at_the_feature_width() {
    let channels = [384i64, 32];
    let disc = Discriminator::new(Device::Cpu, &channels, &DiscConfig::default()).unwrap();
    let v = disc.vs.variables();
    for (i, &c) in channels.iter().enumerate() {
        let shape = |n: &str| v[n].size();
        assert_eq!(
            shape(&format!("heads.{i}.main.0.conv.weight_orig")),
            [c, c, 1]
        );
        assert_eq!(
            shape(&format!("heads.{i}.main.1.conv.weight_orig")),
            [c, c, 9]
        );
        assert_eq!(shape(&format!("heads.{i}.out.weight_orig")), [64, c, 1]);
        assert_eq!(
            shape(&format!("predictors.{i}.main.0.conv.weight_orig")),
            [64, 64, 1]
        );
        assert_eq!(
            shape(&format!("predictors.{i}.main.1.conv.weight_orig")),
            [64, 64, 9]
        );
        assert_eq!(
            shape(&format!("predictors.{i}.out.weight_orig")),
            [64, 64, 1]
        );
        assert!(!v.contains_key(&format!("heads.{i}.main.0.norm.running_mean")));
        let h = &disc.heads()[i];
        assert_eq!(h.blocks[0].norm.virtual_batch(), 8);
        assert_eq!(h.output_channels(), 64);
    }
    let dual: Vec<String> = disc.dual_vs.variables().into_keys().collect();
    assert!(dual.contains(&"heads.0.main.1.conv.weight_orig".to_string()));
    // A fixed width stays available.
    let narrow = Discriminator::new(
        Device::Cpu,
        &channels,
        &DiscConfig {
            head_channels: Some(16),
            ..DiscConfig::default()
        },
    )
    .unwrap();
    assert_eq!(
        narrow.vs.variables()["heads.0.main.1.conv.weight_orig"].size(),
        [16, 16, 9]
    );
    // Scores are batch-statistics functions of the input: the same in the D-step
    // (Train) and G-step (Frozen) modes apart from the power iteration.
    let f: Vec<Tensor> = channels
        .iter()
        .map(|&c| Tensor::randn([2, c, 6], (Kind::Float, Device::Cpu)))
        .collect();
    let t = disc.reference(&f, Mode::Frozen).unwrap();
    let a = disc.scores(Some(&t), None, &f, Mode::Frozen).unwrap();
    let b = disc.scores(Some(&t), None, &f, Mode::Eval).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(vals(x), vals(y));
    }
}

fn stylegan_cfg(text_dim: i64) -> DiscConfig {
    DiscConfig {
        variant: DiscVariant::StyleganT,
        head_channels: Some(8),
        kernel: 3,
        text_dim,
        ..DiscConfig::default()
    }
}

/// StyleGAN-T's conditional logits: per token,
/// `<cls(h)_token, cmapper(c)> / sqrt(64)` with `cmapper(c) = c W^T / sqrt(d) + b`.
#[test]
fn stylegan_t_heads_project_the_text_embedding_per_token() {
    tch::manual_seed(21);
    let channels = [6i64, 10];
    let disc = Discriminator::new(Device::Cpu, &channels, &stylegan_cfg(5)).unwrap();
    assert!(disc.needs_text());
    let v = disc.vs.variables();
    let f: Vec<Tensor> = [(6i64, 7i64), (10, 5)]
        .iter()
        .map(|&(c, n)| Tensor::randn([3, c, n], (Kind::Float, Device::Cpu)))
        .collect();
    let text = Tensor::randn([3, 5], (Kind::Float, Device::Cpu));
    let scores = disc.scores(None, Some(&text), &f, Mode::Frozen).unwrap();
    for i in 0..2 {
        assert_eq!(scores[i].size(), [3, f[i].size()[2]], "a logit per token");
        let out = disc.heads()[i].forward(&f[i], Mode::Frozen).unwrap(); // [3, 64, N]
        assert_eq!(out.size()[1], 64);
        let w = &v[&format!("cmappers.{i}.weight")];
        let b = &v[&format!("cmappers.{i}.bias")];
        assert_eq!(w.size(), [64, 5]);
        let cmap = text.matmul(&w.tr()) / 5f64.sqrt() + b; // [3, 64]
        let hand =
            (out * cmap.unsqueeze(-1)).sum_dim_intlist([1i64].as_slice(), false, Kind::Float) / 8.0;
        let e = rel_err(&scores[i], &hand);
        assert!(e < 1e-5, "level {i}: {e}");
    }
    // The caption changes the logits; a missing embedding is an error.
    let other = disc
        .scores(None, Some(&(text.neg())), &f, Mode::Frozen)
        .unwrap();
    assert!(rel_err(&other[0], &scores[0]) > 1e-3);
    let e = disc
        .scores(None, None, &f, Mode::Frozen)
        .unwrap_err()
        .to_string();
    assert!(e.contains("text embedding"), "{e}");
    // The D loss reaches the text mappers.
    let (loss, _) = disc.d_loss(&[], Some(&text), &f, &f).unwrap();
    loss.backward();
    assert!(
        v["cmappers.0.weight"]
            .grad()
            .abs()
            .sum(Kind::Float)
            .double_value(&[])
            > 0.0
    );
    // Unconditional heads (text_dim 0) end in one channel, as StyleGAN-T's with c_dim 0.
    let plain = Discriminator::new(Device::Cpu, &channels, &stylegan_cfg(0)).unwrap();
    assert!(!plain.needs_text());
    assert_eq!(
        plain.vs.variables()["heads.0.out.weight_orig"].size(),
        [1, 8, 1]
    );
}

/// The hinge of Eq. 9 is taken per token before averaging (StyleGAN-T's
/// `relu(1 + logits).mean()`), not on the token-averaged logit.
#[test]
fn stylegan_t_hinge_is_per_token() {
    // One level, one sample, two tokens with logits 2 and -3 (real) / -2 and 3 (fake).
    let real = [Tensor::from_slice(&[2.0f64, -3.0]).view([1, 2])];
    let fake = [Tensor::from_slice(&[-2.0f64, 3.0]).view([1, 2])];
    let d = hinge_d_loss(&real, &fake).unwrap().double_value(&[]);
    // Per token: real (0 + 4) / 2 = 2, fake (0 + 4) / 2 = 2. Averaged first the logits
    // would be -0.5 and 0.5, giving 1.5 + 1.5 = 3.
    assert!((d - 4.0).abs() < 1e-12, "{d}");
    let g = hinge_g_loss(&fake).unwrap().double_value(&[]);
    assert!((g + 0.5).abs() < 1e-12, "{g}");
    // Levels are summed (Eq. 9), each averaged over its own tokens.
    let real2 = [
        real[0].shallow_clone(),
        Tensor::from_slice(&[0.5f64, 0.5, 0.5]).view([1, 3]),
    ];
    let fake2 = [
        fake[0].shallow_clone(),
        Tensor::from_slice(&[-1.0f64, -1.0, 0.0]).view([1, 3]),
    ];
    let d2 = hinge_d_loss(&real2, &fake2).unwrap().double_value(&[]);
    assert!((d2 - (4.0 + 0.5 + 1.0 / 3.0)).abs() < 1e-12, "{d2}");
}

fn dinov2_fixture() -> (
    Dinov2Model,
    VarStore,
    std::collections::HashMap<String, Tensor>,
) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dinov2");
    let loaded = Dinov2Model::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let io: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("io.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    (loaded.model, loaded.vs, io)
}

/// StyleGAN-T's ViT hooks on DINOv2 against transformers' hidden states: the
/// tapped blocks, then the patch embedding (`hidden_states[0]`), every level the
/// patch tokens plus its CLS token (AddReadout). The four-level option drops both.
#[test]
fn dinov2_five_levels_with_cls_readout_match_transformers() {
    let (model, vs, io) = dinov2_fixture();
    let f = DinoFeatures::new(model, Some(vs), 56, &[0, 1, 2, 3], Levels::PatchAndBlocks).unwrap();
    assert_eq!(f.channels(), vec![32; 5]);
    let px = io["res56x56.in.pixel_values"].shallow_clone();
    let mean = Tensor::from_slice(&[0.485f32, 0.456, 0.406]).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&[0.229f32, 0.224, 0.225]).view([1, 3, 1, 1]);
    let images = (&px * &std + &mean) * 2.0 - 1.0;
    let feats = tch::no_grad(|| f.features(&images));
    assert_eq!(feats.len(), 5);
    for (level, hs) in [(0usize, 1usize), (1, 2), (2, 3), (3, 4), (4, 0)] {
        let h = &io[&format!("res56x56.out.hidden_states_{hs}")]; // [2, 17, 32]
        let reference = (h.narrow(1, 1, 16) + h.narrow(1, 0, 1)).transpose(1, 2);
        let e = rel_err(&feats[level], &reference);
        println!("level {level} (hidden_states_{hs} + CLS): max rel err {e:.2e}");
        assert!(e < 1e-4, "level {level}: {e}");
    }
    let (model, vs, _) = dinov2_fixture();
    let four = DinoFeatures::new(model, Some(vs), 56, &[0, 1, 2, 3], Levels::Blocks).unwrap();
    assert_eq!(four.channels(), vec![32; 4]);
    let feats = tch::no_grad(|| four.features(&images));
    let h = &io["res56x56.out.hidden_states_4"];
    assert!(rel_err(&feats[3], &h.narrow(1, 1, 16).transpose(1, 2)) < 1e-4);
}

/// EfficientNet's five levels: the stem (32 channels at stride 2, the counterpart
/// of the patch embedding) and the stages [1, 2, 4, 6]; the four-level option the
/// stages alone, the same tensors.
#[test]
fn efficientnet_five_levels_add_the_stem() {
    tch::manual_seed(3);
    let mut vs = VarStore::new(Device::Cpu);
    let model = EfficientNet::new(&vs.root(), &EfficientNetConfig::lite0()).unwrap();
    vs.freeze();
    let five = EfficientNetFeatures::new(
        model,
        None,
        64,
        &EfficientNetFeatures::DEFAULT_TAPS,
        Levels::PatchAndBlocks,
    )
    .unwrap();
    assert_eq!(five.channels(), vec![32, 24, 40, 112, 320]);
    let x = Tensor::rand([2, 3, 64, 64], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let f5 = tch::no_grad(|| five.features(&x));
    let tokens: Vec<i64> = f5.iter().map(|t| t.size()[2]).collect();
    assert_eq!(tokens, vec![32 * 32, 16 * 16, 8 * 8, 4 * 4, 2 * 2]);
    let model = five.model();
    let stages = tch::no_grad(|| {
        let prepared = adt::models::efficientnet::normalize(&((&x + 1.0) * 0.5));
        model.stage_outputs(&prepared, &[1, 2, 4, 6]).unwrap()
    });
    // The features run channels-last, the reference here in NCHW: the same values up
    // to the order of the float sums.
    for (i, (a, b)) in f5[1..].iter().zip(&stages).enumerate() {
        let e = rel_err(a, &b.flatten(2, 3));
        assert!(e < 1e-5, "level {}: relative error {e}", i + 1);
    }
}
