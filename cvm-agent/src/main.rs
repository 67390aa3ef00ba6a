//! `cvm-agent`: one tenant's agent. Joins the cluster through the coordinator, receives the
//! weight-free half of the model, and answers its tenant's prompts through ReMO-masked calls.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use talaria_attestation::{Bound, Evidence, Purpose, hardware_evidence};
use talaria_cvm_agent::claims::{AgentClaims, check_floor};
use talaria_cvm_agent::cluster::AgentShared;
use talaria_cvm_agent::manifest::ModelManifest;
use talaria_cvm_agent::net_loop::NetLoop;
use talaria_cvm_agent::openai::Api;
use talaria_cvm_agent::session::{
    BlockingUplink, ConversationFactory, HelloFn, Join, Joined, Tenancy, Uplink, UplinkHealth,
};
use talaria_engine::CvmProvision;
use talaria_net::TenantIdentity;
use talaria_topology::{Role, Topology};
use talaria_wire::{ErrorReply, Request};

#[derive(Parser)]
#[command(
    name = "cvm-agent",
    version,
    about = "One tenant's agent in a Talaria cluster"
)]
struct Args {
    /// The cluster's topology file.
    #[arg(long)]
    topology: PathBuf,
    /// The tenant this agent serves (an `[[agent]]` of the topology).
    #[arg(long)]
    tenant: String,
    /// Where `talaria up` generated the cluster's TLS material (topologies with `generate`).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// How long to keep trying to reach the coordinator, in seconds.
    #[arg(long, default_value_t = 120)]
    connect_timeout_s: u64,
    /// Run without SEV-SNP hardware, presenting no attestation report. Development only: the
    /// coordinator and every tenant must opt in too, and it is logged loudly.
    #[arg(long)]
    insecure_no_attestation: bool,
    /// SHA-256 (hex) of an API key the HTTPS API accepts, besides the topology's
    /// `api_key_sha256`; repeatable. Attested in the agent's claims.
    #[arg(long)]
    api_key_sha256: Vec<String>,
}

/// How long the agent waits for its warm-up before it serves anyway.
const WARM_UP_BUDGET: Duration = Duration::from_secs(60);

/// Evidence binding `bound`: a hardware report, or with the explicit insecure mode an
/// `Insecure` marker.
fn evidence(insecure: bool, bound: &Bound<'_>) -> Result<Vec<u8>, ErrorReply> {
    let evidence = if insecure {
        tracing::warn!("INSECURE: presenting no attestation (--insecure-no-attestation)");
        Evidence::Insecure {
            reason: "cvm-agent started with --insecure-no-attestation".into(),
        }
    } else {
        hardware_evidence(bound).map_err(|e| {
            ErrorReply::new(
                e.error_type(),
                format!("{e} (outside an SEV-SNP guest, --insecure-no-attestation is the development mode)"),
            )
        })?
    };
    talaria_wire::frame::encode::<_, ()>(&evidence, None)
        .map_err(|e| ErrorReply::new(e.error_type(), e.to_string()))
}

fn main() -> Result<()> {
    talaria_actors::init_logging();
    let args = Args::parse();
    // An agent's host holds no weights: the coordinator provisions what the agent needs.
    let topology = Topology::load_for(&args.topology, Role::Agent(&args.tenant))?;
    let Some(agent) = topology.agent(&args.tenant).cloned() else {
        bail!(
            "{}: no agent for tenant {:?}",
            args.topology.display(),
            args.tenant
        );
    };
    let tls = talaria_actors::tls_material(&topology, args.tls_dir.as_deref())
        .map_err(anyhow::Error::msg)?;
    // What the agent serves its tenant with: a key made here, in the CVM's memory, at every
    // start and never written anywhere; never the cluster's key (the cloud holds that). Only
    // the certificate is published, for tenants' TLS clients; the attestation binds it.
    let mut names = vec!["localhost".to_string(), agent.listen.ip().to_string()];
    names.extend(agent.http.map(|a| a.ip().to_string()));
    names.dedup();
    let identity = TenantIdentity::generate(&topology.server_name, &names)
        .context("making the agent's tenant-facing key")?;
    let Some(cert_dir) = agent.cert_dir(args.tls_dir.as_deref()) else {
        bail!(
            "{}: agent {:?} has no `tenant_tls`: the folder where it publishes the certificate \
             its tenant trusts",
            args.topology.display(),
            args.tenant
        );
    };
    if identity.publish(&cert_dir).with_context(|| {
        format!(
            "publishing the agent's certificate in {}",
            cert_dir.display()
        )
    })? {
        tracing::warn!(
            dir = %cert_dir.display(),
            "removed a key file from the certificate folder: the agent never reads one"
        );
    }
    tracing::info!(dir = %cert_dir.display(), "serving the tenant with a key made at this start");
    let remo = topology.remo.config.clone();
    // The topology is the operator's: below the floor the agent does not start unless the
    // file says the tenant accepted it, and even then its attestation binds the configuration
    // and the tenant's own verifier refuses it unless the tenant accepted it there too.
    let accepted = topology.remo.tenant_accepts_below_floor;
    check_floor(&remo, accepted).map_err(|e| anyhow!("topology [remo]: {e}"))?;
    if agent.http.is_some() && !remo.below_floor().is_empty() {
        // An HTTPS client of the OpenAI API never sees the attested claims: it cannot accept
        // less than the floor, so the API is not served below it.
        bail!(
            "topology [remo]: remo_below_floor: the HTTPS API (agent.http) is not served below \
             the floor ({}): only the QUIC tenant protocol, whose verifier shows the claims, is",
            remo.below_floor().join("; ")
        );
    }
    if !remo.below_floor().is_empty() {
        tracing::warn!(
            reasons = %remo.below_floor().join("; "),
            "INSECURE: ReMO below the floor (the topology says the tenant accepted it; the \
             attestation tells the tenant)"
        );
    }
    let mut api_keys = agent.api_key_sha256.clone();
    api_keys.extend(args.api_key_sha256.iter().cloned());
    // The model this binary serves: the cloud's provision and weights are checked against it.
    let manifest = Arc::new(ModelManifest::embedded().map_err(anyhow::Error::msg)?);
    let claims = AgentClaims::new(&agent.tenant, &remo, &api_keys, &manifest.sha256());
    let api_key_digests: Vec<[u8; 32]> = claims
        .api_key_sha256
        .iter()
        .map(|h| {
            hex::decode(h)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| anyhow!("api key hash {h:?} is not 64 hex digits"))
        })
        .collect::<Result<_>>()?;
    if api_key_digests.is_empty() {
        tracing::warn!("no API key configured: every generation request is refused");
    }
    let api_key_digests = Arc::new(api_key_digests);
    let claims = claims.encode();
    let calibration = talaria_cvm_agent::default_calibration().context("embedded calibration")?;
    let max_frame = topology.max_frame_bytes;

    talaria_net::set_liveness(topology.deadlines.idle);

    actix::System::new().block_on(async move {
        // The agent presents its tenant-facing certificate on the cloud connection too: the
        // coordinator admits it only if the attested key is the one this connection proves.
        // The uplink's endpoint and connections live on a runtime of their own, which the
        // sessions' workers drive while they wait for the cloud (`net_loop`).
        let net = NetLoop::start().context("the uplink's runtime")?;
        let client = {
            let _on = net.handle().enter();
            identity.client(&tls, talaria_wire::ALPN_CLOUD)?
        };
        let tenant = agent.tenant.clone();
        let insecure = args.insecure_no_attestation;
        // The key the reports bind: the certificate this agent serves its tenant with.
        let key = identity.cert_der().to_vec();
        let hello_key = key.clone();
        // Every admission (the first, and each after the uplink drops) proves the agent anew
        // over a fresh nonce.
        let hello: HelloFn = Arc::new(move |nonce| {
            // Admission binds the tenant name under its own purpose: a tenant's attestation
            // (the other purpose) relayed here does not verify.
            let bound = Bound {
                purpose: Purpose::Admission,
                nonce: &nonce,
                key: &hello_key,
                claims: tenant.as_bytes(),
            };
            Ok(Request::Hello {
                agent: format!("cvm-agent pid {}", std::process::id()),
                evidence: evidence(insecure, &bound)?,
                key: hello_key.clone(),
                tenant: tenant.clone(),
            })
        });
        let health = UplinkHealth::default();
        let uplink = BlockingUplink::start(Uplink::new(
            Join {
                endpoint: client,
                tls: tls.clone(),
                coordinator: topology.coordinator,
                hello,
                max_frame,
            },
            health.clone(),
            net,
        ));
        let provision = tokio::time::timeout(
            Duration::from_secs(args.connect_timeout_s),
            uplink.actor().send(Joined),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "not admitted by the coordinator {} within {} s",
                topology.coordinator,
                args.connect_timeout_s
            )
        })?
        .map_err(|e| anyhow!("uplink: {e}"))?
        .map_err(|e| anyhow!("{e}"))?;
        let provision: CvmProvision =
            talaria_wire::frame::body(&provision).context("the coordinator's provision")?;
        let deadlines = topology.deadlines.clone();
        // Split evenly between the API keys: no key's conversations can push out another's.
        let conversation_bytes = agent.conversation_cache_bytes / api_key_digests.len().max(1);
        // Building the model half is heavy: off the event loop.
        let shared = tokio::task::spawn_blocking(move || -> Result<AgentShared> {
            Ok(AgentShared::new(
                provision,
                remo,
                calibration,
                uplink,
                Some(manifest),
                deadlines,
                max_frame,
                conversation_bytes,
            )?)
        })
        .await??;
        let shared = Arc::new(shared);
        tracing::info!(
            tenant = %agent.tenant,
            layers = shared.config.n_layers,
            vocab = shared.config.vocab,
            "admitted and provisioned"
        );
        // Before the first tenant, not during its request; within a budget, so that a cloud
        // answering each set-up just before its deadline cannot hold the agent unready (it
        // then serves, and the warm-up finishes beside the sessions).
        let warming = shared.clone();
        let warm_up = tokio::task::spawn_blocking(move || {
            match warming.warm_up() {
                Ok(w) => tracing::info!(
                    seconds = w.seconds,
                    setup_s = w.setup_s,
                    check_vectors = w.vectors_made,
                    checked_ops = w.checked_ops,
                    "warmed up: every op set up (identity-basis weights checked against the \
                     manifest), Freivalds' vectors made"
                ),
                Err(e) => tracing::error!(
                    error_type = e.error_type(),
                    "warm-up failed, each session sets up on its own: {e}"
                ),
            }
        });
        match tokio::time::timeout(WARM_UP_BUDGET, warm_up).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(
                error_type = "internal",
                "warm-up stopped ({e}); each session sets up on its own"
            ),
            Err(_) => tracing::warn!(
                budget_s = WARM_UP_BUDGET.as_secs(),
                "warm-up not done within its budget: serving while it goes on"
            ),
        }
        let max_tokens = shared.config.max_seq;
        let factory: ConversationFactory = Arc::new(move |gone| {
            shared
                .open(Some(gone))
                .map_err(|e| ErrorReply::new(e.error_type(), e.to_string()))
        });
        let attestor: talaria_cvm_agent::session::Attestor = Arc::new(move |nonce| {
            let bound = Bound {
                purpose: Purpose::Tenant,
                nonce: &nonce,
                key: &key,
                claims: &claims,
            };
            Ok((evidence(insecure, &bound)?, claims.clone()))
        });
        let tenancy = Tenancy::new(factory, agent.max_sessions, agent.max_waiting);
        if let Some(addr) = agent.http {
            let api = Api {
                model: topology.model_name.clone(),
                tenancy: tenancy.clone(),
                max_tokens,
                api_keys: api_key_digests.clone(),
                health,
            };
            talaria_cvm_agent::openai::serve(addr, api, identity.server_config(b"http/1.1")?)?;
        }
        let endpoint = identity.server(agent.listen, talaria_wire::ALPN_TENANT)?;
        tracing::info!(listen = %agent.listen, max_sessions = agent.max_sessions, "serving the tenant");
        println!("ready {}", agent.listen);
        talaria_cvm_agent::session::serve(endpoint, tenancy, attestor, api_key_digests).await;
        Ok(())
    })
}
