//! Discriminator heads, losses, EMA and DiffAugment.

use adt::disc::diffaug::{self, AugParams, Policy};
use adt::disc::heads::Mode;
use adt::disc::siamese::{
    cosine_score, d_stats, hinge_d_loss, hinge_g_loss, DiscConfig, DiscVariant, Discriminator,
};
use std::collections::HashMap;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const CHANNELS: [i64; 2] = [6, 10];
const TOKENS: [i64; 2] = [7, 5];

fn feats(batch: i64, shift: f64) -> Vec<Tensor> {
    CHANNELS
        .iter()
        .zip(TOKENS)
        .map(|(&c, n)| Tensor::randn([batch, c, n], (Kind::Float, Device::Cpu)) + shift)
        .collect()
}

fn small_cfg(variant: DiscVariant, spectral_norm: bool) -> DiscConfig {
    DiscConfig {
        variant,
        head_channels: Some(8),
        out_channels: 8,
        kernel: 3,
        spectral_norm,
        ..DiscConfig::default()
    }
}

fn vals(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.detach().to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn snapshot(vs: &nn::VarStore) -> HashMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().copy()))
        .collect()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.eq_tensor(b).all().int64_value(&[]) == 1
}

#[test]
fn hinge_losses_on_hand_made_scores() {
    // Two levels, two samples.
    let real = [
        Tensor::from_slice(&[0.5f32, 2.0]),
        Tensor::from_slice(&[-0.5f32, 0.9]),
    ];
    let fake = [
        Tensor::from_slice(&[-2.0f32, 0.3]),
        Tensor::from_slice(&[0.1f32, -1.5]),
    ];
    // Sample 0: real relu(0.5) + relu(1.5) = 2.0, fake relu(-1) + relu(1.1) = 1.1.
    // Sample 1: real relu(-1) + relu(0.1) = 0.1, fake relu(1.3) + relu(-0.5) = 1.3.
    let d = hinge_d_loss(&real, &fake).unwrap().double_value(&[]);
    assert!(
        (d - (2.0 + 1.1 + 0.1 + 1.3) / 2.0).abs() < 1e-6,
        "d loss {d}"
    );
    // -(sum of fake over levels), batch mean: sample 0: 1.9, sample 1: 1.2.
    let g = hinge_g_loss(&fake).unwrap().double_value(&[]);
    assert!((g - 1.55).abs() < 1e-6, "g loss {g}");

    // Level sums: real (0.0, 2.9), fake (-1.9, -1.2).
    let real = [
        Tensor::from_slice(&[0.5f32, 2.0]),
        Tensor::from_slice(&[-0.5f32, 0.9]),
    ];
    let fake = [
        Tensor::from_slice(&[-2.0f32, 0.3]),
        Tensor::from_slice(&[2.6f32, -1.5]),
    ];
    // Fake sums (0.6, -1.2): pairs real > fake: (0 > 0.6 no), (0 > -1.2 yes), (2.9 yes), (2.9 yes).
    let loss = hinge_d_loss(&real, &fake).unwrap();
    let s = d_stats(&loss, &real, &fake).unwrap();
    assert!((s.accuracy - 0.75).abs() < 1e-12, "{s:?}");
    // real > 0: 1 of 2; fake < 0: 1 of 2.
    assert!((s.sign_accuracy - 0.5).abs() < 1e-12, "{s:?}");
    assert!(
        (s.real_score - 1.45).abs() < 1e-6 && (s.fake_score + 0.3).abs() < 1e-6,
        "{s:?}"
    );
    assert_eq!(s.real_per_level.len(), 2);
    assert!((s.fake_per_level[1] - 0.55).abs() < 1e-6, "{s:?}");
    // Mismatched level counts are an error.
    assert!(hinge_d_loss(&real, &fake[..1]).is_err());
}

#[test]
fn cosine_score_by_hand() {
    // Per-sample vectors flattened from [2, 3] maps.
    let a = Tensor::from_slice(&[
        1.0f64, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, -4.0, 0.0,
    ])
    .view([2, 2, 3]);
    let b = Tensor::from_slice(&[
        2.0f64, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0,
    ])
    .view([2, 2, 3]);
    let c = vals(&cosine_score(&a, &b, 1e-8).unwrap());
    let expected = [4.0 / (3.0 * 5f64.sqrt()), -4.0 / (5.0 * 3f64.sqrt())];
    println!("cosine {c:?} expected {expected:?}");
    for (x, y) in c.iter().zip(expected) {
        assert!((x - y).abs() < 1e-12);
    }
    assert!(cosine_score(&a, &b.narrow(0, 0, 1), 1e-8).is_err());
}

#[test]
fn siamese_scores_are_cosines_of_predictor_and_dual_outputs() {
    tch::manual_seed(1);
    let disc = Discriminator::new(
        Device::Cpu,
        &CHANNELS,
        &small_cfg(DiscVariant::Siamese, true),
    )
    .unwrap();
    let (fr, f) = (feats(3, 0.0), feats(3, 0.5));
    let targets = disc.reference(&fr, Mode::Eval).unwrap();
    let scores = disc.scores(Some(&targets), None, &f, Mode::Eval).unwrap();
    for i in 0..CHANNELS.len() {
        let z = disc.predictors()[i]
            .forward(
                &disc.heads()[i].forward(&f[i], Mode::Eval).unwrap(),
                Mode::Eval,
            )
            .unwrap();
        let t = disc.duals()[i].forward(&fr[i], Mode::Eval).unwrap();
        assert_eq!(z.size(), [3, 8, TOKENS[i]]);
        let (z, t) = (vals(&z), vals(&t));
        let per = z.len() / 3;
        let ours = vals(&scores[i]);
        for b in 0..3 {
            let (zb, tb) = (&z[b * per..(b + 1) * per], &t[b * per..(b + 1) * per]);
            let dot: f64 = zb.iter().zip(tb).map(|(x, y)| x * y).sum();
            let nz = zb.iter().map(|x| x * x).sum::<f64>().sqrt();
            let nt = tb.iter().map(|x| x * x).sum::<f64>().sqrt();
            let hand = dot / (nz * nt);
            println!("level {i} sample {b}: score {} hand {hand}", ours[b]);
            assert!((ours[b] - hand).abs() < 1e-5);
        }
    }
    // Wrong channel count or level count: errors naming the level.
    let bad = vec![
        Tensor::zeros([3, 5, 7], (Kind::Float, Device::Cpu)),
        f[1].shallow_clone(),
    ];
    let err = disc
        .scores(Some(&targets), None, &bad, Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(err.contains("level 0"), "{err}");
    assert!(disc
        .scores(Some(&targets), None, &f[..1], Mode::Eval)
        .is_err());
}

fn largest_singular_value(m: &Tensor) -> f64 {
    let g = m.matmul(&m.transpose(0, 1));
    g.linalg_eigvalsh("L").max().double_value(&[]).sqrt()
}

#[test]
fn spectral_norm_estimates_the_largest_singular_value() {
    tch::manual_seed(2);
    let disc = Discriminator::new(
        Device::Cpu,
        &CHANNELS,
        &small_cfg(DiscVariant::Siamese, true),
    )
    .unwrap();
    let conv = &disc.heads()[1].blocks[1].conv;
    assert!(conv.is_spectral());
    let w = conv
        .weight()
        .reshape([conv.out_channels(), -1])
        .to_kind(Kind::Double);
    let top = largest_singular_value(&w);
    let sigma = conv.sigma().unwrap().double_value(&[]);
    println!("sigma {sigma} vs largest singular value {top}");
    assert!((sigma - top).abs() / top < 1e-3);
    let eff = conv
        .effective_weight(Mode::Eval)
        .reshape([conv.out_channels(), -1])
        .to_kind(Kind::Double);
    let n = largest_singular_value(&eff);
    assert!((n - 1.0).abs() < 1e-3, "normalised spectral norm {n}");
    // A training forward runs one power iteration (changes u), other modes do not.
    let (u, _) = conv.sn_vectors().unwrap();
    let before = u.copy();
    let _ = conv.effective_weight(Mode::Frozen);
    assert!(same(u, &before));
    // Perturb the weight so the power iteration moves.
    tch::no_grad(|| {
        let mut w = conv.weight().shallow_clone();
        let noise = w.randn_like() * 0.5;
        let _ = w.g_add_(&noise);
    });
    let _ = conv.effective_weight(Mode::Train);
    assert!(!same(u, &before));
    let names: Vec<String> = disc.vs.variables().into_keys().collect();
    assert!(
        names.iter().any(|n| n == "heads.1.main.1.conv.weight_u"),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n == "heads.1.main.1.conv.weight_orig"));
    assert!(names.iter().any(|n| n == "predictors.0.out.weight_v"));
}

#[test]
fn ema_update_follows_the_formula() {
    tch::manual_seed(3);
    let disc = Discriminator::new(
        Device::Cpu,
        &CHANNELS,
        &small_cfg(DiscVariant::Siamese, true),
    )
    .unwrap();
    // Starts as a copy.
    let online = snapshot(&disc.vs);
    for (name, d) in disc.dual_vs.variables() {
        assert!(same(&d, &online[&name]), "{name} is not a copy at start");
        assert!(!d.requires_grad(), "dual variable {name} is trainable");
    }
    // Move the online heads: one D step.
    let mut opt = nn::Adam::default().build(&disc.vs, 1e-2).unwrap();
    let (loss, _) = disc
        .d_loss(&feats(4, 0.0), None, &feats(4, 0.0), &feats(4, 1.0))
        .unwrap();
    opt.backward_step(&loss);
    let online = snapshot(&disc.vs);
    let dual = snapshot(&disc.dual_vs);
    let tau = 0.99;
    disc.ema_update(tau).unwrap();
    let mut checked = 0;
    for (name, d) in disc.dual_vs.variables() {
        if name.ends_with("weight_u") || name.ends_with("weight_v") {
            assert!(same(&d, &dual[&name]), "{name} changed by the EMA");
            continue;
        }
        let expected = &dual[&name] * tau + &online[&name] * (1.0 - tau);
        assert!(
            same(&d, &expected),
            "{name}: EMA differs from tau * dual + (1 - tau) * online"
        );
        if name.ends_with("weight_orig") {
            assert!(!same(&d, &dual[&name]), "{name} did not move");
        }
        checked += 1;
    }
    assert!(checked > 10);
    disc.ema_update(0.0).unwrap();
    for (name, d) in disc.dual_vs.variables() {
        if !(name.ends_with("weight_u") || name.ends_with("weight_v")) {
            assert!(same(&d, &online[&name]), "{name}: tau = 0 does not copy");
        }
    }
    assert!(disc.ema_update(1.5).is_err());
}

#[test]
fn d_step_changes_only_the_discriminator() {
    tch::manual_seed(4);
    let disc = Discriminator::new(
        Device::Cpu,
        &CHANNELS,
        &small_cfg(DiscVariant::Siamese, true),
    )
    .unwrap();
    // A stand-in generator: fake features = g * base.
    let gen_vs = nn::VarStore::new(Device::Cpu);
    let g = gen_vs.root().var("g", &[1], nn::Init::Const(1.0));
    let base = feats(4, 1.0);
    let fake: Vec<Tensor> = base.iter().map(|b| b * &g).collect();
    let before = snapshot(&disc.vs);
    let dual_before = snapshot(&disc.dual_vs);
    let g_before = g.detach().copy();
    let mut opt = nn::Adam::default().build(&disc.vs, 1e-2).unwrap();
    let (loss, stats) = disc
        .d_loss(&feats(4, 0.0), None, &feats(4, 0.0), &fake)
        .unwrap();
    println!("d loss {stats:?}");
    opt.backward_step(&loss);
    assert!(
        same(&g, &g_before),
        "generator parameter changed in the D step"
    );
    for (name, v) in disc.vs.variables() {
        if v.requires_grad() {
            assert!(!same(&v, &before[&name]), "trainable {name} did not change");
        }
    }
    for (name, v) in disc.dual_vs.variables() {
        if !(name.ends_with("weight_u") || name.ends_with("weight_v")) {
            assert!(
                same(&v, &dual_before[&name]),
                "dual {name} changed in the D step"
            );
        }
    }
    assert!(disc
        .dual_vs
        .trainable_variables()
        .iter()
        .all(|v| !v.requires_grad()));
}

#[test]
fn g_loss_gradient_reaches_fake_features_and_matches_finite_differences() {
    tch::manual_seed(5);
    for variant in [DiscVariant::Siamese, DiscVariant::StyleganT] {
        let mut disc =
            Discriminator::new(Device::Cpu, &CHANNELS, &small_cfg(variant, true)).unwrap();
        disc.vs.double();
        disc.dual_vs.double();
        let fr: Vec<Tensor> = feats(2, 0.0)
            .iter()
            .map(|t| t.to_kind(Kind::Double))
            .collect();
        let fake: Vec<Tensor> = feats(2, 0.3)
            .iter()
            .map(|t| t.to_kind(Kind::Double).set_requires_grad(true))
            .collect();
        let state = snapshot(&disc.vs);
        let (loss, _) = disc.g_loss(&fr, None, &fake).unwrap();
        loss.backward();
        for (name, v) in disc.vs.variables() {
            assert!(
                same(&v, &state[&name]),
                "{name} changed in a generator forward"
            );
        }
        let eval = |i: usize, idx: i64, h: f64| -> f64 {
            let f: Vec<Tensor> = fake
                .iter()
                .enumerate()
                .map(|(j, t)| {
                    let t = t.detach().copy();
                    if j == i {
                        let _ = t.view([-1]).get(idx).g_add_scalar_(h);
                    }
                    t
                })
                .collect();
            tch::no_grad(|| disc.g_loss(&fr, None, &f).unwrap().0.double_value(&[]))
        };
        let mut worst: f64 = 0.0;
        for (i, f) in fake.iter().enumerate() {
            let grad = f.grad();
            assert!(grad.defined(), "no gradient for fake level {i}");
            let gv = vals(&grad);
            assert!(gv.iter().any(|x| x.abs() > 0.0) && gv.iter().all(|x| x.is_finite()));
            for idx in [0i64, 5, 17, (gv.len() - 1) as i64] {
                let h = 1e-6;
                let fd = (eval(i, idx, h) - eval(i, idx, -h)) / (2.0 * h);
                let err = (fd - gv[idx as usize]).abs() / (gv[idx as usize].abs().max(1e-3));
                worst = worst.max(err);
                assert!(
                    err < 1e-4,
                    "{variant:?} level {i} index {idx}: autograd {} vs finite differences {fd}",
                    gv[idx as usize]
                );
            }
        }
        println!("{variant:?}: worst relative gradient error {worst:e}");
    }
}

/// Hinge losses of the variants from the scores by hand. Without spectral norm the
/// training and frozen forwards produce the same scores (both use batch statistics).
#[test]
fn variant_losses_match_hand_hinge() {
    for variant in [DiscVariant::StyleganT, DiscVariant::Siamese] {
        tch::manual_seed(6);
        let disc = Discriminator::new(Device::Cpu, &CHANNELS, &small_cfg(variant, false)).unwrap();
        let (fr, real, fake) = (feats(3, 0.0), feats(3, 0.0), feats(3, 2.0));
        let targets = match variant {
            DiscVariant::Siamese => Some(disc.reference(&fr, Mode::Frozen).unwrap()),
            DiscVariant::StyleganT => None,
        };
        let sr: Vec<Vec<f64>> = disc
            .scores(targets.as_deref(), None, &real, Mode::Frozen)
            .unwrap()
            .iter()
            .map(vals)
            .collect();
        let sf: Vec<Vec<f64>> = disc
            .scores(targets.as_deref(), None, &fake, Mode::Frozen)
            .unwrap()
            .iter()
            .map(vals)
            .collect();
        // Eq. 9 / Eq. 8 per level: the mean over the level's scores (siamese: one per
        // sample; stylegan_t: one per token) of the hinge term, summed over levels.
        let mut d_hand = 0.0;
        let mut g_hand = 0.0;
        for i in 0..2 {
            let (nr, nf) = (sr[i].len() as f64, sf[i].len() as f64);
            d_hand += sr[i].iter().map(|r| (1.0 - r).max(0.0)).sum::<f64>() / nr;
            d_hand += sf[i].iter().map(|f| (1.0 + f).max(0.0)).sum::<f64>() / nf;
            g_hand -= sf[i].iter().sum::<f64>() / nf;
        }
        let (d, stats) = disc.d_loss(&fr, None, &real, &fake).unwrap();
        let (g, gstats) = disc.g_loss(&fr, None, &fake).unwrap();
        let (d, g) = (d.double_value(&[]), g.double_value(&[]));
        println!("{variant:?}: d {d} (hand {d_hand}), g {g} (hand {g_hand}), {stats:?}");
        assert!((d - d_hand).abs() < 1e-5 && (g - g_hand).abs() < 1e-5);
        assert!((gstats.loss - g).abs() < 1e-12);
        if variant == DiscVariant::StyleganT {
            // Unconditional heads: one logit per token, the head's one-channel output.
            let out = disc.heads()[1].forward(&fake[1], Mode::Frozen).unwrap();
            assert_eq!(out.size(), [3, 1, TOKENS[1]]);
            assert_eq!(sf[1], vals(&out));
            assert!(disc.dual_vs.variables().is_empty() && disc.predictors().is_empty());
            disc.ema_update(0.9).unwrap();
        } else {
            for s in sr.iter().chain(&sf).flatten() {
                assert!(
                    (-1.0 - 1e-6..=1.0 + 1e-6).contains(s),
                    "cosine score {s} out of range"
                );
            }
        }
    }
}

/// Real features are smooth along the tokens (one value per sample and channel plus
/// a little noise), fake ones are white noise. The batch normalisation removes any
/// difference in per-channel mean and scale between the (separately normalised)
/// real and fake batches, so the heads must learn the token structure. The siamese
/// heads see it through the per-sample comparison with the reference view; the
/// `stylegan_t` heads, which only see each batch normalised on its own, get almost
/// no signal from such a toy problem and are not tested for learning here.
fn smooth_feats(batch: i64) -> Vec<Tensor> {
    CHANNELS
        .iter()
        .zip(TOKENS)
        .map(|(&c, n)| {
            let base = Tensor::randn([batch, c, 1], (Kind::Float, Device::Cpu))
                .expand([batch, c, n], false);
            &base + base.randn_like() * 0.1
        })
        .collect()
}

#[test]
fn siamese_d_steps_learn_to_separate() {
    let variant = DiscVariant::Siamese;
    tch::manual_seed(7);
    let disc = Discriminator::new(Device::Cpu, &CHANNELS, &small_cfg(variant, true)).unwrap();
    let mut opt = nn::Adam::default().build(&disc.vs, 1e-2).unwrap();
    let mut history = Vec::new();
    for _ in 0..60 {
        let real_src = smooth_feats(8);
        let fr: Vec<Tensor> = real_src.iter().map(|t| t + t.randn_like() * 0.1).collect();
        let real: Vec<Tensor> = real_src.iter().map(|t| t + t.randn_like() * 0.1).collect();
        let (loss, stats) = disc.d_loss(&fr, None, &real, &feats(8, 0.0)).unwrap();
        opt.backward_step(&loss);
        disc.ema_update(0.9).unwrap();
        history.push(stats);
    }
    let avg = |s: &[adt::disc::siamese::DStats], f: fn(&adt::disc::siamese::DStats) -> f64| {
        s.iter().map(f).sum::<f64>() / s.len() as f64
    };
    let (first, last) = (&history[..5], &history[history.len() - 5..]);
    let (l0, l1) = (avg(first, |s| s.loss), avg(last, |s| s.loss));
    let (a0, a1) = (avg(first, |s| s.accuracy), avg(last, |s| s.accuracy));
    println!(
        "{variant:?}: loss {l0:.3} -> {l1:.3}, accuracy {a0:.3} -> {a1:.3}\n  last {:?}",
        history.last()
    );
    assert!(l1 < l0 - 0.5, "{variant:?}: D loss did not decrease enough");
    assert!(a1 > 0.9, "{variant:?}: accuracy {a1}");
}

#[test]
fn save_and_load_state_round_trip() {
    tch::manual_seed(8);
    let cfg = small_cfg(DiscVariant::Siamese, true);
    let disc = Discriminator::new(Device::Cpu, &CHANNELS, &cfg).unwrap();
    let (fr, f) = (feats(2, 0.0), feats(2, 1.0));
    let (loss, _) = disc.d_loss(&fr, None, &fr, &f).unwrap();
    let mut opt = nn::Sgd::default().build(&disc.vs, 1e-1).unwrap();
    opt.backward_step(&loss);
    disc.ema_update(0.5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    disc.save(dir.path()).unwrap();
    let mut other = Discriminator::new(Device::Cpu, &CHANNELS, &cfg).unwrap();
    other.load_state(dir.path()).unwrap();
    let score = |d: &Discriminator| {
        let t = d.reference(&fr, Mode::Eval).unwrap();
        d.scores(Some(&t), None, &f, Mode::Eval)
            .unwrap()
            .iter()
            .flat_map(vals)
            .collect::<Vec<_>>()
    };
    assert_eq!(score(&disc), score(&other));
    // Another architecture does not load.
    let mut wider = Discriminator::new(
        Device::Cpu,
        &CHANNELS,
        &DiscConfig {
            head_channels: Some(4),
            ..cfg
        },
    )
    .unwrap();
    let err = wider.load_state(dir.path()).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
}

// ---------------------------------------------------------------- DiffAugment

#[test]
fn diffaugment_policy_parsing() {
    assert_eq!(
        Policy::parse("color,translation,cutout").unwrap(),
        Policy::default()
    );
    assert!(Policy::parse("").unwrap().is_identity());
    let p = Policy::parse("translation").unwrap();
    assert!(p.translation && !p.color && !p.cutout);
    let err = Policy::parse("color,flip").unwrap_err().to_string();
    assert!(err.contains("flip"), "{err}");
    assert_eq!(Policy::default().max_shift(64, 32), (8, 4));
    assert_eq!(Policy::default().cutout_size(9, 8), (5, 4));
}

#[test]
fn diffaugment_translation_and_cutout_by_hand() {
    let (h, w) = (6i64, 8i64);
    let x = Tensor::arange(2 * h * w, (Kind::Double, Device::Cpu)).view([2, 1, h, w]) + 1.0;
    let xs = vals(&x);
    let px = |b: i64, i: i64, j: i64| xs[(b * h * w + i * w + j) as usize];
    let params = AugParams {
        brightness: None,
        saturation: None,
        contrast: None,
        translation: Some(vec![(1, -2), (0, 1)]),
        cutout: None,
        cutout_size: (0, 0),
    };
    let y = diffaug::apply(&x, &params).unwrap();
    assert_eq!(y.size(), x.size());
    let ys = vals(&y);
    for b in 0..2 {
        let (ty, tx) = params.translation.as_ref().unwrap()[b as usize];
        for i in 0..h {
            for j in 0..w {
                let (si, sj) = (i + ty, j + tx);
                let expected = if (0..h).contains(&si) && (0..w).contains(&sj) {
                    px(b, si, sj)
                } else {
                    0.0
                };
                assert_eq!(
                    ys[(b * h * w + i * w + j) as usize],
                    expected,
                    "translation b{b} ({i}, {j})"
                );
            }
        }
    }
    let params = AugParams {
        brightness: None,
        saturation: None,
        contrast: None,
        translation: None,
        cutout: Some(vec![(-1, 2), (4, 5)]),
        cutout_size: (3, 4),
    };
    let ys = vals(&diffaug::apply(&x, &params).unwrap());
    let mut zeros = [0, 0];
    for b in 0..2 {
        let (top, left) = params.cutout.as_ref().unwrap()[b as usize];
        for i in 0..h {
            for j in 0..w {
                let inside = i >= top && i < top + 3 && j >= left && j < left + 4;
                let v = ys[(b * h * w + i * w + j) as usize];
                assert_eq!(
                    v,
                    if inside { 0.0 } else { px(b, i, j) },
                    "cutout b{b} ({i}, {j})"
                );
                zeros[b as usize] += inside as usize;
            }
        }
    }
    // Clipped squares: rows 0..2 x cols 2..6, and rows 4..6 x cols 5..8.
    assert_eq!(zeros, [8, 6]);
    // Parameters for a different batch size are rejected.
    let bad = AugParams {
        cutout: Some(vec![(0, 0)]),
        ..params
    };
    assert!(diffaug::apply(&x, &bad).is_err());
}

#[test]
fn diffaugment_color_by_hand() {
    let x = Tensor::from_slice(&[0.2f64, -0.4, 0.6, 0.8, 0.0, -1.0, 0.5, 0.1]).view([1, 2, 2, 2]);
    let params = AugParams {
        brightness: Some(vec![0.3]),
        saturation: Some(vec![1.5]),
        contrast: Some(vec![0.7]),
        translation: None,
        cutout: None,
        cutout_size: (0, 0),
    };
    let y = vals(&diffaug::apply(&x, &params).unwrap());
    let mut v: Vec<f64> = vals(&x).iter().map(|a| a + 0.3).collect();
    for p in 0..4 {
        let m = (v[p] + v[4 + p]) / 2.0;
        v[p] = (v[p] - m) * 1.5 + m;
        v[4 + p] = (v[4 + p] - m) * 1.5 + m;
    }
    let m = v.iter().sum::<f64>() / 8.0;
    let v: Vec<f64> = v.iter().map(|a| (a - m) * 0.7 + m).collect();
    for (a, b) in y.iter().zip(&v) {
        assert!((a - b).abs() < 1e-12, "{y:?} vs {v:?}");
    }
}

#[test]
fn diffaugment_sampling_ranges_and_seeding() {
    let policy = Policy::default();
    tch::manual_seed(11);
    let p = AugParams::sample(&policy, 400, 16, 16);
    let br = p.brightness.as_ref().unwrap();
    assert!(
        br.iter().all(|v| (-0.5..0.5).contains(v))
            && br.iter().any(|v| *v < -0.4)
            && br.iter().any(|v| *v > 0.4)
    );
    assert!(p
        .saturation
        .as_ref()
        .unwrap()
        .iter()
        .all(|v| (0.0..2.0).contains(v)));
    assert!(p
        .contrast
        .as_ref()
        .unwrap()
        .iter()
        .all(|v| (0.5..1.5).contains(v)));
    let t = p.translation.as_ref().unwrap();
    assert!(t.iter().all(|&(a, b)| a.abs() <= 2 && b.abs() <= 2));
    assert!(t.iter().any(|&(a, _)| a == -2) && t.iter().any(|&(_, b)| b == 2));
    assert_eq!(p.cutout_size, (8, 8));
    // Even size: centres 0..=16, top-left = centre - 4.
    assert!(p
        .cutout
        .as_ref()
        .unwrap()
        .iter()
        .all(|&(a, b)| (-4..=12).contains(&a) && (-4..=12).contains(&b)));
    let x = Tensor::rand([3, 3, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    tch::manual_seed(12);
    let a = diffaug::diff_augment(&x, &policy).unwrap();
    tch::manual_seed(12);
    let b = diffaug::diff_augment(&x, &policy).unwrap();
    let c = diffaug::diff_augment(&x, &policy).unwrap();
    assert_eq!(a.size(), x.size());
    assert!(same(&a, &b) && !same(&a, &c));
    // Per-sample parameters: the same image twice in a batch is augmented differently.
    let twice = Tensor::cat(&[x.narrow(0, 0, 1), x.narrow(0, 0, 1)], 0);
    let y = diffaug::diff_augment(&twice, &policy).unwrap();
    assert!(!same(&y.get(0), &y.get(1)));
    assert!(diffaug::diff_augment(&x.get(0), &policy).is_err());
}

#[test]
fn diffaugment_gradcheck() {
    let policy = Policy::default();
    let x = (Tensor::rand([2, 3, 8, 8], (Kind::Double, Device::Cpu)) * 2.0 - 1.0)
        .set_requires_grad(true);
    let weights = Tensor::randn([2, 3, 8, 8], (Kind::Double, Device::Cpu));
    // The random parameters are drawn once: other tests running in parallel share
    // libtorch's global generator, so re-seeding it per evaluation would race.
    tch::manual_seed(21);
    let params = diffaug::AugParams::sample(&policy, 2, 8, 8);
    let f = |x: &Tensor| -> Tensor {
        (diffaug::apply(x, &params).unwrap() * &weights).sum(Kind::Double)
    };
    f(&x).backward();
    let grad = vals(&x.grad());
    let base = x.detach().copy();
    let mut worst: f64 = 0.0;
    let n = grad.len();
    for (idx, &g) in grad.iter().enumerate() {
        let at = |h: f64| {
            let t = base.copy();
            let _ = t.view([-1]).get(idx as i64).g_add_scalar_(h);
            tch::no_grad(|| f(&t).double_value(&[]))
        };
        let h = 1e-6;
        let fd = (at(h) - at(-h)) / (2.0 * h);
        let err = (fd - g).abs();
        worst = worst.max(err);
        assert!(
            err < 1e-6 * (1.0 + g.abs()),
            "index {idx}: autograd {g} vs finite differences {fd}"
        );
    }
    println!("DiffAugment gradcheck over {n} inputs: worst abs error {worst:e}");
    assert!(grad.iter().any(|g| g.abs() > 1e-3));
}

/// A shared colour draw gives two views of the same images the same colour transform
/// (`apply` with the drawn parameters), cutout stays the view's own; without it each view
/// has its own colour draw.
#[test]
fn diffaugment_with_a_shared_colour_draw() {
    tch::manual_seed(5);
    let x = Tensor::rand([6, 3, 8, 8], (Kind::Double, tch::Device::Cpu)) * 2.0 - 1.0;
    let policy = Policy::default();
    let color = AugParams::sample(&policy.color_only(), 6, 8, 8);
    assert!(color.translation.is_none() && color.cutout.is_none());
    let by_hand = diffaug::apply(&x, &color).unwrap();
    let only_color = Policy::parse("color").unwrap();
    let a = diffaug::diff_augment_with_color(&x, &only_color, Some(&color)).unwrap();
    let b = diffaug::diff_augment_with_color(&x, &only_color, Some(&color)).unwrap();
    assert!(same(&a, &by_hand) && same(&b, &by_hand));
    // Without translation (cutout only), unmasked pixels are the shared transform's.
    let cut = Policy::parse("color,cutout").unwrap();
    let d = diffaug::diff_augment_with_color(&x, &cut, Some(&color)).unwrap();
    let m = d.ne(0.0);
    assert!(same(&(&by_hand * &m), &d));
    assert!(m.logical_not().any().int64_value(&[]) == 1);
    // Independent draws (None) differ between views.
    let e = diffaug::diff_augment_with_color(&x, &only_color, None).unwrap();
    let f = diffaug::diff_augment_with_color(&x, &only_color, None).unwrap();
    assert!(!same(&e, &f));
}
