//! Datasets: layouts, decoding, preprocessing, order / resume, prefetching, caches and
//! bad input. Every dataset is generated in a temporary folder by the test itself.

use adt::data::*;
use image::{ImageBuffer, Luma, Rgb, RgbImage, Rgba};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Tensor;

// ---------------------------------------------------------------- helpers

fn png_bytes(img: &(impl Clone + Into<image::DynamicImage>)) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.clone()
        .into()
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn jpeg_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
        .encode_image(img)
        .unwrap();
    out
}

fn webp_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut out)
        .encode(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    out
}

fn solid(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(c))
}

/// A textured image whose pixels identify their position.
fn pattern(w: u32, h: u32, seed: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 7 + seed as u32) as u8,
            (y * 5) as u8,
            ((x + y) * 3 + seed as u32 * 11) as u8,
        ])
    })
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

fn write_metadata(dir: &Path, rows: &[(&str, &str)]) {
    let mut s = String::new();
    for (f, t) in rows {
        s.push_str(&serde_json::json!({"file_name": f, "text": t}).to_string());
        s.push('\n');
    }
    write(&dir.join("metadata.jsonl"), s.as_bytes());
}

/// An imagefolder with `n` good 32x32 PNGs `img_XX.png` captioned "caption XX".
fn good_folder(dir: &Path, n: usize) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for i in 0..n {
        let name = format!("img_{i:02}.png");
        write(&dir.join(&name), &png_bytes(&pattern(32, 32, i as u8)));
        rows.push((name, format!("caption {i:02}")));
    }
    rows
}

fn cfg(path: &Path) -> DataConfig {
    DataConfig {
        path: path.to_string_lossy().into_owned(),
        resolution: Resolution::Square(16),
        num_workers: 3,
        ..Default::default()
    }
}

fn drain_epoch(loader: &mut DataLoader) -> Vec<Batch> {
    let epoch = loader.state().epoch;
    let mut out = Vec::new();
    while let Some(b) = loader.next_in_epoch().unwrap() {
        assert_eq!(b.epoch, epoch);
        out.push(b);
    }
    assert_eq!(loader.state().epoch, epoch + 1);
    out
}

fn keys_of(batches: &[Batch]) -> Vec<String> {
    batches.iter().flat_map(|b| b.keys.clone()).collect()
}

fn tensors_equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.equal(b)
}

/// A tar shard from (member name, bytes) in the given order.
fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, bytes) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

/// Shard `index` with `n` samples keyed `s{index}_{i}`, captions in .txt (even) or .json (odd).
fn good_shard(dir: &Path, index: usize, n: usize) -> PathBuf {
    let mut members = Vec::new();
    for i in 0..n {
        let key = format!("s{index}_{i:03}");
        members.push((
            format!("{key}.jpg"),
            jpeg_bytes(&pattern(24, 20, (index * 16 + i) as u8)),
        ));
        if i % 2 == 0 {
            members.push((
                format!("{key}.txt"),
                format!("shard {index} sample {i}").into_bytes(),
            ));
        } else {
            members.push((
                format!("{key}.json"),
                serde_json::json!({"caption": format!("shard {index} sample {i}")})
                    .to_string()
                    .into_bytes(),
            ));
        }
    }
    let path = dir.join(format!("{index:06}.tar"));
    write_tar(&path, &members);
    path
}

/// A preprocessed `[3, H, W]` tensor as a flat channel-major vector.
fn flat(t: &Tensor) -> Vec<f32> {
    assert_eq!(t.dim(), 3);
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

fn u8_to_unit(v: u8) -> f32 {
    v as f32 / 127.5 - 1.0
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

// ---------------------------------------------------------------- layouts

#[test]
fn imagefolder_with_metadata_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_dataset(dir.path(), 10, 48, 3).unwrap();
    let meta = std::fs::read_to_string(dir.path().join("metadata.jsonl")).unwrap();
    let expected: BTreeMap<String, String> = meta
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["file_name"].as_str().unwrap().to_string(),
                v["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(expected
        .values()
        .all(|c| c.starts_with("a ") && c.ends_with(" background")));
    let mut c = cfg(dir.path());
    c.resolution = Resolution::Square(32);
    let mut loader = DataLoader::new(&c, 4).unwrap();
    assert_eq!(loader.len_hint(), Some(10));
    let batches = drain_epoch(&mut loader);
    // 10 samples, batch 4, drop_last: 2 batches.
    assert_eq!(batches.len(), 2);
    let mut seen = HashSet::new();
    for b in &batches {
        assert_eq!(b.images.size(), vec![4, 3, 32, 32]);
        assert_eq!(b.images.kind(), tch::Kind::Float);
        assert!(b.images.min().double_value(&[]) >= -1.0);
        assert!(b.images.max().double_value(&[]) <= 1.0);
        for (k, cap) in b.keys.iter().zip(&b.captions) {
            assert_eq!(&expected[k], cap, "caption of {k}");
            assert!(seen.insert(k.clone()), "{k} twice in one epoch");
        }
        assert_eq!(b.original_sizes, vec![(48, 48); 4]);
        assert_eq!(b.crop_top_lefts, vec![(0, 0); 4]);
        assert_eq!(b.target_size, (32, 32));
        let ids = b.add_time_ids();
        assert_eq!(ids.size(), vec![4, 6]);
        assert_eq!(
            Vec::<f32>::try_from(ids.get(0)).unwrap(),
            vec![48.0, 48.0, 0.0, 0.0, 32.0, 32.0]
        );
    }
}

#[test]
fn synthetic_dataset_is_deterministic_and_drawn_as_captioned() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_synthetic_dataset(a.path(), 5, 40, 11).unwrap();
    write_synthetic_dataset(b.path(), 5, 40, 11).unwrap();
    for name in ["000000.png", "000004.png", "metadata.jsonl"] {
        assert_eq!(
            std::fs::read(a.path().join(name)).unwrap(),
            std::fs::read(b.path().join(name)).unwrap()
        );
    }
    // The background colour named in the caption is the corner colour.
    let colours: BTreeMap<&str, [u8; 3]> = [
        ("red", [220, 30, 30]),
        ("green", [30, 170, 60]),
        ("blue", [40, 70, 220]),
        ("yellow", [240, 220, 40]),
        ("purple", [140, 50, 170]),
        ("orange", [245, 140, 20]),
        ("white", [250, 250, 250]),
        ("black", [15, 15, 15]),
    ]
    .into();
    let meta = std::fs::read_to_string(a.path().join("metadata.jsonl")).unwrap();
    for line in meta.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = v["text"].as_str().unwrap();
        let words: Vec<&str> = text.split(' ').collect();
        let img = image::open(a.path().join(v["file_name"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!(img.get_pixel(0, 0).0, colours[words[5]], "{text}");
        assert!(img.pixels().any(|p| p.0 == colours[words[1]]), "{text}");
    }
}

#[test]
fn imagefolder_with_txt_captions() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..4 {
        let sub = if i % 2 == 0 { "a" } else { "b/c" };
        write(
            &dir.path().join(format!("{sub}/im{i}.png")),
            &png_bytes(&pattern(20, 20, i)),
        );
        write(
            &dir.path().join(format!("{sub}/im{i}.txt")),
            format!("  text {i}\n").as_bytes(),
        );
    }
    let mut c = cfg(dir.path());
    c.shuffle = false;
    let mut loader = DataLoader::new(&c, 2).unwrap();
    let b = drain_epoch(&mut loader);
    assert_eq!(
        keys_of(&b),
        vec!["a/im0.png", "a/im2.png", "b/c/im1.png", "b/c/im3.png"]
    );
    let caps: Vec<String> = b.iter().flat_map(|b| b.captions.clone()).collect();
    assert_eq!(caps, vec!["text 0", "text 2", "text 1", "text 3"]);
}

#[test]
fn manifests_csv_tsv_jsonl_with_default_and_custom_columns() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("imgs/x.png"), &png_bytes(&pattern(20, 20, 1)));
    write(&d.join("imgs/y.jpg"), &jpeg_bytes(&pattern(20, 20, 2)));
    write(&d.join("imgs/z.webp"), &webp_bytes(&pattern(20, 20, 3)));
    write(
        &d.join("m.csv"),
        b"image,caption\nimgs/x.png,\"an x, quoted\"\nimgs/y.jpg,a y\nimgs/z.webp,a z\n",
    );
    write(
        &d.join("m.tsv"),
        b"path\ttext\nimgs/x.png\tan x\nimgs/y.jpg\ta y\nimgs/z.webp\ta z\n",
    );
    write(
        &d.join("sub/m.jsonl"),
        b"{\"img\": \"../imgs/x.png\", \"desc\": \"an x\"}\n{\"img\": \"../imgs/y.jpg\", \"desc\": \"a y\"}\n\n{\"img\": \"../imgs/z.webp\", \"desc\": \"a z\"}\n",
    );
    for (file, img_col, cap_col, first) in [
        ("m.csv", None, None, "an x, quoted"),
        ("m.tsv", None, None, "an x"),
        ("sub/m.jsonl", Some("img"), Some("desc"), "an x"),
    ] {
        let mut c = cfg(&d.join(file));
        c.shuffle = false;
        // sub/m.jsonl names ../imgs: the dataset root is the parent folder.
        c.root = Some(d.to_path_buf());
        c.image_column = img_col.map(str::to_string);
        c.caption_column = cap_col.map(str::to_string);
        c.drop_last = false;
        let mut loader = DataLoader::new(&c, 3).unwrap();
        let b = loader.next_batch().unwrap();
        assert_eq!(b.len(), 3, "{file}");
        assert_eq!(b.captions[0], first, "{file}");
        assert_eq!(b.captions[2], "a z", "{file}");
        assert!(
            loader.epoch_stats().bad.total() == 0,
            "{file}: {:?}",
            loader.epoch_stats().bad
        );
    }
    // A configured column that does not exist is an error naming it and the columns found.
    let mut c = cfg(&d.join("m.csv"));
    c.caption_column = Some("prompt_text".into());
    let err = DataLoader::new(&c, 1).err().unwrap().to_string();
    assert!(
        err.contains("prompt_text") && err.contains("caption, image"),
        "{err}"
    );
    // No recognisable image column.
    write(&d.join("bad.csv"), b"picture,text\nimgs/x.png,a\n");
    let err = DataLoader::new(&cfg(&d.join("bad.csv")), 1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no image path column") && err.contains("picture"),
        "{err}"
    );
}

#[test]
fn webdataset_shards_brace_pattern_and_list() {
    let dir = tempfile::tempdir().unwrap();
    for s in 0..3 {
        good_shard(dir.path(), s, 5);
    }
    let pattern = format!("{}/{{000000..000002}}.tar", dir.path().display());
    let mut c = cfg(Path::new(&pattern));
    c.shuffle = false;
    c.drop_last = false;
    let mut loader = DataLoader::new(&c, 4).unwrap();
    assert_eq!(loader.len_hint(), None);
    let b = drain_epoch(&mut loader);
    let keys = keys_of(&b);
    assert_eq!(keys.len(), 15);
    assert_eq!(keys[0], "000000.tar/s0_000");
    assert_eq!(keys[14], "000002.tar/s2_004");
    let caps: Vec<String> = b.iter().flat_map(|b| b.captions.clone()).collect();
    assert_eq!(caps[1], "shard 0 sample 1"); // from .json
    assert_eq!(caps[6], "shard 1 sample 1");
    assert_eq!(b.last().unwrap().len(), 3);
    assert_eq!(b[0].original_sizes[0], (20, 24));
    // Explicit list, and a folder of shards.
    let mut c2 = cfg(Path::new(""));
    c2.path = String::new();
    c2.shards = vec![dir.path().join("000002.tar"), dir.path().join("000000.tar")];
    c2.shuffle = false;
    let mut l2 = DataLoader::new(&c2, 5).unwrap();
    assert_eq!(l2.next_batch().unwrap().keys[0], "000002.tar/s2_000");
    let mut c3 = cfg(dir.path());
    c3.shuffle = false;
    let mut l3 = DataLoader::new(&c3, 5).unwrap();
    assert!(l3.description().contains("3 shard"), "{}", l3.description());
    assert_eq!(l3.next_batch().unwrap().keys[0], "000000.tar/s0_000");
    // Shuffled: every sample once per epoch, in a different order from file order.
    let mut c4 = cfg(Path::new(&pattern));
    c4.shuffle_buffer = 4;
    c4.drop_last = false;
    let mut l4 = DataLoader::new(&c4, 4).unwrap();
    let shuffled = keys_of(&drain_epoch(&mut l4));
    assert_ne!(shuffled, keys);
    let mut sorted = shuffled.clone();
    sorted.sort();
    assert_eq!(sorted, keys);
}

// ---------------------------------------------------------------- decoding

#[test]
fn decodes_jpeg_png_webp_gray_palette_16bit_and_alpha() {
    let img = pattern(12, 10, 5);
    let check_rgb8 = |bytes: &[u8], tol: i32, what: &str| {
        let DecodedImage::U8(d) = decode_image(bytes, 1 << 20).unwrap() else {
            panic!("{what}: expected 8-bit")
        };
        assert_eq!(d.dimensions(), (12, 10), "{what}");
        let worst = d
            .as_raw()
            .iter()
            .zip(img.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        assert!(worst <= tol, "{what}: max pixel error {worst}");
    };
    check_rgb8(&png_bytes(&img), 0, "png");
    check_rgb8(&webp_bytes(&img), 0, "webp lossless");
    check_rgb8(&jpeg_bytes(&img), 40, "jpeg");

    // Grayscale 8-bit: replicated to three channels.
    let gray = ImageBuffer::from_fn(8, 6, |x, y| Luma([(x * 30 + y) as u8]));
    let DecodedImage::U8(d) = decode_image(&png_bytes(&gray), 1 << 20).unwrap() else {
        panic!()
    };
    assert_eq!(d.get_pixel(3, 2).0, [92, 92, 92]);

    // 16-bit RGB keeps its precision.
    let deep: ImageBuffer<Rgb<u16>, Vec<u16>> =
        ImageBuffer::from_fn(4, 4, |x, _| Rgb([x as u16 * 1000 + 7, 65535, 0]));
    let DecodedImage::F32(d) = decode_image(&png_bytes(&deep), 1 << 20).unwrap() else {
        panic!("16-bit")
    };
    assert!((d.get_pixel(2, 1).0[0] - 2007.0 / 65535.0).abs() < 1e-6);
    assert_eq!(d.get_pixel(2, 1).0[1], 1.0);

    // RGBA: composited on white.
    let rgba: ImageBuffer<Rgba<u8>, Vec<u8>> = ImageBuffer::from_fn(4, 1, |x, _| match x {
        0 => Rgba([255, 0, 0, 255]),
        1 => Rgba([255, 0, 0, 0]),
        2 => Rgba([0, 0, 0, 128]),
        _ => Rgba([0, 0, 255, 51]),
    });
    let DecodedImage::U8(d) = decode_image(&png_bytes(&rgba), 1 << 20).unwrap() else {
        panic!()
    };
    assert_eq!(d.get_pixel(0, 0).0, [255, 0, 0]);
    assert_eq!(d.get_pixel(1, 0).0, [255, 255, 255]);
    assert_eq!(d.get_pixel(2, 0).0, [127, 127, 127]);
    assert_eq!(d.get_pixel(3, 0).0, [204, 204, 255]);

    // 16-bit gray + alpha.
    let la16: ImageBuffer<image::LumaA<u16>, Vec<u16>> =
        ImageBuffer::from_pixel(2, 2, image::LumaA([0, 32768]));
    let DecodedImage::F32(d) = decode_image(&png_bytes(&la16), 1 << 20).unwrap() else {
        panic!()
    };
    assert!((d.get_pixel(0, 0).0[0] - (1.0 - 32768.0 / 65535.0)).abs() < 1e-5);

    // Palette PNG with transparency.
    let DecodedImage::U8(d) = decode_image(&palette_png(), 1 << 20).unwrap() else {
        panic!()
    };
    assert_eq!(d.dimensions(), (2, 2));
    assert_eq!(d.get_pixel(0, 0).0, [10, 20, 30]);
    assert_eq!(d.get_pixel(1, 0).0, [200, 100, 50]);
    assert_eq!(d.get_pixel(0, 1).0, [255, 255, 255]); // palette entry 2 is fully transparent
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend(crc32(&body).to_be_bytes());
}

/// A 2x2 8-bit palette PNG: [[0, 1], [2, 1]] with entry 2 transparent.
fn palette_png() -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(2u32.to_be_bytes());
    ihdr.extend(2u32.to_be_bytes());
    ihdr.extend([8, 3, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"PLTE", &[10, 20, 30, 200, 100, 50, 1, 2, 3]);
    png_chunk(&mut out, b"tRNS", &[255, 255, 0]);
    let raw = [0u8, 0, 1, 0, 2, 1];
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).unwrap();
    png_chunk(&mut out, b"IDAT", &z.finish().unwrap());
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A JPEG with an EXIF APP1 segment carrying `orientation`.
fn jpeg_with_orientation(img: &RgbImage, orientation: u16) -> Vec<u8> {
    let jpeg = jpeg_bytes(img);
    let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    tiff.extend(1u16.to_be_bytes()); // one entry
    tiff.extend(0x0112u16.to_be_bytes()); // Orientation
    tiff.extend(3u16.to_be_bytes()); // SHORT
    tiff.extend(1u32.to_be_bytes());
    tiff.extend(orientation.to_be_bytes());
    tiff.extend([0, 0]);
    tiff.extend(0u32.to_be_bytes()); // no next IFD
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend(tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend([0xFF, 0xE1]);
    out.extend(((app1.len() + 2) as u16).to_be_bytes());
    out.extend(app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn exif_orientation_is_applied() {
    // 40 wide, 20 high: left half red, right half blue.
    let img = RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let DecodedImage::U8(d) = decode_image(&jpeg_with_orientation(&img, 1), 1 << 20).unwrap()
    else {
        panic!()
    };
    assert_eq!(d.dimensions(), (40, 20));
    // 6: rotate 90 degrees clockwise to display: the left half goes to the top.
    let DecodedImage::U8(d) = decode_image(&jpeg_with_orientation(&img, 6), 1 << 20).unwrap()
    else {
        panic!()
    };
    assert_eq!(d.dimensions(), (20, 40));
    let top = d.get_pixel(10, 5).0;
    let bottom = d.get_pixel(10, 35).0;
    assert!(top[0] > 200 && top[2] < 60, "top {top:?}");
    assert!(bottom[2] > 200 && bottom[0] < 60, "bottom {bottom:?}");
    // 3: rotate 180: red on the right.
    let DecodedImage::U8(d) = decode_image(&jpeg_with_orientation(&img, 3), 1 << 20).unwrap()
    else {
        panic!()
    };
    assert!(d.get_pixel(35, 10).0[0] > 200);
    // The loader reports the upright size as the original size.
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("r.jpg"), &jpeg_with_orientation(&img, 6));
    write_metadata(dir.path(), &[("r.jpg", "rotated")]);
    let mut loader = DataLoader::new(&cfg(dir.path()), 1).unwrap();
    assert_eq!(loader.next_batch().unwrap().original_sizes, vec![(40, 20)]);
}

// ---------------------------------------------------------------- preprocessing

#[test]
fn center_crop_flip_and_values_are_exact() {
    // 64 wide, 32 high: no resize to 32x32, center crop at x = 16.
    let img = pattern(64, 32, 9);
    let t = Transform {
        height: 32,
        width: 32,
        crop: CropMode::Center,
        flip: false,
    };
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let p = t.apply(&DecodedImage::U8(img.clone()), &mut rng);
    assert_eq!(p.original_size, (32, 64));
    assert_eq!(p.crop_top_left, (0, 16));
    assert!(!p.flipped);
    assert_eq!(p.pixels.size(), vec![3, 32, 32]);
    let pp = flat(&p.pixels);
    for c in 0..3 {
        for y in 0..32u32 {
            for x in 0..32u32 {
                let want = u8_to_unit(img.get_pixel(x + 16, y).0[c]);
                let got = pp[c * 1024 + y as usize * 32 + x as usize];
                assert!(
                    (got - want).abs() <= 1e-6,
                    "c {c} y {y} x {x}: {got} vs {want}"
                );
            }
        }
    }
    // Always flipping: the output is the mirror image, and the crop offset is given in
    // the mirrored image (same centered offset here).
    let tf = Transform { flip: true, ..t };
    let mut flips = 0;
    for seed in 0..16 {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let q = tf.apply(&DecodedImage::U8(img.clone()), &mut rng);
        let qq = flat(&q.pixels);
        if q.flipped {
            flips += 1;
            for c in 0..3 {
                for y in [0usize, 13] {
                    for x in [0usize, 5, 31] {
                        assert_eq!(qq[c * 1024 + y * 32 + x], pp[c * 1024 + y * 32 + 31 - x]);
                    }
                }
            }
            assert_eq!(q.crop_top_left, (0, 16));
        } else {
            assert_eq!(qq, pp);
        }
    }
    assert!(flips > 2 && flips < 14, "{flips} flips of 16");
    // Odd margin: Python rounding of 1.5 gives 2.
    let t = Transform {
        height: 32,
        width: 32,
        crop: CropMode::Center,
        flip: false,
    };
    let p = t.apply(&DecodedImage::U8(pattern(35, 32, 0)), &mut rng);
    assert_eq!(p.crop_top_left, (0, 2));
    let pp = flat(&p.pixels);
    assert!((pp[0] - u8_to_unit(pattern(35, 32, 0).get_pixel(2, 0).0[0])).abs() <= 1e-6);
}

#[test]
fn random_crop_is_in_bounds_and_matches_the_source_region() {
    let img = pattern(80, 32, 1);
    let t = Transform {
        height: 32,
        width: 32,
        crop: CropMode::Random,
        flip: true,
    };
    let mut lefts = HashSet::new();
    for seed in 0..40 {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let p = t.apply(&DecodedImage::U8(img.clone()), &mut rng);
        let (top, left) = p.crop_top_left;
        assert_eq!(top, 0);
        assert!(left <= 48);
        lefts.insert(left);
        let pp = flat(&p.pixels);
        // Offset in the mirrored image when flipped: source column = 80 - 1 - (left + x).
        for x in [0u32, 17, 31] {
            let src_x = if p.flipped { 79 - (left + x) } else { left + x };
            let want = u8_to_unit(img.get_pixel(src_x, 3).0[0]);
            assert!(
                (pp[3 * 32 + x as usize] - want).abs() <= 1e-6,
                "seed {seed} x {x}"
            );
        }
    }
    assert!(lefts.len() > 10, "random crops not spread: {lefts:?}");
}

#[test]
fn resize_shortest_side_preserves_content() {
    // A 200x100 image: left half dark, right half light, resized to 64 high then
    // center-cropped 64x64: columns 0..~32 of the 128-wide image are cut.
    let img = RgbImage::from_fn(200, 100, |x, _| {
        if x < 100 {
            Rgb([20, 40, 60])
        } else {
            Rgb([220, 200, 180])
        }
    });
    let t = Transform {
        height: 64,
        width: 64,
        crop: CropMode::Center,
        flip: false,
    };
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let p = t.apply(&DecodedImage::U8(img), &mut rng);
    assert_eq!(p.original_size, (100, 200));
    assert_eq!(p.crop_top_left, (0, 32));
    let pp = flat(&p.pixels);
    let at = |c: usize, y: usize, x: usize| pp[c * 4096 + y * 64 + x];
    assert!((at(0, 10, 5) - (20.0 / 127.5 - 1.0)).abs() < 1e-6);
    assert!((at(2, 60, 60) - (180.0 / 127.5 - 1.0)).abs() < 1e-6);
    // The boundary falls at column 64 - 32 = 32 of the crop.
    assert!(at(0, 30, 29) < -0.5 && at(0, 30, 34) > 0.5);
    // Uniform 16-bit image scaled up: constant output, full precision.
    let deep = image::Rgb32FImage::from_pixel(10, 20, Rgb([0.25, 0.5, 1.0]));
    let t = Transform {
        height: 32,
        width: 32,
        crop: CropMode::Center,
        flip: false,
    };
    let p = t.apply(&DecodedImage::F32(deep), &mut rng);
    let pp = flat(&p.pixels);
    assert!(pp[..1024].iter().all(|v| (v + 0.5).abs() < 1e-5));
    assert!(pp[2048..].iter().all(|v| (v - 1.0).abs() < 1e-5));
}

#[test]
fn downscaling_is_antialiased() {
    // A one-pixel checkerboard shrunk 8x must come out as flat mid-grey: point
    // sampling (no antialiasing) would keep black and white pixels.
    let board = RgbImage::from_fn(256, 256, |x, y| {
        if (x + y) % 2 == 0 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let t = Transform {
        height: 32,
        width: 32,
        crop: CropMode::Center,
        flip: false,
    };
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let p = t.apply(&DecodedImage::U8(board), &mut rng);
    let worst = flat(&p.pixels).iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(worst < 0.02, "max deviation from grey {worst}");
}

#[test]
fn non_square_resolution() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("a.png"),
        &png_bytes(&solid(50, 50, [0, 255, 0])),
    );
    write_metadata(dir.path(), &[("a.png", "green")]);
    let c: DataConfig = toml::from_str(&format!(
        "path = {:?}\nresolution = [16, 32]",
        dir.path().display().to_string()
    ))
    .unwrap();
    let mut loader = DataLoader::new(&c, 1).unwrap();
    let b = loader.next_batch().unwrap();
    assert_eq!(b.images.size(), vec![1, 3, 16, 32]);
    assert_eq!(b.crop_top_lefts, vec![(8, 0)]);
    assert!(
        max_abs_diff(
            &b.images.select(1, 1),
            &Tensor::ones([1, 16, 32], (tch::Kind::Float, tch::Device::Cpu))
        ) < 1e-6
    );
}

// ---------------------------------------------------------------- order and resume

fn shuffled_cfg(dir: &Path) -> DataConfig {
    let mut c = cfg(dir);
    c.crop = CropMode::Random;
    c.flip = true;
    c.seed = 1234;
    c
}

#[test]
fn seeded_shuffle_is_deterministic_per_epoch_and_independent_of_workers() {
    let dir = tempfile::tempdir().unwrap();
    let rows = good_folder(dir.path(), 12);
    let refs: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write_metadata(dir.path(), &refs);
    let run = |workers: usize, seed: u64| {
        let mut c = shuffled_cfg(dir.path());
        c.num_workers = workers;
        c.seed = seed;
        let mut l = DataLoader::new(&c, 4).unwrap();
        let e0 = drain_epoch(&mut l);
        let e1 = drain_epoch(&mut l);
        (e0, e1)
    };
    let (a0, a1) = run(1, 1234);
    let (b0, b1) = run(4, 1234);
    assert_eq!(keys_of(&a0), keys_of(&b0));
    assert_eq!(keys_of(&a1), keys_of(&b1));
    for (x, y) in a0.iter().chain(&a1).zip(b0.iter().chain(&b1)) {
        assert!(tensors_equal(&x.images, &y.images));
        assert_eq!(x.crop_top_lefts, y.crop_top_lefts);
        assert_eq!(x.flipped, y.flipped);
    }
    // A permutation per epoch, different between epochs and seeds.
    let mut sorted = keys_of(&a0);
    sorted.sort();
    assert_eq!(sorted, rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>());
    assert_ne!(keys_of(&a0), keys_of(&a1));
    let (c0, _) = run(2, 99);
    assert_ne!(keys_of(&a0), keys_of(&c0));
}

fn check_resume(c: &DataConfig, batch: usize, before: usize, after: usize) {
    let mut a = DataLoader::new(c, batch).unwrap();
    for _ in 0..before {
        a.next_batch().unwrap();
    }
    let saved = serde_json::to_string(&a.state()).unwrap();
    let expected: Vec<Batch> = (0..after).map(|_| a.next_batch().unwrap()).collect();
    drop(a);
    let mut b = DataLoader::new(c, batch).unwrap();
    b.next_batch().unwrap(); // a different position first; restore must override it
    b.restore(&serde_json::from_str(&saved).unwrap()).unwrap();
    for (i, e) in expected.iter().enumerate() {
        let got = b.next_batch().unwrap();
        assert_eq!(got.keys, e.keys, "batch {i} after restore");
        assert_eq!(got.crop_top_lefts, e.crop_top_lefts);
        assert_eq!(got.flipped, e.flipped);
        assert!(tensors_equal(&got.images, &e.images), "batch {i} pixels");
    }
}

#[test]
fn restored_loader_yields_the_identical_remaining_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let rows = good_folder(dir.path(), 10);
    let refs: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write_metadata(dir.path(), &refs);
    // Add a bad file so that positions count bad items too.
    write(&dir.path().join("zz_bad.png"), b"");
    let mut meta = std::fs::read_to_string(dir.path().join("metadata.jsonl")).unwrap();
    meta.push_str("{\"file_name\": \"zz_bad.png\", \"text\": \"bad\"}\n");
    write(&dir.path().join("metadata.jsonl"), meta.as_bytes());
    let c = shuffled_cfg(dir.path());
    // 10 usable of 11 items, batch 3: 3 batches per epoch; resume mid-epoch and across epochs.
    check_resume(&c, 3, 1, 6);
    check_resume(&c, 3, 3, 4);
    check_resume(&c, 3, 5, 2);
    // State is small and names the seed.
    let l = DataLoader::new(&c, 3).unwrap();
    let s = l.state();
    assert_eq!((s.epoch, s.index, s.seed), (0, 0, 1234));
    // A state for another seed or dataset is refused.
    let mut other = c.clone();
    other.seed = 5;
    let mut l2 = DataLoader::new(&other, 3).unwrap();
    assert!(l2.restore(&s).unwrap_err().to_string().contains("seed"));
    let mut s2 = s.clone();
    s2.fingerprint = "0000".into();
    let mut l3 = DataLoader::new(&c, 3).unwrap();
    assert!(l3
        .restore(&s2)
        .unwrap_err()
        .to_string()
        .contains("different dataset"));
}

#[test]
fn restored_webdataset_loader_yields_the_identical_remaining_sequence() {
    let dir = tempfile::tempdir().unwrap();
    for s in 0..3 {
        good_shard(dir.path(), s, 7);
    }
    let mut c = shuffled_cfg(Path::new(&format!(
        "{}/{{000000..000002}}.tar",
        dir.path().display()
    )));
    c.shuffle_buffer = 3;
    check_resume(&c, 4, 2, 8);
    check_resume(&c, 4, 5, 3);
}

// ---------------------------------------------------------------- bad input

/// Build a folder with `n_good` good samples plus the given extra (file, bytes, caption).
fn folder_with(extra: &[(&str, Option<Vec<u8>>, &str)], n_good: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<(String, String)> = good_folder(dir.path(), n_good);
    for (name, bytes, caption) in extra {
        if let Some(b) = bytes {
            write(&dir.path().join(name), b);
        }
        rows.push((name.to_string(), caption.to_string()));
    }
    let refs: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write_metadata(dir.path(), &refs);
    dir
}

/// Lenient: one epoch skips exactly the bad sample of `kind`; strict: an error naming `name`.
fn check_bad(dir: &Path, kind: BadKind, name: &str) {
    let mut c = cfg(dir);
    c.drop_last = false;
    let mut loader = DataLoader::new(&c, 2).unwrap();
    let n: usize = drain_epoch(&mut loader).iter().map(|b| b.len()).sum();
    let stats = loader.last_epoch_stats().unwrap().clone();
    assert_eq!(n, 3, "{kind}: usable samples");
    assert_eq!(stats.samples, 3);
    assert_eq!(stats.bad.get(kind), 1, "{kind}: counts {:?}", stats.bad);
    assert_eq!(stats.bad.total(), 1, "{kind}: counts {:?}", stats.bad);
    c.strict = true;
    let mut strict = DataLoader::new(&c, 2).unwrap();
    let err = loop {
        match strict.next_batch() {
            Ok(_) => continue,
            Err(e) => break e.to_string(),
        }
    };
    assert!(
        err.contains(name),
        "{kind}: strict error should name {name}: {err}"
    );
    assert!(
        err.contains(kind.name()),
        "{kind}: strict error should give the kind: {err}"
    );
}

fn truncated_jpeg() -> Vec<u8> {
    let j = jpeg_bytes(&pattern(64, 64, 3));
    j[..j.len() * 2 / 3].to_vec()
}

#[test]
fn bad_truncated_jpeg() {
    let bytes = truncated_jpeg();
    let (kind, detail) = decode_image(&bytes, 1 << 20).unwrap_err();
    assert_eq!(kind, BadKind::Corrupt);
    assert!(detail.contains("truncated JPEG"), "{detail}");
    // Data appended after a complete JPEG (as motion photos do) is fine, and so is
    // an EXIF segment before the image.
    let mut appended = jpeg_bytes(&pattern(64, 64, 3));
    appended.extend(vec![0x17; 10_000]);
    assert!(decode_image(&appended, 1 << 20).is_ok());
    assert!(decode_image(&jpeg_with_orientation(&pattern(64, 64, 3), 1), 1 << 20).is_ok());
    // Truncation right after the header segments.
    let full = jpeg_bytes(&pattern(64, 64, 3));
    let sos = full.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    assert_eq!(
        decode_image(&full[..sos + 20], 1 << 20).unwrap_err().0,
        BadKind::Corrupt
    );
    let dir = folder_with(&[("trunc.jpg", Some(bytes), "t")], 3);
    check_bad(dir.path(), BadKind::Corrupt, "trunc.jpg");
}

#[test]
fn bad_truncated_and_corrupt_png() {
    let p = png_bytes(&pattern(64, 64, 3));
    assert_eq!(
        decode_image(&p[..p.len() / 2], 1 << 20).unwrap_err().0,
        BadKind::Corrupt
    );
    let mut corrupt = p.clone();
    for b in corrupt.iter_mut().skip(60).take(200) {
        *b ^= 0x5A;
    }
    assert_eq!(
        decode_image(&corrupt, 1 << 20).unwrap_err().0,
        BadKind::Corrupt
    );
    let dir = folder_with(&[("broken.png", Some(corrupt), "c")], 3);
    check_bad(dir.path(), BadKind::Corrupt, "broken.png");
}

#[test]
fn bad_zero_byte_file() {
    let dir = folder_with(&[("empty.jpg", Some(Vec::new()), "e")], 3);
    check_bad(dir.path(), BadKind::ZeroByte, "empty.jpg");
}

#[test]
fn bad_non_image_with_image_extension() {
    let dir = folder_with(
        &[("notes.png", Some(b"these are not pixels\n".to_vec()), "n")],
        3,
    );
    check_bad(dir.path(), BadKind::NotAnImage, "notes.png");
}

#[test]
fn bad_enormous_dimensions_refused_from_the_header() {
    // A PNG header announcing 100000 x 100000 pixels and no data at all: refused as too
    // large (not as corrupt), so nothing was decoded.
    let mut bomb = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png_chunk(&mut bomb, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&[0u8; 64]).unwrap();
    png_chunk(&mut bomb, b"IDAT", &z.finish().unwrap());
    png_chunk(&mut bomb, b"IEND", &[]);
    let (kind, detail) = decode_image(&bomb, 89_478_485).unwrap_err();
    assert_eq!(kind, BadKind::TooLarge, "{detail}");
    assert!(detail.contains("100000x100000"), "{detail}");
    // The limit is configurable: a 64x64 image is too large for max_pixels = 4000.
    let ok = png_bytes(&pattern(64, 64, 0));
    assert_eq!(decode_image(&ok, 4000).unwrap_err().0, BadKind::TooLarge);
    assert!(decode_image(&ok, 4096).is_ok());
    let dir = folder_with(&[("huge.png", Some(bomb), "h")], 3);
    check_bad(dir.path(), BadKind::TooLarge, "huge.png");
}

#[test]
fn bad_missing_and_unreadable_files() {
    let dir = folder_with(&[("gone.png", None, "g")], 3);
    check_bad(dir.path(), BadKind::MissingFile, "gone.png");
    // A directory where an image should be cannot be read as a file.
    let dir = folder_with(&[("folder.png", None, "f")], 3);
    std::fs::create_dir(dir.path().join("folder.png")).unwrap();
    check_bad(dir.path(), BadKind::Unreadable, "folder.png");
}

#[test]
fn bad_missing_and_empty_captions_are_found_while_listing() {
    // .txt layout: one image without caption file, one with an empty caption.
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        write(
            &dir.path().join(format!("g{i}.png")),
            &png_bytes(&pattern(20, 20, i)),
        );
        write(&dir.path().join(format!("g{i}.txt")), b"fine");
    }
    write(
        &dir.path().join("nocap.png"),
        &png_bytes(&pattern(20, 20, 7)),
    );
    write(
        &dir.path().join("blank.png"),
        &png_bytes(&pattern(20, 20, 8)),
    );
    write(&dir.path().join("blank.txt"), b"  \n ");
    let mut loader = DataLoader::new(&cfg(dir.path()), 1).unwrap();
    let kinds: Vec<(BadKind, bool)> = loader
        .index_bad()
        .iter()
        .map(|b| {
            (
                b.kind,
                b.location.contains("nocap.png") || b.location.contains("blank.png"),
            )
        })
        .collect();
    assert_eq!(kinds.len(), 2);
    assert!(kinds.contains(&(BadKind::MissingCaption, true)));
    assert!(kinds.contains(&(BadKind::EmptyCaption, true)));
    assert_eq!(loader.len_hint(), Some(3));
    assert_eq!(loader.next_batch().unwrap().captions, vec!["fine"]);
    let mut c = cfg(dir.path());
    c.strict = true;
    let err = DataLoader::new(&c, 1).err().unwrap().to_string();
    assert!(
        err.contains("blank.png") && err.contains("empty caption"),
        "{err}"
    );

    // Manifest layout: a null caption, an empty caption, an image missing from the
    // metadata, and a line that is not JSON.
    let dir = folder_with(&[("e.png", Some(png_bytes(&pattern(20, 20, 1))), "   ")], 3);
    write(
        &dir.path().join("unlisted.png"),
        &png_bytes(&pattern(20, 20, 2)),
    );
    let mut meta = std::fs::read_to_string(dir.path().join("metadata.jsonl")).unwrap();
    meta.push_str("{\"file_name\": \"img_00.png\", \"text\": null}\nnot json\n");
    write(&dir.path().join("metadata.jsonl"), meta.as_bytes());
    let loader = DataLoader::new(&cfg(dir.path()), 1).unwrap();
    let mut counts = BadCounts::default();
    for b in loader.index_bad() {
        counts.add(b.kind);
    }
    assert_eq!(counts.get(BadKind::EmptyCaption), 1, "{counts}");
    assert_eq!(counts.get(BadKind::MissingCaption), 2, "{counts}"); // null + unlisted
    assert_eq!(counts.get(BadKind::BadRecord), 1, "{counts}");
    let mut c = cfg(dir.path());
    c.strict = true;
    let err = DataLoader::new(&c, 1).err().unwrap().to_string();
    assert!(err.contains("e.png") || err.contains("line"), "{err}");
}

#[test]
fn captions_longer_than_the_token_window_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..4 {
        write(
            &dir.path().join(format!("g{i}.png")),
            &png_bytes(&pattern(20, 20, i)),
        );
    }
    let long = "word ".repeat(12);
    write_metadata(
        dir.path(),
        &[
            ("g0.png", "short one"),
            ("g1.png", &long),
            ("g2.png", "abcdefghij"),
            ("g3.png", "x"),
        ],
    );
    // Words by default: one caption over 9 words.
    let mut c = cfg(dir.path());
    c.max_caption_tokens = Some(9);
    let mut l = DataLoader::new(&c, 4).unwrap();
    let b = l.next_batch().unwrap();
    assert_eq!(
        b.len(),
        4,
        "long captions are kept (the encoder truncates them)"
    );
    assert_eq!(l.epoch_stats().captions_truncated, 1);
    // A token counter (one token per character here): "abcdefghij" and the long one.
    let counter: TokenCounter = Arc::new(|s: &str| s.chars().count());
    let mut l = DataLoader::new(&c, 4).unwrap().with_token_counter(counter);
    l.next_batch().unwrap();
    assert_eq!(l.epoch_stats().captions_truncated, 2);
    l.next_batch().unwrap();
    assert_eq!(l.last_epoch_stats().unwrap().captions_truncated, 2);
}

fn shard_with(dir: &Path, name: &str, members: Vec<(String, Vec<u8>)>) -> PathBuf {
    let p = dir.join(name);
    write_tar(&p, &members);
    p
}

fn jpg_member(key: &str, seed: u8) -> (String, Vec<u8>) {
    (format!("{key}.jpg"), jpeg_bytes(&pattern(20, 20, seed)))
}

fn txt_member(key: &str, text: &str) -> (String, Vec<u8>) {
    (format!("{key}.txt"), text.as_bytes().to_vec())
}

#[test]
fn bad_shards_missing_duplicate_keys_and_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = shard_with(
        d,
        "a.tar",
        vec![
            jpg_member("k1", 1),
            txt_member("k1", "one"),
            jpg_member("k2", 2),
            txt_member("k2", "two"),
            // Duplicate key later in the shard.
            jpg_member("k1", 3),
            txt_member("k1", "one again"),
            // Missing caption, and a caption without image.
            jpg_member("k3", 4),
            txt_member("k4", "no image"),
            jpg_member("k5", 5),
            txt_member("k5", "five"),
        ],
    );
    let missing = d.join("nope.tar");
    // A damaged shard: garbage after one good sample.
    let mut damaged = Vec::new();
    {
        let mut b = tar::Builder::new(&mut damaged);
        for (name, bytes) in [jpg_member("d1", 6), txt_member("d1", "d one")] {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, bytes.as_slice()).unwrap();
        }
        b.finish().unwrap();
    }
    let end = damaged.len() - 1024; // drop the end-of-archive blocks
    damaged.truncate(end);
    damaged.extend(vec![0x41; 700]);
    write(&d.join("damaged.tar"), &damaged);
    let mut c = cfg(Path::new(""));
    c.path = String::new();
    c.shards = vec![good.clone(), missing.clone(), d.join("damaged.tar")];
    c.shuffle = false;
    c.drop_last = false;
    let mut loader = DataLoader::new(&c, 10).unwrap();
    let b = loader.next_batch().unwrap();
    assert_eq!(
        b.keys,
        vec!["a.tar/k1", "a.tar/k2", "a.tar/k5", "damaged.tar/d1"]
    );
    assert_eq!(b.captions, vec!["one", "two", "five", "d one"]);
    let s = loader.last_epoch_stats().unwrap();
    assert_eq!(s.bad.get(BadKind::DuplicateKey), 1, "{}", s.bad);
    assert_eq!(s.bad.get(BadKind::MissingCaption), 1, "{}", s.bad);
    assert_eq!(s.bad.get(BadKind::MissingImage), 1, "{}", s.bad);
    assert_eq!(s.bad.get(BadKind::MissingShard), 1, "{}", s.bad);
    assert_eq!(s.bad.get(BadKind::CorruptShard), 1, "{}", s.bad);
    // Strict: a missing shard is refused when opening.
    c.strict = true;
    let err = DataLoader::new(&c, 2).err().unwrap().to_string();
    assert!(err.contains("nope.tar"), "{err}");
    // Strict: the duplicate key is an error naming the shard and member.
    c.shards = vec![good];
    let mut l = DataLoader::new(&c, 10).unwrap();
    let err = l.next_batch().unwrap_err().to_string();
    assert!(
        err.contains("a.tar") && err.contains("member k1.jpg") && err.contains("duplicate key"),
        "{err}"
    );
}

#[test]
fn zero_usable_samples_is_an_error_before_training() {
    // Listing finds nothing usable.
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.png"), &png_bytes(&pattern(8, 8, 0)));
    write_metadata(dir.path(), &[("a.png", "")]);
    let err = DataLoader::new(&cfg(dir.path()), 1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no usable samples") && err.contains("empty caption"),
        "{err}"
    );
    // Every listed file is bad: the first batch is an error, not an endless loop.
    let dir = folder_with(
        &[
            ("x.jpg", Some(Vec::new()), "x"),
            ("y.png", Some(b"text".to_vec()), "y"),
        ],
        0,
    );
    let mut l = DataLoader::new(&cfg(dir.path()), 1).unwrap();
    let err = l.next_batch().unwrap_err().to_string();
    assert!(err.contains("no usable samples"), "{err}");
    // Fewer usable samples than one batch with drop_last.
    let dir = folder_with(&[("x.jpg", Some(Vec::new()), "x")], 2);
    let mut l = DataLoader::new(&cfg(dir.path()), 3).unwrap();
    let err = l.next_batch().unwrap_err().to_string();
    assert!(err.contains("fewer than one batch"), "{err}");
    // Shards that all miss.
    let mut c = cfg(Path::new("/nonexistent-adt/{0..3}.tar"));
    c.shuffle = false;
    let err = DataLoader::new(&c, 1).err().unwrap().to_string();
    assert!(err.contains("no usable samples"), "{err}");
    // A path that does not exist.
    let err = DataLoader::new(&cfg(Path::new("/nonexistent-adt-data")), 1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("/nonexistent-adt-data") && err.contains("does not exist"),
        "{err}"
    );
}

// ---------------------------------------------------------------- config

#[test]
fn config_from_toml() {
    let c: DataConfig = toml::from_str(
        "path = \"data/{000000..000009}.tar\"\nformat = \"webdataset\"\nresolution = 1024\ncrop = \"random\"\nflip = true\nstrict = true\nmax_pixels = 1000000\nshuffle = false\nseed = 7\nnum_workers = 2\ncaption_column = \"txt\"\nimage_column = \"jpg\"\n",
    )
    .unwrap();
    assert_eq!(c.format, DataFormat::Webdataset);
    assert_eq!(c.resolution.hw(), (1024, 1024));
    assert_eq!(c.crop, CropMode::Random);
    assert!(c.flip && c.strict && !c.shuffle);
    assert_eq!((c.max_pixels, c.seed, c.num_workers), (1_000_000, 7, 2));
    let d: DataConfig = toml::from_str("path = \"x\"").unwrap();
    assert_eq!(d, DataConfig::for_path("x"));
    let err = toml::from_str::<DataConfig>("path = \"x\"\nresolutoin = 5")
        .unwrap_err()
        .to_string();
    assert!(err.contains("resolutoin"), "{err}");
    let err = toml::from_str::<DataConfig>("path = \"x\"\ncrop = \"diagonal\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("diagonal"), "{err}");
    assert!(DataConfig::default().validate().is_err());
    assert_eq!(
        expand_braces("d/{08..10}.tar").unwrap(),
        vec!["d/08.tar", "d/09.tar", "d/10.tar"]
    );
}

// ---------------------------------------------------------------- caches

fn key(model: &str, res: u32) -> CacheKey {
    CacheKey {
        kind: "vae_latents".into(),
        dataset_hash: "d1".into(),
        model_id: model.into(),
        resolution: (res, res),
        dtype: "f32".into(),
        extra: BTreeMap::from([("scaling_factor".to_string(), "0.18215".to_string())]),
    }
}

#[test]
fn cache_reuses_same_key_and_rebuilds_stale() {
    let root = tempfile::tempdir().unwrap();
    let (cache, status) = FeatureCache::open(root.path(), key("m1", 512)).unwrap();
    assert_eq!(status, CacheStatus::Created);
    let lat = Tensor::arange(24, (tch::Kind::Float, tch::Device::Cpu)).view([1, 4, 2, 3]);
    let id = latent_entry_id("abc123", (0, 16), true);
    assert_ne!(id, latent_entry_id("abc123", (0, 16), false));
    assert_eq!(cache.get(&id).unwrap().map(|v| v.len()), None);
    cache
        .put(&id, &[("latent".to_string(), lat.shallow_clone())])
        .unwrap();
    let got = cache.get(&id).unwrap().unwrap();
    assert_eq!(got[0].0, "latent");
    assert!(tensors_equal(&got[0].1, &lat));
    assert!(cache.get("other").unwrap().is_none());
    assert_eq!(cache.len().unwrap(), 1);
    drop(cache);
    // Same key: reused with its entry.
    let (cache, status) = FeatureCache::open(root.path(), key("m1", 512)).unwrap();
    assert_eq!(status, CacheStatus::Reused { entries: 1 });
    assert!(cache.contains(&id).unwrap());
    drop(cache);
    // Another model: stale, wiped, the old value is not served.
    let (cache, status) = FeatureCache::open(root.path(), key("m2", 512)).unwrap();
    match status {
        CacheStatus::Rebuilt { reason } => {
            assert!(reason.contains("model_id: m1 -> m2"), "{reason}")
        }
        s => panic!("expected a rebuild, got {s:?}"),
    }
    assert!(cache.get(&id).unwrap().is_none());
    assert_eq!(cache.len().unwrap(), 0);
    cache
        .put(&id, &[("latent".to_string(), lat.shallow_clone() * 2)])
        .unwrap();
    drop(cache);
    // Another resolution: stale too.
    let (cache, status) = FeatureCache::open(root.path(), key("m2", 1024)).unwrap();
    assert!(
        matches!(status, CacheStatus::Rebuilt { ref reason } if reason.contains("resolution")),
        "{status:?}"
    );
    assert!(cache.get(&id).unwrap().is_none());
    // An entry file written under another key (copied in by hand) is not served.
    let (other, _) = FeatureCache::open(&root.path().join("elsewhere"), key("m9", 1024)).unwrap();
    other
        .put(&id, &[("latent".to_string(), lat.shallow_clone())])
        .unwrap();
    let rel = walk(other.dir())
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let dest = cache.dir().join(rel.strip_prefix(other.dir()).unwrap());
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(&rel, &dest).unwrap();
    assert!(cache.get(&id).unwrap().is_none());
    // Text entries key on the caption.
    assert_eq!(text_entry_id("a cat"), text_entry_id("a cat"));
    assert_ne!(text_entry_id("a cat"), text_entry_id("a dog"));
    assert!(FeatureCache::open(
        root.path(),
        CacheKey {
            kind: "../x".into(),
            ..key("m", 1)
        }
    )
    .is_err());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn model_identity_changes_with_weights() {
    let d = tempfile::tempdir().unwrap();
    write(&d.path().join("config.json"), b"{\"a\": 1}");
    write(&d.path().join("model.safetensors"), &vec![1u8; 5000]);
    let a = model_identity(d.path()).unwrap();
    assert_eq!(a, model_identity(d.path()).unwrap());
    let mut w = vec![1u8; 5000];
    w[4000] = 2;
    write(&d.path().join("model.safetensors"), &w);
    let b = model_identity(d.path()).unwrap();
    assert_ne!(a, b);
    write(&d.path().join("config.json"), b"{\"a\": 2}");
    assert_ne!(b, model_identity(d.path()).unwrap());
    assert!(model_identity(&d.path().join("missing")).is_err());
}

// ---------------------------------------------------------------- inspect, bench

#[test]
fn inspect_data_reports_counts_sizes_captions_and_bad() {
    let dir = folder_with(
        &[
            (
                "wide.png",
                Some(png_bytes(&solid(300, 100, [1, 2, 3]))),
                "a wide image of some length",
            ),
            ("bad.jpg", Some(Vec::new()), "zero"),
            ("trunc.jpg", Some(truncated_jpeg()), "t"),
        ],
        3,
    );
    let r = inspect_data(dir.path(), false).unwrap();
    assert_eq!(r.usable, 4);
    assert_eq!(r.bad.get(BadKind::ZeroByte), 1);
    assert_eq!(r.bad.get(BadKind::Corrupt), 1);
    let w = r.width.unwrap();
    assert_eq!((w.min, w.median, w.max), (32, 32, 300));
    assert_eq!(r.height.unwrap().max, 100);
    assert_eq!(r.short_side_buckets[0].1, 4); // all under 256 px
    assert_eq!(
        r.aspect_buckets
            .iter()
            .find(|b| b.0.starts_with(">=2"))
            .unwrap()
            .1,
        1
    );
    let c = r.caption_words.unwrap();
    assert_eq!((c.min, c.max), (2, 6));
    let text = r.to_string();
    for needle in [
        "usable samples: 4",
        "zero-byte file: 1",
        "bad.jpg",
        "trunc.jpg",
        "caption length",
        "shortest side",
    ] {
        assert!(text.contains(needle), "report lacks {needle:?}:\n{text}");
    }
    println!("{text}");
    let err = inspect_data(dir.path(), true).unwrap_err().to_string();
    assert!(
        err.contains("bad.jpg") || err.contains("trunc.jpg"),
        "{err}"
    );
}

#[test]
fn bench_loader_runs() {
    let opts = BenchOptions {
        images: 18,
        image_size: 96,
        resolution: 64,
        batch_size: 4,
        num_workers: 2,
        ..Default::default()
    };
    let r = bench_loader(&opts).unwrap();
    assert_eq!(r.images, 16, "whole batches only");
    check_loader_bench(&r, &opts);
}

/// What every loader benchmark must show: all the images of the whole batches were
/// delivered, the rate is the count over the time, the JPEGs have the size of photos
/// of that side, and the temporary folder is gone.
fn check_loader_bench(r: &BenchReport, opts: &BenchOptions) {
    println!("{r}");
    assert_eq!(r.images, opts.images / opts.batch_size * opts.batch_size);
    assert_eq!(
        (r.image_size, r.resolution),
        (opts.image_size, opts.resolution)
    );
    assert!(r.seconds > 0.0 && r.images_per_s.is_finite() && r.images_per_s > 0.0);
    assert!((r.images_per_s * r.seconds - r.images as f64).abs() < 1e-6 * r.images as f64);
    // Quality-90 JPEGs of the photo-like images: tens of KiB at 512 px, more at 768.
    let px = (opts.image_size as u64).pow(2);
    assert!(
        r.mean_jpeg_bytes > px / 40 && r.mean_jpeg_bytes < px * 3,
        "{} bytes per {}-px JPEG",
        r.mean_jpeg_bytes,
        opts.image_size
    );
    let prefix = format!("adt-bench-data-{}-", std::process::id());
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(
        left.is_empty(),
        "temporary benchmark folders left: {left:?}"
    );
}

/// The real measurement: a few hundred 512 px JPEGs (run with --ignored --nocapture).
#[test]
#[ignore]
fn bench_loader_512() {
    let opts = BenchOptions {
        images: 320,
        ..Default::default()
    };
    check_loader_bench(&bench_loader(&opts).unwrap(), &opts);
}

/// The same with a resize on every sample (768 px sources to 512 px).
#[test]
#[ignore]
fn bench_loader_768_to_512() {
    let opts = BenchOptions {
        images: 320,
        image_size: 768,
        ..Default::default()
    };
    check_loader_bench(&bench_loader(&opts).unwrap(), &opts);
}

/// Run `f` on a thread; fail (instead of hanging the suite) if it blocks.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .expect("blocked (a FIFO was opened?)")
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().to_string_lossy().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

/// A dataset reads nothing outside its folder: absolute paths, `..` and symbolic
/// links are bad samples (links inside the folder are followed with
/// `follow_symlinks = true`, links leading out never).
#[test]
fn dataset_paths_stay_inside_the_dataset() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("ds");
    let outside = top.path().join("secret.png");
    write(&outside, &png_bytes(&pattern(32, 32, 9)));
    let mut rows = good_folder(&dir, 2);
    std::os::unix::fs::symlink(&outside, dir.join("link.png")).unwrap();
    std::os::unix::fs::symlink(dir.join("img_00.png"), dir.join("inlink.png")).unwrap();
    let outside_s = outside.display().to_string();
    for (f, t) in [
        (outside_s.as_str(), "absolute"),
        ("../secret.png", "climbs out"),
        ("sub/../../secret.png", "climbs out too"),
        ("link.png", "a link out"),
        ("inlink.png", "a link inside"),
    ] {
        rows.push((f.to_string(), t.to_string()));
    }
    let rows_ref: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write_metadata(&dir, &rows_ref);
    let r = inspect_data(&dir, false).unwrap();
    assert_eq!(r.usable, 2, "{r}");
    assert_eq!(r.bad.get(BadKind::OutsideDataset), 5, "{r}");
    let err = inspect_data(&dir, true).unwrap_err().to_string();
    assert!(
        err.contains("outside the dataset") && err.contains("line 3"),
        "{err}"
    );
    // Following links: the inside one is used, the outside one still refused.
    let mut c = cfg(&dir);
    c.follow_symlinks = true;
    c.drop_last = false;
    let mut loader = DataLoader::new(&c, 1).unwrap();
    let batches = drain_epoch(&mut loader);
    assert_eq!(batches.len(), 3);
    let n_out = loader
        .index_bad()
        .iter()
        .filter(|b| b.kind == BadKind::OutsideDataset)
        .count();
    assert_eq!(n_out, 4, "{:?}", loader.index_bad());

    // .txt captions: a linked image is refused too.
    let txt = top.path().join("txt");
    write(&txt.join("a.png"), &png_bytes(&pattern(32, 32, 1)));
    write(&txt.join("a.txt"), b"a caption");
    std::os::unix::fs::symlink(&outside, txt.join("b.png")).unwrap();
    write(&txt.join("b.txt"), b"b caption");
    let r = inspect_data(&txt, false).unwrap();
    assert_eq!(r.usable, 1, "{r}");
    assert_eq!(r.bad.get(BadKind::OutsideDataset), 1, "{r}");

    // A shard folder with a linked shard is refused.
    let shards = top.path().join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    write(&top.path().join("real.tar"), b"");
    std::os::unix::fs::symlink(top.path().join("real.tar"), shards.join("000.tar")).unwrap();
    let mut c = cfg(&shards);
    c.format = DataFormat::Webdataset;
    let err = DataLoader::new(&c, 1).err().unwrap().to_string();
    assert!(err.contains("symbolic link"), "{err}");
}

/// A FIFO named by a dataset is not opened (it would block forever).
#[test]
fn a_fifo_is_a_bad_sample_not_a_hang() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("meta");
    let mut rows = good_folder(&dir, 2);
    mkfifo(&dir.join("pipe.png"));
    rows.push(("pipe.png".into(), "a pipe".into()));
    let rows_ref: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write_metadata(&dir, &rows_ref);
    let d = dir.clone();
    let r = within(60, move || inspect_data(&d, false).unwrap());
    assert_eq!(r.usable, 2, "{r}");
    assert_eq!(r.bad.get(BadKind::Unreadable), 1, "{r}");
    assert!(r.to_string().contains("not a regular file"), "{r}");

    let txt = top.path().join("txt");
    write(&txt.join("a.png"), &png_bytes(&pattern(32, 32, 1)));
    write(&txt.join("a.txt"), b"a caption");
    write(&txt.join("b.png"), &png_bytes(&pattern(32, 32, 2)));
    mkfifo(&txt.join("b.txt"));
    let r = within(60, move || inspect_data(&txt, false).unwrap());
    assert_eq!(r.usable, 1, "{r}");
    assert_eq!(r.bad.get(BadKind::Unreadable), 1, "{r}");
}

/// A metadata line that is not UTF-8 is one bad record (strict: an error naming
/// its line), not a refusal of the whole dataset.
#[test]
fn a_non_utf8_metadata_line_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let rows = good_folder(dir.path(), 3);
    let mut bytes = Vec::new();
    for (i, (f, t)) in rows.iter().enumerate() {
        if i == 1 {
            bytes.extend_from_slice(b"{\"file_name\": \"img_01.png\", \"text\": \"caf\xe9\"}\n");
        } else {
            bytes.extend_from_slice(
                format!("{}\n", serde_json::json!({"file_name": f, "text": t})).as_bytes(),
            );
        }
    }
    write(&dir.path().join("metadata.jsonl"), &bytes);
    let r = inspect_data(dir.path(), false).unwrap();
    assert_eq!(r.usable, 2, "{r}");
    assert_eq!(r.bad.get(BadKind::BadRecord), 1, "{r}");
    let err = inspect_data(dir.path(), true).unwrap_err().to_string();
    assert!(err.contains("line 2") && err.contains("UTF-8"), "{err}");
    // The same in a CSV manifest.
    let csv = dir.path().join("m.csv");
    write(
        &csv,
        b"file_name,text\nimg_00.png,one\nimg_01.png,caf\xe9\nimg_02.png,three\n",
    );
    let r = inspect_data(&csv, false).unwrap();
    assert_eq!(r.usable, 2, "{r}");
    assert_eq!(r.bad.get(BadKind::BadRecord), 1, "{r}");
    let err = inspect_data(&csv, true).unwrap_err().to_string();
    assert!(err.contains("line 3") && err.contains("UTF-8"), "{err}");
}
