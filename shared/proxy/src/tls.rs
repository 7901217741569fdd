//! TLS in Pingora's terms: https listeners whose certificates and client CA follow the serving
//! snapshot (so a reload rotates them without touching the socket), the peer's identity kept
//! with the connection, and TLS origination to a service's endpoints.

use std::any::Any;
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use http::HeaderValue;
use pingora_core::listeners::tls::{Acceptor, TlsSettings};
use pingora_core::listeners::TlsAccept;
use pingora_core::protocols::tls::{CaType, SslDigest, TlsRef};
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::{parse_x509, CertKey, WrappedX509};
use pingora_error::{Error, ErrorType, OrErr, Result};
use tokio::net::TcpStream;
use weir_config::{Config, TlsMode, UpstreamProtocol, UpstreamTls};
use weir_tls::rustls::client::danger::HandshakeSignatureValid;
use weir_tls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use weir_tls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use weir_tls::rustls::server::{ClientHello, ResolvesServerCert, StoresServerSessions};
use weir_tls::rustls::sign::CertifiedKey;
use weir_tls::rustls::{
    DigitallySignedStruct, DistinguishedName, Error as TlsError, ServerConfig, SignatureScheme,
};
use weir_tls::{CertificateTable, PeerIdentity};

use crate::reload::Reloader;

/// Pingora's TLS acceptor for the https listener at `index` of the config's listeners.
pub fn listener_acceptor(reloader: &Arc<Reloader>, index: usize) -> anyhow::Result<Acceptor> {
    let listener = ServingListener {
        reloader: reloader.clone(),
        index,
    };
    let mut settings = TlsSettings::with_callbacks(Box::new(KeepPeerIdentity(listener.clone())))?;
    // HTTP/2 for clients that offer it (ALPN h2), HTTP/1.1 for the others.
    settings.enable_h2();
    settings.set_cert_resolver(Arc::new(listener.clone()));
    settings.set_client_cert_verifier(Arc::new(listener.clone()));
    let mut acceptor = settings.build();
    // Pingora takes no session store; its rustls config is swapped for one that has ours.
    let mut config = ServerConfig::clone(acceptor.acceptor.config());
    config.session_storage = Arc::new(SessionsByTrust {
        inner: config.session_storage.clone(),
        listener,
    });
    acceptor.acceptor = Arc::new(config).into();
    Ok(acceptor)
}

/// A listener's resumable TLS sessions, filed under the client CAs that were trusted when
/// each was made. A resumed session skips the client certificate's check, so one made before
/// a reload changed `client_auth` (or a sidecar's trust bundle) must not resume after it: it
/// would let in a client the new trust refuses, with the identity the old one gave it.
#[derive(Debug)]
struct SessionsByTrust {
    inner: Arc<dyn StoresServerSessions>,
    listener: ServingListener,
}

impl SessionsByTrust {
    fn key(&self, key: &[u8]) -> Vec<u8> {
        let snapshot = self.listener.reloader.snapshot();
        let listener = snapshot.config.listeners.get(self.listener.index);
        let auth = listener.and_then(|l| l.tls.as_ref()?.client_auth.as_ref());
        let trust = auth.map_or(0, |a| a.trust);
        [&trust.to_le_bytes()[..], key].concat()
    }
}

impl StoresServerSessions for SessionsByTrust {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put(self.key(&key), value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.get(&self.key(key))
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.inner.take(&self.key(key))
    }

    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
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

    /// The identity the listener serves under, for XFCC's `By`: the workload's SPIFFE id on
    /// the sidecar's inbound listener, as Istio's sidecars name themselves; none elsewhere.
    fn own_identity(&self) -> Option<String> {
        let snapshot = self.reloader.snapshot();
        let config = &snapshot.config;
        let listener = config.listeners.get(self.index)?;
        let inbound = config.sidecar.is_some() && listener.name == weir_config::INBOUND;
        inbound.then(|| config.workload.as_ref().map(|w| w.identity.clone()))?
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
struct KeepPeerIdentity(ServingListener);

#[async_trait]
impl TlsAccept for KeepPeerIdentity {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let identity = PeerIdentity::of(tls.peer_certificate_der()?);
        let by = self.0.own_identity();
        // Control characters are escaped, so any certificate's value is a header's.
        let forwarded = HeaderValue::try_from(identity.forwarded_client_cert(by.as_deref()));
        let forwarded = forwarded.ok();
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
/// service's TLS; HTTP/2 (h2c, or ALPN h2 over TLS) when the service says so. From a
/// `SocketAddr`, so Pingora does no (blocking) name resolution.
pub fn upstream_peer(
    tls: Option<&UpstreamPeerTls>,
    protocol: UpstreamProtocol,
    addr: std::net::SocketAddr,
) -> HttpPeer {
    let mut peer = match tls {
        Some(tls) => tls.peer(addr),
        None => HttpPeer::new(addr, false, String::new()),
    };
    if protocol == UpstreamProtocol::Http2 {
        peer.options.alpn = ALPN::H2;
    }
    peer
}

/// A service's TLS origination in Pingora's types, made once per service.
pub struct UpstreamPeerTls {
    /// Pingora's pool keys a connection by address, SNI, client certificate and verify flags,
    /// not by the CA that verified it: this keeps services that trust different CAs (or whose
    /// files were rotated) from sharing connections.
    group: u64,
    sni: String,
    ca: Option<Arc<CaType>>,
    client: Option<Arc<CertKey>>,
    /// Mode mesh: the server's SPIFFE id, checked once a connection is up.
    mesh: Option<MeshIdentity>,
}

impl UpstreamPeerTls {
    pub fn new(tls: &UpstreamTls, connect_timeout: Duration) -> UpstreamPeerTls {
        let ca = (!tls.roots.is_empty()).then(|| {
            let certs: Vec<WrappedX509> = tls
                .roots
                .iter()
                .map(|der| WrappedX509::new(der.clone(), parse_x509))
                .collect();
            Arc::<CaType>::from(certs.into_boxed_slice())
        });
        let client = tls
            .client
            .as_ref()
            .map(|pair| Arc::new(CertKey::new(pair.chain.clone(), pair.key.clone())));
        UpstreamPeerTls {
            group: tls.fingerprint,
            sni: tls.sni.clone(),
            ca,
            client,
            mesh: (tls.mode == TlsMode::Mesh).then(|| MeshIdentity::new(tls, connect_timeout)),
        }
    }

    /// A peer that connects with TLS, sends the SNI and verifies the server's certificate
    /// chain and name; in mode mesh, the chain only (the name is a SPIFFE id, which
    /// [`Self::check_identity`] checks).
    fn peer(&self, addr: std::net::SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, true, self.sni.clone());
        peer.group_key = self.group;
        peer.options.ca.clone_from(&self.ca);
        peer.client_cert_key.clone_from(&self.client);
        peer.options.verify_hostname = self.mesh.is_none();
        peer
    }

    /// For mode mesh, before anything is sent on a connection, new or reused: whether the
    /// server's certificate carries one of the service's identities. Other modes were verified
    /// in full by the handshake.
    pub async fn check_identity(
        &self,
        addr: std::net::SocketAddr,
        tls: Option<&SslDigest>,
    ) -> Result<()> {
        match &self.mesh {
            None => Ok(()),
            Some(mesh) => mesh.check(addr, tls).await,
        }
    }
}

/// Mode mesh's identity check. Pingora's rustls connector verifies a server's chain, but a
/// name only as a host name, and offers no hook to read the certificate; the connection
/// tells only its leaf's SHA-256. So a certificate is checked once: a handshake of Weir's own
/// (weir_tls::mesh: the chain under the trust bundle, the SPIFFE id among `identities`)
/// learns the endpoint's certificate, whose hash joins the verified ones; the connection
/// passes once its certificate is among them. Each request then costs a lookup under a read lock; a renewed
/// certificate, one more handshake.
struct MeshIdentity {
    connector: tokio_rustls::TlsConnector,
    sni: ServerName<'static>,
    timeout: Duration,
    /// SHA-256 of server certificates seen to pass; cleared when it grows past a bound.
    verified: RwLock<HashSet<Vec<u8>>>,
}

/// Distinct server certificates remembered per service (endpoints × renewals).
const VERIFIED_CERTIFICATES: usize = 4096;

/// Handshakes one check may make to meet the connection's certificate behind one address.
const CHECK_HANDSHAKES: usize = 4;

impl MeshIdentity {
    fn new(tls: &UpstreamTls, timeout: Duration) -> MeshIdentity {
        let mut roots = weir_tls::rustls::RootCertStore::empty();
        for der in &tls.roots {
            // Validation parsed every one of them.
            let _ = roots.add(CertificateDer::from(der.clone()));
        }
        let workload = tls
            .client
            .as_ref()
            .expect("mode mesh always has the workload");
        let config = weir_tls::mesh::client_config(
            workload,
            Arc::new(roots),
            &tls.identities,
            &tls.trust_domains,
        )
        .expect("the trust bundle was checked at load");
        MeshIdentity {
            connector: tokio_rustls::TlsConnector::from(config),
            // Validation checked it is a host name.
            sni: ServerName::try_from(tls.sni.clone())
                .unwrap_or_else(|_| ServerName::try_from("mesh").expect("a valid name")),
            timeout,
            verified: RwLock::new(HashSet::new()),
        }
    }

    async fn check(&self, addr: std::net::SocketAddr, tls: Option<&SslDigest>) -> Result<()> {
        let Some(leaf) = tls.map(|d| &d.cert_digest).filter(|d| !d.is_empty()) else {
            return Error::e_explain(ErrorType::TLSHandshakeFailure, "mesh: no TLS on it");
        };
        if self.verified.read().expect("not poisoned").contains(leaf) {
            return Ok(());
        }
        // An address in front of several servers (a Kubernetes ClusterIP) may take the check's
        // handshake to another one than the connection's: each certificate that passes is
        // remembered, and the check tries again until it meets the connection's.
        for _ in 0..CHECK_HANDSHAKES {
            let seen = tokio::time::timeout(self.timeout, self.handshake(addr))
                .await
                .unwrap_or_else(|_| {
                    Error::e_explain(ErrorType::ConnectTimedout, "mesh: identity check timed out")
                })?;
            let mut verified = self.verified.write().expect("not poisoned");
            if verified.len() >= VERIFIED_CERTIFICATES {
                verified.clear();
            }
            verified.insert(seen);
            if verified.contains(leaf) {
                return Ok(());
            }
        }
        let e = format!(
            "mesh: the certificate of the connection to {addr} was not among those its \
             {CHECK_HANDSHAKES} identity checks were shown; not trusted"
        );
        tracing::warn!("{e}");
        Error::e_explain(ErrorType::TLSHandshakeFailure, e)
    }

    /// A handshake with the mesh verifier; the SHA-256 of the certificate it accepted.
    async fn handshake(&self, addr: std::net::SocketAddr) -> Result<Vec<u8>> {
        let tcp = TcpStream::connect(addr)
            .await
            .or_err(ErrorType::ConnectError, "mesh: identity check")?;
        let tls = self
            .connector
            .connect(self.sni.clone(), tcp)
            .await
            .map_err(|e| {
                let context = format!("mesh TLS to {addr}");
                Error::because(ErrorType::TLSHandshakeFailure, context, e)
            })?;
        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
        let hash = leaf
            .map(|c| weir_tls::certificate_hash(c))
            .unwrap_or_default();
        Ok(hash)
    }
}

/// The rustls error under a Pingora error, if any (an I/O error carries it as its inner one).
pub(crate) fn rustls_error(e: &Error) -> Option<&TlsError> {
    let mut cause = e
        .cause
        .as_deref()
        .map(|c| c as &(dyn std::error::Error + 'static));
    while let Some(c) = cause {
        let tls = c.downcast_ref::<TlsError>().or_else(|| {
            let io = c.downcast_ref::<std::io::Error>()?;
            io.get_ref()?.downcast_ref::<TlsError>()
        });
        if tls.is_some() {
            return tls;
        }
        cause = c.source();
    }
    None
}

/// Why a client's TLS handshake failed, as `weir_downstream_tls_handshake_failures_total`
/// says it (after Envoy's `ssl.fail_verify_no_cert`, `ssl.fail_verify_error`,
/// `ssl.connection_error`).
pub(crate) fn handshake_failure(e: &Error) -> &'static str {
    // Pingora's acceptor keeps the rustls error only as text, rustls's own wording.
    let text = e.to_string();
    if text.contains(&TlsError::NoCertificatesPresented.to_string()) {
        "no_certificate"
    } else if text.contains("invalid peer certificate") {
        "bad_certificate"
    } else {
        "other"
    }
}
