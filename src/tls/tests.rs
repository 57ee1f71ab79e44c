//! Identities from certificates and the configs' rules, against real handshakes.

use std::time::SystemTime;

use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConnection, Connection, ServerConnection};

use super::fixtures::*;
use super::*;

#[derive(Debug)]
enum Failed {
    Client(rustls::Error),
    Server(rustls::Error),
}

/// Moves every pending record from `from` to `to`; true when anything moved.
fn transfer(from: &mut Connection, to: &mut Connection) -> Result<bool, rustls::Error> {
    let mut moved = false;
    while from.wants_write() {
        let mut buf = Vec::new();
        from.write_tls(&mut buf).expect("write_tls to a Vec");
        let mut rest = &buf[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).expect("read_tls from a slice");
            to.process_new_packets()?;
        }
        moved = true;
    }
    Ok(moved)
}

/// Runs the handshake in memory until neither side has anything to send.
fn handshake(
    client: ClientConnection,
    server: ServerConnection,
) -> (Connection, Connection, Result<(), Failed>) {
    let mut c = Connection::from(client);
    let mut s = Connection::from(server);
    let result = (|| loop {
        // A side that fails still sends its alert; the error is the receiver's.
        let a = transfer(&mut c, &mut s).map_err(Failed::Server)?;
        let b = transfer(&mut s, &mut c).map_err(Failed::Client)?;
        if !a && !b {
            return Ok(());
        }
    })();
    (c, s, result)
}

fn connect(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> ClientServer {
    let c = ClientConnection::new(client, server_name("10.0.0.2".parse().expect("ip")))
        .expect("client connection");
    let s = ServerConnection::new(server).expect("server connection");
    let (c, s, result) = handshake(c, s);
    ClientServer { c, s, result }
}

struct ClientServer {
    c: Connection,
    s: Connection,
    result: Result<(), Failed>,
}

fn other_error_text(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => o.to_string(),
        other => panic!("expected a certificate error from our verifier, got {other:?}"),
    }
}

/// A leaf signed by `pki`'s CA with arbitrary SANs (the generator never makes these).
fn custom_leaf(pki: &Pki, sans: &[&str]) -> WorkloadCredentials {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().expect("ia5")))
        .collect();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let issuer = Issuer::from_ca_cert_der(
        pki.ca.cert_der(),
        KeyPair::from_pem(&pki.ca.key_pem()).expect("ca key"),
    )
    .expect("issuer");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    WorkloadCredentials {
        id: id(CLIENT),
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

#[test]
fn good_handshake_gives_h2_tls13_and_both_identities() {
    let pki = Pki::new("cluster.local");
    let (cc, sc) = configs(&pki, &pki.creds(CLIENT), &pki.creds(SERVER), SERVER);
    let ClientServer { c, s, result } = connect(cc, sc);
    result.expect("handshake");
    let client_view = negotiated(&c).expect("client side");
    let server_view = negotiated(&s).expect("server side");
    assert_eq!(client_view.peer, id(SERVER));
    assert_eq!(server_view.peer, id(CLIENT));
    assert_eq!(c.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(s.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(client_view.cipher, server_view.cipher);
    assert!(matches!(
        client_view.cipher,
        KtlsCipher::Aes128Gcm | KtlsCipher::Aes256Gcm
    ));
    // Application data flows both ways after the handshake.
    let (mut c, mut s) = (c, s);
    std::io::Write::write_all(&mut c.writer(), b"PRI * HTTP/2.0").expect("write");
    transfer(&mut c, &mut s).expect("transfer");
    let mut got = [0u8; 14];
    std::io::Read::read_exact(&mut s.reader(), &mut got).expect("read");
    assert_eq!(&got, b"PRI * HTTP/2.0");
}

#[test]
fn client_refuses_a_server_with_another_identity() {
    let pki = Pki::new("cluster.local");
    let expected = "spiffe://cluster.local/ns/prod/sa/payments";
    let (cc, sc) = configs(&pki, &pki.creds(CLIENT), &pki.creds(SERVER), expected);
    let ClientServer { result, .. } = connect(cc, sc);
    let Err(Failed::Client(e)) = result else {
        panic!("client must refuse, got {result:?}")
    };
    assert_eq!(
        other_error_text(&e),
        format!("server is {SERVER}, expected {expected}")
    );
}

fn server_refusal(pki: &Pki, server_pki: &Pki, client: WorkloadCredentials) -> rustls::Error {
    let server_creds = server_pki.creds(SERVER);
    let cc = ClientTls::new(&client, &server_pki.bundle)
        .expect("client tls")
        .config_for(&id(SERVER))
        .expect("config");
    let sc = server_config(&server_creds, &pki.bundle, "cluster.local").expect("server");
    let ClientServer {
        mut c,
        mut s,
        result,
    } = connect(cc, sc);
    let e = match result {
        Err(Failed::Server(e)) => e,
        other => panic!("server must refuse, got {other:?}"),
    };
    // In TLS 1.3 the client has finished its side already; the server's alert ends it.
    match transfer(&mut s, &mut c) {
        Err(rustls::Error::AlertReceived(_)) => {}
        other => panic!("client must receive the server's alert, got {other:?}"),
    }
    e
}

#[test]
fn server_refuses_a_client_from_another_trust_domain() {
    let pki = Pki::new("cluster.local");
    let e = server_refusal(
        &pki,
        &pki,
        pki.creds("spiffe://evil.org/ns/default/sa/client"),
    );
    assert_eq!(
        other_error_text(&e),
        "spiffe://evil.org/ns/default/sa/client is outside trust domain cluster.local"
    );
}

#[test]
fn server_refuses_a_client_with_two_uri_sans() {
    let pki = Pki::new("cluster.local");
    let two = custom_leaf(
        &pki,
        &[CLIENT, "spiffe://cluster.local/ns/kube-system/sa/admin"],
    );
    let e = server_refusal(&pki, &pki, two);
    assert!(other_error_text(&e).contains("2 URI SANs"), "{e}");
    let none = custom_leaf(&pki, &[]);
    let e = server_refusal(&pki, &pki, none);
    assert!(other_error_text(&e).starts_with("no URI SAN"), "{e}");
    let not_spiffe = custom_leaf(&pki, &["https://cluster.local/ns/default/sa/client"]);
    let e = server_refusal(&pki, &pki, not_spiffe);
    assert!(other_error_text(&e).contains("not a mesh identity"), "{e}");
}

#[test]
fn server_refuses_a_chain_to_another_ca() {
    let pki = Pki::new("cluster.local");
    // Same identity, same trust domain, signed by an impostor CA with the trusted CA's
    // very name: the issuer is found by name and its signature does not verify.
    let impostor = Pki::new("cluster.local");
    let e = server_refusal(&pki, &pki, impostor.creds(CLIENT));
    assert_eq!(
        e,
        rustls::Error::InvalidCertificate(CertificateError::BadSignature)
    );
    // A CA with another name: no issuer at all.
    let stranger = Pki::new("elsewhere.example");
    let e = server_refusal(&pki, &pki, stranger.creds(CLIENT));
    assert_eq!(
        e,
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[test]
fn server_refuses_a_client_without_a_certificate() {
    let pki = Pki::new("cluster.local");
    let verifier = SpiffeServerVerifier {
        roots: pki.bundle.roots(),
        expected: id(SERVER),
        algs: provider().signature_verification_algorithms,
    };
    let cc = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let sc = server_config(&pki.creds(SERVER), &pki.bundle, "cluster.local").expect("server");
    let ClientServer { result, .. } = connect(Arc::new(cc), sc);
    match result {
        Err(Failed::Server(e)) => assert_eq!(e, rustls::Error::NoCertificatesPresented),
        other => panic!("server must refuse, got {other:?}"),
    }
}

#[test]
fn server_refuses_a_tls12_only_client() {
    let pki = Pki::new("cluster.local");
    let mut tls12 = rustls::crypto::ring::default_provider();
    tls12
        .cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS12);
    let verifier = SpiffeServerVerifier {
        roots: pki.bundle.roots(),
        expected: id(SERVER),
        algs: provider().signature_verification_algorithms,
    };
    let creds = pki.creds(CLIENT);
    let mut cc = ClientConfig::builder_with_provider(Arc::new(tls12))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("tls12 versions (dev-dependency enables rustls' tls12 feature)")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .expect("client cert");
    cc.alpn_protocols = vec![ALPN_H2.to_vec()];
    let sc = server_config(&pki.creds(SERVER), &pki.bundle, "cluster.local").expect("server");
    let ClientServer { result, .. } = connect(Arc::new(cc), sc);
    match result {
        Err(Failed::Server(rustls::Error::PeerIncompatible(_))) => {}
        other => panic!("server must refuse TLS 1.2, got {other:?}"),
    }
}

#[test]
fn server_refuses_a_client_without_h2() {
    let pki = Pki::new("cluster.local");
    let tls = ClientTls::new(&pki.creds(CLIENT), &pki.bundle).expect("client");
    let mut cc = (*tls.config_for(&id(SERVER)).expect("config")).clone();
    cc.alpn_protocols = vec![b"http/1.1".to_vec()];
    let sc = server_config(&pki.creds(SERVER), &pki.bundle, "cluster.local").expect("server");
    let ClientServer { result, .. } = connect(Arc::new(cc), sc);
    assert!(
        matches!(
            result,
            Err(Failed::Server(rustls::Error::NoApplicationProtocol))
        ),
        "{result:?}"
    );
    // A client offering no ALPN at all completes TLS, but `negotiated` refuses the tunnel.
    let mut cc = (*tls.config_for(&id(SERVER)).expect("config")).clone();
    cc.alpn_protocols = Vec::new();
    let sc = server_config(&pki.creds(SERVER), &pki.bundle, "cluster.local").expect("server");
    let ClientServer { s, result, .. } = connect(Arc::new(cc), sc);
    result.expect("handshake without ALPN");
    assert!(matches!(negotiated(&s), Err(TlsError::PeerNoH2)));
}

#[test]
fn expired_leaf_is_refused() {
    let pki = Pki::new("cluster.local");
    let old = SystemTime::now() - std::time::Duration::from_secs(3 * 24 * 3600);
    let expired = pki
        .ca
        .issue(&id(CLIENT), old, std::time::Duration::from_secs(3600))
        .expect("leaf")
        .credentials(&id(CLIENT));
    let e = server_refusal(&pki, &pki, expired);
    assert!(
        matches!(
            e,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
                | rustls::Error::InvalidCertificate(CertificateError::Expired)
        ),
        "{e:?}"
    );
}
