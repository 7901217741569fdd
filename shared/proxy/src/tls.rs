//! TLS in Pingora's terms: https listeners whose certificates and client CA follow the serving
//! snapshot (so a reload rotates them without touching the socket), the peer's identity kept
//! with the connection, and TLS origination to a service's endpoints.

use std::any::Any;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use http::HeaderValue;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::listeners::TlsAccept;
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::l4::stream::Stream;
use pingora_core::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora_core::protocols::tls::{CaType, TlsRef};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::{parse_x509, CertKey, WrappedX509};
use pingora_error::{Error, ErrorType, OrErr, Result};
use tokio::net::TcpStream;
use weir_config::{Config, TlsMode, UpstreamTls};
use weir_tls::rustls::client::danger::HandshakeSignatureValid;
use weir_tls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use weir_tls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use weir_tls::rustls::server::{ClientHello, ResolvesServerCert};
use weir_tls::rustls::sign::CertifiedKey;
use weir_tls::rustls::{
    DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme,
};
use weir_tls::{CertificateTable, PeerIdentity};

use crate::reload::Reloader;

/// Pingora's TLS settings for the https listener at `index` of the config's listeners.
pub fn listener_settings(reloader: &Arc<Reloader>, index: usize) -> anyhow::Result<TlsSettings> {
    let mut settings = TlsSettings::with_callbacks(Box::new(KeepPeerIdentity))?;
    let listener = ServingListener {
        reloader: reloader.clone(),
        index,
    };
    settings.set_cert_resolver(Arc::new(listener.clone()));
    settings.set_client_cert_verifier(Arc::new(listener));
    Ok(settings)
}

/// The certificates of each https listener, by listener index (`None` for plain http).
pub fn certificate_tables(config: &Config) -> Vec<Option<CertificateTable>> {
    config
        .listeners
        .iter()
        .map(|l| {
            let tls = l.tls.as_ref()?;
            let mut table = CertificateTable::default();
            for c in &tls.certificates {
                table.push(&c.hosts, &c.pair);
            }
            Some(table)
        })
        .collect()
}

/// Every certificate the config names, with when it expires, for
/// `weir_tls_cert_expiry_timestamp_seconds`.
pub fn expiries(config: &Config) -> Vec<(String, i64)> {
    let listeners = config
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref())
        .flat_map(|tls| &tls.certificates)
        .map(|c| (c.cert.display().to_string(), c.pair.not_after));
    let services = config.services.iter().filter_map(|s| {
        let tls = s.tls.as_ref()?;
        Some((
            tls.cert.as_ref()?.display().to_string(),
            tls.client.as_ref()?.not_after,
        ))
    });
    listeners.chain(services).collect()
}

/// One https listener as the serving snapshot defines it, looked up at each handshake.
#[derive(Clone)]
struct ServingListener {
    reloader: Arc<Reloader>,
    index: usize,
}

impl ServingListener {
    fn client_auth(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        let snapshot = self.reloader.snapshot();
        let listener = snapshot.config.listeners.get(self.index)?;
        let auth = listener.tls.as_ref()?.client_auth.as_ref()?;
        Some(auth.verifier.clone())
    }
}

impl std::fmt::Debug for ServingListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "listener {} of {}",
            self.index,
            self.reloader.path().display()
        )
    }
}

impl ResolvesServerCert for ServingListener {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snapshot = self.reloader.snapshot();
        let table = snapshot.certificates.get(self.index)?.as_ref()?;
        table.select(hello.server_name())
    }
}

/// Client certificates are asked for, and required, only while the listener's
/// `client_auth` says so; each handshake checks against the CA of the serving snapshot.
impl ClientCertVerifier for ServingListener {
    fn offer_client_auth(&self) -> bool {
        self.client_auth().is_some()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.offer_client_auth()
    }

    /// No hints: the CA may change with a reload, and a client with a certificate sends it.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        match self.client_auth() {
            Some(verifier) => verifier.verify_client_cert(end_entity, intermediates, now),
            None => Err(TlsError::General(
                "client certificates are not enabled".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        let algorithms = &weir_tls::provider().signature_verification_algorithms;
        weir_tls::rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        let algorithms = &weir_tls::provider().signature_verification_algorithms;
        weir_tls::rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        weir_tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The verified client certificate of a connection, as its requests use it.
pub struct TlsPeer {
    pub identity: PeerIdentity,
    /// The `x-forwarded-client-cert` value every request on the connection sends upstream.
    pub forwarded: Option<HeaderValue>,
}

/// Reads the client certificate's identity once per connection, after the handshake; the
/// requests on it find it in the session's TLS digest ([`tls_peer`]).
struct KeepPeerIdentity;

#[async_trait]
impl TlsAccept for KeepPeerIdentity {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let identity = PeerIdentity::of(tls.peer_certificate_der()?);
        // A subject with bytes a header cannot carry sends no header rather than failing.
        let forwarded = HeaderValue::try_from(identity.forwarded_client_cert()).ok();
        Some(Arc::new(TlsPeer {
            identity,
            forwarded,
        }))
    }
}

/// The verified client certificate on this TLS connection, if it sent one.
pub fn tls_peer(tls: &pingora_core::protocols::tls::SslDigest) -> Option<&TlsPeer> {
    tls.extension.get::<TlsPeer>()
}

/// The peer for one try (or health check, or mirror copy) to `addr`: plaintext, or with the
/// service's TLS. From a `SocketAddr`, so Pingora does no (blocking) name resolution.
pub fn upstream_peer(tls: Option<&UpstreamPeerTls>, addr: std::net::SocketAddr) -> HttpPeer {
    match tls {
        Some(tls) => tls.peer(addr),
        None => HttpPeer::new(addr, false, String::new()),
    }
}

/// A service's TLS origination in Pingora's types, made once per service.
pub struct UpstreamPeerTls {
    /// Pingora's pool keys a connection by address, SNI, client certificate and verify flags,
    /// not by the CA that verified it: this keeps services that trust different CAs (or whose
    /// files were rotated) from sharing connections.
    group: u64,
    sni: String,
    handshake: Handshake,
}

enum Handshake {
    /// Pingora's: the server's chain and name verified against `ca` (`None`: the system's).
    Pingora {
        ca: Option<Arc<CaType>>,
        client: Option<Arc<CertKey>>,
    },
    /// Weir's own, for mesh mTLS: Pingora's rustls connector cannot check a SPIFFE id, so the
    /// connection is made TLS before Pingora sees it, and Pingora speaks plain HTTP over it.
    Mesh(Arc<MeshConnect>),
}

impl UpstreamPeerTls {
    pub fn new(tls: &UpstreamTls, connect_timeout: Duration) -> UpstreamPeerTls {
        let handshake = match tls.mode {
            TlsMode::Mesh => Handshake::Mesh(Arc::new(MeshConnect::new(tls, connect_timeout))),
            TlsMode::Simple | TlsMode::Mutual => Handshake::Pingora {
                ca: (!tls.roots.is_empty()).then(|| {
                    let certs: Vec<WrappedX509> = tls
                        .roots
                        .iter()
                        .map(|der| WrappedX509::new(der.clone(), parse_x509))
                        .collect();
                    Arc::<CaType>::from(certs.into_boxed_slice())
                }),
                client: tls
                    .client
                    .as_ref()
                    .map(|pair| Arc::new(CertKey::new(pair.chain.clone(), pair.key.clone()))),
            },
        };
        UpstreamPeerTls {
            group: tls.fingerprint,
            sni: tls.sni.clone(),
            handshake,
        }
    }

    /// A peer that connects with TLS, sends the SNI and verifies the server's certificate
    /// chain and name (in mode mesh: its SPIFFE id).
    fn peer(&self, addr: std::net::SocketAddr) -> HttpPeer {
        let mut peer = match &self.handshake {
            Handshake::Pingora { ca, client } => {
                let mut peer = HttpPeer::new(addr, true, self.sni.clone());
                peer.options.ca.clone_from(ca);
                peer.client_cert_key.clone_from(client);
                peer
            }
            Handshake::Mesh(connect) => {
                let mut peer = HttpPeer::new(addr, false, self.sni.clone());
                peer.options.custom_l4 = Some(connect.clone());
                peer
            }
        };
        peer.group_key = self.group;
        peer
    }
}

/// Connects to a mesh peer: TCP, then the TLS handshake that presents the workload certificate
/// and checks the server's SPIFFE id (weir_tls::mesh), both within the service's
/// `connect_timeout`.
pub struct MeshConnect {
    connector: tokio_rustls::TlsConnector,
    sni: ServerName<'static>,
    timeout: Duration,
}

impl MeshConnect {
    fn new(tls: &UpstreamTls, timeout: Duration) -> MeshConnect {
        let mut roots = weir_tls::rustls::RootCertStore::empty();
        for der in &tls.roots {
            // Validation parsed every one of them.
            let _ = roots.add(CertificateDer::from(der.clone()));
        }
        let workload = tls
            .client
            .as_ref()
            .expect("mode mesh always has the workload");
        let config = weir_tls::mesh::client_config(workload, Arc::new(roots), &tls.identities)
            .expect("the trust bundle was checked at load");
        MeshConnect {
            connector: tokio_rustls::TlsConnector::from(config),
            // Validation checked it is a host name.
            sni: ServerName::try_from(tls.sni.clone())
                .unwrap_or_else(|_| ServerName::try_from("mesh").expect("a valid name")),
            timeout,
        }
    }

    async fn handshake(&self, addr: std::net::SocketAddr) -> Result<MeshStream> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| {
            let kind = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
                _ => ErrorType::ConnectError,
            };
            Error::because(kind, format!("connecting to {addr}"), e)
        })?;
        tcp.set_nodelay(true)
            .or_err(ErrorType::ConnectError, "TCP_NODELAY")?;
        let tls = self
            .connector
            .connect(self.sni.clone(), tcp)
            .await
            .map_err(|e| {
                let context = format!("mesh TLS handshake with {addr}");
                Error::because(ErrorType::TLSHandshakeFailure, context, e)
            })?;
        Ok(MeshStream(tls))
    }
}

impl std::fmt::Debug for MeshConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mesh TLS to {:?}", self.sni)
    }
}

#[async_trait]
impl pingora_core::connectors::L4Connect for MeshConnect {
    async fn connect(&self, addr: &SocketAddr) -> Result<Stream> {
        let SocketAddr::Inet(inet) = addr else {
            return Error::e_explain(ErrorType::ConnectError, "mesh TLS needs an IP address");
        };
        match tokio::time::timeout(self.timeout, self.handshake(*inet)).await {
            Ok(stream) => Ok(VirtualSocketStream::new(Box::new(stream?)).into()),
            Err(_) => Error::e_explain(
                ErrorType::ConnectTimedout,
                format!("mesh TLS to {inet}: no handshake within {:?}", self.timeout),
            ),
        }
    }
}

/// A mesh TLS connection, which Pingora's plain-HTTP session takes as its socket.
#[derive(Debug)]
struct MeshStream(tokio_rustls::client::TlsStream<TcpStream>);

impl VirtualSocket for MeshStream {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> std::io::Result<()> {
        let tcp = self.0.get_ref().0;
        match opt {
            VirtualSockOpt::NoDelay => tcp.set_nodelay(true),
            _ => Ok(()),
        }
    }
}

impl tokio::io::AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
