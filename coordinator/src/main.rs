//! `coordinator`: reads the topology, dials every gpu-node stage, admits cvm-agents and routes
//! their masked calls to the stage that owns each layer. It reads frame headers only.

use std::path::PathBuf;
use std::sync::Arc;

use actix::Actor;
use anyhow::{Context, Result};
use clap::Parser;
use std::sync::atomic::{AtomicBool, Ordering};

use talaria_actors::router::{Admission, NodeLink, RouteTable, Router};
use talaria_attestation::{
    AttestationError, Bound, Evidence, InsecurePolicy, Policy, Purpose, Tcb, parse_measurement,
};
use talaria_gguf::GgufFile;
use talaria_model_file::{Part, read_provision};
use talaria_topology::{Role, Topology};
use talaria_wire::ErrorReply;

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

/// Admission by SEV-SNP attestation, with the topology's policy; agents without hardware only
/// where the topology allows it, and never silently.
struct AttestedAdmission {
    policy: Option<Policy>,
    allow_insecure: bool,
}

impl AttestedAdmission {
    fn new(topology: &Topology) -> Result<Self> {
        let policy = match &topology.attestation {
            None => None,
            Some(a) => Some({
                let mut p = Policy::new(
                    &a.ark,
                    &a.ask,
                    a.measurements
                        .iter()
                        .map(|m| parse_measurement(m))
                        .collect::<Result<_, _>>()
                        .map_err(anyhow::Error::msg)?,
                    Tcb {
                        bootloader: a.min_tcb[0],
                        tee: a.min_tcb[1],
                        snp: a.min_tcb[2],
                        microcode: a.min_tcb[3],
                    },
                    a.max_vmpl,
                    topology.allow_insecure_agents,
                )?;
                p.allow_smt = a.allow_smt;
                p.min_guest_svn = a.min_guest_svn;
                p
            }),
        };
        if policy.is_none() && !topology.allow_insecure_agents {
            tracing::warn!(
                "no [attestation] policy and insecure agents not allowed: no agent can be admitted"
            );
        }
        Ok(Self {
            policy,
            allow_insecure: topology.allow_insecure_agents,
        })
    }
}

impl Admission for AttestedAdmission {
    fn admit(
        &self,
        tenant: &str,
        agent: &str,
        evidence: &[u8],
        nonce: &[u8; 32],
        key: &[u8],
    ) -> Result<(), ErrorReply> {
        let refuse = |e: AttestationError| {
            tracing::warn!(%tenant, %agent, error_type = e.error_type(), "agent refused: {e}");
            ErrorReply::new(e.error_type(), e.to_string())
        };
        let evidence: Evidence = talaria_wire::frame::body(evidence)
            .map_err(|e| refuse(AttestationError::Malformed(e.to_string())))?;
        // The report binds the admission purpose and the tenant it asks for.
        let bound = Bound {
            purpose: Purpose::Admission,
            nonce,
            key,
            claims: tenant.as_bytes(),
        };
        let verified = match &self.policy {
            Some(p) => talaria_attestation::verify(&evidence, p, &bound),
            None => talaria_attestation::verify_without_root(
                &evidence,
                InsecurePolicy {
                    allow_insecure: self.allow_insecure,
                },
            ),
        }
        .map_err(refuse)?;
        match verified.measurement {
            Some(m) => {
                tracing::info!(%tenant, %agent, measurement = %hex::encode(m), "agent attested")
            }
            None => tracing::warn!(%tenant, %agent, "INSECURE: agent admitted without attestation"),
        }
        Ok(())
    }
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
        talaria_actors::router::serve(endpoint, router, max_request).await;
        Ok(())
    })
}
