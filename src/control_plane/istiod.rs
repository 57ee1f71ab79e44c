//! The connection to istiod that the xDS stream and the CA client share: where it is, the
//! channel (tonic over HTTP/2), and how every call presents this node — the bearer token,
//! re-read from its file at every call (a projected service-account token is rotated by the
//! kubelet), and the `clusterid` header istiod routes by.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// The largest message accepted from istiod: a push of 100,000 workloads is 22.5 MiB on the
/// wire (benches/xds_push.rs), so this leaves ten times that and still bounds what a broken
/// control plane can make this node buffer.
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// Where istiod is and how to present this node to it.
#[derive(Debug, Clone)]
pub struct IstiodEndpoint {
    /// `http://host:port` (tests) or `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// The service-account token; `None`: no `authorization` header.
    pub token_path: Option<PathBuf>,
    /// Sent as the `clusterid` header.
    pub cluster_id: String,
}

/// Why a call to istiod failed.
#[derive(Debug, thiserror::Error)]
pub enum IstiodError {
    #[error("connecting to {address}: {detail}")]
    Connect { address: String, detail: String },
    #[error("reading the token {path}: {detail}")]
    Token { path: PathBuf, detail: String },
    #[error("istiod answered {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("istiod did not answer within {0:?}")]
    TimedOut(Duration),
}

impl From<tonic::Status> for IstiodError {
    fn from(s: tonic::Status) -> Self {
        IstiodError::Status {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

impl IstiodEndpoint {
    /// A channel to istiod (connected, HTTP/2 keepalive on).
    ///
    /// # Errors
    /// [`IstiodError::Connect`] with the cause.
    pub async fn connect(&self) -> Result<Channel, IstiodError> {
        let error = |detail: String| IstiodError::Connect {
            address: self.address.clone(),
            detail,
        };
        Endpoint::from_shared(self.address.clone())
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

    /// `message` as a call that presents this node: the token read now, the cluster id.
    ///
    /// # Errors
    /// [`IstiodError::Token`] when the token file cannot be read or is not a header value.
    pub fn request<T>(&self, message: T) -> Result<tonic::Request<T>, IstiodError> {
        let mut request = tonic::Request::new(message);
        if let Some(path) = &self.token_path {
            let token_error = |detail: String| IstiodError::Token {
                path: path.clone(),
                detail,
            };
            let token = std::fs::read_to_string(path).map_err(|e| token_error(e.to_string()))?;
            let value = MetadataValue::try_from(format!("Bearer {}", token.trim()))
                .map_err(|_| token_error("not a valid header value".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        if let Ok(v) = MetadataValue::try_from(self.cluster_id.as_str()) {
            request.metadata_mut().insert("clusterid", v);
        }
        Ok(request)
    }
}
