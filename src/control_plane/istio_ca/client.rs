//! One certificate fetch from istiod's CA over gRPC: the [`request`](super::request) for an
//! identity sent as this node (token, cluster id), the answer [`accept`](super::accept)ed,
//! within a deadline so a CA that never answers holds one identity's retry, not the caller.

use std::time::{Duration, SystemTime};

use istio_api::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

use super::{accept, request, Issued, Refused};
use crate::control_plane::identity::SpiffeId;
use crate::control_plane::istiod::{IstiodEndpoint, IstiodError};

/// Why a fetch gave no certificate: the reason goes to the log, the metric (by
/// [`FetchError::label`]) and the admin endpoint of that identity.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Istiod(#[from] IstiodError),
    #[error("the CA's answer is refused: {0}")]
    Refused(#[from] Refused),
    #[error("making the request: {0}")]
    Request(#[from] rcgen::Error),
}

impl FetchError {
    /// A short, bounded label for the failure metric.
    pub fn label(&self) -> &'static str {
        match self {
            FetchError::Istiod(IstiodError::Connect { .. }) => "connect",
            FetchError::Istiod(IstiodError::Token { .. }) => "token",
            FetchError::Istiod(IstiodError::TimedOut(_)) => "timeout",
            FetchError::Istiod(IstiodError::Status { code, .. }) => match code {
                tonic::Code::Unauthenticated => "unauthenticated",
                tonic::Code::PermissionDenied => "permission_denied",
                tonic::Code::Unavailable => "unavailable",
                _ => "status",
            },
            FetchError::Refused(Refused::WrongIdentity { .. }) => "wrong_identity",
            FetchError::Refused(_) => "bad_answer",
            FetchError::Request(_) => "request",
        }
    }
}

/// Fetches a certificate for `id` valid for `validity`, waiting at most `deadline` for the
/// whole call (connect included). `now` is read when the answer arrives.
///
/// # Errors
/// [`FetchError`]: no connection, no token, an error status, no answer in time, or an
/// answer [`accept`] refuses.
pub async fn fetch(
    ca: &IstiodEndpoint,
    id: &SpiffeId,
    validity: Duration,
    deadline: Duration,
    now: impl Fn() -> SystemTime,
) -> Result<Issued, FetchError> {
    let req = request(id, validity)?;
    let call = async {
        let channel = ca.connect().await?;
        let message = ca.request(req.message.clone())?;
        let answer = IstioCertificateServiceClient::new(channel)
            .create_certificate(message)
            .await
            .map_err(IstiodError::from)?;
        Ok::<_, IstiodError>(answer.into_inner())
    };
    let answer = tokio::time::timeout(deadline, call)
        .await
        .map_err(|_| IstiodError::TimedOut(deadline))??;
    Ok(accept(req, &answer, now())?)
}
