//! ringtun's CA client against an in-process fake istiod CA over a real socket (tonic's gRPC
//! server on loopback) that signs the CSR with a test CA as istiod does (the SAN replaced by
//! the identity asked for), and misbehaves on request: refuses the caller
//! (`Unauthenticated`, as istiod refuses an impersonation it does not allow), signs another
//! identity than the one asked for, or answers too late. Each failure is the one identity's,
//! named by a bounded label.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use istio_api::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use istio_api::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use istio_api::prost_types::value::Kind;
use ringtun::control_plane::certs::DevCa;
use ringtun::control_plane::identity::SpiffeId;
use ringtun::control_plane::istio_ca::client::fetch;
use ringtun::control_plane::istio_ca::IMPERSONATED_IDENTITY;
use ringtun::control_plane::istiod::IstiodEndpoint;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

const DAY: Duration = Duration::from_secs(86_400);

struct FakeCa {
    ca: Arc<DevCa>,
    /// (authorization header, impersonated identity, validity asked) of each call.
    seen: Arc<Mutex<Vec<(String, String, i64)>>>,
}

#[tonic::async_trait]
impl IstioCertificateService for FakeCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let req = request.into_inner();
        let asked = match req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| v.kind.as_ref())
        {
            Some(Kind::StringValue(s)) => s.clone(),
            _ => return Err(Status::invalid_argument("no ImpersonatedIdentity")),
        };
        self.seen
            .lock()
            .unwrap()
            .push((token, asked.clone(), req.validity_duration));
        let id = SpiffeId::parse(&asked).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let signed_as = match id.service_account() {
            "refused" => {
                return Err(Status::unauthenticated(
                    "request impersonation authentication failure",
                ))
            }
            "slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                id
            }
            "mixed-up" => SpiffeId::new("cluster.local", "shop", "admin").unwrap(),
            _ => id,
        };
        let leaf = self
            .ca
            .sign_request(&req.csr, &signed_as, SystemTime::now(), DAY)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf, self.ca.cert_pem().to_string()],
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_come_from_the_ca_and_each_failure_is_one_identitys() {
    let ca = Arc::new(DevCa::generate("cluster.local", SystemTime::now(), 10 * DAY).unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::new(FakeCa {
                ca: ca.clone(),
                seen: seen.clone(),
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let dir = std::env::temp_dir().join(format!("ringtun-ca-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("istio-token");
    std::fs::write(&token, "ca-token").unwrap();
    let endpoint = IstiodEndpoint {
        address: format!("http://{addr}"),
        token_path: Some(token),
        cluster_id: "Kubernetes".into(),
    };
    let id = |sa: &str| SpiffeId::new("cluster.local", "shop", sa).unwrap();
    let deadline = Duration::from_secs(2);

    let issued = fetch(&endpoint, &id("cart"), DAY, deadline, SystemTime::now)
        .await
        .expect("a certificate for cart");
    assert_eq!(issued.credentials.id, id("cart"));
    assert_eq!(issued.roots, vec![ca.cert_der().clone()]);
    assert!(issued.not_after > SystemTime::now() + DAY - Duration::from_secs(60));
    assert_eq!(
        seen.lock().unwrap()[0],
        (
            "Bearer ca-token".to_string(),
            "spiffe://cluster.local/ns/shop/sa/cart".to_string(),
            86_400
        )
    );

    let refused = fetch(&endpoint, &id("refused"), DAY, deadline, SystemTime::now)
        .await
        .unwrap_err();
    assert_eq!(refused.label(), "unauthenticated", "{refused}");
    assert!(refused.to_string().contains("impersonation"), "{refused}");

    let mixed = fetch(&endpoint, &id("mixed-up"), DAY, deadline, SystemTime::now)
        .await
        .unwrap_err();
    assert_eq!(mixed.label(), "wrong_identity", "{mixed}");
    assert!(mixed.to_string().contains("sa/admin"), "{mixed}");

    let started = std::time::Instant::now();
    let slow = fetch(&endpoint, &id("slow"), DAY, deadline, SystemTime::now)
        .await
        .unwrap_err();
    assert_eq!(slow.label(), "timeout", "{slow}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the deadline cut it"
    );

    // The others' failures left this identity's fetches as they were.
    fetch(&endpoint, &id("cart"), DAY, deadline, SystemTime::now)
        .await
        .expect("cart again");
    let _ = std::fs::remove_dir_all(&dir);
}
