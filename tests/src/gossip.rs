//! A bare libp2p gossipsub peer, for publishing what a ferry node never would.

use anyhow::{Result, bail};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, noise, tcp, yamux};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Connects to `node`, subscribes to `topic`, and publishes every message
/// of `msgs` once a second until `done()` holds or `within` passes.
pub async fn publish_until(
    node: SocketAddr,
    topic: &str,
    msgs: &[Vec<u8>],
    within: Duration,
    done: impl Fn() -> bool,
) -> Result<()> {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|key| {
            let cfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .max_transmit_size(64 * 1024)
                .build()
                .expect("gossipsub config");
            gossipsub::Behaviour::<
                gossipsub::IdentityTransform,
                gossipsub::AllowAllSubscriptionFilter,
            >::new(gossipsub::MessageAuthenticity::Signed(key.clone()), cfg)
            .expect("gossipsub")
        })?
        .build();
    let t = gossipsub::IdentTopic::new(topic);
    swarm.behaviour_mut().subscribe(&t)?;
    swarm.dial(format!("/ip4/{}/tcp/{}", node.ip(), node.port()).parse::<libp2p::Multiaddr>()?)?;
    let deadline = Instant::now() + within;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if done() {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("the nodes never counted the garbage");
                }
                // Until the node has us in its mesh, publishing fails;
                // after that, nodes drop repeats by content.
                for m in msgs {
                    let _ = swarm.behaviour_mut().publish(t.clone(), m.clone());
                }
            }
            ev = swarm.select_next_some() => {
                if let SwarmEvent::OutgoingConnectionError { error, .. } = ev {
                    bail!("could not reach the node: {error}");
                }
            }
        }
    }
}
