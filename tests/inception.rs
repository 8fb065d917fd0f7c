//! The FID Inception-v3 (`src/models/inception.rs`) against pytorch-fid 0.3.0.
//!
//! The reference data is committed in `tests/fixtures/inception/`, written by
//! `scripts/fixtures/make_inception.py`: pytorch-fid's own
//! `InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)`
//! with random weights (every convolution weight a strided view of one shared storage,
//! so the `torch.save` files are small) and randomised BatchNorm statistics, saved in
//! the legacy and the zip `torch.save` formats; its network input, block outputs
//! (subsampled) and pool3 features for images of three sizes. The tests convert both
//! files with `scripts/convert_inception.py` (standard-library reader, so they need a
//! Python 3 but no torch), check that the result is byte for byte what torch.load gave
//! the generator, and run the port on it. The loader and name tests need no fixture.

mod common;

use adt::eval::metrics::{FeatureExtractor, FeatureSpace};
use adt::models::inception::{self, InceptionV3};
use adt::weights;
use common::fixtures::{load_map, max_rel_err};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{nn, Device, Kind, Tensor};

/// Cases of the fixture: (name, batch, height, width).
const CASES: [(&str, i64, i64, i64); 3] = [
    ("a64", 2, 64, 64),
    ("b80x100", 1, 80, 100),
    ("c331x300", 1, 331, 300),
];

/// The `torch.save` files of the fixture (legacy and zip format).
const PTH: [&str; 2] = ["inception_legacy.pth", "inception_zip.pth"];

/// Bound on `max|ours - ref| / max|ref|` for the pool3 features (and the block outputs).
/// Both sides run the same libtorch 2.11 CPU kernels in float32, so the differences are
/// rounding noise; the fixture's own float32-vs-float64 spread is up to 7e-5 for the
/// block outputs (case.json, `float32_vs_float64_max_rel_err`, the 331x300 case). 1e-4
/// leaves room for other CPUs' kernels and is still hundreds of times below what a wrong
/// FID-specific pooling choice changes (checked against case.json below).
const TOL: f64 = 1e-4;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inception")
}

/// The converted weights of each .pth file, converted once per test run into the
/// target folder, or None when the opt-out skipped (no Python 3).
fn converted() -> Option<&'static HashMap<&'static str, PathBuf>> {
    static DIRS: OnceLock<Option<HashMap<&'static str, PathBuf>>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/convert_inception.py");
        let python = common::inputs::python();
        let mut dirs = HashMap::new();
        for pth in PTH {
            let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join("inception-converted")
                .join(pth);
            let _ = std::fs::remove_dir_all(&out);
            let status = std::process::Command::new(&python)
                .arg(&script)
                .args(["--reader", "stdlib"])
                .arg(fixture_dir().join(pth))
                .arg(&out)
                .output();
            match status {
                Ok(o) if o.status.success() => {}
                Ok(o) => panic!(
                    "{} failed on {pth} ({}): {}",
                    script.display(),
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => {
                    common::inputs::missing(
                        &format!("a Python 3 interpreter ({}: {e})", python.display()),
                        "install python3, or name one in the PYTHON environment variable",
                    );
                    return None;
                }
            }
            dirs.insert(pth, out);
        }
        Some(dirs)
    })
    .as_ref()
}

/// Every 6th row and column of the network input, every 4th channel, row and column of
/// a block output: the subsampling the fixture stores.
fn sub(t: &Tensor, step: i64, from_dim: i64) -> Tensor {
    let mut t = t.shallow_clone();
    for d in from_dim..4 {
        t = t.slice(d, 0, None, step);
    }
    t
}

fn images(io: &HashMap<String, Tensor>, case: &str) -> Tensor {
    get(io, &format!("{case}.images_u8")).to_kind(Kind::Float) / 255.0
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
    let Some(conv) = converted() else { return };
    let dir = fixture_dir();
    let io = load_map(&dir.join("io.safetensors")).unwrap();
    let loaded =
        InceptionV3::load(&conv["inception_legacy.pth"], Device::Cpu, Kind::Float).unwrap();
    let mut worst = 0f64;
    for (name, n, h, w) in CASES {
        let images = images(&io, name);
        assert_eq!(images.size(), vec![n, 3, h, w], "{name}.images");
        let x = inception::preprocess(&images).unwrap();
        assert_eq!(x.size(), vec![n, 3, 299, 299]);
        let err_in = max_rel_err(&sub(&x, 6, 2), get(&io, &format!("{name}.input_sub")));
        let blocks = tch::no_grad(|| loaded.model.blocks(&x)).unwrap();
        let mut line = format!("{name} ({h}x{w}, batch {n}): input {err_in:.2e}");
        for (i, b) in blocks.iter().enumerate().take(3) {
            let err = max_rel_err(&sub(b, 4, 1), get(&io, &format!("{name}.block{i}_sub")));
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
    let Some(conv) = converted() else { return };
    let io = load_map(&fixture_dir().join("io.safetensors")).unwrap();
    let ex = FeatureExtractor::load(
        FeatureSpace::InceptionV3,
        Some(&conv["inception_legacy.pth"]),
        None,
        false,
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(ex.dim(), 2048);
    assert_eq!(ex.resolution(), 299);
    // One list of images of all three sizes, as `adt eval` reads a folder.
    let mut list = Vec::new();
    let mut want = Vec::new();
    for (name, n, _, _) in CASES {
        let batch = images(&io, name);
        for i in 0..n {
            list.push(batch.get(i));
            let pre = ex.preprocess(&batch.get(i)).unwrap();
            let err = max_rel_err(
                &sub(&pre, 6, 2),
                &get(&io, &format!("{name}.input_sub")).narrow(0, i, 1),
            );
            assert!(
                err <= 1e-6,
                "{name}[{i}]: eval preprocessing error {err:.3e}"
            );
        }
        want.push(get(&io, &format!("{name}.pool3")).shallow_clone());
    }
    let got = ex.features(&list).unwrap();
    let err = max_rel_err(&got, &Tensor::cat(&want, 0));
    println!("adt eval features (converted weights, mixed sizes): max relative error {err:.3e}");
    assert!(err <= TOL, "{err:.3e}");

    // `adt forward --component inception` on the zip-format file's conversion.
    let zip = &conv["inception_zip.pth"];
    let inputs = HashMap::from([("images".to_string(), images(&io, "b80x100"))]);
    let out = inception::run_forward("inception", zip, &inputs).unwrap();
    let err = max_rel_err(&out["pool3"], get(&io, "b80x100.pool3"));
    println!("adt forward inception: pool3 max relative error {err:.3e}");
    assert!(err <= TOL, "{err:.3e}");
    let err = max_rel_err(&sub(&out["input"], 6, 2), get(&io, "b80x100.input_sub"));
    assert!(err <= 1e-6, "{err:.3e}");
    let err = format!(
        "{:#}",
        inception::run_forward("inception", zip, &HashMap::new()).unwrap_err()
    );
    assert!(err.contains("images"), "{err}");
}

#[test]
fn converter_writes_what_torch_load_reads() {
    let Some(conv) = converted() else { return };
    let case = case_json(&fixture_dir());
    for pth in PTH {
        let dir = &conv[pth];
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let sha = format!("{:x}", Sha256::digest(&bytes));
        // The generator converted the same file with torch.load and checked those
        // tensors against the state dict: the standard-library reader must write the
        // same bytes.
        let want = case["converted_model_safetensors_sha256"][pth]
            .as_str()
            .unwrap_or_else(|| panic!("case.json: no converted sha256 of {pth}"));
        assert_eq!(
            sha, want,
            "{pth}: the standard-library reader wrote other bytes than torch.load"
        );
        let got = load_map(&dir.join("model.safetensors")).unwrap();
        assert_eq!(got.len(), 472, "{pth}: tensor count");
        assert!(got.keys().all(|k| !k.ends_with("num_batches_tracked")));
        assert!(got.values().all(|t| t.kind() == Kind::Float));
        assert!(
            got.contains_key("fc.weight")
                && got.contains_key("Mixed_7c.branch_pool.bn.running_var")
        );
        let cfg = adt::models::config::read_json(&dir.join("config.json")).unwrap();
        assert_eq!(cfg["model_type"], inception::MODEL_TYPE, "{pth}");
        assert_eq!(cfg["num_tensors"], got.len(), "{pth}");
        assert_eq!(cfg["reader"], "stdlib", "{pth}");
        println!(
            "{pth}: {} tensors, identical to the torch.load conversion",
            got.len()
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
