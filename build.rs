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
//! - `LORA_KERNELS_CHECK_ENTRIES=1` (or `LORA_KERNELS_CHECK_BINDINGS=1`): fail if the
//!   kernel entry list of the sources differs from the checked-in `src/cuda/entries.rs`
//!   (needs nvcc). `LORA_KERNELS_WRITE_ENTRIES=1` (or `LORA_KERNELS_WRITE_BINDINGS=1`)
//!   overwrites the checked-in file instead. Without either, a difference is a warning.
//! - `LORA_KERNELS_CACHE_DIR`: where compiled fatbinaries are cached by content hash
//!   (default: `<target>/lora-kernels-nvcc-cache`), so a `cargo clippy` after a
//!   `cargo test` does not compile the kernels again.
//!
//! Kernel entries: every `extern "C" __global__` function of `kernels/<module>.cu` (found
//! in nvcc's preprocessed output, so entries that macros make count) becomes a typed
//! constant, `LK_DORA_NORM_BF16: Kernel = Kernel { module: Module::Dora, name:
//! "lk_dora_norm_bf16" }`, plus one `ByDType` table per family of entries whose names
//! differ only in `f32` / `f16` / `bf16` (`LK_DORA_NORM`). The crate names kernels only
//! through these, so a misspelt kernel or a wrong module does not compile. With nvcc the
//! crate compiles against the list made from the sources (`$OUT_DIR/entries.rs`);
//! without it, against the checked-in copy `src/cuda/entries.rs`, which CI keeps equal
//! to the sources.

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
        "LORA_KERNELS_CHECK_ENTRIES",
        "LORA_KERNELS_WRITE_ENTRIES",
        "LORA_KERNELS_CACHE_DIR",
        "LIBCLANG_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed={CHECKED_IN_ENTRIES}");

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
        use_checked_in_entries(manifest, out_dir);
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

    // The entry list first: a stale checked-in list fails before minutes of compiling.
    // (Cached by the sources and this script, whose code writes it.)
    let mut entries_hash = hash.clone();
    entries_hash.add(include_bytes!("build.rs"));
    let cached_entries = cache_dir.join(format!("entries-{:016x}.rs", entries_hash.finish()));
    let entries = match fs::read_to_string(&cached_entries) {
        Ok(text) => text,
        Err(_) => {
            let text = entries_source(&kernel_entries(&nvcc, sources));
            let tmp = cached_entries.with_extension(format!("tmp{}", std::process::id()));
            fs::write(&tmp, &text).unwrap();
            fs::rename(&tmp, &cached_entries).unwrap();
            text
        }
    };
    check_entries(manifest, out_dir, &entries);

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
// Kernel entries
// ---------------------------------------------------------------------------------------

const CHECKED_IN_ENTRIES: &str = "src/cuda/entries.rs";

/// Without nvcc: the crate compiles against the checked-in entry list.
fn use_checked_in_entries(manifest: &Path, out_dir: &Path) {
    if env::var("LORA_KERNELS_CHECK_ENTRIES").is_ok_and(|v| v == "1") {
        panic!("LORA_KERNELS_CHECK_ENTRIES=1 needs nvcc (the entries come from its preprocessor)");
    }
    if env::var("LORA_KERNELS_CHECK_BINDINGS").is_ok_and(|v| v == "1") {
        println!("cargo:warning=no nvcc: {CHECKED_IN_ENTRIES} is not checked against kernels/");
    }
    let text = fs::read_to_string(manifest.join(CHECKED_IN_ENTRIES))
        .unwrap_or_else(|e| panic!("{CHECKED_IN_ENTRIES}: {e}"));
    fs::write(out_dir.join("entries.rs"), text).unwrap();
}

/// With nvcc: the crate compiles against `fresh` (made from the sources); the checked-in
/// copy is compared with it, and rewritten or found stale as the environment asks.
fn check_entries(manifest: &Path, out_dir: &Path, fresh: &str) {
    let on = |var: &str| env::var(var).is_ok_and(|v| v == "1");
    let check = on("LORA_KERNELS_CHECK_ENTRIES") || on("LORA_KERNELS_CHECK_BINDINGS");
    let write = on("LORA_KERNELS_WRITE_ENTRIES") || on("LORA_KERNELS_WRITE_BINDINGS");
    let generated = out_dir.join("entries.rs");
    fs::write(&generated, fresh).unwrap();
    let checked_in = manifest.join(CHECKED_IN_ENTRIES);
    if fs::read_to_string(&checked_in).is_ok_and(|current| current == fresh) {
        return;
    }
    if write {
        fs::write(&checked_in, fresh).unwrap();
        return;
    }
    let msg = format!(
        "{CHECKED_IN_ENTRIES} is out of date with the kernel entries of kernels/*.cu; \
         regenerate it with `LORA_KERNELS_WRITE_ENTRIES=1 cargo build` (fresh list: {})",
        generated.display()
    );
    if check {
        panic!("{msg}");
    }
    println!("cargo:warning={msg}");
}

/// The `extern "C" __global__` entries of each source, by module (file stem), sorted.
fn kernel_entries(nvcc: &Path, sources: &[PathBuf]) -> Vec<(String, Vec<String>)> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                scope.spawn(move || {
                    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
                    let text = preprocess(nvcc, src);
                    let dir = src.parent().unwrap().canonicalize().unwrap();
                    let mut names = global_entries(&text, &dir)
                        .unwrap_or_else(|e| panic!("{}: {e}", src.display()));
                    if names.is_empty() {
                        panic!(
                            "{}: no extern \"C\" __global__ entry found in nvcc's \
                             preprocessed output",
                            src.display()
                        );
                    }
                    names.sort();
                    names.dedup();
                    (stem, names)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// nvcc's preprocessed host-side text of `src`, with line markers.
fn preprocess(nvcc: &Path, src: &Path) -> String {
    let mut cmd = Command::new(nvcc);
    cmd.args(NVCC_FLAGS).arg("-E");
    cmd.arg("-I").arg(src.parent().unwrap()).arg(src);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {}: {e}", nvcc.display()));
    if !output.status.success() {
        panic!(
            "nvcc -E failed on {}:\n{:?}\n{}",
            src.display(),
            cmd,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The names of the `__global__` functions defined or declared in the files of `dir`
/// (the line markers say which file each line comes from; the CUDA headers' are skipped),
/// each required to be `extern "C"` (a C++ name is mangled: the crate could not load it).
fn global_entries(text: &str, dir: &Path) -> Result<Vec<String>, String> {
    // Tokens of our files: identifiers, literals, and single punctuation characters.
    let mut toks: Vec<String> = Vec::new();
    let mut ours = false;
    let mut seen: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix('#') {
            // `# 12 "path" flags` or `#line 12 "path"`; other directives (#pragma) skipped.
            let rest = rest.trim_start();
            let rest = rest.strip_prefix("line").unwrap_or(rest).trim_start();
            if rest.starts_with(|c: char| c.is_ascii_digit()) {
                if let (Some(a), Some(b)) = (rest.find('"'), rest.rfind('"')) {
                    if b > a {
                        let file = &rest[a + 1..b];
                        ours = *seen.entry(file.to_string()).or_insert_with(|| {
                            Path::new(file)
                                .parent()
                                .and_then(|p| p.canonicalize().ok())
                                .is_some_and(|p| p == dir)
                        });
                    }
                }
            }
            continue;
        }
        if ours {
            tokenize(line, &mut toks);
        }
    }
    let balanced = |i: usize| -> Result<usize, String> {
        // toks[i] == "(": the index after its matching ")".
        let mut depth = 0;
        for (j, t) in toks.iter().enumerate().skip(i) {
            match t.as_str() {
                "(" => depth += 1,
                ")" => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(j + 1);
                    }
                }
                _ => {}
            }
        }
        Err("unbalanced parentheses".into())
    };
    let is_ident = |t: &str| t.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
    let mut names = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        // A declaration's specifiers: from a token that may start one to the declarator.
        let start = i;
        let mut global = false;
        let mut j = i;
        let name = loop {
            let Some(t) = toks.get(j) else { break None };
            match t.as_str() {
                "__global__" => {
                    global = true;
                    j += 1;
                }
                "__attribute__" | "__launch_bounds__" | "__cluster_dims__" | "__declspec"
                    if toks.get(j + 1).is_some_and(|t| t == "(") =>
                {
                    let end = balanced(j + 1)?;
                    if toks[j + 1..end]
                        .iter()
                        .any(|t| t == "global" || t == "__global__")
                    {
                        global = true;
                    }
                    j = end;
                }
                t if is_ident(t) && toks.get(j + 1).is_some_and(|t| t == "(") => {
                    break Some(j);
                }
                t if is_ident(t) || t == "\"C\"" || t == "*" || t == "&" || t == "::" => {
                    j += 1;
                }
                _ => break None,
            }
        };
        match name {
            Some(n) if global => {
                let extern_c = toks[start..n]
                    .windows(2)
                    .any(|w| w[0] == "extern" && w[1] == "\"C\"");
                if !extern_c {
                    return Err(format!(
                        "__global__ {} is not extern \"C\" (its name would be mangled)",
                        toks[n]
                    ));
                }
                names.push(toks[n].clone());
                i = n + 1;
            }
            _ => i = j.max(start + 1),
        }
    }
    Ok(names)
}

/// Appends the tokens of one line of preprocessed C++ (no comments are left by then).
fn tokenize(line: &str, toks: &mut Vec<String>) {
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphanumeric() || c == b'_' {
            // An identifier, or a number (with its '.', suffixes and exponent letters).
            let number = c.is_ascii_digit();
            let s = i;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || (number && b[i] == b'.'))
            {
                i += 1;
            }
            toks.push(line[s..i].to_string());
        } else if c == b'"' || c == b'\'' {
            let s = i;
            i += 1;
            while i < b.len() && b[i] != c {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
            toks.push(line[s..i].to_string());
        } else if c == b':' && b.get(i + 1) == Some(&b':') {
            toks.push("::".into());
            i += 2;
        } else {
            // One punctuation character (a UTF-8 sequence whole, though none is expected).
            let s = i;
            i += 1;
            while i < b.len() && (b[i] & 0xC0) == 0x80 {
                i += 1;
            }
            toks.push(line[s..i].to_string());
        }
    }
}

/// `gemm_mma` -> `GemmMma`.
fn camel(stem: &str) -> String {
    stem.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The Rust source of the entry list (the checked-in src/cuda/entries.rs).
fn entries_source(modules: &[(String, Vec<String>)]) -> String {
    use std::collections::BTreeMap;
    let mut s = String::from(
        "// @generated by build.rs from the `extern \"C\" __global__` entries of kernels/*.cu (after\n\
         // nvcc's preprocessor), included by src/cuda/kernel.rs: do not edit by hand.\n\
         // Regenerate: LORA_KERNELS_WRITE_ENTRIES=1 cargo build\n\
         \n\
         /// A kernel module: the kernels of one `kernels/*.cu` file, one embedded fatbinary.\n\
         #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]\n\
         pub(crate) enum Module {\n",
    );
    for (stem, _) in modules {
        s += &format!("    /// kernels/{stem}.cu\n    {},\n", camel(stem));
    }
    s += "}\n\nimpl Module {\n    /// Every module.\n";
    s += &format!(
        "    pub(crate) const ALL: [Module; {}] = [\n",
        modules.len()
    );
    for (stem, _) in modules {
        s += &format!("        Module::{},\n", camel(stem));
    }
    s += "    ];\n\n    /// The file stem: `kernels/<name>.cu`, the fatbinary `<name>`.\n";
    s += "    pub(crate) const fn name(self) -> &'static str {\n        match self {\n";
    for (stem, _) in modules {
        s += &format!("            Module::{} => {stem:?},\n", camel(stem));
    }
    s += "        }\n    }\n}\n";

    // Every entry, and the families of entries that differ only in the element type.
    let mut all: BTreeMap<String, String> = BTreeMap::new();
    let mut families: BTreeMap<String, [Option<String>; 3]> = BTreeMap::new();
    for (stem, names) in modules {
        s += &format!("\n// kernels/{stem}.cu\n");
        for name in names {
            let konst = name.to_ascii_uppercase();
            if let Some(other) = all.insert(konst.clone(), stem.clone()) {
                panic!("kernel entry {name} in both kernels/{other}.cu and kernels/{stem}.cu");
            }
            s += &format!(
                "pub(crate) const {konst}: Kernel = Kernel {{\n    module: Module::{},\n    name: {name:?},\n}};\n",
                camel(stem)
            );
            let parts: Vec<&str> = name.split('_').collect();
            let dts: Vec<usize> = (0..parts.len())
                .filter(|&i| matches!(parts[i], "f32" | "f16" | "bf16"))
                .collect();
            if let [i] = dts[..] {
                let mut fam = parts.clone();
                let slot = ["f32", "f16", "bf16"]
                    .iter()
                    .position(|d| *d == parts[i])
                    .unwrap();
                fam[i] = "*";
                let fam = fam.join("_");
                families.entry(fam).or_default()[slot] = Some(konst);
            }
        }
    }
    s += "\n// One kernel per element type: the entries whose names differ only in f32 / f16 / bf16.\n";
    for (fam, kernels) in &families {
        let konst = fam.replace("_*", "").to_ascii_uppercase();
        if all.contains_key(&konst) {
            panic!(
                "the family {fam} and the entry {} have one constant name",
                konst.to_lowercase()
            );
        }
        let opt = |k: &Option<String>| k.as_ref().map_or("None".into(), |k| format!("Some({k})"));
        s += &format!(
            "pub(crate) const {konst}: ByDType = ByDType {{\n    family: {fam:?},\n    f32: {},\n    f16: {},\n    bf16: {},\n}};\n",
            opt(&kernels[0]),
            opt(&kernels[1]),
            opt(&kernels[2])
        );
    }
    s
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
