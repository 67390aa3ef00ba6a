//! `coordinator`: reads the topology, dials every gpu-node stage, admits cvm-agents and routes
//! their masked calls to the stage that owns each layer. It reads frame headers only.

use std::path::PathBuf;
use std::sync::Arc;

use actix::Actor;
use anyhow::{Context, Result};
use clap::Parser;
use std::sync::atomic::{AtomicBool, Ordering};

mod admission;
mod router;

use admission::AttestedAdmission;
use router::{NodeLink, RouteTable, Router};
use talaria_gguf::GgufFile;
use talaria_model_file::{Part, read_provision};
use talaria_topology::{Role, Topology};

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Route a Talaria cluster's masked calls"
)]
struct Args {
    /// The cluster's topology file.
    #[arg(long)]
    topology: PathBuf,
    /// Where `talaria up` generated the cluster's TLS material (topologies with `generate`).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
}

fn main() -> Result<()> {
    talaria_actors::init_logging();
    let args = Args::parse();
    let topology = Topology::load_for(&args.topology, Role::Coordinator)?;
    let tls = talaria_actors::tls_material(&topology, args.tls_dir.as_deref())
        .map_err(anyhow::Error::msg)?;
    talaria_net::set_liveness(topology.deadlines.idle);
    let path = topology.coordinator_file();
    let file = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    Part::Coordinator
        .check_file(&file)
        .with_context(|| format!("{}", path.display()))?;
    let provision = read_provision(&file)?;
    drop(file);
    topology.check_layers(provision.config.n_layers)?;
    let routes = RouteTable::new(&topology, provision.config.n_layers)
        .context("the stages do not cover the model")?;
    // An agent sends requests only: none is larger than the largest call of this model.
    let max_request =
        talaria_wire::max_request_frame(&provision.config).min(topology.max_frame_bytes);
    let config = provision.config.clone();
    let provision = talaria_wire::frame::encode::<_, ()>(&provision, None)?;

    actix::System::new().block_on(async move {
        // The coordinator proves itself to the gpu-nodes with the cluster's certificate: they
        // serve no one else.
        let client = tls.cluster_client(talaria_wire::ALPN_CLOUD)?;
        let live: Arc<[AtomicBool]> = topology
            .stages
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect();
        let nodes = topology
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                NodeLink::new(
                    s.name.clone(),
                    s.listen,
                    tls.clone(),
                    client.clone(),
                    topology.max_frame_bytes,
                    // What a stage reads (gpu-node's main computes it the same way, from the
                    // same topology and model): the most a batch may be.
                    max_request,
                    live.clone(),
                    i,
                )
                .start()
            })
            .collect::<Vec<_>>();
        // Ready means routable: every part of the model has a stage connected.
        loop {
            let up: Vec<bool> = live.iter().map(|l| l.load(Ordering::Relaxed)).collect();
            let parts_up = (0..routes.n_parts())
                .filter(|&p| routes.replicas(p).iter().any(|&n| up[n]))
                .count();
            if parts_up == routes.n_parts() {
                break;
            }
            tracing::debug!(parts_up, parts = routes.n_parts(), "waiting for gpu-nodes");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        tracing::info!("every part of the model has a stage connected");
        let admission = Arc::new(AttestedAdmission::new(&topology)?);
        let limits = topology
            .agents
            .iter()
            .map(|a| (a.tenant.clone(), a.max_sessions))
            .collect();
        if let Some(addr) = topology.coordinator_metrics {
            talaria_actors::metrics::serve(addr)?;
        }
        let router = Router::new(
            routes,
            config,
            nodes,
            live,
            admission,
            Arc::new(provision),
            limits,
            topology.deadlines.clone(),
        )
        .start();
        // Agents present a certificate of their own; admission checks that the attested key is
        // that certificate.
        let endpoint = tls.server(
            topology.coordinator,
            talaria_wire::ALPN_CLOUD,
            talaria_net::ClientAuth::AnyCertificate,
        )?;
        tracing::info!(listen = %topology.coordinator, stages = topology.stages.len(), "serving");
        println!("ready {}", topology.coordinator);
        router::serve(endpoint, router, max_request).await;
        Ok(())
    })
}
