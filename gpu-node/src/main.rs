//! `gpu-node`: serves one pipeline stage of a topology — only its layers' weights, masked
//! linear calls over QUIC.

use std::path::PathBuf;
use std::sync::Arc;

use actix::Actor;
use anyhow::{Context, Result, bail};
use clap::Parser;
use talaria_gguf::GgufFile;
use talaria_gpu_node::runtime::{DEFAULT_MAX_QUEUED, GpuShard, LayerStage, ShardLimits};
use talaria_gpu_node::{CloudExecutor, Fault, Faulty, LinearWeights, Tap};
use talaria_model_file::{Part, read_config};
use talaria_topology::{Role, Topology};

#[derive(Parser)]
#[command(
    name = "gpu-node",
    version,
    about = "Serve one stage of a Talaria cluster"
)]
struct Args {
    /// The cluster's topology file.
    #[arg(long)]
    topology: PathBuf,
    /// The name of the stage to serve (a `[[stage]]` of the topology).
    #[arg(long)]
    stage: String,
    /// Where `talaria up` generated the cluster's TLS material (topologies with `generate`).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Record everything this node sees into this directory (docs/tap-format.md).
    #[arg(long)]
    tap: Option<PathBuf>,
}

fn main() -> Result<()> {
    talaria_actors::init_logging();
    let args = Args::parse();
    // First: a refused test fault stops the node before it loads anything.
    let fault = Fault::from_env(&args.stage).map_err(anyhow::Error::msg)?;
    let topology = Topology::load_for(&args.topology, Role::Stage(&args.stage))?;
    let Some(stage) = topology.stage(&args.stage).cloned() else {
        bail!(
            "{}: no stage named {:?}",
            args.topology.display(),
            args.stage
        );
    };
    let tls = talaria_actors::tls_material(&topology, args.tls_dir.as_deref())
        .map_err(anyhow::Error::msg)?;
    talaria_net::set_liveness(topology.deadlines.idle);

    let t0 = std::time::Instant::now();
    let path = topology.stage_file(&stage);
    let file = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    let config = read_config(&file)?;
    topology.check_layers(config.n_layers)?;
    Part::Stage {
        layers: stage.layers.clone(),
        lm_head: stage.lm_head,
    }
    .check_file(&file)
    .with_context(|| format!("stage {}: {}", stage.name, path.display()))?;
    let mut weights = LinearWeights::load_on(
        &file,
        &config,
        stage.layers.clone(),
        stage.lm_head,
        stage.backend,
    )
    .with_context(|| format!("stage {} on {}", stage.name, stage.backend))?;
    if topology.remo.integer_mode() {
        // The integer mode's exact weights, for this stage's layers only.
        let before = weights.bytes();
        weights
            .load_int(&file)
            .with_context(|| format!("stage {}: integer weights", stage.name))?;
        tracing::info!(
            stage = %stage.name,
            int_weight_mb = (weights.bytes() - before) as f64 / 1e6,
            "integer weights loaded"
        );
    }
    drop(file);
    let weight_bytes = weights.bytes();
    let tap = args.tap.as_ref().map(Tap::create).transpose()?;
    let executor = Arc::new(CloudExecutor::new(weights, tap));
    tracing::info!(
        stage = %stage.name,
        layers = ?stage.layers,
        lm_head = stage.lm_head,
        backend = %stage.backend,
        weight_mb = weight_bytes as f64 / 1e6,
        rss_mb = talaria_actors::rss_bytes().unwrap_or(0) as f64 / 1e6,
        load_s = t0.elapsed().as_secs_f64(),
        "weights loaded"
    );

    actix::System::new().block_on(async move {
        // Only the cluster's own processes (the coordinator) may connect: a stage serves its
        // weights' products and `R_pub` to no one else.
        let endpoint = tls.server(
            stage.listen,
            talaria_wire::ALPN_CLOUD,
            talaria_net::ClientAuth::Cluster,
        )?;
        if let Some(addr) = stage.metrics {
            talaria_actors::metrics::serve(addr)?;
        }
        let limits = ShardLimits {
            max_rows: talaria_wire::max_call_rows(&config),
            max_queued: DEFAULT_MAX_QUEUED,
        };
        let compute: Arc<dyn talaria_gpu_node::runtime::StageCompute> = match fault {
            None => executor,
            Some(f) => Arc::new(Faulty::new(executor, f)),
        };
        let shard = GpuShard::new(compute.clone(), topology.batching.clone(), limits)?.start();
        let layer_stage = LayerStage::new(stage.name.clone(), compute, shard).start();
        tracing::info!(stage = %stage.name, listen = %stage.listen, "serving");
        println!("ready {}", stage.listen);
        // A stage reads requests only: none is larger than the largest call of this model.
        let max_request = talaria_wire::max_request_frame(&config).min(topology.max_frame_bytes);
        talaria_gpu_node::runtime::serve(endpoint, layer_stage, max_request).await;
        Ok(())
    })
}
