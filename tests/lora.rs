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
            let _ = b.copy_(&(Tensor::randn_like(&b) * 0.1));
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

#[test]
fn lora_training_changes_only_the_adapters() {
    let _g = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::tiny_config(
        dir.path(),
        &[
            "train.iterations=6",
            "train.h=2",
            "train.warmup_g=1",
            "train.warmup_d=1",
            "train.lr_g=1e-2",
            "train.bf16_trajectory=true",
            "train.lora={ rank = 2, alpha = 4.0 }",
            "output.checkpoint_every=0",
        ],
    );
    let seed = cfg.train.seed as i64;
    let base = Pipeline::tiny_random(Device::Cpu, seed).unwrap();
    let before = common::sorted_vars(base.backbone_vs());
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
    assert!(moved > 0, "no lora_B left zero initialisation");
    // The run's output is the adapter file, loadable as a diffusers LoRA.
    let file = LoraFile::load(&dir.path().join("final"), "unet").unwrap();
    assert_eq!(file.modules.len() * 2, adapters.len());
    assert_eq!((file.rank, file.alpha), (2, 4.0));
}
