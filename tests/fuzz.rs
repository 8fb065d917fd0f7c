//! Property-based fuzzing (proptest) of every parser that reads user input: the
//! configuration with `--set`, metadata.jsonl / CSV / TSV manifests, WebDataset
//! tars, image decoding and safetensors headers. The property is "no panic, no
//! hang": any input gives a value or an error.
//!
//! Each target runs a fixed number of cases in the normal `cargo test` (a few
//! seconds); set `ADT_FUZZ_CASES=N` for a longer run. Failing inputs are kept in
//! `tests/proptest-regressions/` and replayed first on every run.

use adt::data::{decode_image, inspect_data};
use adt::train::config::Config;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, FileFailurePersistence};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Panics anywhere in the process (data loader threads included).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn config(cases: u32) -> PtConfig {
    let cases = std::env::var("ADT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    PtConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/proptest-regressions/fuzz.txt"
        )))),
        ..PtConfig::default()
    }
}

fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x as u8).wrapping_mul(seed), y as u8, seed])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn webp(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 9]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::WebP).unwrap();
    out.into_inner()
}

/// Byte-level mutation of a valid input: flips, a truncation, an insertion.
fn mutate(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = base.len().max(1);
    (
        prop::collection::vec((0..n, any::<u8>()), 0..8),
        prop::option::of(0..n),
        prop::option::of((0..n, prop::collection::vec(any::<u8>(), 0..16))),
    )
        .prop_map(move |(flips, cut, insert)| {
            let mut b = base.clone();
            for (i, v) in flips {
                if i < b.len() {
                    b[i] = v;
                }
            }
            if let Some((i, bytes)) = insert {
                let i = i.min(b.len());
                b.splice(i..i, bytes);
            }
            if let Some(c) = cut {
                b.truncate(c);
            }
            b
        })
}

const KEYS: &[&str] = &[
    "train.k",
    "train.h",
    "train.iterations",
    "train.batch_size",
    "train.resolution",
    "train.device",
    "train.lr_g",
    "train.tau",
    "train.lambda",
    "train.mode",
    "train.ema_decay",
    "train.grad_accum",
    "sampler.steps",
    "sampler.cfg",
    "sampler.kind",
    "disc.resolution",
    "disc.blocks",
    "disc.channels",
    "disc.diffaug",
    "disc.features",
    "data.path",
    "output.dir",
    "output.keep_checkpoints",
    "model.path",
    "train",
    "x.y.z",
];

const VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "7",
    "nan",
    "inf",
    "-inf",
    "1e400",
    "9223372036854775808",
    "-9223372036854775809",
    "\"\"",
    "\"cuda:99\"",
    "cuda",
    "[]",
    "[1, 2, 99]",
    "[-1]",
    "{a = 1}",
    "true",
    "1.5",
    "\"ft\"",
    "'''\n'''",
    "1979-05-27T07:32:00Z",
];

fn set_arg() -> impl Strategy<Value = String> {
    prop_oneof![
        (prop::sample::select(KEYS), prop::sample::select(VALUES))
            .prop_map(|(k, v)| format!("{k}={v}")),
        (prop::sample::select(KEYS), ".{0,12}").prop_map(|(k, v)| format!("{k}={v}")),
        ("[a-z_.]{0,14}", prop::sample::select(VALUES)).prop_map(|(k, v)| format!("{k}={v}")),
        ".{0,24}",
    ]
}

proptest! {
    #![proptest_config(config(512))]

    /// `--set` overrides: an error or a valid configuration whose TOML reloads to
    /// the same configuration (the same TOML text).
    #[test]
    fn config_set_never_panics(sets in prop::collection::vec(set_arg(), 0..5)) {
        match Config::load(None, &sets) {
            Err(e) => {
                let msg = format!("{e:#}");
                prop_assert!(!msg.is_empty());
            }
            Ok(c) => {
                prop_assert!(c.validate().is_ok());
                let _ = c.check_device();
                let text = c.to_toml().unwrap();
                let d = tempfile::tempdir().unwrap();
                let p = d.path().join("c.toml");
                std::fs::write(&p, &text).unwrap();
                let again = Config::load(Some(&p), &[]);
                prop_assert!(again.is_ok(), "{text}\n{:?}", again.err());
                // Compared as text: the free-form [data] table may hold a NaN.
                prop_assert_eq!(again.unwrap().to_toml().unwrap(), text);
            }
        }
    }

    /// A configuration file of arbitrary text.
    #[test]
    fn config_file_never_panics(text in "([\\[\\]a-z._=\"' 0-9\n-]|train|disc|k|resolution){0,80}") {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(&p, &text).unwrap();
        let _ = Config::load(Some(&p), &[]);
    }
}

/// One manifest line: a good row, a row with odd values, or raw bytes.
fn json_line() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        Just("\"a.png\"".to_string()),
        Just("\"b.png\"".to_string()),
        Just("\"../x.png\"".to_string()),
        Just("\"/etc/passwd\"".to_string()),
        Just("\"\"".to_string()),
        Just("\"sub/../a.png\"".to_string()),
        Just("\".\"".to_string()),
        Just("null".to_string()),
        Just("3".to_string()),
        Just("[\"a.png\"]".to_string()),
        "\"[a-z./\\\\]{0,10}\"".prop_map(|s| s),
    ];
    let text = prop_oneof![
        Just("\"a caption\"".to_string()),
        Just("\"\"".to_string()),
        Just("\"   \"".to_string()),
        Just("null".to_string()),
        Just("42".to_string()),
        Just("[\"x\", \"y\"]".to_string()),
        Just("{\"a\": 1}".to_string()),
        "\".{0,20}\"".prop_map(|s| s.replace('\\', "")),
    ];
    prop_oneof![
        4 => (name, text, prop::sample::select(&["file_name", "image", "path", "x"][..]),
              prop::sample::select(&["text", "caption", "prompt", "y"][..]))
            .prop_map(|(n, t, kn, kt)| format!("{{\"{kn}\": {n}, \"{kt}\": {t}}}").into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..40),
        1 => ".{0,30}".prop_map(String::into_bytes),
    ]
}

fn csv_field() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a.png".to_string()),
        Just("b.png".to_string()),
        Just("../a.png".to_string()),
        Just("/etc/hostname".to_string()),
        Just("\"quoted, with comma\"".to_string()),
        Just("\"unterminated".to_string()),
        Just("".to_string()),
        "[a-z ,\t\"]{0,12}",
    ]
}

fn write_images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("a.png"), png(8, 8, 1)).unwrap();
    std::fs::write(dir.join("b.png"), png(9, 7, 2)).unwrap();
}

proptest! {
    #![proptest_config(config(48))]

    /// metadata.jsonl of an image folder.
    #[test]
    fn metadata_jsonl_never_panics(lines in prop::collection::vec(json_line(), 0..8), strict in any::<bool>()) {
        count_panics();
        let d = tempfile::tempdir().unwrap();
        write_images(d.path());
        let mut bytes = Vec::new();
        for l in lines {
            bytes.extend_from_slice(&l);
            bytes.push(b'\n');
        }
        std::fs::write(d.path().join("metadata.jsonl"), &bytes).unwrap();
        let before = PANICS.load(Ordering::SeqCst);
        let _ = inspect_data(d.path(), strict);
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), before);
    }

    /// CSV and TSV manifests.
    #[test]
    fn csv_tsv_manifests_never_panic(
        header in prop::sample::select(&["image,text", "file_name\tcaption", "path,prompt,extra", "x,y", ""][..]),
        rows in prop::collection::vec(prop::collection::vec(csv_field(), 0..4), 0..6),
        tsv in any::<bool>(),
        raw in prop::option::of(prop::collection::vec(any::<u8>(), 0..30)),
    ) {
        count_panics();
        let d = tempfile::tempdir().unwrap();
        write_images(d.path());
        let sep = if tsv { "\t" } else { "," };
        let mut text = header.replace([',', '\t'], sep).into_bytes();
        text.push(b'\n');
        for r in rows {
            text.extend_from_slice(r.join(sep).as_bytes());
            text.push(b'\n');
        }
        if let Some(r) = raw {
            text.extend_from_slice(&r);
        }
        let p = d.path().join(if tsv { "m.tsv" } else { "m.csv" });
        std::fs::write(&p, &text).unwrap();
        let before = PANICS.load(Ordering::SeqCst);
        let _ = inspect_data(&p, false);
        let _ = inspect_data(&p, true);
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), before);
    }
}

/// A valid shard with a few samples, to be mutated.
fn shard_bytes(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if h.set_path(name).is_err() {
            continue;
        }
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn member() -> impl Strategy<Value = (String, Vec<u8>)> {
    let name = prop_oneof![
        Just("s1.png".to_string()),
        Just("s1.txt".to_string()),
        Just("s1.json".to_string()),
        Just("s2.jpg".to_string()),
        Just("s2.cls".to_string()),
        Just("s3".to_string()),
        Just(".s4.png".to_string()),
        Just("d/s5.webp".to_string()),
        Just("s6.a.b.txt".to_string()),
        "[a-z./]{1,10}",
    ];
    let data = prop_oneof![
        Just(png(6, 6, 3)),
        Just(jpeg(5, 9)),
        Just(b"a caption".to_vec()),
        Just(b"{\"caption\": \"x\", \"text\": 3}".to_vec()),
        Just(b"{not json".to_vec()),
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    (name, data)
}

fn shard() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(member(), 0..6)
        .prop_map(|m| shard_bytes(&m))
        .prop_flat_map(mutate)
}

proptest! {
    #![proptest_config(config(48))]

    /// WebDataset tar shards, built then damaged.
    #[test]
    fn webdataset_tars_never_panic(tar in shard(), strict in any::<bool>()) {
        count_panics();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("000000.tar");
        std::fs::write(&p, &tar).unwrap();
        let before = PANICS.load(Ordering::SeqCst);
        let _ = inspect_data(&p, strict);
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), before);
    }
}

fn image_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        mutate(png(13, 11, 5)),
        mutate(jpeg(17, 9)),
        mutate(webp(10, 12)),
        // Valid headers announcing huge sizes.
        mutate(png(1, 1, 1)).prop_map(|mut b| {
            if b.len() > 24 {
                b[16..24].copy_from_slice(&[0x7f, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff]);
            }
            b
        }),
    ]
}

proptest! {
    #![proptest_config(config(384))]

    /// Image decoding: a decoded image has the size it announces, or an error.
    #[test]
    fn image_decoding_never_panics(bytes in image_bytes(), max_pixels in prop::sample::select(&[1u64, 100, 10_000, 89_478_485][..])) {
        if let Ok(img) = decode_image(&bytes, max_pixels) {
            let (h, w) = img.size();
            let (w, h) = (w as u64, h as u64);
            prop_assert!(w * h <= max_pixels && w > 0 && h > 0);
        }
    }
}

fn safetensors_file() -> impl Strategy<Value = Vec<u8>> {
    let dtype = prop_oneof![
        Just("F32".to_string()),
        Just("F16".to_string()),
        Just("I64".to_string()),
        Just("BOOL".to_string()),
        Just("F8_E4M3".to_string()),
        Just("C64".to_string()),
        "[A-Z0-9]{0,4}",
    ];
    let dim = prop_oneof![0u64..5, Just(u64::MAX), Just(1 << 40)];
    let entry = (
        "[a-z.]{1,6}",
        dtype,
        prop::collection::vec(dim, 0..3),
        prop_oneof![0u64..64, Just(u64::MAX)],
        prop_oneof![0u64..64, Just(u64::MAX)],
    );
    let structured =
        (prop::collection::vec(entry, 0..4), 0usize..96).prop_map(|(entries, data_len)| {
            let mut m = serde_json::Map::new();
            for (name, dtype, shape, b, e) in entries {
                m.insert(
                    name,
                    serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [b, e]}),
                );
            }
            let header = serde_json::to_vec(&m).unwrap();
            let mut out = (header.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&header);
            out.extend(std::iter::repeat_n(0u8, data_len));
            out
        });
    let valid = {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.safetensors");
        let t = tch::Tensor::arange(12, (tch::Kind::Float, tch::Device::Cpu)).view([3, 4]);
        let u = tch::Tensor::from_slice(&[1i64, 2]);
        adt::weights::save_safetensors(&[("a".into(), t), ("b".into(), u)], &p, None, None)
            .unwrap();
        std::fs::read(&p).unwrap()
    };
    prop_oneof![
        2 => structured,
        1 => mutate(valid),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    /// Safetensors headers: a header that passes the check has every tensor's data
    /// inside the file, and then the full parse succeeds.
    #[test]
    fn safetensors_headers_never_panic(bytes in safetensors_file()) {
        let header = adt::weights::header_from_bytes(&bytes);
        let parsed = adt::weights::parse_safetensors(&bytes);
        if header.is_ok() && !header.as_ref().unwrap().is_empty() {
            // The checked header describes data that is there.
            prop_assert!(parsed.is_ok() || format!("{:#}", parsed.as_ref().err().unwrap()).contains("dtype"),
                "{:?}", parsed.err());
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        let _ = adt::inspect::inspect(&p);
    }
}

/// Training keys with values of the right type (edge values included).
const TRAIN_SETS: &[(&str, &[&str])] = &[
    ("train.k", &["0", "1", "2", "5", "8", "100"]),
    ("train.h", &["1", "2", "3"]),
    ("train.batch_size", &["1", "3"]),
    ("train.resolution", &["8", "16", "24", "40", "64"]),
    ("train.mode", &["\"ft\"", "\"adt\""]),
    ("train.grad_path", &["\"drtune\"", "\"adt\""]),
    ("train.decompose", &["false", "true"]),
    ("train.grad_accum", &["1", "2"]),
    ("train.ema_decay", &["0.0", "0.5", "0.999"]),
    ("train.warmup_d", &["0", "1", "1000"]),
    ("train.lambda", &["0.0", "1e6"]),
    ("sampler.steps", &["1", "2", "3", "8", "50", "1000"]),
    ("sampler.kind", &["\"ddim\"", "\"dpmpp\"", "\"flow\""]),
    ("sampler.cfg", &["0.0", "1.0", "100.0"]),
    (
        "disc.resolution",
        &["0", "7", "14", "32", "33", "48", "56", "64", "100"],
    ),
    ("disc.features", &["\"dinov2\"", "\"efficientnet-lite0\""]),
    ("disc.blocks", &["[0]", "[5]", "[0, 99]", "[]"]),
    ("disc.channels", &["1", "3", "64"]),
    ("disc.kind", &["\"stylegan_t\"", "\"siamese\""]),
    (
        "disc.diffaug",
        &["\"\"", "\"cutout\"", "\"color,translation,cutout\""],
    ),
    ("train.lora", &["{ rank = 2 }"]),
    ("train.base_dtype", &["\"fp32\"", "\"bf16\"", "\"fp16\""]),
    ("model.frozen_dtype", &["\"fp32\"", "\"bf16\"", "\"fp16\""]),
    ("model.text_device", &["\"train\"", "\"cpu\""]),
];

fn train_set() -> impl Strategy<Value = String> {
    prop::sample::select(TRAIN_SETS)
        .prop_flat_map(|(k, vs)| prop::sample::select(vs).prop_map(move |v| format!("{k}={v}")))
}

fn train_one(sets: &[&str]) -> anyhow::Result<()> {
    let d = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny-random.toml");
    let mut o = vec![
        format!("output.dir={:?}", d.path().display().to_string()),
        "output.sample_every=0".to_string(),
        "output.checkpoint_every=0".to_string(),
        "data.num_workers=1".to_string(),
        "data.synthetic_count=4".to_string(),
        "train.iterations=1".to_string(),
    ];
    o.extend(sets.iter().map(|s| s.to_string()));
    let cfg = Config::load(Some(&example), &o)?;
    adt::train::run::run(
        cfg,
        &adt::train::run::RunOptions {
            quiet: true,
            ..Default::default()
        },
    )?;
    Ok(())
}

/// Inputs the fuzzing found panicking (tch errors unwrapped deep in the feature
/// network) before the configuration refused them: now errors.
#[test]
fn fuzz_regressions_are_errors() {
    for s in [
        "disc.resolution=0",
        "disc.resolution=7",
        "disc.resolution=14",
    ] {
        let e = train_one(&[s])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("disc.resolution"), "{s}: {e}");
    }
}

proptest! {
    #![proptest_config(config(12))]

    /// A valid configuration builds the tiny trainer and runs one iteration, or
    /// gives an error: values that pass the parser never panic further down.
    #[test]
    fn accepted_configs_train_or_error(
        sets in prop::collection::vec(train_set(), 1..4)
    ) {
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        if let Err(e) = train_one(&sets) {
            let msg = format!("{e:#}");
            prop_assert!(!msg.is_empty());
        }
    }
}
