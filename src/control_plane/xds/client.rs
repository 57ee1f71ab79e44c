//! The delta ADS stream to istiod over gRPC (tonic), for the control-plane thread's
//! single-threaded runtime: connect, authenticate, open the stream, feed every push to the
//! [`DeltaClient`] and send its answers, hand each [`Update`] to the caller; and reconnect
//! when the stream ends, with the versions held.
//!
//! Every connect presents this node afresh ([`IstiodEndpoint::request`]: the token re-read,
//! the `clusterid` header). Reconnects are
//! ztunnel's: after a stream istiod ended (it closes streams every ~30 minutes by design) at
//! once; after an error, waiting from 10 ms doubling to 15 s, reset by the next stream that
//! delivers a push.

use std::time::Duration;

use istio_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use istio_api::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::delta::{DeltaClient, Update};
use crate::control_plane::istiod::{IstiodEndpoint, IstiodError, MAX_MESSAGE};

pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// One stream: connect, send the opening requests, then answer pushes until it ends. Each
/// update goes to `apply` before its ACK or NACK is sent (istiod may rely on an ACKed state
/// being in force). Returns how many pushes it answered before istiod closed it cleanly.
///
/// # Errors
/// [`IstiodError`] when the connection, the token or the stream fails.
pub async fn run_stream<F: FnMut(Update)>(
    istiod: &IstiodEndpoint,
    delta: &mut DeltaClient,
    apply: &mut F,
) -> Result<u64, (IstiodError, u64)> {
    let channel = istiod.connect().await.map_err(|e| (e, 0))?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    for r in delta.initial_requests() {
        // The channel holds the opening requests (one per type) without waiting.
        let _ = tx.try_send(r);
    }
    let request = istiod
        .request(ReceiverStream::new(rx))
        .map_err(|e| (e, 0))?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut responses = client
        .delta_aggregated_resources(request)
        .await
        .map_err(|s| (s.into(), 0))?
        .into_inner();
    let mut answered = 0u64;
    loop {
        match responses.message().await {
            Ok(Some(response)) => {
                let push = delta.on_response(response);
                apply(push.update);
                answered += 1;
                if tx.send(push.reply).await.is_err() {
                    // tonic dropped the request side: the stream is over.
                    return Ok(answered);
                }
            }
            Ok(None) => return Ok(answered),
            Err(s) => return Err((s.into(), answered)),
        }
    }
}

/// The wait before the next stream: none after istiod ended a stream that worked, the first
/// wait after one that failed having worked, else doubling from [`FIRST_BACKOFF`] to
/// [`MAX_BACKOFF`] (a server that closes every stream at once is not asked in a loop).
pub fn next_backoff(previous: Duration, ended: &Result<u64, (IstiodError, u64)>) -> Duration {
    match ended {
        Ok(answered) if *answered > 0 => Duration::ZERO,
        Err((_, answered)) if *answered > 0 => FIRST_BACKOFF,
        _ => (previous * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF),
    }
}

/// Streams until `stop` says so: each end logged, the wait between them per [`next_backoff`].
pub async fn run<F: FnMut(Update)>(
    istiod: IstiodEndpoint,
    delta: &mut DeltaClient,
    apply: &mut F,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::ZERO;
    loop {
        let ended = tokio::select! {
            ended = run_stream(&istiod, delta, apply) => ended,
            _ = stop.changed() => return,
        };
        match &ended {
            Ok(n) => {
                log::info!("xds: istiod ended the stream after {n} pushes; reconnecting")
            }
            Err((e, n)) => log::warn!("xds: stream failed after {n} pushes: {e}"),
        }
        backoff = next_backoff(backoff, &ended);
        if !backoff.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
        }
        if *stop.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_wait_as_ztunnels_do() {
        let failed = |n| {
            Err((
                IstiodError::Connect {
                    address: "x".into(),
                    detail: "refused".into(),
                },
                n,
            ))
        };
        let mut wait = Duration::ZERO;
        let mut waits = Vec::new();
        for _ in 0..13 {
            wait = next_backoff(wait, &failed(0));
            waits.push(wait.as_millis());
        }
        assert_eq!(
            waits,
            [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240, 15000, 15000]
        );
        assert_eq!(
            next_backoff(wait, &failed(3)),
            FIRST_BACKOFF,
            "a stream that worked resets it"
        );
        assert_eq!(next_backoff(wait, &Ok(1)), Duration::ZERO);
        assert_eq!(
            next_backoff(Duration::from_millis(40), &Ok(0)),
            Duration::from_millis(80),
            "closed before any push: backs off"
        );
    }
}
