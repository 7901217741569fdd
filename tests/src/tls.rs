//! Real TLS for the tests: a CA made at test time (rcgen), an HTTPS client that shows which
//! certificate it was served, and an HTTPS upstream that can require client certificates.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use weir_tls::PeerIdentity;

/// A certificate authority that lives for one test.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert: String,
    pub key: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `names` (DNS names, "*.x" allowed).
    pub fn server(&self, names: &[&str]) -> Issued {
        self.issue(names, &[], &[ExtendedKeyUsagePurpose::ServerAuth], names[0])
    }

    /// A client certificate with common name `cn` and these URI SANs (SPIFFE ids).
    pub fn client(&self, cn: &str, uris: &[&str]) -> Issued {
        self.issue(&[], uris, &[ExtendedKeyUsagePurpose::ClientAuth], cn)
    }

    /// A mesh workload's certificate: its SPIFFE id as the only name, for serving and calling.
    pub fn workload(&self, spiffe: &str) -> Issued {
        let usages = [
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(&[], &[spiffe], &usages, "workload")
    }

    fn issue(
        &self,
        names: &[&str],
        uris: &[&str],
        usages: &[ExtendedKeyUsagePurpose],
        cn: &str,
    ) -> Issued {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        for uri in uris {
            let uri = (*uri).try_into().unwrap();
            params.subject_alt_names.push(SanType::URI(uri));
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = usages.to_vec();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

fn client_config(ca_pem: &str, client: Option<&Issued>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(weir_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    with_client(builder, client)
}

fn with_client(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    client: Option<&Issued>,
) -> rustls::ClientConfig {
    match client {
        Some(issued) => {
            let chain = CertificateDer::pem_slice_iter(issued.cert.as_bytes())
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    }
}

/// What an HTTPS request got back, and the certificate the server presented.
pub struct TlsReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The server certificate's DNS names.
    pub served: Vec<String>,
    /// The server certificate's URI names (a mesh workload's SPIFFE id).
    pub served_ids: Vec<String>,
    /// SHA-256 of the server certificate.
    pub served_hash: String,
    /// Whether the handshake resumed a session instead of a full one.
    pub resumed: bool,
}

/// An HTTPS client that keeps its TLS sessions, so a connection after the first resumes one,
/// as browsers and HTTP client libraries do.
pub struct TlsClient(Arc<rustls::ClientConfig>);

impl TlsClient {
    pub fn new(ca_pem: &str, client: Option<&Issued>) -> TlsClient {
        TlsClient(Arc::new(client_config(ca_pem, client)))
    }

    /// [`https_get`] with this client's sessions.
    pub fn get(&self, port: u16, sni: &str, path: &str) -> Result<TlsReply, String> {
        request_over(self.0.clone(), port, b"", sni, path, &[])
    }
}

/// One HTTPS request to 127.0.0.1:`port` with `sni`, trusting only `ca_pem`, presenting
/// `client` if given. A TLS or transport failure is `Err` with rustls's reason.
pub fn https_get(
    port: u16,
    sni: &str,
    ca_pem: &str,
    client: Option<&Issued>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<TlsReply, String> {
    let config = Arc::new(client_config(ca_pem, client));
    request_over(config, port, b"", sni, path, headers)
}

/// [`https_get`] on a connection that first sends `preface` in the clear: a PROXY protocol
/// header, as a load balancer in front would.
pub fn https_get_after(
    preface: &[u8],
    port: u16,
    sni: &str,
    ca_pem: &str,
    path: &str,
) -> Result<TlsReply, String> {
    let config = Arc::new(client_config(ca_pem, None));
    request_over(config, port, preface, sni, path, &[])
}

/// One request to a sidecar's inbound port at 127.0.0.1:`port`, presenting `client` (a
/// workload certificate) or none. Whatever the server presents is accepted and reported in
/// `served_ids`: this client tests what the server lets in.
pub fn mesh_get(port: u16, client: Option<&Issued>, path: &str) -> Result<TlsReply, String> {
    MeshClient::new(client).get(port, path)
}

/// A mesh caller that keeps its TLS sessions between requests, to resume them.
pub struct MeshClient(Arc<rustls::ClientConfig>);

impl MeshClient {
    pub fn new(client: Option<&Issued>) -> MeshClient {
        let builder = rustls::ClientConfig::builder_with_provider(weir_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer));
        MeshClient(Arc::new(with_client(builder, client)))
    }

    pub fn get(&self, port: u16, path: &str) -> Result<TlsReply, String> {
        request_over(self.0.clone(), port, b"", "mesh.test", path, &[])
    }
}

fn request_over(
    config: Arc<rustls::ClientConfig>,
    port: u16,
    preface: &[u8],
    sni: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<TlsReply, String> {
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(preface).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    // A server that closes without close_notify still gave its whole answer.
    if let Err(e) = tls.read_to_end(&mut raw) {
        if raw.is_empty() {
            return Err(e.to_string());
        }
    }
    let resumed = tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let identity = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| PeerIdentity::of(c.as_ref()))
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(format!("no answer: {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or(format!("bad status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(TlsReply {
        status,
        headers,
        body: body.to_string(),
        served: identity.dns,
        served_ids: identity.uris,
        served_hash: identity.hash,
        resumed,
    })
}

/// Accepts any server certificate, checking only the handshake's signatures.
#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &weir_tls::provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algorithms = &weir_tls::provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        weir_tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl TlsReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTPS server on 127.0.0.1 that answers every request with its name, optionally
/// requiring a client certificate from `client_ca`. It keeps the client certificate's
/// identity and the headers of the last request.
pub struct TlsUpstream {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    last_peer: Arc<Mutex<Option<PeerIdentity>>>,
    last_headers: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
}

/// A server's TLS: `served`, and with `client_ca` (PEM) a client certificate that chains to it
/// required.
pub fn server_config(served: &Issued, client_ca: Option<&str>) -> Arc<rustls::ServerConfig> {
    let chain: Vec<_> = CertificateDer::pem_slice_iter(served.cert.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(served.key.as_bytes()).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(weir_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let roots = weir_tls::roots(ca.as_bytes()).unwrap();
            builder.with_client_cert_verifier(weir_tls::client_verifier(roots).unwrap())
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(builder.with_single_cert(chain, key).unwrap())
}

impl TlsUpstream {
    pub fn start(name: &str, served: &Issued, client_ca: Option<&str>) -> TlsUpstream {
        let config = server_config(served, client_ca);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = TlsUpstream {
            name: name.to_string(),
            addr,
            hits: Arc::default(),
            last_peer: Arc::default(),
            last_headers: Arc::default(),
            stop: Arc::default(),
        };
        let (hits, peer, headers, stop) = (
            upstream.hits.clone(),
            upstream.last_peer.clone(),
            upstream.last_headers.clone(),
            upstream.stop.clone(),
        );
        let name = name.to_string();
        thread::spawn(move || {
            for tcp in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(tcp) = tcp else { continue };
                let (config, hits, peer, headers) =
                    (config.clone(), hits.clone(), peer.clone(), headers.clone());
                let name = name.clone();
                thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    serve(&mut tls, &name, &hits, &peer, &headers);
                });
            }
        });
        upstream
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// The identity in the client certificate of the last request's connection.
    pub fn last_peer(&self) -> Option<PeerIdentity> {
        self.last_peer.lock().unwrap().clone()
    }

    pub fn last_header(&self, name: &str) -> Option<String> {
        let headers = self.last_headers.lock().unwrap();
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Answers the requests of one keep-alive connection (bodiless requests only).
fn serve(
    tls: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    name: &str,
    hits: &AtomicUsize,
    peer: &Mutex<Option<PeerIdentity>>,
    last_headers: &Mutex<Vec<(String, String)>>,
) {
    let mut reader = BufReader::new(tls);
    loop {
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let tls = reader.get_mut();
        let identity = tls
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| PeerIdentity::of(c.as_ref()));
        *peer.lock().unwrap() = identity;
        let close = headers.contains(&("connection".into(), "close".into()));
        *last_headers.lock().unwrap() = headers;
        hits.fetch_add(1, Ordering::SeqCst);
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-upstream: {name}\r\n\r\n{name}",
            name.len()
        );
        if tls.write_all(answer.as_bytes()).is_err() || tls.flush().is_err() {
            return;
        }
        if close {
            tls.conn.send_close_notify();
            let _ = tls.flush();
            return;
        }
    }
}
