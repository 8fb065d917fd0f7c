//! The training options that shrink the training state: a bfloat16 LoRA base
//! (`train.base_dtype`), frozen networks in half precision (`model.frozen_dtype`) and
//! text encoders on the host (`model.text_device`), on tiny random models.

mod common;

use adt::models::lora::LoraSpec;
use adt::models::pipeline::{Pipeline, RandomSpec, TextStack};
use adt::train::adt::build_features;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

const SD3: [&str; 3] = [
    "model.path=\"tiny-random-sd3\"",
    "sampler.kind=\"flow\"",
    "sampler.steps=4",
];

/// A tiny LoRA run; `extra` settings on top. Returns the trainer and its losses
/// (loss_d, loss_g_adv, loss_diff of every iteration that has them).
fn lora_run(extra: &[&str]) -> (adt::train::adt::Trainer, Vec<(String, f64)>) {
    let dir = tempfile::tempdir().unwrap();
    let mut o = vec![
        "train.iterations=6",
        "train.h=2",
        "train.warmup_g=1",
        "train.warmup_d=1",
        "train.lr_g=1e-3",
        "train.lora={ rank = 2, alpha = 4.0 }",
        "output.checkpoint_every=0",
    ];
    o.extend_from_slice(extra);
    let cfg = common::tiny_config(dir.path(), &o);
    let tr = common::run_quiet(cfg).unwrap();
    let mut losses = Vec::new();
    for (i, m) in common::read_metrics(dir.path()).iter().enumerate() {
        for k in ["loss_d", "loss_g_adv", "loss_diff"] {
            if let Some(v) = m.get(k).and_then(|v| v.as_f64()) {
                losses.push((format!("step {i} {k}"), v));
            }
        }
    }
    (tr, losses)
}

fn tiny_pipeline(extra: &[&str], seed: i64) -> Pipeline {
    if extra.contains(&SD3[0]) {
        Pipeline::random(&RandomSpec::tiny_sd3().unwrap(), Device::Cpu, seed).unwrap()
    } else {
        Pipeline::tiny_random(Device::Cpu, seed).unwrap()
    }
}

/// With `train.base_dtype = "bf16"`: the base is stored once in bfloat16 (no
/// trajectory copy even with `train.bf16_trajectory`), the adapters are float32 and
/// the only optimised variables, the base is unchanged, and the losses stay within
/// 2 % (of the largest loss value) of the float32 run's over 6 iterations.
fn bf16_base(extra: &[&str]) {
    let _g = common::lock();
    let mut fp32_opts = extra.to_vec();
    fp32_opts.push("train.base_dtype=\"fp32\"");
    let (tr32, l32) = lora_run(&fp32_opts);
    let mut bf16_opts = extra.to_vec();
    bf16_opts.extend(["train.base_dtype=\"bf16\"", "train.bf16_trajectory=true"]);
    let (tr, l16) = lora_run(&bf16_opts);
    assert!(
        tr.fast.is_none() && tr.fast_sd3.is_none(),
        "a trajectory copy was made"
    );
    let fresh = tiny_pipeline(extra, tr.cfg.train.seed as i64);
    let fresh: HashMap<String, Tensor> = fresh.backbone_vs().variables();
    let vars = tr.pipe.backbone_vs().variables();
    let mut n_adapters = 0;
    for (k, t) in &vars {
        if k.contains(".lora_") {
            assert_eq!(t.kind(), Kind::Float, "adapter {k}");
            assert!(t.requires_grad(), "adapter {k} is frozen");
            n_adapters += 1;
        } else {
            assert_eq!(t.kind(), Kind::BFloat16, "base weight {k}");
            assert!(!t.requires_grad(), "base weight {k} is trainable");
            assert!(
                t.equal(&fresh[k].to_kind(Kind::BFloat16)),
                "base weight {k} changed"
            );
        }
    }
    assert!(n_adapters > 0);
    assert_eq!(tr.opt_g.params().len(), n_adapters);
    let moved = tr
        .pipe
        .lora_slots()
        .adapters()
        .iter()
        .filter(|(_, _, b)| b.abs().max().double_value(&[]) > 0.0)
        .count();
    assert!(moved > 0, "no lora_B moved");
    // The float32 run had no trajectory copy either (bf16_trajectory off).
    assert!(tr32.fast.is_none() && tr32.fast_sd3.is_none());
    assert_eq!(
        l32.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        l16.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    let scale = l32.iter().map(|(_, v)| v.abs()).fold(1e-3, f64::max);
    let mut worst = (String::new(), 0.0);
    for ((k, a), (_, b)) in l32.iter().zip(&l16) {
        assert!(b.is_finite(), "{k}: {b}");
        let d = (a - b).abs() / scale;
        if d > worst.1 {
            worst = (k.clone(), d);
        }
    }
    println!(
        "bf16 base vs fp32 base: {} loss values, largest difference {:.3e} of the largest loss ({})",
        l32.len(),
        worst.1,
        worst.0
    );
    assert!(worst.1 < 0.02, "{}: {:.3e}", worst.0, worst.1);
    assert!(
        worst.1 > 0.0,
        "the bf16 run gave the float32 losses exactly"
    );
}

#[test]
fn bf16_base_unet_lora() {
    bf16_base(&[]);
}

#[test]
fn bf16_base_sd3_lora() {
    bf16_base(&SD3);
}

/// The LoRA forward and backward on a bfloat16 base: same adapters, the adapter
/// gradient of a loss on the backbone output agrees with the float32 base's
/// (UNet: cosine > 0.999 over all adapters, > 0.95 for each tensor, norms within 2 %;
/// MMDiT: 0.95, 0.9, 10 %), the output stays float32 and within 5 %.
#[test]
fn bf16_base_adapter_gradients_match_fp32() {
    let _g = common::lock();
    for sd3 in [false, true] {
        let extra: &[&str] = if sd3 { &SD3 } else { &[] };
        let spec = LoraSpec {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: adt::models::lora::default_targets(),
        };
        let grads = |bf16: bool| {
            let mut p = tiny_pipeline(extra, 3);
            tch::manual_seed(11);
            p.attach_lora(&spec).unwrap();
            tch::no_grad(|| {
                for (_, _, mut b) in p.lora_slots().adapters() {
                    let r = b.randn_like() * 0.1;
                    b.copy_(&r);
                }
            });
            if bf16 {
                assert!(p.set_base_kind(Kind::BFloat16) > 0);
            }
            tch::manual_seed(12);
            let caps = vec!["a red circle".to_string(), "a blue square".to_string()];
            let (cond, _) = p.encode_text(&caps, None).unwrap();
            let c = p.latent_channels();
            let x = Tensor::randn([2, c, 8, 8], (Kind::Float, Device::Cpu));
            let t = Tensor::from_slice(&[500.0f32, 200.0]);
            let out = p.denoiser().predict(&x, &t, &cond).unwrap();
            assert_eq!(out.kind(), Kind::Float);
            let w = out.randn_like();
            (&out * &w).sum(Kind::Float).backward();
            let g: Vec<(String, Tensor, Tensor)> = p
                .lora_slots()
                .adapters()
                .into_iter()
                .map(|(k, a, b)| (k, a.grad().copy(), b.grad().copy()))
                .collect();
            (out.detach(), g)
        };
        let (o32, g32) = grads(false);
        let (o16, g16) = grads(true);
        let rel = (&o16 - &o32).norm().double_value(&[]) / o32.norm().double_value(&[]);
        assert!(rel < 0.05 && rel > 0.0, "sd3 {sd3}: output rel diff {rel}");
        let mut worst: f64 = 1.0;
        let (mut all32, mut all16) = (Vec::new(), Vec::new());
        for ((k, a32, b32), (_, a16, b16)) in g32.iter().zip(&g16) {
            for (x, y) in [(a32, a16), (b32, b16)] {
                assert_eq!(y.kind(), Kind::Float, "{k}");
                let cos = (x * y).sum(Kind::Double).double_value(&[])
                    / (x.norm().double_value(&[]) * y.norm().double_value(&[]) + 1e-30);
                worst = worst.min(cos);
                all32.push(x.flatten(0, -1));
                all16.push(y.flatten(0, -1));
            }
        }
        let (x, y) = (Tensor::cat(&all32, 0), Tensor::cat(&all16, 0));
        let (nx, ny) = (x.norm().double_value(&[]), y.norm().double_value(&[]));
        let cos = (&x * &y).sum(Kind::Double).double_value(&[]) / (nx * ny);
        println!(
            "sd3 {sd3}: output rel diff {rel:.2e}; adapter gradients: cosine {cos:.5} \
             (worst tensor {worst:.5}), norm ratio {:.4}",
            ny / nx
        );
        // The tiny MMDiT is more sensitive to bfloat16 rounding than the tiny UNet
        // (without adapters, bf16 weights and compute move its output by 2.4 %
        // against the UNet's 1.5 %).
        let (min_cos, min_worst, max_norm) = if sd3 {
            (0.95, 0.9, 0.1)
        } else {
            (0.999, 0.95, 0.02)
        };
        assert!(cos > min_cos, "sd3 {sd3}: adapter gradient cosine {cos}");
        assert!(
            worst > min_worst,
            "sd3 {sd3}: worst adapter tensor cosine {worst}"
        );
        assert!(
            (ny / nx - 1.0).abs() < max_norm,
            "sd3 {sd3}: norm ratio {}",
            ny / nx
        );
    }
}

fn text_stores(p: &Pipeline) -> Vec<&tch::nn::VarStore> {
    match &p.text {
        TextStack::Clip(v) => v.iter().map(|t| &t.encoder.vs).collect(),
        TextStack::Sd3(s) => {
            let mut v = vec![&s.clip_l.encoder.vs, &s.clip_g.encoder.vs];
            v.extend(s.t5.as_ref().map(|t| &t.encoder.vs));
            v
        }
    }
}

fn all_kinds(vs: &tch::nn::VarStore) -> Vec<Kind> {
    let mut k: Vec<Kind> = vs.variables().values().map(|t| t.kind()).collect();
    k.dedup();
    k
}

/// `model.frozen_dtype`: the VAE, the text encoders and the feature network hold
/// weights of that dtype, compute in it (outputs differ slightly from float32's but
/// come back float32), and a training run with bf16 frozen networks stays within 2 %
/// of the float32 run's losses.
#[test]
fn frozen_networks_in_half_precision() {
    let _g = common::lock();
    for (name, kind) in [("bf16", Kind::BFloat16), ("fp16", Kind::Half)] {
        for extra in [&[][..], &SD3[..]] {
            let dir = tempfile::tempdir().unwrap();
            let mut o = vec![format!("model.frozen_dtype=\"{name}\"")];
            o.extend(extra.iter().map(|s| s.to_string()));
            let o: Vec<&str> = o.iter().map(String::as_str).collect();
            let cfg = common::tiny_config(dir.path(), &o);
            let tr = adt::train::adt::Trainer::with_parts(
                cfg.clone(),
                tiny_pipeline(extra, 1),
                Some(build_features(&cfg, Device::Cpu, true).unwrap()),
            )
            .unwrap();
            let vae = tr.pipe.vae.as_ref().unwrap();
            assert_eq!(all_kinds(&vae.vs), vec![kind], "VAE");
            for vs in text_stores(&tr.pipe) {
                assert_eq!(all_kinds(vs), vec![kind], "text encoder");
            }
            // The backbone stays float32.
            assert_eq!(tr.pipe.kind(), Kind::Float);
            // Against the same networks in float32.
            let ref32 = tiny_pipeline(extra, 1);
            tch::manual_seed(4);
            let images = Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
            let (z, z32) = (
                tr.pipe.to_latents(&images).unwrap(),
                ref32.to_latents(&images).unwrap(),
            );
            assert_eq!(z.kind(), Kind::Float);
            let rel = |a: &Tensor, b: &Tensor| {
                (a - b).norm().double_value(&[]) / b.norm().double_value(&[])
            };
            let d = rel(&z, &z32);
            assert!(d > 0.0 && d < 0.05, "{name} VAE encode: rel diff {d}");
            let x = tr.pipe.to_images(&z32).unwrap();
            let d = rel(&x, &ref32.to_images(&z32).unwrap());
            assert!(
                x.kind() == Kind::Float && d > 0.0 && d < 0.05,
                "{name} VAE decode: {d}"
            );
            let caps = vec!["a red circle".to_string(), String::new()];
            let (c, _) = tr.pipe.encode_text(&caps, None).unwrap();
            let (c32, _) = ref32.encode_text(&caps, None).unwrap();
            let d = rel(&c.context, &c32.context);
            assert!(
                c.context.kind() == Kind::Float && d > 0.0 && d < 0.05,
                "{name} text: {d}"
            );
            // The feature network.
            let mut cfg32 = cfg.clone();
            cfg32.model.frozen_dtype = Default::default();
            tch::manual_seed(9);
            let f = build_features(&cfg, Device::Cpu, true).unwrap();
            tch::manual_seed(9);
            let f32n = build_features(&cfg32, Device::Cpu, true).unwrap();
            for (a, b) in f.features(&images).iter().zip(f32n.features(&images)) {
                let d = rel(a, &b);
                assert!(
                    a.kind() == Kind::Float && d > 0.0 && d < 0.05,
                    "{name} features: {d}"
                );
            }
        }
    }
    // A short run with bf16 frozen networks.
    let run = |frozen: &str| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = common::tiny_config(
            dir.path(),
            &[
                "train.iterations=4",
                "train.warmup_g=1",
                "train.warmup_d=1",
                "output.checkpoint_every=0",
                &format!("model.frozen_dtype=\"{frozen}\""),
            ],
        );
        common::run_quiet(cfg).unwrap();
        common::read_metrics(dir.path())
            .iter()
            .flat_map(|m| {
                ["loss_d", "loss_g_adv", "loss_diff"]
                    .into_iter()
                    .filter_map(|k| m.get(k).and_then(|v| v.as_f64()))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<f64>>()
    };
    let (a, b) = (run("fp32"), run("bf16"));
    assert_eq!(a.len(), b.len());
    let scale = a.iter().map(|v| v.abs()).fold(1e-3, f64::max);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / scale)
        .fold(0.0, f64::max);
    println!(
        "bf16 frozen networks vs fp32: largest loss difference {worst:.3e} of the largest loss"
    );
    assert!(worst < 0.02 && worst > 0.0, "{worst}");
}

/// `model.text_device = "cpu"`: the text encoders live on the host and the
/// conditioning they give is on the training device and equals the on-device
/// encoders' (here both are the CPU: this machine has no accelerator, so only the
/// placement and the result are checked, not a transfer).
#[test]
fn text_encoders_on_the_host() {
    let _g = common::lock();
    for extra in [&[][..], &SD3[..]] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = vec!["model.text_device=\"cpu\""];
        o.extend_from_slice(extra);
        let cfg = common::tiny_config(dir.path(), &o);
        assert_eq!(cfg.text_device(), Device::Cpu);
        let mut p = tiny_pipeline(extra, 2);
        let caps = vec!["a green square".to_string(), String::new()];
        let (c0, _) = p.encode_text(&caps, None).unwrap();
        p.place_frozen(None, cfg.text_device());
        assert_eq!(p.text_device(), Device::Cpu);
        for vs in text_stores(&p) {
            assert!(vs.variables().values().all(|t| t.device() == Device::Cpu));
        }
        let (c1, _) = p.encode_text(&caps, None).unwrap();
        assert_eq!(c1.context.device(), p.device);
        assert!(c1.context.equal(&c0.context));
    }
}

/// A LoRA run with a bfloat16 base and bfloat16 frozen networks, stopped at a
/// checkpoint and resumed, ends in the state of the uninterrupted run, bit for bit.
#[test]
fn bf16_base_run_resumes_bit_for_bit() {
    let _g = common::lock();
    tch::set_num_threads(1);
    let over = [
        "train.iterations=6",
        "train.h=2",
        "train.warmup_g=1",
        "train.lr_g=1e-2",
        "train.lora={ rank = 2 }",
        "train.base_dtype=\"bf16\"",
        "model.frozen_dtype=\"bf16\"",
        "output.checkpoint_every=3",
    ];
    let (_, tr) = common::whole_and_resumed(&over);
    assert!(tr
        .pipe
        .backbone_vs()
        .variables()
        .iter()
        .all(|(k, t)| k.contains(".lora_") || t.kind() == Kind::BFloat16));
}

/// The options on a pipeline read from a diffusers folder (and DINOv2 read from a
/// transformers folder, in bfloat16): the UNet is read straight
/// into bfloat16 (adapters float32), the VAE and the text encoder in bfloat16 with the
/// encoder on the host, no trajectory copy, and two iterations give a finite
/// generator loss and move the adapters.
#[test]
fn options_on_a_pipeline_folder() {
    let _g = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    Pipeline::tiny_random(Device::Cpu, 7)
        .unwrap()
        .save(&model)
        .unwrap();
    let path = format!("model.path={:?}", model.display().to_string());
    // The DINOv2 fixture (a small transformers Dinov2Model, 4 layers) as features.
    let dino = format!(
        "disc.features_path={:?}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dinov2")
    );
    let cfg = common::tiny_config(
        &dir.path().join("out"),
        &[
            &path,
            &dino,
            "disc.blocks=[0, 1, 2, 3]",
            "train.lora={ rank = 2 }",
            "train.base_dtype=\"bf16\"",
            "train.bf16_trajectory=true",
            "train.warmup_g=1",
            "train.warmup_d=1",
            "train.h=1",
            "train.iterations=2",
            "output.checkpoint_every=0",
            "model.frozen_dtype=\"bf16\"",
            "model.text_device=\"cpu\"",
        ],
    );
    let tr = common::run_quiet(cfg).unwrap();
    assert!(tr.fast.is_none() && tr.fast_sd3.is_none());
    for (k, t) in tr.pipe.backbone_vs().variables() {
        let want = if k.contains(".lora_") {
            Kind::Float
        } else {
            Kind::BFloat16
        };
        assert_eq!(t.kind(), want, "{k}");
    }
    assert_eq!(
        all_kinds(&tr.pipe.vae.as_ref().unwrap().vs),
        vec![Kind::BFloat16]
    );
    assert_eq!(tr.pipe.text_device(), Device::Cpu);
    for vs in text_stores(&tr.pipe) {
        assert_eq!(all_kinds(vs), vec![Kind::BFloat16]);
        assert_eq!(vs.device(), Device::Cpu);
    }
    let m = common::read_metrics(&dir.path().join("out"));
    let g = m.last().unwrap()["loss_g_adv"]
        .as_f64()
        .expect("a generator step");
    assert!(g.is_finite());
    assert!(tr.pipe.lora_slots().adapters().iter().any(|(_, _, b)| b
        .abs()
        .max()
        .double_value(&[])
        > 0.0));
}

/// Gradient checkpointing on a bfloat16 base with bfloat16 frozen networks: the
/// recomputed blocks (float32 adapters on the bfloat16 base, the bfloat16 VAE
/// decoder) give the losses of the run without it exactly and its adapter gradient up
/// to the order in which bfloat16 gradients are summed. Measured: 9.8e-3 of the
/// gradient's norm (8.5e-3 with float32 frozen networks); with a float32 base the same
/// comparison gives 4.6e-7, and bfloat16's rounding is 2^16 times coarser. Allowed: 3 %.
#[test]
fn bf16_base_with_gradient_checkpointing() {
    use adt::models::checkpoint::{available, checkpointed_total};
    if !available() {
        eprintln!("skipped: this build has no checkpoint shim (build with LIBTORCH set)");
        return;
    }
    let _g = common::lock();
    tch::set_num_threads(1);
    let mut per_mode = Vec::new();
    for ckpt in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let g = format!("train.gradient_checkpointing={ckpt}");
        let cfg = common::tiny_config(
            dir.path(),
            &[
                &g,
                "train.h=1",
                "train.k=2",
                "sampler.steps=6",
                "train.lora={ rank = 2, alpha = 4.0 }",
                "train.base_dtype=\"bf16\"",
                "model.frozen_dtype=\"bf16\"",
            ],
        );
        tch::manual_seed(11);
        let features = build_features(&cfg, Device::Cpu, true).unwrap();
        let pipe = Pipeline::tiny_random(Device::Cpu, 3).unwrap();
        tch::manual_seed(12);
        let mut tr = adt::train::adt::Trainer::with_parts(cfg, pipe, Some(features)).unwrap();
        tch::manual_seed(3);
        for (_, _, b) in tr.pipe.lora_slots().adapters() {
            let mut b = b.shallow_clone();
            tch::no_grad(|| b.copy_(&(b.randn_like() * 0.1)));
        }
        tr.force_start = Some(1);
        tch::manual_seed(5);
        let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu)).tanh();
        let captions = vec!["a red circle".to_string(), "a blue square".to_string()];
        let ids = Tensor::zeros([2, 6], (Kind::Float, Device::Cpu));
        let before = checkpointed_total();
        let log = tr.iteration_on(&images, &captions, &ids).unwrap();
        assert_eq!(checkpointed_total() > before, ckpt);
        let grads: Vec<Tensor> = tr
            .pipe
            .lora_slots()
            .adapters()
            .iter()
            .flat_map(|(_, a, b)| [a.grad().flatten(0, -1), b.grad().flatten(0, -1)])
            .collect();
        per_mode.push((Tensor::cat(&grads, 0), log));
    }
    let ((g0, l0), (g1, l1)) = (&per_mode[0], &per_mode[1]);
    assert_eq!(l0.loss_d, l1.loss_d);
    assert_eq!(l0.loss_g_adv, l1.loss_g_adv);
    let rel = (g1 - g0).norm().double_value(&[]) / g0.norm().double_value(&[]);
    println!("bf16 base: checkpointing vs not, adapter gradient rel diff {rel:.2e}");
    assert!(rel < 0.03, "{rel:e}");
}
