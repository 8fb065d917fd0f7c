//! The FID Inception-v3 (`src/models/inception.rs`) against pytorch-fid 0.3.0.
//!
//! The reference data is built by `scripts/setup_inception_fixture.sh` into
//! `.cache/fixtures/inception/` (too large to commit): pytorch-fid's own
//! `InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)`
//! with random weights and randomised BatchNorm statistics, its network input and block
//! outputs for images of three sizes, and the weights converted from `.pth` files by
//! `scripts/convert_inception.py`. Without the fixture the parity tests print a notice
//! and pass, except under CI (`CI` set), where they fail. The loader and name tests need
//! no fixture.

use adt::eval::metrics::{FeatureExtractor, FeatureSpace};
use adt::fixtures::{load_map, max_rel_err};
use adt::models::inception::{self, InceptionV3};
use adt::weights;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// Cases of the fixture: (name, batch, height, width).
const CASES: [(&str, i64, i64, i64); 3] = [
    ("a64", 2, 64, 64),
    ("b80x100", 1, 80, 100),
    ("c331x300", 1, 331, 300),
];

/// Folders written by the converter, one per reader / file format.
const CONVERTED: [&str; 3] = [
    "converted-torch",
    "converted-stdlib-legacy",
    "converted-stdlib-zip",
];

/// Bound on `max|ours - ref| / max|ref|` for the pool3 features (and the block outputs).
/// Both sides run the same libtorch 2.11 CPU kernels in float32, so the differences are
/// rounding noise; the fixture's own float32-vs-float64 spread is up to 1.5e-5 (case.json,
/// `float32_vs_float64_max_rel_err`, the 331x300 case). 1e-4 leaves room for other CPUs'
/// kernels and is still hundreds of times below what a wrong FID-specific pooling choice
/// changes (checked against case.json below).
const TOL: f64 = 1e-4;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/fixtures/inception")
}

/// The fixture folder, or None (after a notice) when it was not built. Under CI a missing
/// fixture is a failure.
fn fixture() -> Option<PathBuf> {
    let dir = fixture_dir();
    let mut needed = vec![
        dir.join("io.safetensors"),
        dir.join("model.safetensors"),
        dir.join("case.json"),
    ];
    needed.extend(
        CONVERTED
            .iter()
            .map(|c| dir.join(c).join("model.safetensors")),
    );
    let missing: Vec<String> = needed
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return Some(dir);
    }
    let msg = format!(
        "the pytorch-fid Inception fixture is missing ({}); build it with `bash scripts/setup_inception_fixture.sh`",
        missing.join(", ")
    );
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

fn case_json(dir: &Path) -> serde_json::Value {
    let p = dir.join("case.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn get<'a>(io: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    io.get(key)
        .unwrap_or_else(|| panic!("io.safetensors has no tensor {key}"))
}

#[test]
fn pool3_features_match_pytorch_fid() {
    let Some(dir) = fixture() else { return };
    let io = load_map(&dir.join("io.safetensors")).unwrap();
    // The fixture's model.safetensors is the raw state dict: it also holds the classifier
    // and the num_batches_tracked counters, which the loader skips.
    let loaded = InceptionV3::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let mut worst = 0f64;
    for (name, n, h, w) in CASES {
        let images = get(&io, &format!("{name}.images"));
        assert_eq!(images.size(), vec![n, 3, h, w], "{name}.images");
        let x = inception::preprocess(images).unwrap();
        let err_in = max_rel_err(&x, get(&io, &format!("{name}.input")));
        let blocks = tch::no_grad(|| loaded.model.blocks(&x)).unwrap();
        let mut line = format!("{name} ({h}x{w}, batch {n}): input {err_in:.2e}");
        for (i, b) in blocks.iter().enumerate().take(3) {
            let err = max_rel_err(b, get(&io, &format!("{name}.block{i}")));
            line += &format!(", block{i} {err:.2e}");
            assert!(
                err <= TOL,
                "{name}.block{i}: max relative error {err:.3e} > {TOL:e}"
            );
        }
        let pool3 = &blocks[3];
        assert_eq!(pool3.size(), vec![n, inception::FEATURE_DIM]);
        let err = max_rel_err(pool3, get(&io, &format!("{name}.pool3")));
        let err64 = max_rel_err(pool3, get(&io, &format!("{name}.pool3_f64")));
        println!("{line}, pool3 {err:.2e} (vs pytorch-fid in float64: {err64:.2e})");
        // Same kernels on the same float32 input: the resize is reproduced to rounding.
        assert!(
            err_in <= 1e-6,
            "{name}: preprocessing differs from pytorch-fid (max relative error {err_in:.3e})"
        );
        assert!(
            err <= TOL,
            "{name}.pool3: max relative error {err:.3e} > {TOL:e}"
        );
        worst = worst.max(err);
    }
    // The fixture discriminates: pytorch-fid's network with torchvision's pooling in the
    // FID-specific places gives features this far from the FID ones.
    let variants = &case_json(&dir)["torchvision_block_variants_pool3_rel_diff"];
    for key in ["avg_pool_count_include_pad", "last_block_avg_pool"] {
        let diff = variants[key]
            .as_f64()
            .unwrap_or_else(|| panic!("case.json: no {key}"));
        println!("pytorch-fid with the torchvision block ({key}): pool3 differs by {diff:.3e}");
        assert!(
            diff > 100.0 * TOL,
            "{key}: {diff:e} is too close to {TOL:e}"
        );
    }
    println!("worst pool3 max relative error {worst:.3e} (bound {TOL:e})");
}

#[test]
fn eval_feature_extractor_and_forward_use_the_converted_weights() {
    let Some(dir) = fixture() else { return };
    let io = load_map(&dir.join("io.safetensors")).unwrap();
    let converted = dir.join("converted-stdlib-legacy");
    let ex = FeatureExtractor::load(
        FeatureSpace::InceptionV3,
        Some(&converted),
        None,
        false,
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(ex.dim(), 2048);
    assert_eq!(ex.resolution(), 299);
    // One list of images of all three sizes, as `adt eval` reads a folder.
    let mut images = Vec::new();
    let mut want = Vec::new();
    for (name, n, _, _) in CASES {
        let batch = get(&io, &format!("{name}.images"));
        for i in 0..n {
            images.push(batch.get(i));
            let pre = ex.preprocess(&batch.get(i)).unwrap();
            let err = max_rel_err(&pre, &get(&io, &format!("{name}.input")).narrow(0, i, 1));
            assert!(
                err <= 1e-6,
                "{name}[{i}]: eval preprocessing error {err:.3e}"
            );
        }
        want.push(get(&io, &format!("{name}.pool3")).shallow_clone());
    }
    let got = ex.features(&images).unwrap();
    let err = max_rel_err(&got, &Tensor::cat(&want, 0));
    println!("adt eval features (converted weights, mixed sizes): max relative error {err:.3e}");
    assert!(err <= TOL, "{err:.3e}");

    // `adt forward --component inception` on the torch.load conversion.
    let inputs = HashMap::from([(
        "images".to_string(),
        get(&io, "b80x100.images").shallow_clone(),
    )]);
    let out = inception::run_forward("inception", &dir.join("converted-torch"), &inputs).unwrap();
    let err = max_rel_err(&out["pool3"], get(&io, "b80x100.pool3"));
    println!("adt forward inception: pool3 max relative error {err:.3e}");
    assert!(err <= TOL, "{err:.3e}");
    let err = max_rel_err(&out["input"], get(&io, "b80x100.input"));
    assert!(err <= 1e-6, "{err:.3e}");
    let err = format!(
        "{:#}",
        inception::run_forward("inception", &converted, &HashMap::new()).unwrap_err()
    );
    assert!(err.contains("images"), "{err}");
}

#[test]
fn converter_writes_the_state_dict_exactly() {
    let Some(dir) = fixture() else { return };
    let reference: HashMap<String, Tensor> = load_map(&dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .collect();
    assert!(reference.contains_key("fc.weight"));
    for sub in CONVERTED {
        let conv_dir = dir.join(sub);
        let got = load_map(&conv_dir.join("model.safetensors")).unwrap();
        let mut names: Vec<&String> = got.keys().collect();
        names.sort();
        let mut want: Vec<&String> = reference.keys().collect();
        want.sort();
        assert_eq!(
            names, want,
            "{sub}: tensor names differ from the state dict"
        );
        for (name, t) in &got {
            let r = &reference[name];
            assert_eq!(t.kind(), Kind::Float, "{sub}: {name}");
            assert!(
                t.equal(r),
                "{sub}: tensor {name} differs from the state dict"
            );
        }
        let cfg = adt::models::config::read_json(&conv_dir.join("config.json")).unwrap();
        assert_eq!(cfg["model_type"], inception::MODEL_TYPE, "{sub}");
        assert_eq!(cfg["num_tensors"], reference.len(), "{sub}");
        println!(
            "{sub}: {} tensors identical to the state dict (reader {})",
            got.len(),
            cfg["reader"]
        );
    }
}

/// The variables of a randomly initialised model, under pytorch-fid's names.
fn random_weights() -> Vec<(String, Tensor)> {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = InceptionV3::new(&vs.root());
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Save `base`, edited by `edit`, as `dir/model.safetensors`.
fn write_weights(
    dir: &Path,
    base: &[(String, Tensor)],
    edit: impl FnOnce(&mut Vec<(String, Tensor)>),
) -> PathBuf {
    let mut vars: Vec<(String, Tensor)> = base
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    edit(&mut vars);
    let path = dir.join("model.safetensors");
    weights::save_safetensors(&vars, &path, None, None).unwrap();
    path
}

fn load_err(dir: &Path) -> String {
    match InceptionV3::load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn loader_errors_name_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = random_weights();

    // The graph has pytorch-fid's names: 94 convolutions with a BatchNorm each.
    write_weights(dir, &base, |_| {});
    let loaded = InceptionV3::load(dir, Device::Cpu, Kind::Float).unwrap();
    let vars = loaded.vs.variables();
    assert_eq!(vars.len(), 94 * 5);
    for name in [
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_4a_3x3.bn.running_mean",
        "Mixed_5b.branch5x5_2.conv.weight",
        "Mixed_6a.branch3x3dbl_3.bn.running_var",
        "Mixed_6e.branch7x7dbl_5.conv.weight",
        "Mixed_7a.branch7x7x3_4.conv.weight",
        "Mixed_7c.branch3x3dbl_3b.bn.bias",
    ] {
        assert!(vars.contains_key(name), "no variable {name}");
    }
    assert_eq!(
        vars["Mixed_6b.branch7x7_2.conv.weight"].size(),
        vec![128, 128, 1, 7]
    );

    // Extra tensors of the real file: the classifier and BatchNorm counters are skipped.
    write_weights(dir, &base, |v| {
        v.push((
            "fc.weight".into(),
            Tensor::zeros([1008, 2048], (Kind::Float, Device::Cpu)),
        ));
        v.push((
            "fc.bias".into(),
            Tensor::zeros([1008], (Kind::Float, Device::Cpu)),
        ));
        v.push((
            "Mixed_5b.branch1x1.bn.num_batches_tracked".into(),
            Tensor::from(0i64),
        ));
    });
    InceptionV3::load(dir, Device::Cpu, Kind::Float).unwrap();
    // The .safetensors file itself works as the path too.
    InceptionV3::load(&dir.join("model.safetensors"), Device::Cpu, Kind::Float).unwrap();

    let missing = "Mixed_7c.branch_pool.bn.running_var";
    write_weights(dir, &base, |v| v.retain(|(k, _)| k != missing));
    let err = load_err(dir);
    assert!(err.contains(missing) && err.contains("missing"), "{err}");

    let wrong = "Mixed_6b.branch7x7_2.conv.weight";
    write_weights(dir, &base, |v| {
        for (k, t) in v.iter_mut() {
            if k == wrong {
                *t = t.transpose(2, 3).contiguous();
            }
        }
    });
    let err = load_err(dir);
    assert!(
        err.contains(wrong) && err.contains("[128, 128, 7, 1]") && err.contains("[128, 128, 1, 7]"),
        "{err}"
    );

    // torchvision's ImageNet Inception has an auxiliary classifier: not this model.
    write_weights(dir, &base, |v| {
        v.push((
            "AuxLogits.fc.weight".into(),
            Tensor::zeros([1000, 768], (Kind::Float, Device::Cpu)),
        ))
    });
    let err = load_err(dir);
    assert!(
        err.contains("AuxLogits.fc.weight") && err.contains("unexpected"),
        "{err}"
    );

    // A config.json of another model.
    write_weights(dir, &base, |_| {});
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "efficientnet_lite"}"#,
    )
    .unwrap();
    let err = load_err(dir);
    assert!(
        err.contains("config.json") && err.contains("model_type"),
        "{err}"
    );

    let err = load_err(&dir.join("nothing-here"));
    assert!(
        err.contains("nothing-here") && err.contains("convert_inception.py"),
        "{err}"
    );
}

#[test]
fn preprocessing_is_a_bilinear_resize_to_299_then_2x_minus_1() {
    // A 299 x 299 image is not resampled.
    let img = Tensor::rand([1, 3, 299, 299], (Kind::Float, Device::Cpu));
    let pre = inception::preprocess(&img).unwrap();
    assert_eq!(max_rel_err(&pre, &(&img * 2.0 - 1.0)), 0.0);
    // A constant image stays constant whatever its size; 0.25 -> -0.5.
    let flat = Tensor::full([2, 3, 40, 70], 0.25, (Kind::Float, Device::Cpu));
    let pre = inception::preprocess(&flat).unwrap();
    assert_eq!(pre.size(), vec![2, 3, 299, 299]);
    let dev = (pre + 0.5).abs().max().double_value(&[]);
    assert!(dev < 1e-6, "{dev}");
    // Shrinking does not antialias: 598 -> 299 samples at 2j + 0.5, the mean of columns
    // 2j and 2j + 1. With every fourth column 1 (the others 0) that is 0.5, 0, 0.5, 0, ...
    // so 0, -1, 0, -1, ... after 2x - 1 (an antialiasing filter would blur the stripes).
    let col = Tensor::arange(598, (Kind::Float, Device::Cpu))
        .remainder(4.0)
        .eq(0.0)
        .to_kind(Kind::Float);
    let stripes = col.view([1, 1, 1, 598]).expand([1, 3, 598, 598], false);
    let pre = inception::preprocess(&stripes).unwrap();
    let j = Tensor::arange(299, (Kind::Float, Device::Cpu));
    let want = (j.remainder(2.0).eq(0.0).to_kind(Kind::Float) - 1.0)
        .view([1, 1, 1, 299])
        .expand([1, 3, 299, 299], false);
    let dev = (pre - want).abs().max().double_value(&[]);
    assert!(dev < 1e-6, "{dev}");
    assert!(inception::preprocess(&Tensor::zeros([3, 8, 8], (Kind::Float, Device::Cpu))).is_err());
}

#[test]
fn feature_space_names() {
    for s in ["inception-v3", "inception", "fid", "FID", "Inception-V3"] {
        assert_eq!(
            s.parse::<FeatureSpace>().unwrap(),
            FeatureSpace::InceptionV3,
            "{s}"
        );
    }
    let fs = FeatureSpace::InceptionV3;
    assert_eq!(fs.name(), "inception-v3");
    assert_eq!(fs.to_string(), "inception-v3");
    assert!(FeatureSpace::ALL.contains(&fs));
    assert_eq!(serde_json::to_string(&fs).unwrap(), "\"inception-v3\"");
    assert_eq!(
        serde_json::from_str::<FeatureSpace>("\"inception-v3\"").unwrap(),
        fs
    );
    // The weights are user-supplied: no default folder, and the error says how to get them.
    assert_eq!(fs.default_path(), None);
    let err = FeatureExtractor::load(fs, None, None, false, Device::Cpu)
        .err()
        .expect("loaded without weights");
    let err = format!("{err:#}");
    assert!(
        err.contains("convert_inception.py") && err.contains("pt_inception-2015-12-05"),
        "{err}"
    );
    let somewhere = Path::new("weights-that-do-not-exist");
    let err = FeatureExtractor::load(fs, Some(somewhere), Some(224), false, Device::Cpu)
        .err()
        .expect("resolution 224 accepted");
    assert!(format!("{err:#}").contains("299"), "{err:#}");
    let err = FeatureExtractor::load(fs, Some(somewhere), None, true, Device::Cpu)
        .err()
        .expect("centre crop accepted");
    assert!(format!("{err:#}").contains("center_crop"), "{err:#}");
    let err = FeatureExtractor::load(fs, Some(somewhere), None, false, Device::Cpu)
        .err()
        .expect("missing folder accepted");
    assert!(
        format!("{err:#}").contains("convert_inception.py"),
        "{err:#}"
    );
    let err = format!("{:#}", "clip".parse::<FeatureSpace>().unwrap_err());
    assert!(err.contains("inception-v3"), "{err}");
}
