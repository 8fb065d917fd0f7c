//! The README's figures against the files in `assets/` they come from: the demo's
//! three-seed table and the CPU table (`assets/demo-results/`), the H200 benchmark
//! table and the memory and SD3 figures (`assets/bench-h200/`), the base model's
//! parameter count (`assets/demo-base/unet`). Each number is compared at the precision
//! the README prints it with, so an asset re-measured or a number typed by hand that
//! differs fails here.

use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).unwrap()
}

fn json(rel: &str) -> Value {
    let p = root().join(rel);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The numbers of a piece of text, as written ("194.4", "0.540", "68"); digits that
/// are part of a word ("float32", "bf16", "32x32", "H200") are not numbers.
fn numbers(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit() && (i == 0 || !chars[i - 1].is_alphanumeric());
        if !starts {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len()
            && (chars[j].is_ascii_digit()
                || (chars[j] == '.' && j + 1 < chars.len() && chars[j + 1].is_ascii_digit()))
        {
            j += 1;
        }
        if j == chars.len() || !chars[j].is_alphanumeric() {
            out.push(chars[i..j].iter().collect());
        }
        while j < chars.len() && chars[j].is_alphanumeric() {
            j += 1;
        }
        i = j;
    }
    out
}

/// The README as one line (markdown line breaks are spaces).
fn flat(text: &str) -> String {
    text.lines().collect::<Vec<_>>().join(" ")
}

/// The numbers after `marker` (which must occur once) in the flattened README.
fn after(flat: &str, marker: &str) -> Vec<String> {
    let hits = flat.matches(marker).count();
    assert_eq!(hits, 1, "README: {hits} occurrences of {marker:?}");
    numbers(&flat[flat.find(marker).unwrap() + marker.len()..])
}

/// `written` is `value` rounded to the decimals `written` shows.
#[track_caller]
fn same(what: &str, written: &str, value: f64) {
    let decimals = written.split_once('.').map_or(0, |(_, d)| d.len());
    let want = format!("{value:.decimals$}");
    assert_eq!(
        written, want,
        "README {what}: {written}, the asset says {value}"
    );
}

/// The rows of the markdown table whose header line starts with `header`, as cells.
fn table(text: &str, header: &str) -> Vec<Vec<String>> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(header));
    assert!(lines.next().is_some(), "README: no table headed {header:?}");
    lines
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

fn models<'a>(report: &'a Value, name: &str) -> Vec<&'a Value> {
    report["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == name)
        .collect()
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

#[test]
fn demo_tables_match_the_reports() {
    let text = readme();
    // Three seeds on the GPU samples.
    let r = json("assets/demo-results/report.json");
    let rows = table(&text, "| model | FD (mean ± sd over 3 seeds)");
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let name = if row[0].starts_with("base") {
            "base"
        } else {
            &row[0].to_lowercase()
        };
        let ms = models(&r, name);
        let cells: Vec<Vec<String>> = row[1..].iter().map(|c| numbers(c)).collect();
        if name == "base" {
            same("base FD", &cells[0][0], ms[0]["fd"].as_f64().unwrap());
            same(
                "base colour L1",
                &cells[2][0],
                ms[0]["histogram_l1"].as_f64().unwrap(),
            );
            continue;
        }
        assert_eq!(ms.len(), 3, "{name}: seeds");
        let fds: Vec<f64> = ms.iter().map(|m| m["fd"].as_f64().unwrap()).collect();
        let (mean, sd) = mean_sd(&fds);
        same(&format!("{name} FD mean"), &cells[0][0], mean);
        same(&format!("{name} FD sd"), &cells[0][1], sd);
        for (i, m) in ms.iter().enumerate() {
            same(
                &format!("{name} seed {i} FD"),
                &cells[1][i],
                m["fd"].as_f64().unwrap(),
            );
            same(
                &format!("{name} seed {i} colour L1"),
                &cells[2][i],
                m["histogram_l1"].as_f64().unwrap(),
            );
        }
    }
    let f = flat(&text);
    let refs = after(&f, "Reference points: style gap");
    same("style gap", &refs[0], r["style_gap_fd"].as_f64().unwrap());
    same("floor", &refs[2], r["floor_fd"].as_f64().unwrap());
    // "by X to Y points": the smallest and largest per-seed margin of ADT over FT.
    let ft: Vec<f64> = models(&r, "ft")
        .iter()
        .map(|m| m["fd"].as_f64().unwrap())
        .collect();
    let adt: Vec<f64> = models(&r, "adt")
        .iter()
        .map(|m| m["fd"].as_f64().unwrap())
        .collect();
    let margins: Vec<f64> = ft.iter().zip(&adt).map(|(f, a)| f - a).collect();
    let by = after(&f, "for every seed (by ");
    same(
        "smallest margin",
        &by[0],
        margins.iter().cloned().fold(f64::MAX, f64::min),
    );
    same(
        "largest margin",
        &by[1],
        margins.iter().cloned().fold(f64::MIN, f64::max),
    );
    let avg = |name: &str| {
        let ms = models(&r, name);
        ms.iter()
            .map(|m| m["histogram_l1"].as_f64().unwrap())
            .sum::<f64>()
            / ms.len() as f64
    };
    let l1 = after(&f, "colour-histogram distance went up (");
    same("ADT mean colour L1", &l1[0], avg("adt"));
    same("base colour L1", &l1[1], avg("base"));
    same("FT mean colour L1", &l1[2], avg("ft"));

    // One seed on the CPU.
    let r = json("assets/demo-results/cpu-seed0/report.json");
    let rows = table(
        &text,
        "| model | FD | KID | colour-histogram L1 | training |",
    );
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let name = row[0].to_lowercase();
        let m = models(&r, &name)[0];
        let n: Vec<String> = row[1..].iter().flat_map(|c| numbers(c)).collect();
        same(&format!("CPU {name} FD"), &n[0], m["fd"].as_f64().unwrap());
        same(
            &format!("CPU {name} KID"),
            &n[1],
            m["kid"].as_f64().unwrap(),
        );
        same(
            &format!("CPU {name} colour L1"),
            &n[2],
            m["histogram_l1"].as_f64().unwrap(),
        );
        if name != "base" {
            same(
                &format!("CPU {name} training s"),
                &n[3],
                m["train_seconds"].as_f64().unwrap(),
            );
        }
    }
    let gap = after(&f, "(style gap ");
    same(
        "CPU style gap",
        &gap[0],
        r["style_gap_fd"].as_f64().unwrap(),
    );
    same("CPU floor", &gap[1], r["floor_fd"].as_f64().unwrap());
    let fd = |n: &str| models(&r, n)[0]["fd"].as_f64().unwrap();
    let ahead = after(&f, "ADT is ahead of FT by");
    same("CPU margin", &ahead[0], fd("ft") - fd("adt"));
    let wall = after(&f, "`adt demo` run took");
    same(
        "CPU demo wall time",
        &wall[0],
        r["wall_seconds"].as_f64().unwrap(),
    );
}

fn median(file: &Value, workload: &str, variant: &str) -> f64 {
    file["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["workload"] == workload && r["variant"] == variant)
        .unwrap_or_else(|| panic!("no row {workload} / {variant}"))["median_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("{workload} / {variant}: not measured"))
}

fn peak_gib(file: &Value, workload: &str) -> f64 {
    let row = file["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["workload"] == workload && r["variant"] == "baseline")
        .unwrap_or_else(|| panic!("no row {workload}"));
    row["peak_bytes"].as_f64().unwrap() / (1u64 << 30) as f64
}

/// The fastest measured variant of a workload and its median.
fn best(file: &Value, workload: &str) -> f64 {
    file["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["workload"] == workload && r["variant"] != "baseline")
        .filter_map(|r| r["median_ms"].as_f64())
        .fold(f64::MAX, f64::min)
}

#[test]
fn bench_table_matches_the_h200_files() {
    let text = readme();
    let dir = "assets/bench-h200";
    let reference = json(&format!("{dir}/pytorch-reference.json"));
    let rows = table(&text, "| workload | baseline (fp32 eager)");
    let plan = [
        (
            "one CFG UNet step",
            "unet",
            "unet_cfg_step",
            "unet_cfg_step",
        ),
        ("sampling", "sample", "sample_ddim50", "sample_ddim50"),
        ("ADT G+D", "adt", "adt_gd_s0", "adt_gd_s0"),
        ("ADT D-only", "adt", "adt_d_s0", ""),
        (
            "ADT, mean over an H = 5",
            "adt",
            "adt_h5_mean",
            "adt_h5_mean",
        ),
    ];
    assert_eq!(rows.len(), plan.len());
    for (row, (label, file, workload, reference_key)) in rows.iter().zip(plan) {
        assert!(row[0].starts_with(label), "{:?} vs {label}", row[0]);
        let f = json(&format!("{dir}/{file}.json"));
        let base = median(&f, workload, "baseline");
        let top = best(&f, workload);
        same(
            &format!("{workload} baseline ms"),
            &numbers(&row[1])[0],
            base,
        );
        same(&format!("{workload} best ms"), &numbers(&row[2])[0], top);
        same(
            &format!("{workload} ratio"),
            &numbers(&row[3])[0],
            top / base,
        );
        let refs = numbers(&row[4]);
        if reference_key.is_empty() {
            assert!(
                refs.is_empty(),
                "{workload}: a reference figure without a file"
            );
        } else {
            let want: Vec<f64> = reference[reference_key]
                .as_array()
                .unwrap_or_else(|| panic!("pytorch-reference.json: no {reference_key}"))
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(refs.len(), want.len(), "{workload}: reference figures");
            for (w, v) in refs.iter().zip(want) {
                same(&format!("{workload} PyTorch reference"), w, v);
            }
        }
    }
    let f = flat(&text);
    let unet = json(&format!("{dir}/unet.json"));
    let alone = after(&f, "bf16 + CUDA graph alone ");
    same(
        "bf16 + CUDA graph",
        &alone[0],
        median(&unet, "unet_cfg_step", "bf16+cuda_graph"),
    );

    // Peak memory against K.
    let mem = json(&format!("{dir}/memory.json"));
    let flat_k = after(&f, "per-step gradient decomposition): ");
    for k in ["1", "3", "8"] {
        same(
            &format!("peak K = {k}"),
            &flat_k[0],
            peak_gib(&mem, &format!("adt_gd_s0_k{k}")),
        );
    }
    let one = after(&f, "with the whole trajectory in one graph ");
    for (i, k) in ["1", "3", "8"].iter().enumerate() {
        same(
            &format!("one-graph peak K = {k}"),
            &one[i],
            peak_gib(&mem, &format!("adt_gd_s0_k{k}_onegraph")),
        );
    }
    let rm = after(&f, "(reference 22.8");
    let want = reference["memory_gib_k1_k3_k8"].as_array().unwrap();
    same("reference peak K = 1", "22.8", want[0].as_f64().unwrap());
    for (w, v) in rm.iter().zip(&want[1..]) {
        same("reference peak", w, v.as_f64().unwrap());
    }

    // SD3-medium.
    let sd3 = json(&format!("{dir}/sd3-medium.json"));
    let sd3m = json(&format!("{dir}/sd3-medium-memory.json"));
    let n = after(&f, "guided transformer step ");
    same(
        "SD3 step fp32",
        &n[0],
        median(&sd3, "transformer_cfg_step", "baseline"),
    );
    same(
        "SD3 step bf16",
        &n[1],
        median(&sd3, "transformer_cfg_step", "bf16"),
    );
    let n = after(&f, "sampling + decode ");
    same(
        "SD3 sampling fp32 s",
        &n[0],
        median(&sd3, "sample_flow28", "baseline") / 1000.0,
    );
    same(
        "SD3 sampling bf16 s",
        &n[1],
        median(&sd3, "sample_flow28", "bf16") / 1000.0,
    );
    same(
        "SD3 sampling bf16+tf32 s",
        &n[2],
        median(&sd3, "sample_flow28", "bf16+tf32") / 1000.0,
    );
    let n = after(&f, "ADT G+D from step 0 ");
    same(
        "SD3 G+D fp32 s",
        &n[0],
        median(&sd3, "adt_gd_s0", "baseline") / 1000.0,
    );
    same(
        "SD3 G+D bf16 s",
        &n[1],
        median(&sd3, "adt_gd_s0", "bf16") / 1000.0,
    );
    same(
        "SD3 D-only s",
        &n[2],
        median(&sd3m, "adt_d_s0", "baseline") / 1000.0,
    );
    let n = after(&f, "Peak memory of G+D ");
    same("SD3 peak K = 1", &n[0], peak_gib(&sd3m, "adt_gd_s0_k1"));
    same("SD3 peak K = 3", &n[0], peak_gib(&sd3m, "adt_gd_s0_k3"));
    same(
        "SD3 one-graph peak K = 1",
        &n[3],
        peak_gib(&sd3m, "adt_gd_s0_k1_onegraph"),
    );
    // params.unet counts every tensor, the stored 192 x 192 position grid of width 1536
    // included; the README gives the parameters.
    let medium = adt::models::mmdit::Sd3Config::medium();
    let grid = medium.pos_embed_max_size.unwrap().pow(2) * medium.inner_dim();
    let params = (sd3["params"]["unet"].as_f64().unwrap() - grid as f64) / 1e9;
    same(
        "SD3 parameters (B)",
        &after(&f, "sd3-medium`: random-initialised ")[0],
        params,
    );
}

/// "1.7 M parameters": the committed base UNet's tensors, counted from the safetensors
/// header.
#[test]
fn demo_base_parameter_count() {
    let p: &Path = &root().join("assets/demo-base/unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let count: u64 = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| {
            v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    let text = flat(&readme());
    let marker = " M parameters, 32x32 RGB";
    assert_eq!(text.matches(marker).count(), 1);
    let written = numbers(&text[..text.find(marker).unwrap()]);
    let written = &written[written.len() - 1..];
    same("base UNet parameters (M)", &written[0], count as f64 / 1e6);
    println!("base UNet: {count} parameters");
}

/// "2,981 iterations" of pretraining: the last step of the committed pretraining log;
/// "478" held-out images in the three-seed evaluation: its report.
#[test]
fn demo_base_pretraining_and_evaluation_sizes() {
    let text = flat(&readme());
    let log = std::fs::read_to_string(root().join("assets/demo-base-log/pretrain-metrics.jsonl"))
        .unwrap();
    let last: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    let iterations = last["step"].as_u64().unwrap() + 1;
    // "2,981" is written with a thousands separator: it reads as "2" then "981".
    let written = after(&text, "captions from the Unicode names) for ");
    assert_eq!(
        format!("{},{}", written[0], written[1]),
        format_thousands(iterations)
    );
    let report = json("assets/demo-results/report.json");
    let n = after(&text, "held-out caption (of ");
    same(
        "held-out images",
        &n[0],
        report["eval_images"].as_f64().unwrap(),
    );
}

fn format_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The three-seed CPU table with the current defaults
/// (`assets/demo-results/cpu-3seeds/report.json`): Lite1 and Lite2 FD (mean ± sd and
/// per seed), KID means, colour-histogram L1 and mean saturation means.
#[test]
fn cpu_three_seed_table_matches_its_report() {
    let text = readme();
    let r = json("assets/demo-results/cpu-3seeds/report.json");
    let second = &r["second_space"];
    let rows = table(&text, "| model | Lite1 FD (mean ± sd, 3 seeds)");
    assert_eq!(rows.len(), 3);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for row in &rows {
        let name = row[0].to_lowercase();
        let first: Vec<&Value> = models(&r, &name);
        let other: Vec<&Value> = models(second, &name);
        let get = |ms: &[&Value], key: &str| -> Vec<f64> {
            ms.iter().map(|m| m[key].as_f64().unwrap()).collect()
        };
        let cells: Vec<Vec<String>> = row[1..].iter().map(|c| numbers(c)).collect();
        let fd1 = get(&first, "fd");
        let fd2 = get(&other, "fd");
        if name == "base" {
            assert_eq!(fd1.len(), 1);
            same("base Lite1 FD", &cells[0][0], fd1[0]);
        } else {
            assert_eq!(fd1.len(), 3, "{name}: seeds");
            let (m, sd) = mean_sd(&fd1);
            same(&format!("{name} Lite1 FD mean"), &cells[0][0], m);
            same(&format!("{name} Lite1 FD sd"), &cells[0][1], sd);
            for (i, v) in fd1.iter().enumerate() {
                same(&format!("{name} seed {i} Lite1 FD"), &cells[1][i], *v);
            }
        }
        same(
            &format!("{name} Lite1 KID"),
            &cells[2][0],
            mean(&get(&first, "kid")),
        );
        if name == "base" {
            same("base Lite2 FD", &cells[3][0], fd2[0]);
        } else {
            let (m, sd) = mean_sd(&fd2);
            same(&format!("{name} Lite2 FD mean"), &cells[3][0], m);
            same(&format!("{name} Lite2 FD sd"), &cells[3][1], sd);
        }
        same(
            &format!("{name} Lite2 KID"),
            &cells[4][0],
            mean(&get(&other, "kid")),
        );
        same(
            &format!("{name} colour L1"),
            &cells[5][0],
            mean(&get(&first, "histogram_l1")),
        );
        same(
            &format!("{name} mean saturation"),
            &cells[6][0],
            mean(&get(&other, "mean_saturation")),
        );
    }
    let f = flat(&text);
    let refs = after(&f, "(style-gap FD ");
    same(
        "3-seed style gap",
        &refs[0],
        r["style_gap_fd"].as_f64().unwrap(),
    );
    same("3-seed floor", &refs[1], r["floor_fd"].as_f64().unwrap());
    same(
        "3-seed wall time",
        &after(&f, "--eval-images 478`, ")[0],
        r["wall_seconds"].as_f64().unwrap(),
    );
    // "ADT won two seeds (by X and Y points) and lost the third (by Z)", "by P% in Lite1".
    let fd = |n: &str| -> Vec<f64> {
        models(&r, n)
            .iter()
            .map(|m| m["fd"].as_f64().unwrap())
            .collect()
    };
    let (ft, adt) = (fd("ft"), fd("adt"));
    let margins: Vec<f64> = ft.iter().zip(&adt).map(|(f, a)| f - a).collect();
    let won = after(&f, "ADT won two seeds (by ");
    same("first win", &won[0], margins[0]);
    same("second win", &won[1], margins[1]);
    same("loss", &after(&f, "lost the third (by ")[0], -margins[2]);
    let rel = 100.0 * (mean(&ft) - mean(&adt)) / mean(&ft);
    same(
        "relative margin",
        &after(&f, "is its mean KID, but by ")[0],
        rel,
    );
    same(
        "Lite2 loss",
        &after(&f, "In Lite2 it lost seed 1 instead (by ")[0],
        models(second, "adt")[1]["fd"].as_f64().unwrap()
            - models(second, "ft")[1]["fd"].as_f64().unwrap(),
    );

    // The 120-iteration run before the speed changes.
    let old = json("assets/demo-results/cpu-3seeds-120it/report.json");
    assert_eq!(old["iterations"].as_u64(), Some(120));
    let fd = |n: &str| -> Vec<f64> {
        models(&old, n)
            .iter()
            .map(|m| m["fd"].as_f64().unwrap())
            .collect()
    };
    let (ft, adt) = (fd("ft"), fd("adt"));
    let n = after(
        &f,
        "trajectories; `assets/demo-results/cpu-3seeds-120it/`), gave Lite1 FD",
    );
    let (m, sd) = mean_sd(&ft);
    same("120-it FT mean", &n[0], m);
    same("120-it FT sd", &n[1], sd);
    let (m, sd) = mean_sd(&adt);
    same("120-it ADT mean", &n[2], m);
    same("120-it ADT sd", &n[3], sd);
    let margins: Vec<f64> = ft.iter().zip(&adt).map(|(f, a)| f - a).collect();
    same("120-it win 1", &n[4], margins[0]);
    same("120-it win 2", &n[5], margins[1]);
    same("120-it loss", &n[6], -margins[2]);
}

/// The colour-drift table (README, "Colour drift") against the ablation reports it
/// merges (`assets/colour-drift/seed*/report.json`): per variant the seeds, and over
/// them the mean (± sd) of the saturation, the paired saturation difference to ADT, the
/// hue-histogram L1, FD and KID in both spaces.
/// A cell "m" (one value) or "m ± sd" (mean and sample sd of several), m possibly
/// negative, against the values.
#[track_caller]
fn mean_sd_cell(what: &str, cell: &str, v: &[f64]) {
    let parts: Vec<&str> = cell.split('±').map(str::trim).collect();
    if v.len() == 1 {
        assert_eq!(parts.len(), 1, "{what}: {cell}");
        same(what, parts[0], v[0]);
    } else {
        let (m, sd) = mean_sd(v);
        assert_eq!(parts.len(), 2, "{what}: {cell}");
        same(&format!("{what} mean"), parts[0], m);
        same(&format!("{what} sd"), parts[1], sd);
    }
}

#[test]
fn colour_drift_table_matches_its_reports() {
    let text = readme();
    let reports = [
        json("assets/colour-drift/seed1/report.json"),
        json("assets/colour-drift/seed0/report.json"),
    ];
    // (variant, seed) -> run, each once.
    let mut runs: Vec<(String, u64, &Value)> = Vec::new();
    for r in &reports {
        for run in r["runs"].as_array().unwrap() {
            let key = (
                run["variant"].as_str().unwrap().to_string(),
                run["seed"].as_u64().unwrap(),
            );
            if !runs.iter().any(|(v, s, _)| (v, s) == (&key.0, &key.1)) {
                runs.push((key.0, key.1, run));
            }
        }
    }
    let rows = table(&text, "| variant | change | seeds | mean saturation");
    assert!(rows.len() >= 3, "colour-drift table: {} rows", rows.len());
    let check = mean_sd_cell;
    let f = |r: &Value, key: &str, i: Option<usize>| -> f64 {
        match i {
            Some(i) => r[key][i].as_f64().unwrap(),
            None => r[key].as_f64().unwrap(),
        }
    };
    for row in &rows {
        let name = row[0].as_str();
        let rs: Vec<&Value> = if name == "base" {
            vec![&reports[0]["base"]]
        } else {
            let mut v: Vec<(u64, &Value)> = runs
                .iter()
                .filter(|(n, _, _)| n == name)
                .map(|(_, s, r)| (*s, *r))
                .collect();
            v.sort_by_key(|(s, _)| *s);
            let seeds: Vec<String> = v.iter().map(|(s, _)| s.to_string()).collect();
            assert_eq!(row[2], seeds.join(","), "{name}: seeds");
            v.into_iter().map(|(_, r)| r).collect()
        };
        assert!(!rs.is_empty(), "{name}: no runs in the reports");
        let col =
            |key: &str, i: Option<usize>| -> Vec<f64> { rs.iter().map(|r| f(r, key, i)).collect() };
        check(
            &format!("{name} saturation"),
            &row[3],
            &col("mean_saturation", None),
        );
        if name != "base" && name != "adt" {
            let d: Vec<f64> = rs
                .iter()
                .map(|r| {
                    let seed = r["seed"].as_u64().unwrap();
                    let adt = runs
                        .iter()
                        .find(|(n, s, _)| n == "adt" && *s == seed)
                        .unwrap()
                        .2;
                    f(r, "mean_saturation", None) - f(adt, "mean_saturation", None)
                })
                .collect();
            let mean = d.iter().sum::<f64>() / d.len() as f64;
            same(
                &format!("{name} saturation - ADT's"),
                row[4].trim_start_matches('+'),
                mean,
            );
        }
        check(&format!("{name} hue L1"), &row[5], &col("hue_l1", None));
        for i in 0..2 {
            check(
                &format!("{name} FD {i}"),
                &row[6 + 2 * i],
                &col("fd", Some(i)),
            );
            check(
                &format!("{name} KID {i}"),
                &row[7 + 2 * i],
                &col("kid", Some(i)),
            );
        }
    }
}

/// The gradient-checkpointing table: the memory each step added (from the rows'
/// notes), the memory in use before, and the time ratios, against
/// `assets/checkpointing/sd15-256px-cpu.json`.
#[test]
fn checkpointing_table_matches_its_report() {
    let file = json("assets/checkpointing/sd15-256px-cpu.json");
    let rows = file["rows"].as_array().unwrap();
    let row = |w: &str| -> &Value {
        rows.iter()
            .find(|r| r["workload"] == w)
            .unwrap_or_else(|| panic!("no row {w}"))
    };
    // "added X GiB over Y GiB in use"
    let note = |w: &str| -> (f64, f64) {
        let n = row(w)["note"].as_str().unwrap();
        let v: Vec<f64> = numbers(n).iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(v.len(), 2, "{n}");
        (v[0], v[1])
    };
    let text = readme();
    let t = table(
        &text,
        "| step | without | with checkpointing | time ratio |",
    );
    assert_eq!(t.len(), 2);
    for (cells, w) in t.iter().zip(["kept_step_grad", "vae_decode_grad"]) {
        let (plain, before) = note(w);
        let (ck, before_ck) = note(&format!("{w}_ckpt"));
        same(&format!("{w} without"), &numbers(&cells[1])[0], plain);
        same(&format!("{w} with"), &numbers(&cells[2])[0], ck);
        let ratio = row(&format!("{w}_ckpt"))["ratio"].as_f64().unwrap();
        same(&format!("{w} ratio"), &cells[3], ratio);
        assert!(
            ck < plain,
            "{w}: checkpointing added {ck} GiB, without {plain}"
        );
        same("memory in use", "13.99", before);
        same("memory in use", "13.99", before_ck);
    }
    let f = flat(&text);
    same(
        "in use",
        &after(&f, "each step adds over the")[0],
        note("kept_step_grad").1,
    );
}

/// The Apple-emoji table against `assets/other-styles/apple/report.json`: means, sample
/// standard deviations and per-seed FD in both spaces, KID means, saturation.
#[test]
fn other_style_table_matches_its_report() {
    let rep = json("assets/other-styles/apple/report.json");
    let runs: Vec<&Value> = rep["runs"].as_array().unwrap().iter().collect();
    let of =
        |v: &str| -> Vec<&Value> { runs.iter().copied().filter(|r| r["variant"] == v).collect() };
    let text = readme();
    let t = table(
        &text,
        "| model | Lite1 FD (mean ± sd) | per seed | Lite1 KID | Lite2 FD (mean ± sd) | Lite2 KID | mean saturation |",
    );
    assert_eq!(t.len(), 3);
    let base = &rep["base"];
    same("base Lite1 FD", &t[0][1], base["fd"][0].as_f64().unwrap());
    same("base Lite1 KID", &t[0][3], base["kid"][0].as_f64().unwrap());
    same("base Lite2 FD", &t[0][4], base["fd"][1].as_f64().unwrap());
    same("base Lite2 KID", &t[0][5], base["kid"][1].as_f64().unwrap());
    same(
        "base saturation",
        &t[0][6],
        base["mean_saturation"].as_f64().unwrap(),
    );
    for (row, v) in t[1..].iter().zip(["ft", "adt"]) {
        let rs = of(v);
        assert_eq!(rs.len(), 3, "{v}: three seeds");
        let col = |f: &dyn Fn(&Value) -> f64| rs.iter().map(|r| f(r)).collect::<Vec<f64>>();
        for (space, fd_cell, kid_cell) in [(0, 1, 3), (1, 4, 5)] {
            let fd = col(&|r: &Value| r["fd"][space].as_f64().unwrap());
            let (m, sd) = mean_sd(&fd);
            let n = numbers(&row[fd_cell]);
            same(&format!("{v} FD mean {space}"), &n[0], m);
            same(&format!("{v} FD sd {space}"), &n[1], sd);
            let kid = col(&|r: &Value| r["kid"][space].as_f64().unwrap());
            same(&format!("{v} KID {space}"), &row[kid_cell], mean_sd(&kid).0);
            if space == 0 {
                for (w, x) in numbers(&row[2]).iter().zip(&fd) {
                    same(&format!("{v} per seed"), w, *x);
                }
            }
        }
        let sat = col(&|r: &Value| r["mean_saturation"].as_f64().unwrap());
        same(&format!("{v} saturation"), &row[6], mean_sd(&sat).0);
    }
    let f = flat(&text);
    same(
        "target saturation",
        &after(&f, "(held-out Apple mean saturation")[0],
        rep["reference_colour"]["mean_saturation"].as_f64().unwrap(),
    );
}

/// The demo's stage table against `assets/demo-results/cpu-seed0/report.json`, and the
/// speed paragraph against the two 120-iteration runs in `assets/demo-results/speed/`.
#[test]
fn demo_stage_table_matches_its_report() {
    let first = json("assets/demo-results/cpu-seed0/report.json");
    let text = readme();
    let t = table(&text, "| stage | seconds |");
    let stages = first["stages"].as_array().unwrap();
    assert_eq!(
        t.len(),
        stages.len() + 2,
        "preparation, the stages, the total"
    );
    same(
        "preparation",
        &t[0][1],
        first["preparation_seconds"].as_f64().unwrap(),
    );
    for (row, s) in t[1..].iter().zip(stages) {
        assert_eq!(row[0], s["stage"].as_str().unwrap(), "stage name");
        same(row[0].as_str(), &row[1], s["seconds"].as_f64().unwrap());
    }
    let wall = first["wall_seconds"].as_f64().unwrap();
    same("total", &t[t.len() - 1][1], wall);
    let stage = |r: &Value, prefix: &str| -> f64 {
        r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"].as_str().unwrap().starts_with(prefix))
            .unwrap()["seconds"]
            .as_f64()
            .unwrap()
    };
    let f = flat(&text);
    let share = 100.0 * stage(&first, "ADT seed 0: train") / wall;
    same("ADT share", &after(&f, "ADT's training is")[0], share);

    let before = json("assets/demo-results/speed/120it-before/report.json");
    let after_ = json("assets/demo-results/speed/120it-after/report.json");
    for r in [&before, &after_] {
        assert_eq!(r["iterations"].as_u64(), Some(120));
    }
    let n = after(&f, "operations) took");
    same(
        "before wall",
        &n[0],
        before["wall_seconds"].as_f64().unwrap(),
    );
    let n = after(&f, "bfloat16 sampling took");
    same(
        "after wall",
        &n[0],
        after_["wall_seconds"].as_f64().unwrap(),
    );
    same(
        "ADT training before",
        &n[1],
        stage(&before, "ADT seed 0: train"),
    );
    same(
        "ADT training after",
        &n[2],
        stage(&after_, "ADT seed 0: train"),
    );
    let fd = |r: &Value, name: &str| models(r, name)[0]["fd"].as_f64().unwrap();
    let n = after(&f, "at 120 iterations that run had FT at");
    same("120-iteration FT", &n[0], fd(&after_, "ft"));
    same("120-iteration ADT", &n[1], fd(&after_, "adt"));
    same(
        "120-iteration margin",
        &n[2],
        fd(&after_, "ft") - fd(&after_, "adt"),
    );
    same(
        "80-iteration margin",
        &n[3],
        fd(&first, "ft") - fd(&first, "adt"),
    );
    let n = after(&f, "by a few FD points (same seed, 120 iterations: ");
    same("ADT before", &n[0], fd(&before, "adt"));
    same("ADT after", &n[1], fd(&after_, "adt"));
    same("FT before", &n[2], fd(&before, "ft"));
    same("FT after", &n[3], fd(&after_, "ft"));
}

/// The Table 3 table against `assets/table3/report.json` (`scripts/table3.sh`): for
/// every variant, mean ± sd over the seeds of FD in both spaces, the per-seed Lite1
/// FD, the mean KIDs, the direction against ADT, the hue-histogram distance and the
/// saturation; and the settings the text quotes.
#[test]
fn table3_matches_its_report() {
    let rep = json("assets/table3/report.json");
    let runs: Vec<&Value> = rep["runs"].as_array().unwrap().iter().collect();
    let seeds: Vec<u64> = rep["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert!(seeds.len() >= 3, "Table 3: {} seeds", seeds.len());
    let of = |v: &str| -> Vec<&Value> {
        let mut rs: Vec<&Value> = runs.iter().copied().filter(|r| r["variant"] == v).collect();
        rs.sort_by_key(|r| r["seed"].as_u64().unwrap());
        rs
    };
    let metric = |rs: &[&Value], key: &str, i: Option<usize>| -> Vec<f64> {
        rs.iter()
            .map(|r| match i {
                Some(i) => r[key][i].as_f64().unwrap(),
                None => r[key].as_f64().unwrap(),
            })
            .collect()
    };
    let check = mean_sd_cell;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let text = readme();
    let rows = table(
        &text,
        "| variant | change | Lite1 FD (mean ± sd) | Lite1 FD per seed |",
    );
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        names,
        [
            "base",
            "adt",
            "stylegan-t",
            "drtune",
            "lambda0",
            "k1",
            "k3",
            "levels4",
            "ft"
        ],
        "Table 3 rows"
    );
    let adt = of("adt");
    for row in &rows {
        let name = row[0].as_str();
        let rs: Vec<&Value> = if name == "base" {
            vec![&rep["base"]]
        } else {
            of(name)
        };
        if name != "base" {
            let got: Vec<u64> = rs.iter().map(|r| r["seed"].as_u64().unwrap()).collect();
            assert_eq!(got, seeds, "{name}: one run per seed");
            let fd0 = metric(&rs, "fd", Some(0));
            let written = numbers(&row[3]);
            assert_eq!(written.len(), fd0.len(), "{name}: per-seed FD");
            for (w, x) in written.iter().zip(&fd0) {
                same(&format!("{name} per-seed FD"), w, *x);
            }
        }
        check(
            &format!("{name} Lite1 FD"),
            &row[2],
            &metric(&rs, "fd", Some(0)),
        );
        same(
            &format!("{name} Lite1 KID"),
            &row[4],
            mean(&metric(&rs, "kid", Some(0))),
        );
        check(
            &format!("{name} Lite2 FD"),
            &row[5],
            &metric(&rs, "fd", Some(1)),
        );
        same(
            &format!("{name} Lite2 KID"),
            &row[6],
            mean(&metric(&rs, "kid", Some(1))),
        );
        if name != "base" && name != "adt" {
            let dir = |key: &str| {
                let signs: Vec<std::cmp::Ordering> = (0..2)
                    .map(|i| {
                        mean(&metric(&rs, key, Some(i)))
                            .partial_cmp(&mean(&metric(&adt, key, Some(i))))
                            .unwrap()
                    })
                    .collect();
                if signs.iter().all(|s| s.is_gt()) {
                    "worse"
                } else if signs.iter().all(|s| s.is_lt()) {
                    "better"
                } else {
                    "disagree"
                }
            };
            assert_eq!(
                row[7],
                format!("{} / {}", dir("fd"), dir("kid")),
                "{name}: vs ADT"
            );
        }
        same(
            &format!("{name} hue L1"),
            &row[8],
            mean(&metric(&rs, "hue_l1", None)),
        );
        same(
            &format!("{name} saturation"),
            &row[9],
            mean(&metric(&rs, "mean_saturation", None)),
        );
    }
    let f = flat(&text);
    let settings = after(&f, "`scripts/table3.sh` (");
    assert_eq!(
        settings[..2],
        [
            rep["iterations"].as_u64().unwrap().to_string(),
            rep["eval_images"].as_u64().unwrap().to_string()
        ],
        "Table 3 settings: iterations, held-out captions"
    );
    same(
        "Table 3 wall time",
        &after(&f, "idle but for a few short builds beside it, ")[0],
        rep["wall_seconds"].as_f64().unwrap(),
    );
}

/// The fresh-clone `scripts/demo.sh` figures: the README's total, setup and demo
/// seconds against `assets/demo-results/fresh-clone/` (timing.txt and the report's
/// wall time), and that run's model figures equal to the first run's.
#[test]
fn fresh_clone_demo_matches_its_files() {
    let dir = "assets/demo-results/fresh-clone";
    let timing = std::fs::read_to_string(root().join(dir).join("timing.txt")).unwrap();
    let measured: Vec<String> = timing
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(numbers)
        .collect();
    let fresh = json(&format!("{dir}/report.json"));
    let f = flat(&readme());
    let written = after(&f, "(`assets/demo-results/fresh-clone/`), it took");
    // "exit 0, wall 824 s" then "demo: 555 s ... data: 269 s".
    assert_eq!(written[0], measured[1], "total seconds");
    assert_eq!(written[1], measured[3], "setup seconds");
    assert_eq!(written[2], measured[2], "demo seconds");
    same(
        "demo wall",
        &written[2],
        fresh["wall_seconds"].as_f64().unwrap(),
    );
    let first = json("assets/demo-results/cpu-seed0/report.json");
    for (a, b) in fresh["models"]
        .as_array()
        .unwrap()
        .iter()
        .zip(first["models"].as_array().unwrap())
    {
        for key in ["name", "fd", "kid", "histogram_l1"] {
            assert_eq!(a[key], b[key], "fresh-clone {key}");
        }
    }
}
