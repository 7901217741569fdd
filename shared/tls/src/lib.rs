//! weir-tls: the TLS material of Weir's listeners and upstreams, on rustls with ring (the
//! crypto Pingora's rustls build uses).
//!
//! Everything here is pure, but for the system's trust store ([`trusted`]): PEM bytes in,
//! rustls types or a clear error out. Reading the files (and naming their place in the
//! config) is weir-config's job; handing the material to
//! Pingora's listeners and connectors is weir-proxy's.

use std::fmt;
use std::sync::{Arc, LazyLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

pub use rustls;

pub mod mesh;

/// The crypto of every TLS config Weir builds.
pub fn provider() -> Arc<CryptoProvider> {
    static RING: LazyLock<Arc<CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    RING.clone()
}

/// A certificate chain and its private key, checked to belong together.
#[derive(Clone)]
pub struct KeyPair {
    /// For serving: what a rustls server config presents.
    pub certified: Arc<CertifiedKey>,
    /// The chain in DER, leaf first, and the key in DER (PKCS#8, PKCS#1 or SEC1), for
    /// Pingora's client connector, which takes raw DER.
    pub chain: Vec<Vec<u8>>,
    pub key: Vec<u8>,
    /// When the leaf certificate expires, in seconds since the Unix epoch.
    pub not_after: i64,
}

impl fmt::Debug for KeyPair {
    // Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("certificates", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Parses a PEM certificate chain (leaf first) and a PEM private key, and checks that the key
/// is the leaf's.
pub fn key_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<KeyPair, String> {
    let chain = certificates(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        // PKCS#8's "ENCRYPTED PRIVATE KEY", or OpenSSL's legacy "Proc-Type: 4,ENCRYPTED".
        let encrypted = key_pem.windows(9).any(|w| w == b"ENCRYPTED");
        match encrypted {
            true => "the private key is encrypted; Weir reads plain PEM keys (decrypt it: \
                     openssl pkey -in key.pem -out plain-key.pem)"
                .to_string(),
            false => format!("no private key found in PEM ({e})"),
        }
    })?;
    let key_der = key.secret_der().to_vec();
    let not_after = parse(&chain[0])?.validity().not_after.timestamp();
    let certified =
        CertifiedKey::from_der(chain.clone(), key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => "the private key is not the certificate's".into(),
            e => format!("unusable private key: {e}"),
        })?;
    Ok(KeyPair {
        certified: Arc::new(certified),
        chain: chain.iter().map(|c| c.to_vec()).collect(),
        key: key_der,
        not_after,
    })
}

/// Every certificate of a PEM bundle, in order; an error when there is none or one does not
/// parse.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate found in PEM".into());
    }
    for cert in &certs {
        parse(cert)?;
    }
    Ok(certs)
}

/// The trust anchors of a PEM bundle of CA certificates.
pub fn roots(pem: &[u8]) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(pem)? {
        roots
            .add(cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    Ok(Arc::new(roots))
}

/// The CAs a client trusts: `ca` (certificates in DER), or with none the system's trust store
/// (`/etc/ssl/certs`, or `SSL_CERT_FILE`/`SSL_CERT_DIR`), the one thing here read from disk.
pub fn trusted(ca: &[Vec<u8>]) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    if ca.is_empty() {
        let system = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(system.certs);
        if roots.is_empty() {
            let errors = system.errors.iter().map(|e| e.to_string());
            return Err(format!(
                "no CA certificates in the system's trust store ({}); give a ca",
                errors.collect::<Vec<_>>().join("; ")
            ));
        }
    }
    for der in ca {
        let cert = CertificateDer::from(der.clone());
        roots
            .add(cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    Ok(Arc::new(roots))
}

/// A client config for a server called by name (the OTLP collector): its certificate must
/// chain to `roots` and name the host called; `client`, if any, is presented when the server
/// asks for a certificate. ALPN is the caller's to set.
pub fn client_config(
    roots: Arc<RootCertStore>,
    client: Option<&KeyPair>,
) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    Ok(match client {
        Some(pair) => builder.with_client_cert_resolver(Arc::new(Presents(pair.certified.clone()))),
        None => builder.with_no_client_auth(),
    })
}

/// Always presents this certificate, whatever CA the server asks for: the server checks it
/// against the CAs it trusts (for the mesh, its trust bundle).
#[derive(Debug)]
pub(crate) struct Presents(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A verifier that requires a client certificate chaining to one of `roots`.
pub fn client_verifier(roots: Arc<RootCertStore>) -> Result<Arc<dyn ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| format!("cannot verify client certificates with this CA: {e}"))
}

/// Whether `chain` (DER, leaf first) chains to `roots`, its dates aside: a certificate that
/// has expired or is not valid yet is another matter, which a clock may settle.
pub fn chains_to(chain: &[Vec<u8>], roots: Arc<RootCertStore>) -> Result<(), String> {
    use rustls::{CertificateError as Cert, Error};
    let Some((leaf, rest)) = chain.split_first() else {
        return Err("no certificate".into());
    };
    let intermediates: Vec<_> = rest
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let leaf = CertificateDer::from(leaf.as_slice());
    let now = rustls::pki_types::UnixTime::now();
    match client_verifier(roots)?.verify_client_cert(&leaf, &intermediates, now) {
        Ok(_) => Ok(()),
        Err(Error::InvalidCertificate(
            Cert::Expired
            | Cert::ExpiredContext { .. }
            | Cert::NotValidYet
            | Cert::NotValidYetContext { .. },
        )) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| format!("not an X.509 certificate: {e}"))
}

/// A listener's certificates, chosen by the name the client asks for (SNI).
#[derive(Debug, Clone, Default)]
pub struct CertificateTable {
    /// Host patterns (exact names or "*.suffix"; empty = any name) and the pair they serve,
    /// in declaration order.
    entries: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl CertificateTable {
    pub fn push(&mut self, hosts: &[String], pair: &KeyPair) {
        let hosts = hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        self.entries.push((hosts, pair.certified.clone()));
    }

    /// The certificate for `sni`: an exact name first, then the longest matching wildcard,
    /// then one declared without hosts; with no SNI or no match, the first certificate (as
    /// nginx serves its default server's), so the client sees a name mismatch, not a reset.
    pub fn select(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let first = self.entries.first().map(|(_, key)| key.clone());
        let Some(sni) = sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase()) else {
            return first;
        };
        let exact = self.entries.iter().find(|(hosts, _)| hosts.contains(&sni));
        let wildcard = || {
            self.entries
                .iter()
                .filter_map(|(hosts, key)| {
                    let longest = hosts
                        .iter()
                        .filter_map(|h| h.strip_prefix('*'))
                        .filter(|suffix| sni.len() > suffix.len() && sni.ends_with(suffix))
                        .map(str::len)
                        .max()?;
                    Some((longest, key))
                })
                .max_by_key(|(len, _)| *len)
        };
        let any = || self.entries.iter().find(|(hosts, _)| hosts.is_empty());
        exact
            .map(|(_, key)| key.clone())
            .or_else(|| wildcard().map(|(_, key)| key.clone()))
            .or_else(|| any().map(|(_, key)| key.clone()))
            .or(first)
    }
}

/// Who the peer of a TLS connection proved to be with its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerIdentity {
    /// URI subject alternative names, such as a SPIFFE id `spiffe://mesh.local/ns/a/sa/b`.
    pub uris: Vec<String>,
    /// DNS subject alternative names.
    pub dns: Vec<String>,
    /// The subject, as `CN=client,O=example`.
    pub subject: String,
    /// SHA-256 of the certificate's DER, in lower-case hex.
    pub hash: String,
}

/// What a workload certificate lacks to call the mesh, and to serve it if it `serves` (a
/// sidecar does both): with an extended key usage extension, it must allow `clientAuth`, and
/// `serverAuth` to serve, or the peers' TLS refuses it at the handshake.
pub fn mesh_usage_missing(der: &[u8], serves: bool) -> Option<&'static str> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let eku = cert.extended_key_usage().ok()??.value;
    if serves && !(eku.any || eku.server_auth) {
        return Some("serverAuth");
    }
    (!(eku.any || eku.client_auth)).then_some("clientAuth")
}

impl PeerIdentity {
    /// Reads the identity of a verified leaf certificate.
    pub fn of(der: &[u8]) -> PeerIdentity {
        let hash = hex(&certificate_hash(der));
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return PeerIdentity {
                hash,
                ..PeerIdentity::default()
            };
        };
        let mut identity = PeerIdentity {
            subject: cert.subject().to_string().replace(", ", ","),
            hash,
            ..PeerIdentity::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) => identity.uris.push((*uri).to_string()),
                    GeneralName::DNSName(dns) => identity.dns.push((*dns).to_string()),
                    _ => {}
                }
            }
        }
        // SPIFFE ids first, so the first URI is the workload's when it has one.
        (identity.uris).sort_by_key(|uri| !uri.starts_with("spiffe://"));
        identity
    }

    /// The name to log and match: the first URI SAN (the SPIFFE id), else the subject.
    pub fn principal(&self) -> &str {
        self.uris.first().unwrap_or(&self.subject)
    }

    /// The value of `x-forwarded-client-cert`, in Envoy's format:
    /// `By=<own id>;Hash=<sha256>;Subject="<subject>";URI=<uri>;DNS=<name>`, `By` naming the
    /// proxy that checked the certificate, when it has an identity to name.
    pub fn forwarded_client_cert(&self, by: Option<&str>) -> String {
        let mut value = String::new();
        if let Some(by) = by {
            value.push_str("By=");
            value.push_str(&xfcc_value(by));
            value.push(';');
        }
        value.push_str(&format!(
            "Hash={};Subject={}",
            self.hash,
            quoted(&self.subject)
        ));
        for uri in &self.uris {
            value.push_str(";URI=");
            value.push_str(&xfcc_value(uri));
        }
        for dns in &self.dns {
            value.push_str(";DNS=");
            value.push_str(&xfcc_value(dns));
        }
        value
    }
}

/// An `x-forwarded-client-cert` value as Envoy writes it: quoted when it holds a `,`, `;`,
/// `=` or `"` (which would otherwise start another field or element), so a CA-signed name
/// cannot add a field of its own; or a control character, which no header value may carry.
fn xfcc_value(value: &str) -> std::borrow::Cow<'_, str> {
    match value.contains([',', ';', '=', '"']) || value.contains(char::is_control) {
        true => quoted(value).into(),
        false => value.into(),
    }
}

/// `value` in double quotes, its `\` and `"` escaped, and control characters (a CR or LF in
/// a subject would otherwise make the whole header unsendable) written `\xNN`.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' | '"' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// SHA-256 of a certificate's DER: how Pingora's TLS digest names a peer's certificate.
pub fn certificate_hash(der: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair as RcKey, SanType};

    fn issue(names: &[&str]) -> (String, String) {
        let key = RcKey::generate().expect("key");
        let cert = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn leaf(key: &CertifiedKey) -> Vec<String> {
        PeerIdentity::of(key.cert[0].as_ref()).dns
    }

    #[test]
    fn a_key_must_go_with_its_certificate() {
        let (cert, key) = issue(&["a.example"]);
        let (_, other_key) = issue(&["b.example"]);
        assert!(key_pair(cert.as_bytes(), key.as_bytes()).is_ok());
        let err = key_pair(cert.as_bytes(), other_key.as_bytes()).unwrap_err();
        assert!(err.contains("is not the certificate's"), "{err}");
        let err = key_pair(b"nothing", key.as_bytes()).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
        // An encrypted key (PKCS#8, as `openssl req -newkey` writes one) is named as such.
        let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIH0MF8GCSqGSIb3DQEFDTBSMDEG\n\
                         -----END ENCRYPTED PRIVATE KEY-----\n";
        let err = key_pair(cert.as_bytes(), encrypted.as_bytes()).unwrap_err();
        assert!(err.contains("the private key is encrypted"), "{err}");
        let err = key_pair(cert.as_bytes(), cert.as_bytes()).unwrap_err();
        assert!(err.contains("no private key"), "{err}");
    }

    #[test]
    fn sni_picks_exact_then_longest_wildcard_then_catch_all_then_first() {
        let pair = |names: &[&str]| {
            let (c, k) = issue(names);
            key_pair(c.as_bytes(), k.as_bytes()).expect("pair")
        };
        let mut table = CertificateTable::default();
        table.push(&["first.example".into()], &pair(&["first.example"]));
        table.push(&["*.example.com".into()], &pair(&["wide.example.com"]));
        table.push(
            &["*.api.example.com".into()],
            &pair(&["narrow.api.example.com"]),
        );
        table.push(
            &["Exact.API.example.com".into()],
            &pair(&["exact.api.example.com"]),
        );
        let pick = |table: &CertificateTable, sni: Option<&str>| {
            leaf(&table.select(sni).expect("a certificate"))
        };
        let t = &table;
        assert_eq!(
            pick(t, Some("exact.api.example.com")),
            ["exact.api.example.com"]
        );
        assert_eq!(
            pick(t, Some("x.api.example.com")),
            ["narrow.api.example.com"]
        );
        assert_eq!(pick(t, Some("x.example.com.")), ["wide.example.com"]);
        assert_eq!(pick(t, Some("example.com")), ["first.example"]);
        assert_eq!(pick(t, None), ["first.example"]);
        table.push(&[], &pair(&["any.example"]));
        assert_eq!(pick(&table, Some("elsewhere.org")), ["any.example"]);
        assert!(CertificateTable::default().select(Some("x")).is_none());
    }

    #[test]
    fn a_peer_is_named_by_its_spiffe_id() {
        let key = RcKey::generate().expect("key");
        let mut params = CertificateParams::new(vec!["svc.local".to_string()]).expect("params");
        params.subject_alt_names.push(SanType::URI(
            "spiffe://mesh.local/ns/a/sa/b".try_into().expect("uri"),
        ));
        params.distinguished_name.push(DnType::CommonName, "client");
        let cert = params.self_signed(&key).expect("cert");
        let id = PeerIdentity::of(cert.der());
        assert_eq!(id.uris, ["spiffe://mesh.local/ns/a/sa/b"]);
        assert_eq!(id.dns, ["svc.local"]);
        assert_eq!(id.principal(), "spiffe://mesh.local/ns/a/sa/b");
        assert_eq!(id.subject, "CN=client");
        assert_eq!(id.hash.len(), 64);
        let xfcc = id.forwarded_client_cert(None);
        assert!(xfcc.starts_with(&format!("Hash={};Subject=\"CN=client\"", id.hash)));
        assert!(xfcc.ends_with(";URI=spiffe://mesh.local/ns/a/sa/b;DNS=svc.local"));

        // Another URI before the SPIFFE id: the SPIFFE id still names the peer.
        let mut params = CertificateParams::new(Vec::new()).expect("params");
        for uri in ["https://example.com/x", "spiffe://mesh.local/ns/a/sa/c"] {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().expect("uri")));
        }
        let id = PeerIdentity::of(params.self_signed(&key).expect("cert").der());
        assert_eq!(
            id.uris,
            ["spiffe://mesh.local/ns/a/sa/c", "https://example.com/x"]
        );
        assert_eq!(id.principal(), "spiffe://mesh.local/ns/a/sa/c");

        // A name with the header's separators is quoted: it cannot add a field.
        let id = PeerIdentity {
            uris: vec!["spiffe://m/a;URI=spiffe://m/admin".into()],
            subject: "CN=a\\\"b".into(),
            ..PeerIdentity::default()
        };
        assert_eq!(
            id.forwarded_client_cert(None),
            "Hash=;Subject=\"CN=a\\\\\\\"b\";URI=\"spiffe://m/a;URI=spiffe://m/admin\""
        );
        // A control character (a CR LF in a subject) is escaped: the header is still sent,
        // and adds no header line of its own.
        let id = PeerIdentity {
            uris: vec!["spiffe://m/a\nx".into()],
            subject: "CN=a\r\nX-Injected: 1\0".into(),
            ..PeerIdentity::default()
        };
        let xfcc = id.forwarded_client_cert(None);
        assert_eq!(
            xfcc,
            "Hash=;Subject=\"CN=a\\x0d\\x0aX-Injected: 1\\x00\";URI=\"spiffe://m/a\\x0ax\""
        );
        // What a header value may hold (RFC 9110 §5.5): visible ASCII, space and tab.
        assert!(xfcc
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b)));
    }
}
