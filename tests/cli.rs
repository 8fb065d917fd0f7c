//! The `adt` binary's process-level settings: OpenMP wait policy and `--threads`.

use std::process::Command;

fn adt_debug(args: &[&str], wait_policy: Option<&str>) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_adt"));
    c.args(args)
        .env("RUST_LOG", "adt=debug")
        .env_remove("OMP_WAIT_POLICY")
        .env_remove("GOMP_SPINCOUNT")
        .env_remove("OMP_NUM_THREADS");
    if let Some(p) = wait_policy {
        c.env("OMP_WAIT_POLICY", p);
    }
    let out = c.output().expect("running adt");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "adt {args:?} failed: {err}");
    err
}

#[test]
fn short_spin_by_default_and_user_policy_kept() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/unet_sd15");
    let err = adt_debug(&["inspect", fixture], None);
    assert!(err.contains("GOMP_SPINCOUNT=10000"), "{err}");
    let err = adt_debug(&["inspect", fixture], Some("ACTIVE"));
    assert!(
        err.contains("OMP_WAIT_POLICY=ACTIVE, GOMP_SPINCOUNT=,"),
        "{err}"
    );
}

#[test]
fn threads_option_sets_tensor_threads() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/unet_sd15");
    let err = adt_debug(&["--threads", "1", "inspect", fixture], None);
    assert!(err.contains(", 1 tensor threads"), "{err}");
    let err = adt_debug(&["inspect", fixture, "--threads", "3"], None);
    assert!(err.contains(", 3 tensor threads"), "{err}");
}
