//! The API server as pods see it: HTTPS behind the `kubernetes` Service
//! (10.96.0.1:443), with a certificate from the instance's own cluster CA,
//! whose `ca.crt` every pod's service-account volume holds (the
//! `kube-root-ca.crt` ConfigMap). Client libraries' in-cluster
//! configuration (`load_incluster_config()`, kube-rs `Config::incluster()`)
//! verifies the server with it and sends the pod's token, which
//! [`authenticate`] checks. The admin kubeconfig keeps the plain loopback
//! listener.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

use super::status::ApiError;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the cluster CA: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("configuring TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The instance's cluster CA and the API server's certificate it signed.
pub struct ClusterCa {
    /// The CA certificate, PEM: what `ca.crt` holds.
    pub ca_pem: String,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new CA, and a serving certificate for the names and addresses a
    /// pod may use for the API server (as kube-apiserver's has).
    pub fn new(ips: &[IpAddr]) -> Result<Self, TlsError> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "tpd-sandbox-ca");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let names =
            ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"];
        let mut leaf = CertificateParams::new(names.map(str::to_owned).to_vec())?;
        leaf.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        leaf.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let leaf_key = KeyPair::generate()?;
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

        let chain = vec![CertificateDer::from(leaf_cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        // Client libraries speak HTTP/1.1 here (watch, exec upgrades).
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ClusterCa { ca_pem: ca_cert.pem(), server: Arc::new(server) })
    }

    /// Wraps `tcp` so that it yields TLS connections.
    pub fn listener(&self, tcp: TcpListener) -> TlsListener {
        TlsListener { tcp, acceptor: TlsAcceptor::from(self.server.clone()), handshakes: JoinSet::new() }
    }
}

/// A TCP listener whose connections come out after their TLS handshake;
/// handshakes run concurrently, so a client that stalls in one holds up
/// nobody else.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        let acceptor = self.acceptor.clone();
                        self.handshakes.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(tls)) => Some((tls, peer)),
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                                    None
                                }
                                Err(_) => None,
                            }
                        });
                    }
                    // As axum's own TCP listener does: back off on errors
                    // such as EMFILE instead of spinning.
                    Err(e) => {
                        tracing::debug!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                // A failed handshake must not disable this branch for the
                // rest of the select, or a good one would wait for the next
                // connection: match inside.
                Some(joined) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(done)) = joined {
                        return done;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Service-account tokens the server issued (TokenRequest), and whose.
#[derive(Debug, Default)]
pub struct Tokens(Mutex<HashMap<String, String>>);

impl Tokens {
    /// A new token for `namespace`/`account`.
    pub fn issue(&self, namespace: &str, account: &str) -> String {
        let token = format!("sandbox.{}", random_hex(32));
        let user = format!("system:serviceaccount:{namespace}:{account}");
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(token.clone(), user);
        token
    }

    /// The user a bearer token stands for, if the server issued it.
    pub fn user(&self, token: &str) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(token).cloned()
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

/// Lets through only requests that carry a token this server issued, as
/// kube-apiserver answers 401 to anyone else on its secure port.
pub async fn authenticate(State(tokens): State<Arc<Tokens>>, req: Request, next: Next) -> Response {
    let bearer = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token);
    match bearer.and_then(|t| tokens.user(t)) {
        Some(user) => {
            tracing::debug!(%user, path = req.uri().path(), "authenticated");
            next.run(req).await
        }
        None => ApiError::unauthorized().into_response(),
    }
}

/// The token of an `Authorization: Bearer TOKEN` header. The scheme is
/// case-insensitive (RFC 9110 11.1): the Python client sends `bearer`.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_whatever_the_schemes_case() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn issued_tokens_name_their_service_account_and_others_are_unknown() {
        let tokens = Tokens::default();
        let t = tokens.issue("team", "builder");
        assert_eq!(tokens.user(&t).as_deref(), Some("system:serviceaccount:team:builder"));
        assert_ne!(tokens.issue("team", "builder"), t, "each request gets a new token");
        assert_eq!(tokens.user("sandbox-token:team:builder"), None);
    }

    async fn handshake(trusting: &ClusterCa, addr: SocketAddr, name: &str) -> std::io::Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(trusting.ca_pem.as_bytes()).unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut tls = connector.connect(server_name, TcpStream::connect(addr).await?).await?;
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn clients_that_trust_ca_crt_reach_the_server_by_its_service_names() {
        use axum::serve::Listener;
        use tokio::io::AsyncWriteExt;
        let ca = ClusterCa::new(&[std::net::Ipv4Addr::LOCALHOST.into()]).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = ca.listener(tcp);
        let server = tokio::spawn(async move {
            loop {
                let (mut tls, _) = listener.accept().await;
                let _ = tls.write_all(b"ok").await;
                let _ = tls.shutdown().await;
            }
        });
        for name in ["kubernetes.default.svc", "kubernetes", "127.0.0.1"] {
            assert_eq!(handshake(&ca, addr, name).await.unwrap(), b"ok", "{name}");
        }
        assert!(handshake(&ca, addr, "example.org").await.is_err(), "a name the certificate lacks");
        let other = ClusterCa::new(&[]).unwrap();
        assert!(handshake(&other, addr, "kubernetes").await.is_err(), "a client trusting another CA");
        // Failed handshakes did not stop the listener.
        assert_eq!(handshake(&ca, addr, "kubernetes").await.unwrap(), b"ok");
        server.abort();
    }
}
