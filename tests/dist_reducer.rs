//! The bucketed gradient reducer alone, on two ranks over Gloo on the loopback: the
//! test binary starts two copies of itself, one per rank.

use adt::dist::{GradReducer, Launch, ProcessGroup};
use std::process::Command;
use std::time::Duration;
use tch::{Kind, Tensor};

const TEST: &str = "reducer_averages_whatever_pass_count_was_announced";

/// The input of parameter `i` in backward pass `pass` of round `round` on `rank`.
fn input(i: usize, rank: usize, round: usize, pass: usize) -> Tensor {
    let n = 5 + i as i64;
    Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * 0.5
        + (rank * 10 + round * 3 + pass + i) as f64
}

fn rank_body() {
    let launch = Launch::from_env().unwrap().expect("launched as a rank");
    let pg = ProcessGroup::init(&launch, "gloo", Duration::from_secs(30)).unwrap();
    let params: Vec<Tensor> = (0..3)
        .map(|i| Tensor::ones([5 + i], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true))
        .collect();
    // A 16-byte cap puts each parameter in a bucket of its own.
    let reducer = GradReducer::new(&pg, &params, 16).unwrap();
    assert_eq!(reducer.buckets(), 3);
    // Two backward passes per step, announced as 2 (right), 1 (too few: buckets go out
    // early and are sent again) and 3 (too many: everything goes out at the end).
    for (round, announced) in [2usize, 1, 3].into_iter().enumerate() {
        for p in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let (sent0, early0) = reducer.sent();
        for pass in 0..2 {
            if pass == 0 {
                reducer.arm(announced);
            }
            let loss = params
                .iter()
                .enumerate()
                .map(|(i, w)| (w * input(i, launch.rank, round, pass)).sum(Kind::Float))
                .reduce(|a, b| a + b)
                .unwrap();
            loss.backward();
        }
        reducer.finish().unwrap();
        let (sent1, early1) = reducer.sent();
        for (i, p) in params.iter().enumerate() {
            let expected = (0..2)
                .map(|r| input(i, r, round, 0) + input(i, r, round, 1))
                .reduce(|a, b| a + b)
                .unwrap()
                / 2.0;
            assert!(
                p.grad().allclose(&expected, 1e-6, 1e-6, false),
                "round {round}, parameter {i}: {:?} != {:?}",
                p.grad(),
                expected
            );
        }
        let (sent, early) = (sent1 - sent0, early1 - early0);
        match announced {
            // Every bucket once, each started from a hook during the last pass.
            2 => assert_eq!((sent, early), (3, 3)),
            // Sent after the first pass, then again.
            1 => assert_eq!((sent, early), (6, 3)),
            // Nothing during the backward.
            _ => assert_eq!((sent, early), (3, 0)),
        }
    }
}

#[test]
fn reducer_averages_whatever_pass_count_was_announced() {
    if std::env::var_os("ADT_REDUCER_TEST_RANK").is_some() {
        rank_body();
        return;
    }
    if !adt::dist::available() {
        eprintln!("skipped: this build has no c10d binding (build with LIBTORCH set)");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|r| {
            Command::new(&exe)
                .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
                .env("ADT_REDUCER_TEST_RANK", "1")
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("OMP_NUM_THREADS", "1")
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, mut c) in children.into_iter().enumerate() {
        let status = c.wait().unwrap();
        assert!(status.success(), "rank {r}: {status}");
    }
}
