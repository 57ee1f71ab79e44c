//! The delta ADS stream to istiod over gRPC (tonic), for the control-plane thread's
//! single-threaded runtime: connect, authenticate, open the stream, feed every push to the
//! [`DeltaClient`] and send its answers, hand each [`Update`] to the caller; and reconnect
//! when the stream ends, with the versions held.
//!
//! Every connect re-reads the bearer token from its file (a projected service-account token
//! is rotated by the kubelet) and sends the `clusterid` header istiod routes by. Reconnects are
//! ztunnel's: after a stream istiod ended (it closes streams every ~30 minutes by design) at
//! once; after an error, waiting from 10 ms doubling to 15 s, reset by the next stream that
//! delivers a push.

use std::path::PathBuf;
use std::time::Duration;

use istio_api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use istio_api::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::delta::{DeltaClient, Update};

pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Where istiod is and how to present this node to it.
#[derive(Debug, Clone)]
pub struct XdsServer {
    /// `http://host:port` (tests) or `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// The service-account token, re-read at every connect; `None`: no `authorization` header.
    pub token_path: Option<PathBuf>,
    /// Sent as the `clusterid` header.
    pub cluster_id: String,
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("connecting to {address}: {detail}")]
    Connect { address: String, detail: String },
    #[error("reading the token {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("istiod answered {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
}

/// One stream: connect, send the opening requests, then answer pushes until it ends. Each
/// update goes to `apply` before its ACK or NACK is sent (istiod may rely on an ACKed state
/// being in force). Returns how many pushes it answered before istiod closed it cleanly.
///
/// # Errors
/// [`StreamError`] when the connection, the token or the stream fails.
pub async fn run_stream<F: FnMut(Update)>(
    server: &XdsServer,
    delta: &mut DeltaClient,
    apply: &mut F,
) -> Result<u64, (StreamError, u64)> {
    let channel = connect(&server.address).await.map_err(|e| (e, 0))?;
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    for r in delta.initial_requests() {
        // The channel holds the opening requests (one per type) without waiting.
        let _ = tx.try_send(r);
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(path) = &server.token_path {
        let token = std::fs::read_to_string(path).map_err(|source| {
            (
                StreamError::Token {
                    path: path.clone(),
                    source,
                },
                0,
            )
        })?;
        let value = MetadataValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| {
            (
                StreamError::Token {
                    path: path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "not a valid header value",
                    ),
                },
                0,
            )
        })?;
        request.metadata_mut().insert("authorization", value);
    }
    if let Ok(v) = MetadataValue::try_from(server.cluster_id.as_str()) {
        request.metadata_mut().insert("clusterid", v);
    }
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let status = |s: tonic::Status| StreamError::Status {
        code: s.code(),
        message: s.message().to_string(),
    };
    let mut responses = client
        .delta_aggregated_resources(request)
        .await
        .map_err(|s| (status(s), 0))?
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
            Err(s) => return Err((status(s), answered)),
        }
    }
}

async fn connect(address: &str) -> Result<Channel, StreamError> {
    let error = |detail: String| StreamError::Connect {
        address: address.to_string(),
        detail,
    };
    Endpoint::from_shared(address.to_string())
        .map_err(|e| error(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| match std::error::Error::source(&e) {
            Some(cause) => error(format!("{e}: {cause}")),
            None => error(e.to_string()),
        })
}

/// The wait before the next stream: none after istiod ended a stream that worked, the first
/// wait after one that failed having worked, else doubling from [`FIRST_BACKOFF`] to
/// [`MAX_BACKOFF`] (a server that closes every stream at once is not asked in a loop).
pub fn next_backoff(previous: Duration, ended: &Result<u64, (StreamError, u64)>) -> Duration {
    match ended {
        Ok(answered) if *answered > 0 => Duration::ZERO,
        Err((_, answered)) if *answered > 0 => FIRST_BACKOFF,
        _ => (previous * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF),
    }
}

/// Streams until `stop` says so: each end logged, the wait between them per [`next_backoff`].
pub async fn run<F: FnMut(Update)>(
    server: XdsServer,
    delta: &mut DeltaClient,
    apply: &mut F,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::ZERO;
    loop {
        let ended = tokio::select! {
            ended = run_stream(&server, delta, apply) => ended,
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
                StreamError::Connect {
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
