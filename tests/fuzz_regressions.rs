//! The fuzz targets (`fuzz/`, see its README) under `cargo test`, where the fuzzer does
//! not run: every input saved in `fuzz/regressions/<target>/` (each crash the fuzzer
//! found, kept after its fix), the seeds made from `tests/fixtures/peer/`, and a bounded
//! sweep of pseudo-random and mutated inputs from a fixed seed. A panic is a failure.

mod fuzz_harness;

use std::path::{Path, PathBuf};

use fuzz_harness::{Target, TARGETS};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target(name: &str) -> Target {
    TARGETS.iter().find(|(n, _)| *n == name).unwrap().1
}

/// The seed inputs of each target, in its input format, from the committed fixtures.
fn seeds(name: &str) -> Vec<Vec<u8>> {
    let peer = root().join("tests/fixtures/peer");
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    match name {
        "peft_adapter" => ["peft_lora_48x80_r8_adapter", "peft_dora_48x80_r8_adapter"]
            .iter()
            .map(|d| {
                let mut v = read(&peer.join(d).join("adapter_config.json"));
                v.push(0);
                v.extend(read(&peer.join(d).join("adapter_model.safetensors")));
                v
            })
            .collect(),
        "linear4bit" => [
            "nf4_64x128_bs64_linear4bit_checkpoint.safetensors",
            "nf4_64x128_bs64_dq_linear4bit_checkpoint.safetensors",
        ]
        .iter()
        .map(|f| {
            // Prefix byte 0: "layer.", the fixtures' prefix.
            let mut v = vec![0u8];
            v.extend(read(&peer.join(f)));
            v
        })
        .collect(),
        _ => vec![Vec::new()],
    }
}

/// SplitMix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Random bytes, or a seed with a few bytes changed, inserted or cut.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let seed = &seeds[rng.below(seeds.len())];
    if seed.is_empty() || rng.below(4) == 0 {
        let len = rng.below(600);
        return (0..len).map(|_| rng.next() as u8).collect();
    }
    let mut v = seed.clone();
    for _ in 0..1 + rng.below(4) {
        let i = rng.below(v.len());
        match rng.below(4) {
            0 => v[i] = rng.next() as u8,
            1 => v[i] ^= 1 << rng.below(8),
            2 => v.insert(i, rng.next() as u8),
            _ => v.truncate(i.max(1)),
        }
    }
    v
}

fn run(name: &str, sweep: usize) {
    let f = target(name);
    let dir = root().join("fuzz/regressions").join(name);
    let mut saved: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    saved.sort();
    for p in &saved {
        eprintln!("{name}: {}", p.display());
        f(&std::fs::read(p).unwrap());
    }
    let seeds = seeds(name);
    for s in &seeds {
        f(s);
    }
    let mut rng = Rng(0x5EED ^ name.len() as u64);
    for _ in 0..sweep {
        f(&mutate(&mut rng, &seeds));
    }
}

#[test]
fn fuzz_peft_adapter() {
    run("peft_adapter", 400);
}

#[test]
fn fuzz_linear4bit() {
    run("linear4bit", 400);
}

#[test]
fn fuzz_nf4_quantize() {
    run("nf4_quantize", 1000);
}

#[test]
fn fuzz_cpu_ops() {
    run("cpu_ops", 1000);
}

#[test]
fn fuzz_neftune_ops() {
    run("neftune_ops", 1000);
}
