//! The caller's stream: ops on a `Gpu` made from a stream the test owns
//! (`Gpu::from_stream`), captured into a CUDA graph and replayed, give bit-identical
//! results to eager calls, also after the inputs change between replays; and two
//! threads on two streams with different tunings each take their own path.
//!
//! Skips loudly without a GPU (fails with `LORA_KERNELS_REQUIRE_GPU=1`); the core-path
//! cases need sm_90 and skip loudly elsewhere.

mod common;

use std::sync::Arc;

use common::Rng;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use lora_kernels::cuda::{self, gemm, nf4::Nf4Device, Gpu, Path, Plan};
use lora_kernels::tuning::{CorePolicy, FusedDown};
use lora_kernels::{
    bf16, DoraOutputs, DoraWeights, LoraGrads, LoraOptions, LoraShape, LoraWeights, Nf4Weight,
    QloraWeights, Tuning,
};

/// A caller-owned context and stream (cudarc's event tracking off, as a framework that
/// captures graphs runs it), and a `Gpu` on that stream; `None` (after a loud note from
/// `common::gpu`) without a GPU.
fn caller_gpu() -> Option<(Arc<CudaStream>, Gpu)> {
    common::gpu()?;
    let ctx = CudaContext::new(0).expect("context");
    // SAFETY: every buffer of these tests is used on one stream at a time, ordered by
    // the test's own synchronizations, so cudarc's cross-stream events are not needed
    // (and waits on events recorded outside a capture are not allowed inside it).
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().expect("stream");
    let gpu = Gpu::from_stream(stream.clone()).expect("Gpu::from_stream");
    Some((stream, gpu))
}

fn sm90(gpu: &Gpu, test: &str) -> bool {
    if gemm::supported(gpu) {
        return true;
    }
    eprintln!(
        "\n*** {test} SKIPPED: no sm_90 GEMM core on {} ***\n",
        gpu.name()
    );
    false
}

/// Captures `ops` on `stream` into a graph (thread-local capture mode).
fn capture(stream: &Arc<CudaStream>, ops: impl FnOnce()) -> cudarc::driver::CudaGraph {
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .expect("begin capture");
    ops();
    stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
        .expect("end capture")
        .expect("a graph")
}

fn bits(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Copies `host` into the existing device buffer `dst` (same length) on the stream.
fn overwrite(stream: &Arc<CudaStream>, dst: &mut CudaSlice<bf16>, host: &[bf16]) {
    stream.memcpy_htod(host, dst).expect("htod");
}

/// The LoRA layer of the graph tests: buffers on the caller's stream.
struct Layer {
    shape: LoraShape,
    x: CudaSlice<bf16>,
    w: CudaSlice<bf16>,
    a: CudaSlice<bf16>,
    b: CudaSlice<bf16>,
    dy: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    h: CudaSlice<bf16>,
    dx: CudaSlice<bf16>,
    da: CudaSlice<bf16>,
    db: CudaSlice<bf16>,
}

impl Layer {
    fn new(gpu: &Gpu, shape: LoraShape, rng: &mut Rng) -> Layer {
        let up = |v: Vec<bf16>| gpu.upload(&v).unwrap();
        Layer {
            shape,
            x: up(rng.vec(shape.x_len(), 1.0)),
            w: up(rng.vec(shape.w_len(), 0.05)),
            a: up(rng.vec(shape.a_len(), 0.05)),
            b: up(rng.vec(shape.b_len(), 0.05)),
            dy: up(rng.vec(shape.y_len(), 1.0)),
            y: gpu.zeros(shape.y_len()).unwrap(),
            h: gpu.zeros(shape.h_len()).unwrap(),
            dx: gpu.zeros(shape.x_len()).unwrap(),
            da: gpu.zeros(shape.a_len()).unwrap(),
            db: gpu.zeros(shape.b_len()).unwrap(),
        }
    }

    /// Forward then backward; their plans.
    fn step(&mut self, gpu: &Gpu, opts: &LoraOptions) -> (Plan, Plan) {
        let weights = LoraWeights {
            w: &self.w,
            a: &self.a,
            b: &self.b,
            bias: None,
        };
        let fwd = cuda::lora::forward(
            gpu,
            &self.shape,
            opts,
            &self.x,
            weights,
            &mut self.y,
            Some(&mut self.h),
        )
        .expect("lora forward");
        let grads = LoraGrads {
            dx: &mut self.dx,
            da: &mut self.da,
            db: &mut self.db,
        };
        let bwd = cuda::lora::backward(
            gpu,
            &self.shape,
            opts,
            &self.x,
            weights,
            &self.h,
            &self.dy,
            grads,
        )
        .expect("lora backward");
        (fwd, bwd)
    }

    /// y, h, dx, da, db as bits.
    fn outputs(&self, gpu: &Gpu) -> Vec<Vec<u16>> {
        [&self.y, &self.h, &self.dx, &self.da, &self.db]
            .iter()
            .map(|b| bits(&gpu.download(*b).unwrap()))
            .collect()
    }
}

/// A LoRA forward + backward on the core path (the down product and G inside the core
/// launches) captured on the caller's stream: each replay equals the eager step bit for
/// bit, also after x and dY are overwritten between replays (the graph reads the new
/// inputs; the core's flag words are reset inside the graph, so a replay never takes
/// the previous replay's flags as its own).
#[test]
fn gpu_graph_lora_forward_backward() {
    let Some((stream, gpu)) = caller_gpu() else {
        return;
    };
    if !sm90(&gpu, "gpu_graph_lora_forward_backward") {
        return;
    }
    let shape = LoraShape::new(2048, 1024, 1024, 16);
    let opts = LoraOptions::new(2.0).with_tuning(Tuning {
        core: CorePolicy::Require,
        fused_down: FusedDown::Force,
        ..Tuning::AUTO
    });
    let mut rng = Rng::new(11);
    let mut layer = Layer::new(&gpu, shape, &mut rng);
    let inputs: Vec<(Vec<bf16>, Vec<bf16>)> = (0..3)
        .map(|_| (rng.vec(shape.x_len(), 1.0), rng.vec(shape.y_len(), 1.0)))
        .collect();

    // Eager references, one per input set (and the kernels' one-time setup).
    let mut eager = Vec::new();
    for (x, dy) in &inputs {
        overwrite(&stream, &mut layer.x, x);
        overwrite(&stream, &mut layer.dy, dy);
        let (fwd, bwd) = layer.step(&gpu, &opts);
        assert_eq!(fwd.path, Path::Core, "forward plan {fwd:?}");
        assert!(fwd.fused_down, "forward plan {fwd:?}");
        assert_eq!(bwd.path, Path::Core, "backward plan {bwd:?}");
        assert!(bwd.fused_down, "backward plan {bwd:?}");
        eager.push(layer.outputs(&gpu));
    }
    assert_ne!(
        eager[0], eager[1],
        "different inputs must give different outputs"
    );

    overwrite(&stream, &mut layer.x, &inputs[0].0);
    overwrite(&stream, &mut layer.dy, &inputs[0].1);
    gpu.synchronize().unwrap();
    let graph = capture(&stream, || {
        layer.step(&gpu, &opts);
    });
    for round in 0..2 {
        for (i, (x, dy)) in inputs.iter().enumerate() {
            overwrite(&stream, &mut layer.x, x);
            overwrite(&stream, &mut layer.dy, dy);
            // Poison the outputs: a replay must write every element again.
            for out in [&mut layer.y, &mut layer.dx] {
                stream.memset_zeros(out).unwrap();
            }
            graph.launch().expect("graph launch");
            let got = layer.outputs(&gpu);
            for (j, name) in ["y", "h", "dx", "da", "db"].iter().enumerate() {
                assert!(
                    got[j] == eager[i][j],
                    "replay {round}, input {i}: {name} differs from the eager call"
                );
            }
        }
    }
}

/// A QLoRA forward (dequantized row panels into the core, several panels) and a DoRA
/// forward (the core with the norm scale in its epilogue) captured on the caller's
/// stream: replays equal eager calls bit for bit, before and after x changes.
#[test]
fn gpu_graph_qlora_and_dora_forward() {
    let Some((stream, gpu)) = caller_gpu() else {
        return;
    };
    if !sm90(&gpu, "gpu_graph_qlora_and_dora_forward") {
        return;
    }
    let shape = LoraShape::new(1024, 1024, 1536, 16);
    let (t, k, n, r) = (1024, 1024, 1536, 16);
    let mut rng = Rng::new(12);
    let w_dense: Vec<bf16> = rng.vec(n * k, 0.05);
    let q = Nf4Weight::quantize(&w_dense, n, k, 64, true).unwrap();
    let wq = Nf4Device::upload(&gpu, &q).unwrap();
    let w = gpu.upload(&w_dense).unwrap();
    let a = gpu.upload(&rng.vec::<bf16>(r * k, 0.05)).unwrap();
    let b = gpu.upload(&rng.vec::<bf16>(n * r, 0.05)).unwrap();
    let m = gpu.upload(&rng.vec::<bf16>(n, 1.0)).unwrap();
    let xs: Vec<Vec<bf16>> = (0..2).map(|_| rng.vec(t * k, 1.0)).collect();
    let mut x = gpu.upload(&xs[0]).unwrap();
    let mut yq = gpu.zeros::<bf16>(t * n).unwrap();
    let mut yd = gpu.zeros::<bf16>(t * n).unwrap();
    let mut norm = gpu.zeros::<f32>(n).unwrap();
    // Panels of 512 rows: three per forward.
    let opts = LoraOptions::new(2.0).with_tuning(Tuning {
        panel_elems: Some(512 * k),
        ..Tuning::AUTO
    });
    let run = |x: &CudaSlice<bf16>,
               yq: &mut CudaSlice<bf16>,
               yd: &mut CudaSlice<bf16>,
               norm: &mut CudaSlice<f32>| {
        let qw = QloraWeights {
            w: &wq,
            a: &a,
            b: &b,
            bias: None,
        };
        let pq = cuda::qlora::forward(&gpu, &shape, &opts, x, qw, yq, None).expect("qlora");
        let dw = DoraWeights {
            w: &w,
            a: &a,
            b: &b,
            bias: None,
            magnitude: &m,
        };
        let out = DoraOutputs {
            y: yd,
            h: None,
            norm: Some(norm),
            z: None,
        };
        let pd = cuda::dora::forward(&gpu, &shape, &opts, x, dw, out).expect("dora");
        (pq, pd)
    };
    let mut eager = Vec::new();
    for xi in &xs {
        overwrite(&stream, &mut x, xi);
        let (pq, pd) = run(&x, &mut yq, &mut yd, &mut norm);
        assert_eq!(pq.path, Path::CorePanels, "qlora plan {pq:?}");
        assert_eq!(pd.path, Path::Core, "dora plan {pd:?}");
        eager.push((
            bits(&gpu.download(&yq).unwrap()),
            bits(&gpu.download(&yd).unwrap()),
        ));
    }
    assert_ne!(eager[0], eager[1]);
    gpu.synchronize().unwrap();
    let graph = capture(&stream, || {
        run(&x, &mut yq, &mut yd, &mut norm);
    });
    for (i, xi) in xs.iter().enumerate().chain(xs.iter().enumerate()) {
        overwrite(&stream, &mut x, xi);
        stream.memset_zeros(&mut yq).unwrap();
        stream.memset_zeros(&mut yd).unwrap();
        graph.launch().expect("graph launch");
        assert!(
            bits(&gpu.download(&yq).unwrap()) == eager[i].0,
            "qlora replay, input {i}"
        );
        assert!(
            bits(&gpu.download(&yd).unwrap()) == eager[i].1,
            "dora replay, input {i}"
        );
    }
}

/// Two threads, each with its own `Gpu` on its own stream of one device (sharing the
/// loaded kernels), run the same LoRA step at once with different tunings: each takes
/// its own path (cuBLAS / the core), and each result equals that tuning's result from
/// one thread alone, bit for bit.
#[test]
fn gpu_two_streams_two_tunings() {
    let Some((stream, gpu)) = caller_gpu() else {
        return;
    };
    if !sm90(&gpu, "gpu_two_streams_two_tunings") {
        return;
    }
    let other = gpu
        .with_stream(stream.context().new_stream().unwrap())
        .expect("with_stream");
    let shape = LoraShape::new(1024, 1024, 1024, 16);
    let never = LoraOptions::new(2.0).with_tuning(Tuning {
        core: CorePolicy::Never,
        ..Tuning::AUTO
    });
    let require = LoraOptions::new(2.0).with_tuning(Tuning {
        core: CorePolicy::Require,
        ..Tuning::AUTO
    });
    // References: each tuning alone, on the first stream.
    let mut reference = Vec::new();
    for opts in [&never, &require] {
        let mut layer = Layer::new(&gpu, shape, &mut Rng::new(21));
        layer.step(&gpu, opts);
        reference.push(layer.outputs(&gpu));
    }
    assert_ne!(
        reference[0], reference[1],
        "the two paths round differently"
    );

    let results: Vec<(Plan, Plan, Vec<Vec<u16>>)> = std::thread::scope(|s| {
        let jobs = [(&gpu, &never), (&other, &require)].map(|(g, opts)| {
            s.spawn(move || {
                let mut layer = Layer::new(g, shape, &mut Rng::new(21));
                g.synchronize().unwrap();
                let mut plans = None;
                for _ in 0..20 {
                    plans = Some(layer.step(g, opts));
                }
                let (f, b) = plans.unwrap();
                (f, b, layer.outputs(g))
            })
        });
        jobs.map(|j| j.join().unwrap()).into()
    });
    assert_eq!(results[0].0.path, Path::Cublas, "{:?}", results[0].0);
    assert_eq!(results[0].1.path, Path::Cublas, "{:?}", results[0].1);
    assert_eq!(results[1].0.path, Path::Core, "{:?}", results[1].0);
    assert_eq!(results[1].1.path, Path::Core, "{:?}", results[1].1);
    assert!(
        results[0].2 == reference[0],
        "the cuBLAS thread's results differ"
    );
    assert!(
        results[1].2 == reference[1],
        "the core thread's results differ"
    );
}
