//! Data-parallel training over Gloo on the loopback: two `adt` processes of the
//! tiny configuration, one thread each with a passive OpenMP wait policy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Whether this build has the c10d binding (LIBTORCH known at build time); the
/// tests say so and pass trivially otherwise.
fn skip() -> bool {
    if adt::dist::available() {
        return false;
    }
    eprintln!("skipped: this build has no c10d binding (build with LIBTORCH set)");
    true
}

fn adt() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_adt"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("OMP_NUM_THREADS", "1")
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("SLURM_PROCID")
        .env_remove("SLURM_NTASKS")
        .env_remove("MASTER_PORT")
        .env_remove("ADT_TEST_DUMP")
        .env_remove("ADT_TEST_PINNED_NOISE");
    c
}

/// `adt train` of examples/tiny-random.toml into `out` with `extra` arguments.
fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "train".into(),
        "--config".into(),
        "examples/tiny-random.toml".into(),
    ];
    for s in [
        format!("output.dir={:?}", out.display().to_string()),
        "output.sample_every=0".into(),
        "data.num_workers=1".into(),
        "train.iterations=4".into(),
        "output.checkpoint_every=2".into(),
    ] {
        a.push("--set".into());
        a.push(s);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn run_ok(mut c: Command, what: &str) -> Output {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The (step, what) -> hash lines a rank dumped.
fn hashes(dump: &Path, rank: usize) -> Vec<(u64, String, String)> {
    std::fs::read_to_string(dump.join(format!("rank{rank}.jsonl")))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["what"].as_str().unwrap().to_string(),
                v["hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Losses of a metrics line (everything but timings).
fn losses(v: &serde_json::Value) -> Vec<(String, f64)> {
    ["loss_d", "d_acc", "loss_g_adv", "loss_diff", "grad_norm_g"]
        .iter()
        .filter_map(|k| v[*k].as_f64().map(|x| (k.to_string(), x)))
        .collect()
}

#[test]
fn two_ranks_stay_identical_and_resume_exactly() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Uninterrupted 2-process run.
    let (a, dump_a) = (tmp.path().join("a"), tmp.path().join("dump-a"));
    std::fs::create_dir_all(&dump_a).unwrap();
    let mut c = adt();
    c.args(train_args(&a, &["--nproc", "2"]))
        .env("ADT_TEST_DUMP", &dump_a);
    run_ok(c, "2-process run");
    let (h0, h1) = (hashes(&dump_a, 0), hashes(&dump_a, 1));
    // A D step every iteration, a G step every second (h = 2).
    assert_eq!(h0.len(), 4 + 2, "{h0:?}");
    assert_eq!(
        h0, h1,
        "parameters differ across ranks after an optimiser step"
    );
    let distinct: std::collections::HashSet<_> = h0.iter().map(|x| &x.2).collect();
    assert_eq!(
        distinct.len(),
        h0.len(),
        "parameters did not change: {h0:?}"
    );
    let m_a = metrics(&a);
    assert_eq!(m_a.len(), 4);
    for line in &m_a {
        for (k, v) in losses(line) {
            assert!(v.is_finite(), "{k} = {v}");
        }
    }

    // The same run stopped after 2 iterations and resumed from its checkpoint.
    let (b, dump_b) = (tmp.path().join("b"), tmp.path().join("dump-b"));
    std::fs::create_dir_all(&dump_b).unwrap();
    let mut c = adt();
    c.args(train_args(&b, &["--nproc", "2", "--max-iterations", "2"]))
        .env("ADT_TEST_DUMP", &dump_b);
    run_ok(c, "first half");
    let mut c = adt();
    c.args(train_args(&b, &["--nproc", "2", "--resume"]))
        .env("ADT_TEST_DUMP", &dump_b);
    run_ok(c, "resumed half");
    for r in 0..2 {
        assert_eq!(
            hashes(&dump_b, r),
            hashes(&dump_a, r),
            "rank {r}: the resumed run's parameters differ from the uninterrupted run's"
        );
    }
    let m_b = metrics(&b);
    assert_eq!(m_b.len(), 4);
    for (x, y) in m_a.iter().zip(&m_b) {
        assert_eq!(losses(x), losses(y), "step {}", x["step"]);
    }
}

fn read_grads(path: &Path) -> HashMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn two_ranks_of_batch_b_equal_one_rank_of_batch_2b() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, batch: usize, nproc: usize| -> PathBuf {
        let (out, dump) = (
            tmp.path().join(name),
            tmp.path().join(format!("dump-{name}")),
        );
        std::fs::create_dir_all(&dump).unwrap();
        let bs = format!("train.batch_size={batch}");
        let np = nproc.to_string();
        let mut extra = vec![
            "--set",
            "train.mode=\"ft\"",
            "--set",
            &bs,
            "--max-iterations",
            "1",
        ];
        if nproc > 1 {
            extra.extend(["--nproc", &np]);
        }
        let mut c = adt();
        c.args(train_args(&out, &extra))
            .env("ADT_TEST_DUMP", &dump)
            .env("ADT_TEST_PINNED_NOISE", "1");
        run_ok(c, name);
        dump
    };
    let one = read_grads(&run("one", 4, 1).join("grads-g-rank0.safetensors"));
    let two = run("two", 2, 2);
    let (r0, r1) = (
        read_grads(&two.join("grads-g-rank0.safetensors")),
        read_grads(&two.join("grads-g-rank1.safetensors")),
    );
    assert_eq!(one.len(), r0.len());
    assert!(!one.is_empty());
    let (mut num, mut den) = (0.0, 0.0);
    for (k, g) in &one {
        // Identical on both ranks, bit for bit.
        assert!(r0[k].equal(&r1[k]), "{k}: ranks disagree");
        num += f64::try_from((&r0[k] - g).square().sum(tch::Kind::Double)).unwrap();
        den += f64::try_from(g.square().sum(tch::Kind::Double)).unwrap();
    }
    let rel = (num / den).sqrt();
    eprintln!("relative difference of the averaged gradients: {rel:e}");
    assert!(den > 0.0);
    assert!(rel < 1e-5, "relative difference of the gradients {rel:e}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start two ranks of a long tiny run, stop rank 1 with `how` once training runs,
/// and return rank 0's exit status, its stderr and the seconds it took to exit.
fn lose_rank_1(how: &str, timeout_s: u32) -> (std::process::ExitStatus, String, f64) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let port = free_port().to_string();
    let timeout = format!("train.dist_timeout_s={timeout_s}");
    let args = train_args(
        &out,
        &[
            "--set",
            "train.iterations=1000",
            "--set",
            "output.checkpoint_every=0",
            "--set",
            &timeout,
        ],
    );
    let spawn = |rank: usize| {
        let mut c = adt();
        c.args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(if rank == 0 {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        c.spawn().unwrap()
    };
    let mut r0 = spawn(0);
    let mut r1 = spawn(1);
    // Wait until training runs (rank 0 logs its iterations).
    let t0 = Instant::now();
    loop {
        let n = std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= 2 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = r0.kill();
            let _ = r1.kill();
            panic!("training did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stopped = Instant::now();
    match how {
        "kill" => r1.kill().unwrap(),
        "freeze" => {
            // SAFETY: signalling our own child by its pid.
            assert_eq!(unsafe { libc::kill(r1.id() as i32, libc::SIGSTOP) }, 0);
        }
        _ => unreachable!(),
    }
    let status = loop {
        if let Some(s) = r0.try_wait().unwrap() {
            break s;
        }
        if stopped.elapsed() > Duration::from_secs(timeout_s as u64 + 45) {
            let _ = r0.kill();
            let _ = r1.kill();
            panic!("rank 0 did not exit after rank 1 was stopped ({how})");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = stopped.elapsed().as_secs_f64();
    let _ = r1.kill();
    let _ = r1.wait();
    let mut err = String::new();
    std::io::Read::read_to_string(r0.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status, err, took)
}

#[test]
fn a_killed_rank_stops_the_other_with_its_name() {
    if skip() {
        return;
    }
    // The dead peer's connection closes: no need to wait for the timeout.
    let (status, err, took) = lose_rank_1("kill", 60);
    assert!(!status.success());
    assert!(took < 30.0, "took {took} s");
    assert!(
        err.contains("rank 1 stopped answering"),
        "the error does not name rank 1:\n{err}"
    );
}

#[test]
fn a_frozen_rank_stops_the_other_after_the_timeout() {
    if skip() {
        return;
    }
    let (status, err, took) = lose_rank_1("freeze", 4);
    assert!(!status.success());
    assert!((4.0..40.0).contains(&took), "took {took} s");
    assert!(
        err.contains("rank 1 stopped answering") && err.contains("timed out"),
        "the error does not name rank 1 or the timeout:\n{err}"
    );
}
