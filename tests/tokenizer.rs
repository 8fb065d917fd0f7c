//! The CLIP tokenizer against ids from OpenAI's reference tokenizer.

mod common;

use adt::models::tokenizer::{run_tokenize, ClipTokenizer, Pad};
use common::fixtures;
use std::path::Path;

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn strings() -> Vec<serde_json::Value> {
    let case = fixtures::case("tokenizer_clip").unwrap();
    let s = case["strings"].as_array().unwrap().clone();
    assert_eq!(s.len(), 16);
    s
}

fn tok_dir() -> std::path::PathBuf {
    fixtures::dir("tokenizer_clip").join("tokenizer")
}

/// Copy some files of the fixture tokenizer folder to a fresh folder.
fn partial_copy(files: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in files {
        std::fs::copy(tok_dir().join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

#[test]
fn vocab_merges_match_reference_exactly() {
    // Without tokenizer.json, to be sure which path runs.
    let tmp = partial_copy(&[
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]);
    for dir in [tmp.path(), tok_dir().as_path()] {
        let tok = ClipTokenizer::from_dir(dir).unwrap();
        let mut bad = 0;
        for s in strings() {
            let text = s["text"].as_str().unwrap();
            let ours = tok.encode(text).unwrap();
            let expected = ids(&s["ids"]);
            if ours != expected {
                println!("MISMATCH {text:?}\n  ours     {ours:?}\n  expected {expected:?}");
                bad += 1;
            }
        }
        assert_eq!(bad, 0, "{bad} of 16 strings differ ({})", dir.display());
    }
    println!("vocab.json + merges.txt: 16/16 strings exact");
}

#[test]
fn padded_rows_and_truncation() {
    let tok = ClipTokenizer::from_dir(&tok_dir()).unwrap();
    let io = fixtures::io("tokenizer_clip").unwrap();
    let all = strings();
    let texts: Vec<&str> = all.iter().map(|s| s["text"].as_str().unwrap()).collect();
    let n_trunc_expected = all
        .iter()
        .filter(|s| s["truncated"].as_bool().unwrap())
        .count();
    assert!(n_trunc_expected > 0);
    for (pad, key, io_key) in [
        (Pad::Eos, "ids_pad_eos_77", "input_ids_pad_eos"),
        (Pad::Zero, "ids_pad_zero_77", "input_ids_pad_zero"),
    ] {
        let (t, n_trunc) = tok.encode_padded(&texts, pad).unwrap();
        assert_eq!(t.size(), [16, 77]);
        assert_eq!(t.kind(), tch::Kind::Int64);
        assert_eq!(n_trunc, n_trunc_expected);
        assert!(t.equal(&io[io_key]), "{io_key} differs");
        for (i, s) in all.iter().enumerate() {
            let (row, cut) = tok.encode_row(texts[i], pad).unwrap();
            assert_eq!(row, ids(&s[key]), "{key} of {:?}", texts[i]);
            assert_eq!(cut, s["truncated"].as_bool().unwrap());
        }
    }
    // The folder's pad_token is <|endoftext|>.
    assert_eq!(tok.pad_id(Pad::Config), 49407);
}

#[test]
fn pad_token_from_config() {
    let tmp = partial_copy(&["vocab.json", "merges.txt"]);
    let tok = ClipTokenizer::from_dir(tmp.path()).unwrap();
    assert_eq!(
        tok.pad_id(Pad::Config),
        49407,
        "no config: pad with end-of-text"
    );
    std::fs::write(
        tmp.path().join("special_tokens_map.json"),
        r#"{"bos_token": {"content": "<|startoftext|>"}, "pad_token": {"content": "!", "lstrip": false}}"#,
    )
    .unwrap();
    let tok = ClipTokenizer::from_dir(tmp.path()).unwrap();
    assert_eq!(tok.pad_id(Pad::Config), 0);
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"pad_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    let tok = ClipTokenizer::from_dir(tmp.path()).unwrap();
    assert_eq!(tok.pad_id(Pad::Config), 49407, "tokenizer_config.json wins");
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"pad_token": "<|nope|>"}"#,
    )
    .unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(tmp.path()).err().unwrap());
    assert!(
        err.contains("<|nope|>") && err.contains("pad_token"),
        "{err}"
    );
}

#[test]
fn tokenizer_json_fallback() {
    let tmp = partial_copy(&[
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]);
    let tok = ClipTokenizer::from_dir(tmp.path()).unwrap();
    let mut agree = 0;
    for s in strings() {
        let text = s["text"].as_str().unwrap();
        let ours = tok.encode(text).unwrap();
        let expected = if s["tokenizer_json_agrees"].as_bool().unwrap() {
            agree += 1;
            ids(&s["ids"])
        } else {
            ids(&s["ids_tokenizer_json"])
        };
        assert_eq!(ours, expected, "tokenizer.json on {text:?}");
    }
    println!("tokenizer.json: 16/16 as documented ({agree} equal to the reference)");
}

#[test]
fn missing_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(tmp.path()).err().unwrap());
    assert!(err.contains(&tmp.path().display().to_string()), "{err}");
    assert!(
        err.contains("vocab.json") && err.contains("merges.txt") && err.contains("tokenizer.json"),
        "{err}"
    );
}

#[test]
fn run_tokenize_cli() {
    let texts = vec![
        "A Photo Of A CAT".to_string(),
        "fish &amp; chips".to_string(),
    ];
    let dir: &Path = &tok_dir();
    let unpadded = run_tokenize(dir, None, &texts).unwrap();
    assert_eq!(unpadded[0], vec![49406, 320, 1125, 539, 320, 2368, 49407]);
    assert_eq!(unpadded[1], vec![49406, 2759, 261, 8855, 49407]);
    let zero = run_tokenize(dir, Some("zero"), &texts).unwrap();
    assert_eq!(zero[1].len(), 77);
    assert_eq!(&zero[1][..6], &[49406, 2759, 261, 8855, 49407, 0]);
    let eos = run_tokenize(dir, Some("eos"), &texts).unwrap();
    assert_eq!(eos[0][76], 49407);
    assert!(run_tokenize(dir, Some("left"), &texts).is_err());
}
