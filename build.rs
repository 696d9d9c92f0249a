//! Link-time settings for libtorch.
//!
//! * rpath to `$LIBTORCH/lib`, so the binary finds libtorch without LD_LIBRARY_PATH.
//! * With the `cuda` feature, force `libtorch_cuda.so` into the binary's NEEDED list: nothing in
//!   our code references its symbols, so the default `--as-needed` linker drops it and libtorch
//!   then silently reports no GPU.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    let lib = format!("{libtorch}/lib");
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::env::var("CARGO_FEATURE_CUDA").is_ok() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
