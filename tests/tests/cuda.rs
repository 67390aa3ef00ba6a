//! The gpu-node on a CUDA device, checked against the CPU backend (`--features cuda`). Without a
//! device the tests print why they skip; without the feature this file holds no test.
#![cfg(feature = "cuda")]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use talaria_engine::{BlockOp, OpId};
use talaria_gguf::GgufFile;
use talaria_gpu_node::{CloudExecutor, LinearWeights};
use talaria_model_file::read_config;
use talaria_tests::cluster::{LocalCluster, topology};
use talaria_tests::{golden, ids, real_model};
use talaria_topology::Backend;
use talaria_wire::{MaskedCall, Tensor};

/// Why CUDA cannot be used here, if it cannot.
fn no_device() -> Option<String> {
    use burn::tensor::Tensor as T;
    let probe = std::panic::catch_unwind(|| {
        let device = burn::backend::cuda::CudaDevice::new(0);
        T::<burn::backend::Cuda, 1>::from_floats([1.0, 2.0], &device)
            .sum()
            .into_scalar()
    });
    match probe {
        Ok(v) if v == 3.0 => None,
        Ok(v) => Some(format!("the probe summed to {v}")),
        Err(e) => Some(
            talaria_actors::panic_message(e.as_ref())
                .unwrap_or("the CUDA runtime panicked")
                .to_string(),
        ),
    }
}

macro_rules! require_device {
    () => {
        if let Some(why) = no_device() {
            eprintln!("SKIPPED: no usable CUDA device: {why}");
            return;
        }
    };
}

fn executors() -> (CloudExecutor, CloudExecutor) {
    let f = GgufFile::open(real_model()).unwrap();
    let config = read_config(&f).unwrap();
    let all = 0..=config.n_layers - 1;
    let load = |b| {
        CloudExecutor::new(
            LinearWeights::load_on(&f, &config, all.clone(), true, b).unwrap(),
            None,
        )
    };
    (load(Backend::Cpu), load(Backend::Cuda(0)))
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let scale = a.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn masked_linear_calls_on_cuda_match_the_cpu_backend() {
    require_device!();
    let (cpu, gpu) = executors();
    assert_eq!(gpu.weights().placement(), Backend::Cuda(0));
    let config = cpu.weights().config().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let ops = [
        OpId::Block {
            layer: 0,
            op: BlockOp::Qkv,
        },
        OpId::Block {
            layer: 11,
            op: BlockOp::Down,
        },
        OpId::Block {
            layer: 29,
            op: BlockOp::GateUp,
        },
        OpId::LmHead,
    ];
    for (i, &op) in ops.iter().enumerate() {
        let (d_in, _) = op.shape(&config);
        for rows in [1usize, 3, 37] {
            // Masked rows are large: σ = 100 times the activations.
            let x: Vec<f64> = (0..rows * d_in)
                .map(|_| rng.random_range(-300.0..300.0))
                .collect();
            for f64_mode in [false, true] {
                let tensor = if f64_mode {
                    Tensor::F64 {
                        rows,
                        cols: d_in,
                        data: x.clone(),
                    }
                } else {
                    Tensor::F32 {
                        rows,
                        cols: d_in,
                        data: x.iter().map(|&v| v as f32).collect(),
                    }
                };
                let call = MaskedCall {
                    session: 1,
                    seq: i as u64,
                    op,
                    x: tensor,
                };
                let a = cpu.call(&call).unwrap().y.to_f64();
                let b = gpu.call(&call).unwrap().y.to_f64();
                let d = max_rel_diff(&a, &b);
                let tol = if f64_mode { 1e-12 } else { 1e-4 };
                assert!(
                    d < tol,
                    "{op} rows {rows} f64 {f64_mode}: relative difference {d:e}"
                );
            }
        }
    }
    // The set-up (R_pub = W at full rank) is the same weight.
    let req = talaria_wire::SetupRequest {
        session: 1,
        op: OpId::Block {
            layer: 3,
            op: BlockOp::AttnOut,
        },
        basis: talaria_wire::BasisSpec::Identity,
        f64: true,
        integer: false,
    };
    assert_eq!(cpu.setup(&req).unwrap(), gpu.setup(&req).unwrap());
}

#[test]
fn a_cuda_stage_answers_through_the_cluster() {
    require_device!();
    let model = real_model();
    let text = topology(
        &model,
        &[("stage-0", "0-14", false), ("stage-1", "15-29", true)],
        &["tenant-a"],
    )
    .replace("lm_head = true\n", "lm_head = true\nbackend = \"cuda:0\"\n")
        // The cloud's GEMM in f32 (f64-client): CUDA stages have no f64 GEMM.
        + "[remo]\nprecision = \"f64-client\"\n";
    let cluster = LocalCluster::start(&text);
    let topo = cluster.topology();
    assert_eq!(topo.stages[1].backend, Backend::Cuda(0));
    let reference = golden("greedy.json");
    let r = &reference["results"][1];
    let req = talaria_wire::TenantRequest {
        prompt: talaria_wire::Prompt::Ids(ids(&r["prompt_ids"])),
        max_tokens: ids(&r["ids"]).len(),
        sampling: Default::default(),
        ignore_eos: false,
        stop: Vec::new(),
        cache_salt: None,
    };
    let answer = talaria_tests::cluster::ask_agent(
        &cluster.agent_tls(&topo.agents[0].tenant),
        topo.agents[0].listen,
        &cluster.api_key(&topo.agents[0].tenant),
        &req,
    );
    assert_eq!(answer, Ok(ids(&r["ids"])));
}
