// For GPU builds (feature `cuda` or ADT_CUDA_LINK=1) keep libtorch_cuda linked even
// though no symbol of it is referenced directly: rustc links with --as-needed, which
// would drop it and make tch::Cuda::is_available() silently false.
//
// GPU builds also compile `csrc/cuda_shim.cpp` (peak-memory statistics of the CUDA
// caching allocator, CUDA-graph capture / replay) against the libtorch headers and
// set the `adt_cuda_shim` cfg for the Rust side. The shim needs the CUDA runtime
// headers (cuda_runtime_api.h and crt/): found under $ADT_CUDA_INCLUDE, $CUDA_HOME,
// the pip `nvidia` folder next to libtorch, or /usr/local/cuda.
use std::path::{Path, PathBuf};

fn cuda_include(libtorch: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("ADT_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("CUDA_HOME") {
        candidates.push(Path::new(&p).join("include"));
    }
    let nvidia = libtorch.join("..").join("nvidia");
    for sub in ["cu13", "cu12", "cuda_runtime"] {
        candidates.push(nvidia.join(sub).join("include"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates.into_iter().find(|d| {
        d.join("cuda_runtime_api.h").is_file() && d.join("crt").join("host_defines.h").is_file()
    })
}

fn build_shim() {
    println!("cargo:rerun-if-changed=csrc/cuda_shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=ADT_CUDA_INCLUDE");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let libtorch = PathBuf::from(std::env::var("LIBTORCH").unwrap_or_else(|_| {
        panic!("GPU build: LIBTORCH is not set (source scripts/env.sh first)")
    }));
    let inc = libtorch.join("include");
    if !inc.join("ATen").join("cuda").join("CUDAGraph.h").is_file() {
        panic!(
            "GPU build: {} has no ATen/cuda/CUDAGraph.h (a CUDA build of libtorch 2.11 is needed)",
            inc.display()
        );
    }
    let cuda_inc = cuda_include(&libtorch).unwrap_or_else(|| {
        panic!(
            "GPU build: no CUDA runtime headers with crt/host_defines.h found (looked in \
             $ADT_CUDA_INCLUDE, $CUDA_HOME/include, {}/../nvidia/cu13/include, /usr/local/cuda/include); \
             install them with `pip install --no-deps nvidia-cuda-crt==13.0.88` into the libtorch venv \
             or set ADT_CUDA_INCLUDE",
            libtorch.display()
        )
    });
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("csrc/cuda_shim.cpp")
        .include(&inc)
        .include(inc.join("torch").join("csrc").join("api").join("include"))
        .include(&cuda_inc)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("adt_cuda_shim");
    println!("cargo:rustc-cfg=adt_cuda_shim");
}

/// The include folder of the libtorch named by LIBTORCH (as scripts/env.sh sets it),
/// if it has `marker` (a header path under it, in `/`-separated parts); None for
/// builds without a known libtorch folder. Registers the rerun triggers of `source`.
fn libtorch_include(source: &str, marker: &[&str]) -> Option<PathBuf> {
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let inc = PathBuf::from(std::env::var("LIBTORCH").ok()?).join("include");
    let header = marker.iter().fold(inc.clone(), |p, part| p.join(part));
    header.is_file().then_some(inc)
}

/// A C++17 build of one shim against the libtorch headers (with the C++ API
/// headers when `api`).
fn shim_build(source: &str, inc: &Path, api: bool) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true).std("c++17").file(source).include(inc);
    if api {
        b.include(inc.join("torch").join("csrc").join("api").join("include"));
    }
    b.define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false);
    b
}

// The fused-AdamW binding (csrc/optim_shim.cpp) is compiled in every build whose
// libtorch folder is known (LIBTORCH, as scripts/env.sh sets it); without it the
// optimiser falls back to its per-tensor loop.
fn build_optim_shim() {
    let src = "csrc/optim_shim.cpp";
    let Some(inc) = libtorch_include(src, &["ATen", "ops", "_fused_adamw.h"]) else {
        return;
    };
    shim_build(src, &inc, false).compile("adt_optim_shim");
    println!("cargo:rustc-cfg=adt_optim_shim");
}

// The gradient-checkpointing binding (csrc/ckpt_shim.cpp: a custom autograd function
// that recomputes a model segment in the backward) is compiled in every build whose
// libtorch folder is known; without it `train.gradient_checkpointing` is refused.
fn build_ckpt_shim() {
    let src = "csrc/ckpt_shim.cpp";
    let marker = ["torch", "csrc", "autograd", "custom_function.h"];
    let Some(inc) = libtorch_include(src, &marker) else {
        return;
    };
    shim_build(src, &inc, true).compile("adt_ckpt_shim");
    println!("cargo:rustc-cfg=adt_ckpt_shim");
}

// The distributed binding (csrc/dist_shim.cpp: TCPStore, Gloo process group and, in
// GPU builds, NCCL; bucketed gradient reducer) is compiled in every build whose
// libtorch folder is known and ships the c10d headers; without it `adt train` runs
// on one process only.
fn build_dist_shim(cuda: bool) {
    let src = "csrc/dist_shim.cpp";
    let c10d = ["torch", "csrc", "distributed", "c10d"];
    let Some(inc) = libtorch_include(src, &[&c10d[..], &["TCPStore.hpp"]].concat()) else {
        return;
    };
    let backend = c10d.iter().fold(inc.clone(), |p, part| p.join(part));
    if !backend.join("Backend.hpp").is_file() {
        return;
    }
    let mut b = shim_build(src, &inc, true);
    if cuda {
        // ProcessGroupNCCL (libtorch_cuda, linked in GPU builds).
        b.define("ADT_DIST_NCCL", None);
    }
    b.define("USE_C10D_GLOO", None)
        .define("USE_DISTRIBUTED", None)
        .compile("adt_dist_shim");
    println!("cargo:rustc-cfg=adt_dist_shim");
}

fn main() {
    println!("cargo:rerun-if-env-changed=ADT_CUDA_LINK");
    println!("cargo::rustc-check-cfg=cfg(adt_cuda_shim)");
    println!("cargo::rustc-check-cfg=cfg(adt_optim_shim)");
    println!("cargo::rustc-check-cfg=cfg(adt_dist_shim)");
    println!("cargo::rustc-check-cfg=cfg(adt_ckpt_shim)");
    build_optim_shim();
    build_ckpt_shim();
    let cuda = std::env::var("CARGO_FEATURE_CUDA").is_ok()
        || std::env::var("ADT_CUDA_LINK")
            .map(|v| v == "1")
            .unwrap_or(false);
    build_dist_shim(cuda);
    if cuda {
        build_shim();
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-Wl,--allow-shlib-undefined");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-lc10_cuda");
        println!("cargo:rustc-link-arg=-lc10");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
