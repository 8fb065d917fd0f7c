//! LoRA: adapters made by diffusers / PEFT load in adt and give diffusers' UNet output;
//! adt's adapters have the same names and shapes; merging equals the run-time adapter;
//! a LoRA training run changes only the adapters.

mod common;

use adt::models::lora::{self, LoraFile, LoraSpec};
use adt::models::pipeline::Pipeline;
use adt::models::unet::LoadedUNet;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn io() -> HashMap<String, Tensor> {
    adt::weights::read_safetensors(&fixture("lora_sd15/io.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn unet_out(unet: &LoadedUNet, io: &HashMap<String, Tensor>) -> Tensor {
    tch::no_grad(|| {
        unet.model.forward(
            &io["lora.in.sample"],
            &io["lora.in.timestep"],
            &io["lora.in.encoder_hidden_states"],
            None,
        )
    })
    .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn load_unet() -> LoadedUNet {
    LoadedUNet::load(&fixture("unet_sd15"), Device::Cpu, Kind::Float).unwrap()
}

const TOL: f64 = 1e-5;

#[test]
fn diffusers_lora_gives_diffusers_output() {
    let io = io();
    let unet = load_unet();
    let file = LoraFile::load(&fixture("lora_sd15"), "unet").unwrap();
    assert_eq!((file.rank, file.alpha), (4, 8.0));
    let base = unet_out(&unet, &io);
    let d_base = max_abs(&base, &io["base.out.sample"]);
    let lora_effect = max_abs(&io["lora.out.sample"], &io["base.out.sample"]);
    println!("base vs diffusers {d_base:.2e}; effect of the LoRA {lora_effect:.2e}");
    assert!(d_base < TOL);
    assert!(
        lora_effect > 100.0 * TOL,
        "the fixture's LoRA is too weak to test"
    );

    // At run time, scale 1 and 0.5 (diffusers' set_adapters weight).
    unet.model.lora.attach_file(&file, 1.0).unwrap();
    let d1 = max_abs(&unet_out(&unet, &io), &io["lora.out.sample"]);
    unet.model.lora.attach_file(&file, 0.5).unwrap();
    let dh = max_abs(&unet_out(&unet, &io), &io["lora_half.out.sample"]);
    unet.model.lora.detach_all();
    let d0 = max_abs(&unet_out(&unet, &io), &io["base.out.sample"]);
    println!(
        "run-time adapter vs diffusers: scale 1 {d1:.2e}, scale 0.5 {dh:.2e}, detached {d0:.2e}"
    );
    assert!(d1 < TOL && dh < TOL && d0 < TOL);

    // Merged into the weights (what adt sample --lora and adt merge-lora do).
    unet.model.lora.merge_file(&file, 1.0).unwrap();
    let dm = max_abs(&unet_out(&unet, &io), &io["lora.out.sample"]);
    println!("merged vs diffusers {dm:.2e}");
    assert!(dm < TOL);
}

#[test]
fn merge_equals_runtime_adapter_including_feed_forward() {
    let _g = common::lock();
    tch::manual_seed(3);
    let io = io();
    let unet = load_unet();
    let spec = LoraSpec {
        rank: 3,
        alpha: 5.0,
        dropout: 0.0,
        targets: vec![
            "to_q".into(),
            "to_out.0".into(),
            "ff.net.0.proj".into(),
            "ff.net.2".into(),
        ],
    };
    let names = unet.model.lora.attach_new(&unet.vs.root(), &spec).unwrap();
    assert!(names.iter().any(|n| n.ends_with("ff.net.2")));
    // B starts at zero (PEFT's initialisation): randomise it so the adapter matters.
    tch::no_grad(|| {
        for (_, _, b) in unet.model.lora.adapters() {
            let mut b = b;
            b.copy_(&(Tensor::randn_like(&b) * 0.1));
        }
    });
    let runtime = unet_out(&unet, &io);
    let dir = tempfile::tempdir().unwrap();
    lora::save_peft(&unet.model.lora, &spec, "unet", dir.path()).unwrap();
    let file = LoraFile::load(dir.path(), "unet").unwrap();
    assert_eq!(file.alpha, 5.0);
    assert_eq!(file.modules.len(), names.len());

    let merged = load_unet();
    let before = unet_out(&merged, &io);
    assert!(
        max_abs(&before, &runtime) > 1e-3,
        "the adapters changed nothing"
    );
    merged.model.lora.merge_file(&file, 1.0).unwrap();
    let d = max_abs(&unet_out(&merged, &io), &runtime);
    println!("merged vs run-time adapters: {d:.2e}");
    assert!(d < TOL);
}

/// Names and shapes of the tensors of a LoRA file, and its rank / alpha metadata.
fn layout(path: &Path) -> (BTreeMap<String, Vec<usize>>, serde_json::Value) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let shapes = header
        .tensors()
        .into_iter()
        .map(|(k, info)| (k, info.shape.clone()))
        .collect();
    let meta: serde_json::Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()[lora::METADATA_KEY]).unwrap();
    (shapes, meta)
}

#[test]
fn saved_adapters_have_the_names_and_shapes_of_the_peft_fixture() {
    let unet = load_unet();
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: lora::default_targets(),
    };
    unet.model.lora.attach_new(&unet.vs.root(), &spec).unwrap();
    let dir = tempfile::tempdir().unwrap();
    lora::save_peft(&unet.model.lora, &spec, "unet", dir.path()).unwrap();
    let (ours, our_meta) = layout(&dir.path().join(lora::LORA_FILE));
    let (theirs, their_meta) = layout(&fixture("lora_sd15").join(lora::LORA_FILE));
    assert_eq!(ours.len(), 160);
    assert_eq!(ours, theirs);
    for k in [
        "unet.r",
        "unet.lora_alpha",
        "unet.lora_dropout",
        "unet.peft_type",
        "unet.use_rslora",
    ] {
        assert_eq!(our_meta[k], their_meta[k], "metadata {k}");
    }
    let mut t1: Vec<String> =
        serde_json::from_value(our_meta["unet.target_modules"].clone()).unwrap();
    let mut t2: Vec<String> =
        serde_json::from_value(their_meta["unet.target_modules"].clone()).unwrap();
    t1.sort();
    t2.sort();
    assert_eq!(t1, t2);
}

#[test]
fn bad_targets_and_files_are_named() {
    let unet = load_unet();
    let spec = LoraSpec {
        rank: 4,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec!["conv_in".into()],
    };
    let e = unet
        .model
        .lora
        .attach_new(&unet.vs.root(), &spec)
        .unwrap_err();
    assert!(e.to_string().contains("\"conv_in\""), "{e}");
    let e = LoraFile::load(&fixture("lora_sd15"), "transformer").unwrap_err();
    assert!(
        format!("{e:#}").contains("transformer.") && format!("{e:#}").contains("lora_sd15"),
        "{e:#}"
    );
}

/// A tiny LoRA training run (with the bf16 trajectory copy): the base weights are
/// bit-identical to a fresh copy of the model afterwards, only adapters were optimised,
/// and they moved; the output is the adapter file.
fn lora_training_run(
    extra: &[&str],
    base: impl Fn(&adt::train::config::Config) -> Pipeline,
    prefix: &str,
) {
    let _g = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let mut o = vec![
        "train.iterations=6",
        "train.h=2",
        "train.warmup_g=1",
        "train.warmup_d=1",
        "train.lr_g=1e-2",
        "train.bf16_trajectory=true",
        "train.lora={ rank = 2, alpha = 4.0 }",
        "output.checkpoint_every=0",
    ];
    o.extend_from_slice(extra);
    let cfg = common::tiny_config(dir.path(), &o);
    let before = common::sorted_vars(base(&cfg).backbone_vs());
    let tr = common::run_quiet(cfg).unwrap();
    let after: HashMap<String, Tensor> = tr.pipe.backbone_vs().variables();
    let adapters: Vec<&String> = after.keys().filter(|k| k.contains(".lora_")).collect();
    assert!(!adapters.is_empty());
    assert_eq!(after.len(), before.len() + adapters.len());
    for (k, t) in &before {
        assert!(t.equal(&after[k]), "base weight {k} changed");
        assert!(!after[k].requires_grad(), "base weight {k} is trainable");
    }
    // Only the adapters are in the optimiser, and training moved them.
    assert_eq!(tr.opt_g.params().len(), adapters.len());
    let moved = tr
        .pipe
        .lora_slots()
        .adapters()
        .iter()
        .filter(|(_, _, b)| b.abs().max().double_value(&[]) > 0.0)
        .count();
    assert!(moved > 0, "no lora_B left its zero initialisation");
    // The run's output is the adapter file, loadable as a diffusers LoRA.
    let file = LoraFile::load(&dir.path().join("final"), prefix).unwrap();
    assert_eq!(file.modules.len() * 2, adapters.len());
    assert_eq!((file.rank, file.alpha), (2, 4.0));
}

#[test]
fn lora_training_changes_only_the_adapters() {
    lora_training_run(
        &[],
        |cfg| Pipeline::tiny_random(Device::Cpu, cfg.train.seed as i64).unwrap(),
        "unet",
    );
}

#[test]
fn sd3_lora_training_changes_only_the_adapters() {
    use adt::models::pipeline::RandomSpec;
    lora_training_run(
        &[
            "model.path=\"tiny-random-sd3\"",
            "sampler.kind=\"flow\"",
            "sampler.steps=4",
        ],
        |cfg| {
            let mut spec = RandomSpec::tiny_sd3().unwrap();
            if let RandomSpec::Sd3(s) = &mut spec {
                s.with_t5 = cfg.model.use_t5;
            }
            Pipeline::random(&spec, Device::Cpu, cfg.train.seed as i64).unwrap()
        },
        "transformer",
    );
}

#[test]
fn sd3_adapters_merge_equals_runtime_and_round_trip() {
    use adt::models::mmdit::LoadedSd3Transformer;
    let _g = common::lock();
    tch::manual_seed(5);
    let load =
        || LoadedSd3Transformer::load(&fixture("sd3_dual"), Device::Cpu, Kind::Float).unwrap();
    let t = load();
    let spec = LoraSpec {
        rank: 2,
        alpha: 3.0,
        dropout: 0.0,
        targets: vec![
            "to_q".into(),
            "to_out.0".into(),
            "add_q_proj".into(),
            "to_add_out".into(),
            "ff_context.net.2".into(),
        ],
    };
    let names = t.model.lora.attach_new(&t.vs.root(), &spec).unwrap();
    // Block 0 has the dual (second self-) attention `attn2`.
    for n in [
        "transformer_blocks.0.attn.add_q_proj",
        "transformer_blocks.0.attn2.to_q",
    ] {
        assert!(names.iter().any(|m| m == n), "{n} not adapted: {names:?}");
    }
    tch::no_grad(|| {
        for (_, _, b) in t.model.lora.adapters() {
            let mut b = b;
            b.copy_(&(Tensor::randn_like(&b) * 0.1));
        }
    });
    let x = Tensor::randn([1, 16, 16, 16], (Kind::Float, Device::Cpu));
    let ctx = Tensor::randn([1, 5, 32], (Kind::Float, Device::Cpu));
    let pooled = Tensor::randn([1, 24], (Kind::Float, Device::Cpu));
    let ts = Tensor::from_slice(&[500.0f32]);
    let run = |m: &LoadedSd3Transformer| {
        tch::no_grad(|| m.model.forward(&x, &ctx, &pooled, &ts)).unwrap()
    };
    let runtime = run(&t);
    let dir = tempfile::tempdir().unwrap();
    lora::save_peft(&t.model.lora, &spec, "transformer", dir.path()).unwrap();
    let (shapes, _) = layout(&dir.path().join(lora::LORA_FILE));
    assert!(shapes.contains_key("transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight"));
    let merged = load();
    let base = run(&merged);
    assert!(
        max_abs(&base, &runtime) > 1e-3,
        "the adapters changed nothing"
    );
    let file = LoraFile::load(dir.path(), "transformer").unwrap();
    merged.model.lora.merge_file(&file, 1.0).unwrap();
    let d = max_abs(&run(&merged), &runtime);
    println!("SD3 merged vs run-time adapters: {d:.2e}");
    assert!(d < TOL);
}

#[test]
fn cli_sample_with_lora_equals_sampling_the_merged_pipeline() {
    let _g = common::lock();
    tch::manual_seed(11);
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let pipe = Pipeline::tiny_random(Device::Cpu, 4).unwrap();
    pipe.save(&base).unwrap();
    let spec = LoraSpec {
        rank: 2,
        alpha: 2.0,
        dropout: 0.0,
        targets: lora::default_targets(),
    };
    let unet = pipe.unet().unwrap();
    unet.model.lora.attach_new(&unet.vs.root(), &spec).unwrap();
    tch::no_grad(|| {
        for (_, _, b) in unet.model.lora.adapters() {
            let mut b = b;
            b.copy_(&(Tensor::randn_like(&b) * 0.2));
        }
    });
    let lora_dir = dir.path().join("lora");
    lora::save_peft(&unet.model.lora, &spec, "unet", &lora_dir).unwrap();
    let adt = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_adt"))
            .args(args)
            .env("OMP_NUM_THREADS", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "adt {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |q: &Path| q.to_str().unwrap().to_string();
    let merged = dir.path().join("merged");
    let lora_arg = format!("{}:0.6", p(&lora_dir));
    adt(&[
        "merge-lora",
        "--model",
        &p(&base),
        "--lora",
        &lora_arg,
        "--out",
        &p(&merged),
    ]);
    let sample = |model: &Path, lora: Option<&str>, out: &Path| {
        let mut a = vec![
            "sample".to_string(),
            "--model".into(),
            p(model),
            "--prompt".into(),
            "a red circle".into(),
            "--steps".into(),
            "3".into(),
            "--out".into(),
            p(out),
        ];
        if let Some(l) = lora {
            a.extend(["--lora".to_string(), l.to_string()]);
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        adt(&a);
        std::fs::read(out.join("ddim-3steps-cfg7/00000.png")).unwrap()
    };
    let with_lora = sample(&base, Some(&lora_arg), &dir.path().join("s1"));
    let from_merged = sample(&merged, None, &dir.path().join("s2"));
    let plain = sample(&base, None, &dir.path().join("s3"));
    assert_eq!(with_lora, from_merged);
    assert_ne!(with_lora, plain, "the LoRA changed no pixel");
}

#[test]
fn lora_run_with_8bit_moments_resumes_bit_for_bit() {
    let _g = common::lock();
    tch::set_num_threads(1);
    let over = [
        "train.iterations=6",
        "train.h=2",
        "train.warmup_g=1",
        "train.lr_g=1e-2",
        "train.lora={ rank = 32, alpha = 8.0, targets = [\"to_q\", \"to_k\", \"to_v\", \"to_out.0\", \"ff.net.0.proj\", \"ff.net.2\"] }",
        "train.optimizer_state=\"8bit\"",
        "output.checkpoint_every=3",
    ];
    let (whole, _) = common::whole_and_resumed(&over);
    // Some adapter is large enough for 8-bit moments.
    let state = whole.opt_g.state("g");
    assert!(
        state.iter().any(|(k, _)| k.starts_with("g.m8.")),
        "no 8-bit moments"
    );
}
