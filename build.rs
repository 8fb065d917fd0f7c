// For GPU builds (feature `cuda` or ADT_CUDA_LINK=1) keep libtorch_cuda linked even
// though no symbol of it is referenced directly: rustc links with --as-needed, which
// would drop it and make tch::Cuda::is_available() silently false.
fn main() {
    println!("cargo:rerun-if-env-changed=ADT_CUDA_LINK");
    let cuda = std::env::var("CARGO_FEATURE_CUDA").is_ok()
        || std::env::var("ADT_CUDA_LINK").map(|v| v == "1").unwrap_or(false);
    if cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-Wl,--allow-shlib-undefined");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
