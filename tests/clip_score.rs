//! CLIP vision tower, CLIP image preprocessing and CLIP score against transformers
//! (tests/fixtures/clip_model, written by scripts/fixtures/make_clip_vision.py), and
//! the `adt eval --clip` / `adt sample` wiring.

mod common;

use adt::eval::clip_score::{prompts_for, read_prompts, score_with, ClipScorer, PROMPTS_FILE};
use adt::eval::EvalReport;
use adt::models::clip_vision::{load_rgb8, ClipImageProcessor, ClipVisionModel};
use common::fixtures;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

const FIXTURE: &str = "clip_model";

fn io() -> HashMap<String, Tensor> {
    fixtures::io(FIXTURE).unwrap()
}

/// (file, prompt) of the fixture's PNG images, in the order of the stored tensors.
fn fixture_images() -> Vec<(PathBuf, String)> {
    let case = fixtures::case(FIXTURE).unwrap();
    case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                fixtures::dir(FIXTURE).join(i["file"].as_str().unwrap()),
                i["prompt"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn vision_tower_matches_transformers_in_both_layouts() {
    let io = io();
    let full = ClipVisionModel::load(&fixtures::dir(FIXTURE), Device::Cpu, Kind::Float).unwrap();
    assert!(full.full_clip_model && full.model.has_projection());
    let out = tch::no_grad(|| full.model.forward(&io["pixel_values"])).unwrap();
    let mut worst: f64 = 0.0;
    for (name, ours) in [
        ("image_last_hidden_state", &out.last_hidden_state),
        ("image_pooler_output", &out.pooler_output),
        ("image_embeds", out.image_embeds.as_ref().unwrap()),
    ] {
        let err = fixtures::max_rel_err(ours, &io[name]);
        println!("CLIPModel folder, {name}: max rel err {err:.3e}");
        worst = worst.max(err);
    }
    let dir = fixtures::dir(FIXTURE).join("vision_with_projection");
    let proj = ClipVisionModel::load(&dir, Device::Cpu, Kind::Float).unwrap();
    assert!(!proj.full_clip_model && proj.model.has_projection());
    let embeds = tch::no_grad(|| proj.model.forward(&io["pixel_values"]))
        .unwrap()
        .image_embeds
        .unwrap();
    let err = fixtures::max_rel_err(&embeds, &io["vision_proj_image_embeds"]);
    println!("CLIPVisionModelWithProjection folder, image_embeds: max rel err {err:.3e}");
    worst = worst.max(err);
    assert!(worst < 1e-5, "vision tower: max rel err {worst:.3e}");
}

#[test]
fn vision_tower_rejects_a_wrong_input_size() {
    let m = ClipVisionModel::load(&fixtures::dir(FIXTURE), Device::Cpu, Kind::Float).unwrap();
    let e = m
        .model
        .forward(&Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu)))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[B, 3, 30, 30]"), "{e}");
}

#[test]
fn text_tower_tokenizer_and_logits_match_transformers() {
    let io = io();
    let scorer = ClipScorer::load(&fixtures::dir(FIXTURE), Device::Cpu).unwrap();
    let case = fixtures::case(FIXTURE).unwrap();
    let prompts: Vec<&str> = case["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let (ids, _) = scorer
        .tokenizer
        .encode_padded(&prompts, adt::models::tokenizer::Pad::Config)
        .unwrap();
    assert_eq!(
        Vec::<i64>::try_from(ids.flatten(0, -1)).unwrap(),
        Vec::<i64>::try_from(io["input_ids"].flatten(0, -1)).unwrap(),
        "token ids differ from transformers' CLIPTokenizer"
    );
    let txt = scorer.text_embeds(&prompts).unwrap();
    let err_txt = fixtures::max_rel_err(&txt, &io["text_embeds"]);
    let img = scorer
        .image_embeds_from_pixels(&io["pixel_values"])
        .unwrap();
    let norm = |t: &Tensor| t / t.norm_scalaropt_dim(2, [-1i64].as_slice(), true);
    let cos = norm(&img).matmul(&norm(&txt).transpose(0, 1));
    let err_cos = max_abs(&cos, &io["cosine"]);
    let logits = &cos * scorer.logit_scale.exp();
    let err_logits = fixtures::max_rel_err(&logits, &io["logits_per_image"]);
    println!(
        "text_embeds max rel err {err_txt:.3e}; cosine max abs err {err_cos:.3e}; logits_per_image max rel err {err_logits:.3e}"
    );
    assert!(err_txt < 1e-5, "text_embeds: {err_txt:.3e}");
    assert!(err_cos < 1e-5, "cosine: {err_cos:.3e}");
    assert!(err_logits < 1e-5, "logits_per_image: {err_logits:.3e}");
}

#[test]
fn preprocessing_matches_clip_image_processor() {
    let io = io();
    let proc = ClipImageProcessor::from_dir(&fixtures::dir(FIXTURE), 30).unwrap();
    assert_eq!(proc, ClipImageProcessor::new(30));
    let ours = Tensor::stack(
        &fixture_images()
            .iter()
            .map(|(f, _)| proc.preprocess(&load_rgb8(f).unwrap()).unwrap())
            .collect::<Vec<_>>(),
        0,
    );
    // Both sides quantise the resized image to 8 bits, so any resampling difference
    // shows up as whole steps of 1/255/std (>= 0.0142); float32 normalisation
    // differences would be ~1e-7.
    let pil = max_abs(&ours, &io["png_pixel_values_pil"]);
    println!("pixel_values vs CLIPImageProcessorPil: max abs diff {pil:.3e}");
    assert!(pil <= 1e-6, "PIL backend: {pil:.3e}");
    if let Some(tv) = io.get("png_pixel_values_torchvision") {
        // The torchvision backend resizes in float and rounds once; it differs from
        // Pillow's two 8-bit passes by at most one level on some pixels.
        let d = max_abs(&ours, tv);
        let level = 1.0 / 255.0 / 0.26130258;
        println!(
            "pixel_values vs torchvision-backed CLIPImageProcessor: max abs diff {d:.3e} ({:.2} 8-bit levels)",
            d / level
        );
        assert!(d <= level * 1.0001 + 1e-6, "torchvision backend: {d:.3e}");
    }
}

#[test]
fn clip_score_matches_transformers() {
    let io = io();
    let scorer = ClipScorer::load(&fixtures::dir(FIXTURE), Device::Cpu).unwrap();
    let (files, prompts): (Vec<PathBuf>, Vec<String>) = fixture_images().into_iter().unzip();
    // Batches of 2, so that the last batch is partial.
    let r = score_with(&scorer, &files, &prompts, 2).unwrap();
    let want_cos = Vec::<f64>::try_from(io["png_cosine"].to_kind(Kind::Double)).unwrap();
    let want_score = Vec::<f64>::try_from(io["png_clip_score"].to_kind(Kind::Double)).unwrap();
    let want_mean = io["png_clip_score_mean"].double_value(&[]);
    assert_eq!(r.images.len(), 3);
    for (i, s) in r.images.iter().enumerate() {
        println!(
            "{} {:?}: cos {:.6} (transformers {:.6}), score {:.4} (transformers {:.4})",
            s.file, s.prompt, s.cosine, want_cos[i], s.score, want_score[i]
        );
        assert!((s.cosine - want_cos[i]).abs() < 1e-5);
        assert!((s.score - want_score[i]).abs() < 1e-3);
    }
    println!("mean {:.6} (transformers {want_mean:.6})", r.mean);
    assert!((r.mean - want_mean).abs() < 1e-3);
    // The fixture has a clearly negative cosine: its score is clamped to 0 and the
    // mean differs from the unclamped one.
    let neg = want_cos
        .iter()
        .position(|c| *c < -0.03)
        .expect("fixture has a negative cosine");
    assert_eq!(r.images[neg].score, 0.0);
    let unclamped = 100.0 * r.images.iter().map(|s| s.cosine).sum::<f64>() / 3.0;
    assert!(r.mean - unclamped > 1.0, "{} vs {unclamped}", r.mean);
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// Rewrite `dir/model.safetensors` with `f` applied to its tensors.
fn rewrite_weights(dir: &Path, f: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let p = dir.join("model.safetensors");
    let mut t = adt::weights::read_safetensors(&p).unwrap();
    f(&mut t);
    adt::weights::save_safetensors(&t, &p, None, None).unwrap();
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn loader_errors_name_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let load_vision = |d: &Path| ClipVisionModel::load(d, Device::Cpu, Kind::Float);
    let load_full = |d: &Path| ClipScorer::load(d, Device::Cpu);

    // A missing vision tensor.
    let d = tmp.path().join("missing_vision");
    copy_dir(&fixtures::dir(FIXTURE), &d);
    rewrite_weights(&d, |t| {
        t.retain(|(n, _)| n != "vision_model.post_layernorm.weight")
    });
    for e in [err_of(load_vision(&d)), err_of(load_full(&d))] {
        println!("{e}");
        assert!(
            e.contains("vision_model.post_layernorm.weight") && e.contains("missing"),
            "{e}"
        );
    }

    // A missing text tensor or logit_scale matters for the score, not the vision tower.
    for name in [
        "text_model.final_layer_norm.bias",
        "logit_scale",
        "text_projection.weight",
    ] {
        let d = tmp.path().join(format!("missing_{name}"));
        copy_dir(&fixtures::dir(FIXTURE), &d);
        rewrite_weights(&d, |t| t.retain(|(n, _)| n != name));
        assert!(load_vision(&d).is_ok());
        let e = err_of(load_full(&d));
        println!("{e}");
        assert!(e.contains(name), "{e}");
    }

    // An unexpected tensor, and a wrong shape.
    let d = tmp.path().join("extra");
    copy_dir(&fixtures::dir(FIXTURE), &d);
    rewrite_weights(&d, |t| {
        t.push((
            "vision_model.encoder.layers.2.mlp.fc1.bias".into(),
            Tensor::zeros([64], (Kind::Float, Device::Cpu)),
        ))
    });
    for e in [err_of(load_vision(&d)), err_of(load_full(&d))] {
        assert!(
            e.contains("vision_model.encoder.layers.2.mlp.fc1.bias") && e.contains("unexpected"),
            "{e}"
        );
    }
    let d = tmp.path().join("shape");
    copy_dir(&fixtures::dir(FIXTURE), &d);
    rewrite_weights(&d, |t| {
        for (n, v) in t.iter_mut() {
            if n == "visual_projection.weight" {
                *v = Tensor::zeros([8, 32], (Kind::Float, Device::Cpu));
            }
        }
    });
    let e = err_of(load_vision(&d));
    assert!(
        e.contains("visual_projection.weight") && e.contains("[8, 32]"),
        "{e}"
    );

    // A vision-only folder is no CLIPModel; a folder without tokenizer files neither.
    let e = err_of(load_full(
        &fixtures::dir(FIXTURE).join("vision_with_projection"),
    ));
    assert!(e.contains("not a CLIPModel config"), "{e}");
    let d = tmp.path().join("no_tokenizer");
    copy_dir(&fixtures::dir(FIXTURE), &d);
    for f in ["vocab.json", "merges.txt", "tokenizer.json"] {
        std::fs::remove_file(d.join(f)).unwrap();
    }
    let e = err_of(load_full(&d));
    assert!(e.contains("no CLIP tokenizer files"), "{e}");

    // Unsupported preprocessing settings name the field.
    let d = tmp.path().join("resample");
    copy_dir(&fixtures::dir(FIXTURE), &d);
    let p = d.join("preprocessor_config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("\"resample\": 3", "\"resample\": 2")).unwrap();
    let e = err_of(ClipImageProcessor::from_dir(&d, 30));
    assert!(
        e.contains("resample") && e.contains("preprocessor_config.json"),
        "{e}"
    );
}

#[test]
fn prompts_come_from_prompts_jsonl_or_metadata_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let files = vec![d.join("a.png"), d.join("sub/b.png")];
    std::fs::write(
        d.join("metadata.jsonl"),
        "{\"file_name\": \"a.png\", \"text\": \"first\"}\n{\"file_name\": \"sub/b.png\", \"caption\": \"second\"}\n",
    )
    .unwrap();
    assert_eq!(prompts_for(d, &files).unwrap(), vec!["first", "second"]);
    // prompts.jsonl wins over metadata.jsonl.
    std::fs::write(
        d.join(PROMPTS_FILE),
        "{\"file\": \"a.png\", \"prompt\": \"p1\"}\n{\"file\": \"sub/b.png\", \"prompt\": \"p2\"}\n",
    )
    .unwrap();
    assert_eq!(prompts_for(d, &files).unwrap(), vec!["p1", "p2"]);
    let e = err_of(prompts_for(d, &[d.join("c.png")]));
    assert!(e.contains("c.png") && e.contains("no prompt"), "{e}");
    std::fs::write(d.join(PROMPTS_FILE), "{\"file\": \"a.png\"}\n").unwrap();
    let e = err_of(read_prompts(d));
    assert!(e.contains("line 1") && e.contains("\"prompt\""), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = err_of(read_prompts(empty.path()));
    assert!(
        e.contains("prompts.jsonl") && e.contains("metadata.jsonl"),
        "{e}"
    );
}

fn adt(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_adt"))
        .args(args)
        .output()
        .unwrap();
    if !out.status.success() {
        panic!(
            "adt {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn eval_with_clip(generated: &Path, reference: &Path, json: &Path) -> (EvalReport, String) {
    let out = adt(&[
        "eval",
        "--generated",
        generated.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
        "--features",
        "dinov2",
        "--features-path",
        fixtures::dir("dinov2").to_str().unwrap(),
        "--clip",
        fixtures::dir(FIXTURE).to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let report = EvalReport::from_json(&std::fs::read_to_string(json).unwrap()).unwrap();
    (report, String::from_utf8_lossy(&out.stdout).to_string())
}

#[test]
fn adt_eval_clip_reports_the_transformers_score() {
    let tmp = tempfile::tempdir().unwrap();
    let gen = tmp.path().join("generated");
    std::fs::create_dir_all(&gen).unwrap();
    for (f, _) in fixture_images() {
        std::fs::copy(&f, gen.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::copy(
        fixtures::dir(FIXTURE).join(PROMPTS_FILE),
        gen.join(PROMPTS_FILE),
    )
    .unwrap();
    let json = tmp.path().join("report.json");
    let (report, stdout) = eval_with_clip(&gen, &gen, &json);
    print!("{stdout}");
    let want = io()["png_clip_score_mean"].double_value(&[]);
    let got = report.clip_score.expect("clip_score in the JSON report");
    println!("adt eval --clip: {got:.6}, transformers: {want:.6}");
    assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    assert!(stdout.contains("CLIP score"), "{stdout}");

    // A report written before the field existed still parses.
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("clip_score");
    let old = EvalReport::from_json(&v.to_string()).unwrap();
    assert_eq!(old.clip_score, None);
    assert!(!old.to_json().unwrap().contains("clip_score"));

    // Without prompts the CLIP score is an error that says what is missing.
    std::fs::remove_file(gen.join(PROMPTS_FILE)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_adt"))
        .args([
            "eval",
            "--generated",
            gen.to_str().unwrap(),
            "--reference",
            gen.to_str().unwrap(),
            "--features",
            "dinov2",
            "--features-path",
            fixtures::dir("dinov2").to_str().unwrap(),
            "--clip",
            fixtures::dir(FIXTURE).to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("prompts.jsonl"), "{err}");
}

#[test]
fn adt_sample_writes_prompts_that_adt_eval_clip_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let pipe = tmp.path().join("pipe");
    let out = tmp.path().join("samples");
    adt(&[
        "init-pipeline",
        "--preset",
        "tiny",
        "--out",
        pipe.to_str().unwrap(),
    ]);
    let prompts = ["a red cat", "a bicycle on a wall", "snow"];
    let mut args = vec![
        "sample",
        "--model",
        pipe.to_str().unwrap(),
        "--steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    for p in &prompts {
        args.extend(["--prompt", p]);
    }
    adt(&args);
    let gen = out.join("ddim-2steps-cfg7");
    let index = std::fs::read_to_string(gen.join(PROMPTS_FILE)).unwrap();
    println!("{index}");
    let lines: Vec<serde_json::Value> = index
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (i, (l, p)) in lines.iter().zip(prompts).enumerate() {
        assert_eq!(l["file"], format!("{i:05}.png"));
        assert_eq!(l["prompt"], p);
        assert!(gen.join(format!("{i:05}.png")).is_file());
    }

    let (report, stdout) = eval_with_clip(&gen, &gen, &tmp.path().join("r.json"));
    print!("{stdout}");
    let got = report.clip_score.expect("clip_score in the JSON report");
    // The same images and prompts scored through the library.
    let scorer = ClipScorer::load(&fixtures::dir(FIXTURE), Device::Cpu).unwrap();
    let files: Vec<PathBuf> = (0..3).map(|i| gen.join(format!("{i:05}.png"))).collect();
    let want = score_with(&scorer, &files, &prompts.map(String::from), 8).unwrap();
    println!(
        "adt eval --clip on adt sample output: {got:.6} (library: {:.6})",
        want.mean
    );
    assert!((got - want.mean).abs() < 1e-9);
    assert_eq!(report.generated.count, 3);
}
