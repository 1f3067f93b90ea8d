//! With the `cuda` feature, compiles the CUDA kernels to PTX with nvcc (tools/cuda/build.sh
//! provides one from PyPI wheels) for compute capability $CUDA_COMPUTE_CAP (default 80; PTX is
//! compiled further by the driver for newer GPUs): src/cuda/kernels.cu into `kernels.ptx`, and
//! src/cuda/flash_attention.cu once per head-dim class `FA_NF` = 1..8 into `flash_N.ptx`, each
//! its own module so the driver JIT-compiles only the classes a model uses.
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// The head-dim classes of the fused attention (head dims up to 16·N); src/cuda.rs's
/// `FLASH_PTX` includes one PTX file per class (a mismatch fails to compile).
const FLASH_CLASSES: usize = 8;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo:rerun-if-changed=src/cuda/flash_attention.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    println!("cargo:rustc-env=IMPRINT_CUDA_COMPUTE_CAP={cap}");
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let compile = |src: &str, ptx: &Path, defines: &[String]| -> Child {
        Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("--gpu-architecture=compute_{cap}"))
            .args(defines)
            .arg("-o")
            .arg(ptx)
            .arg(src)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}): the `cuda` feature needs nvcc; tools/cuda/build.sh installs one",
                    nvcc.display()
                )
            })
    };
    // All nvcc runs at once: they are independent and each mostly single-threaded.
    let mut jobs = vec![(
        "src/cuda/kernels.cu".to_string(),
        compile("src/cuda/kernels.cu", &out.join("kernels.ptx"), &[]),
    )];
    for n in 1..=FLASH_CLASSES {
        jobs.push((
            format!("src/cuda/flash_attention.cu (FA_NF={n})"),
            compile(
                "src/cuda/flash_attention.cu",
                &out.join(format!("flash_{n}.ptx")),
                &[format!("-DFA_NF={n}")],
            ),
        ));
    }
    // Wait for every run before failing, so none is left writing into OUT_DIR.
    let failed: Vec<String> = jobs
        .into_iter()
        .filter_map(|(what, mut child)| match child.wait() {
            Ok(status) if status.success() => None,
            Ok(status) => Some(format!("{what} ({status})")),
            Err(e) => Some(format!("{what} ({e})")),
        })
        .collect();
    if !failed.is_empty() {
        panic!("nvcc failed on {}", failed.join(", "));
    }
}
