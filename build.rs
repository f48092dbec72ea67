//! Build script: compiles every `kernels/*.cu` into one fatbinary (SASS for each target
//! architecture plus PTX for the oldest, so newer GPUs still run) that the library
//! embeds, and checks the bindgen bindings of `kernels/*.h`.
//!
//! Environment (all optional):
//! - `NVCC`: the nvcc to use. Otherwise `$CUDA_PATH/bin`, `$CUDA_HOME/bin`, `PATH`,
//!   `/usr/local/cuda/bin`, then `.toolchain/cuda` (what `scripts/install-toolchain.sh` puts
//!   in place) are searched, in that order.
//! - `CUDA_COMPUTE_CAP` or `LORA_KERNELS_ARCHS`: a comma-separated list of compute
//!   capabilities (`90`, `80,86`), to build only those (faster builds). Default: 80, 86,
//!   89, 90 (90 is built as sm_90a) plus PTX for compute_80.
//! - `LORA_KERNELS_REQUIRE_NVCC=1`: a missing nvcc is a build error (CI sets it). Without
//!   it the crate builds without kernels, and every CUDA op returns
//!   `Error::KernelsNotBuilt`.
//! - `LORA_KERNELS_CHECK_BINDINGS=1`: regenerate the bindings with bindgen (needs
//!   libclang) and fail if they differ from the checked-in `src/cuda/bindings.rs`.
//!   `LORA_KERNELS_WRITE_BINDINGS=1` overwrites the checked-in file instead.
//! - `LORA_KERNELS_CACHE_DIR`: where compiled fatbinaries are cached by content hash
//!   (default: `<target>/lora-kernels-nvcc-cache`), so a `cargo clippy` after a
//!   `cargo test` does not compile the kernels again.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &[u32] = &[80, 86, 89, 90];
const PTX_ARCH: u32 = 80;

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernel_dir = manifest.join("kernels");

    for var in [
        "NVCC",
        "CUDA_PATH",
        "CUDA_HOME",
        "PATH",
        "CUDA_COMPUTE_CAP",
        "LORA_KERNELS_ARCHS",
        "LORA_KERNELS_REQUIRE_NVCC",
        "LORA_KERNELS_CHECK_BINDINGS",
        "LORA_KERNELS_WRITE_BINDINGS",
        "LORA_KERNELS_CACHE_DIR",
        "LIBCLANG_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");

    let mut sources: Vec<PathBuf> = Vec::new();
    let mut headers: Vec<PathBuf> = Vec::new();
    let mut c_headers: Vec<PathBuf> = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(&kernel_dir)
        .expect("kernels/ is missing")
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        println!("cargo:rerun-if-changed={}", path.display());
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => sources.push(path),
            Some("cuh") => headers.push(path),
            Some("h") => {
                headers.push(path.clone());
                c_headers.push(path)
            }
            _ => {}
        }
    }

    check_bindings(&manifest, &out_dir, &c_headers);
    build_kernels(&manifest, &out_dir, &sources, &headers);
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

fn build_kernels(manifest: &Path, out_dir: &Path, sources: &[PathBuf], headers: &[PathBuf]) {
    let require = env::var("LORA_KERNELS_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let archs = target_archs();
    let generated = out_dir.join("kernels.rs");

    let Some(nvcc) = find_nvcc(manifest) else {
        let msg = "nvcc not found: building without CUDA kernels (every CUDA op will return \
                   Error::KernelsNotBuilt). Install the pinned toolchain with \
                   `bash scripts/install-toolchain.sh`, or set NVCC=/path/to/nvcc.";
        if require {
            panic!("LORA_KERNELS_REQUIRE_NVCC=1 and {msg}");
        }
        println!("cargo:warning={msg}");
        write_generated(&generated, None, "", &[]);
        return;
    };
    let version = nvcc_version(&nvcc).unwrap_or_else(|e| {
        panic!("{} does not run: {e}", nvcc.display());
    });

    // Content hash of everything that affects the output.
    let mut hash = Fnv::new();
    hash.add(version.as_bytes());
    hash.add(format!("{archs:?}").as_bytes());
    hash.add(NVCC_FLAGS.join(" ").as_bytes());
    for f in headers.iter().chain(sources) {
        hash.add(f.file_name().unwrap().to_string_lossy().as_bytes());
        hash.add(&fs::read(f).unwrap());
    }
    let cache_dir = cache_dir(out_dir);
    fs::create_dir_all(&cache_dir).ok();

    // Compile the files in parallel (each nvcc also runs its gencode targets in parallel).
    let results: Vec<(String, PathBuf)> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
                let mut h = hash.clone();
                h.add(stem.as_bytes());
                let cached = cache_dir.join(format!("{stem}-{:016x}.fatbin", h.finish()));
                let nvcc = &nvcc;
                let archs = &archs;
                scope.spawn(move || {
                    if !cached.exists() {
                        compile(nvcc, src, archs, &cached);
                    }
                    (stem, cached)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mut modules = Vec::new();
    for (stem, cached) in results {
        let dest = out_dir.join(format!("{stem}.fatbin"));
        fs::copy(&cached, &dest).unwrap();
        modules.push((stem, dest));
    }
    let arch_list = archs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    write_generated(&generated, Some(&version), &arch_list, &modules);
}

const NVCC_FLAGS: &[&str] = &[
    "-std=c++17",
    "-O3",
    "--use_fast_math",
    "-lineinfo",
    "--threads",
    "0",
];

fn gencode(arch: u32) -> String {
    // Hopper's wgmma / setmaxnreg need the arch-specific target, written in -gencode form.
    if arch == 90 {
        "-gencode=arch=compute_90a,code=sm_90a".to_string()
    } else {
        format!("-gencode=arch=compute_{arch},code=sm_{arch}")
    }
}

fn compile(nvcc: &Path, src: &Path, archs: &[u32], out: &Path) {
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let mut cmd = Command::new(nvcc);
    cmd.args(NVCC_FLAGS).arg("-fatbin");
    for &a in archs {
        cmd.arg(gencode(a));
    }
    let ptx = archs
        .iter()
        .copied()
        .min()
        .unwrap_or(PTX_ARCH)
        .min(PTX_ARCH);
    cmd.arg(format!("-gencode=arch=compute_{ptx},code=compute_{ptx}"));
    cmd.arg("-I").arg(src.parent().unwrap());
    cmd.arg("-o").arg(&tmp).arg(src);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {}: {e}", nvcc.display()));
    if !output.status.success() {
        panic!(
            "nvcc failed on {}:\n{:?}\n{}{}",
            src.display(),
            cmd,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    fs::rename(&tmp, out).unwrap();
}

fn target_archs() -> Vec<u32> {
    let spec = env::var("LORA_KERNELS_ARCHS")
        .ok()
        .or_else(|| env::var("CUDA_COMPUTE_CAP").ok())
        .filter(|s| !s.trim().is_empty());
    let Some(spec) = spec else {
        return DEFAULT_ARCHS.to_vec();
    };
    let mut archs: Vec<u32> = spec
        .split(',')
        .map(|s| {
            let s = s.trim().trim_start_matches("sm_").trim_end_matches('a');
            let s = s.replace('.', "");
            s.parse::<u32>()
                .unwrap_or_else(|_| panic!("bad compute capability {s:?} in {spec:?}"))
        })
        .collect();
    for &a in &archs {
        if a < 80 {
            panic!("compute capability {a} is below 80: lora-kernels needs sm_80 or newer");
        }
    }
    archs.sort();
    archs.dedup();
    archs
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            panic!("NVCC={} does not name a file", p.display());
        }
        return Some(p);
    }
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Ok(p) = env::var(var) {
            candidates.push(PathBuf::from(p).join("bin/nvcc"));
        }
    }
    if let Ok(path) = env::var("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.push(manifest.join(".toolchain/cuda/nvidia/cu13/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file())
}

fn nvcc_version(nvcc: &Path) -> Result<String, String> {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown")
        .trim()
        .to_string())
}

fn cache_dir(out_dir: &Path) -> PathBuf {
    if let Ok(d) = env::var("LORA_KERNELS_CACHE_DIR") {
        return PathBuf::from(d);
    }
    // OUT_DIR = <target>/<profile>/build/<pkg>-<hash>/out (or with a target triple).
    let mut dir = out_dir;
    while let Some(parent) = dir.parent() {
        if dir.file_name().is_some_and(|n| n == "build") {
            if let Some(target) = parent.parent() {
                return target.join("lora-kernels-nvcc-cache");
            }
        }
        dir = parent;
    }
    out_dir.join("nvcc-cache")
}

fn write_generated(path: &Path, version: Option<&str>, archs: &str, modules: &[(String, PathBuf)]) {
    let mut s = String::from("// @generated by build.rs\n");
    s += &format!("pub const KERNELS_BUILT: bool = {};\n", version.is_some());
    s += &format!(
        "pub const NVCC_VERSION: &str = {:?};\n",
        version.unwrap_or("")
    );
    s += &format!("pub const ARCHS: &str = {archs:?};\n");
    s += "pub const MODULES: &[(&str, &[u8])] = &[\n";
    for (name, file) in modules {
        s += &format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            file.display().to_string()
        );
    }
    s += "];\n";
    fs::write(path, s).unwrap();
}

// ---------------------------------------------------------------------------------------
// Bindings
// ---------------------------------------------------------------------------------------

fn check_bindings(manifest: &Path, out_dir: &Path, c_headers: &[PathBuf]) {
    let check = env::var("LORA_KERNELS_CHECK_BINDINGS").is_ok_and(|v| v == "1");
    let write = env::var("LORA_KERNELS_WRITE_BINDINGS").is_ok_and(|v| v == "1");
    if !check && !write {
        return;
    }
    let checked_in = manifest.join("src/cuda/bindings.rs");
    let mut builder = bindgen::Builder::default()
        .raw_line("// @generated by bindgen from kernels/*.h: do not edit by hand.")
        .raw_line("// Regenerate: LORA_KERNELS_WRITE_BINDINGS=1 cargo build")
        .raw_line("#![allow(non_camel_case_types, non_snake_case, dead_code)]")
        .allowlist_type("Lk.*")
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .generate_comments(true)
        .use_core();
    for h in c_headers {
        builder = builder.header(h.to_string_lossy());
    }
    let generated = match builder.generate() {
        Ok(b) => b.to_string(),
        Err(e) => panic!("bindgen failed (is libclang installed? set LIBCLANG_PATH): {e}"),
    };
    fs::write(out_dir.join("bindings.rs"), &generated).unwrap();
    if write {
        fs::write(&checked_in, &generated).unwrap();
        return;
    }
    let current = fs::read_to_string(&checked_in).unwrap_or_default();
    if current != generated {
        panic!(
            "src/cuda/bindings.rs is out of date with kernels/*.h; regenerate it with \
             `LORA_KERNELS_WRITE_BINDINGS=1 cargo build` (fresh output: {})",
            out_dir.join("bindings.rs").display()
        );
    }
}

// ---------------------------------------------------------------------------------------

/// FNV-1a, 64 bit: a stable content hash for the nvcc cache.
#[derive(Clone)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator, so ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}
