//! Mesh mTLS, the client side: a sidecar calling another presents its workload certificate and
//! accepts the server by its SPIFFE id, not by a host name (workload certificates name
//! workloads, as in Istio and Linkerd, and often carry no DNS name at all).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    RootCertStore, SignatureScheme,
};

use crate::{provider, KeyPair, PeerIdentity, Presents};

/// The trust domain of a SPIFFE id: `mesh.local` of `spiffe://mesh.local/ns/a/sa/b`.
pub fn trust_domain(id: &str) -> Option<&str> {
    let domain = id.strip_prefix("spiffe://")?.split('/').next()?;
    (!domain.is_empty()).then_some(domain)
}

/// A SPIFFE id (SPIFFE-ID spec §2): `spiffe://`, a trust domain of lower-case letters, digits,
/// `.`, `-` and `_`, then a path, if any, of segments of letters, digits, `.`, `-` and `_`,
/// none empty, `.` or `..`.
pub fn spiffe_id_ok(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let (domain, path) = rest
        .split_once('/')
        .map_or((rest, None), |(d, p)| (d, Some(p)));
    let plain = |b: u8| b.is_ascii_digit() || b"._-".contains(&b);
    let domain_ok =
        !domain.is_empty() && domain.bytes().all(|b| b.is_ascii_lowercase() || plain(b));
    let path_ok = path.is_none_or(|path| {
        path.split('/').all(|seg| {
            !matches!(seg, "" | "." | "..")
                && seg.bytes().all(|b| b.is_ascii_alphabetic() || plain(b))
        })
    });
    domain_ok && path_ok
}

/// A mesh peer's SPIFFE id: its certificate must name exactly one (X509-SVID §2), well
/// formed (an id no config could name, `.../sa/other/.`, would slip past a deny of
/// `.../sa/other`), in one of `trust_domains`, as Istio's sidecars require by default (a CA
/// shared with another mesh or cluster vouches for its workloads too). Else why not.
pub fn peer_id<'a>(
    identity: &'a PeerIdentity,
    trust_domains: &[String],
) -> Result<&'a str, String> {
    let id = one_spiffe_id(identity)?;
    match trust_domain(id).is_some_and(|td| trust_domains.iter().any(|t| t == td)) {
        true => Ok(id),
        false => Err(format!(
            "peer identity {id} is not in the trust domains {trust_domains:?}"
        )),
    }
}

/// The one well-formed SPIFFE id a peer's certificate names, or why not.
fn one_spiffe_id(identity: &PeerIdentity) -> Result<&str, String> {
    let ids: Vec<&str> = (identity.uris.iter())
        .filter(|uri| {
            uri.get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://"))
        })
        .map(String::as_str)
        .collect();
    match ids[..] {
        [id] if spiffe_id_ok(id) => Ok(id),
        [id] => Err(format!(
            "peer identity {id:?} is not a well-formed SPIFFE id"
        )),
        [] => Err("the peer's certificate names no SPIFFE id (no spiffe:// URI SAN)".into()),
        _ => Err(format!(
            "the peer's certificate names {} SPIFFE ids ({}); an X.509-SVID names one",
            ids.len(),
            ids.join(", ")
        )),
    }
}

/// A client config that presents `workload` and accepts a server whose certificate chains to
/// `roots` (the trust bundle) and carries one of `identities` as a URI SAN; with no
/// `identities`, any SPIFFE id of `trust_domains` ([`peer_id`]).
pub fn client_config(
    workload: &KeyPair,
    roots: Arc<RootCertStore>,
    identities: &[String],
    trust_domains: &[String],
) -> Result<Arc<ClientConfig>, String> {
    let chain = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| format!("cannot verify servers with this trust bundle: {e}"))?;
    let verifier = Arc::new(MeshServerVerifier {
        chain,
        identities: identities.to_vec(),
        trust_domains: trust_domains.to_vec(),
    });
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(Presents(workload.certified.clone())));
    Ok(Arc::new(config))
}

/// Whether the server's `identity` is one the caller accepts: one of `identities`, or with
/// none, any SPIFFE id of `trust_domains`; else why not.
pub fn accepts(
    identities: &[String],
    trust_domains: &[String],
    identity: &PeerIdentity,
) -> Result<(), String> {
    if identities.is_empty() {
        return peer_id(identity, trust_domains).map(|_| ());
    }
    let id = one_spiffe_id(identity)?;
    match identities.iter().any(|i| i == id) {
        true => Ok(()),
        false => Err(format!(
            "peer identity {id} is not one of the service's identities {identities:?}"
        )),
    }
}

/// Inbound mesh mTLS: requires a client certificate that chains to `roots` (the trust bundle)
/// and names one SPIFFE id of `trust_domains` ([`peer_id`]).
pub fn client_verifier(
    roots: Arc<RootCertStore>,
    trust_domains: Vec<String>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let chain = crate::client_verifier(roots)?;
    Ok(Arc::new(MeshClientVerifier {
        chain,
        trust_domains,
    }))
}

#[derive(Debug)]
struct MeshServerVerifier {
    /// Checks the chain up to the trust bundle, the validity dates and the signatures.
    chain: Arc<WebPkiServerVerifier>,
    identities: Vec<String>,
    trust_domains: Vec<String>,
}

#[derive(Debug)]
struct MeshClientVerifier {
    /// Checks the chain up to the trust bundle, the validity dates and the signatures.
    chain: Arc<dyn ClientCertVerifier>,
    trust_domains: Vec<String>,
}

/// Why a peer's certificate was refused, for the log; the peer gets `certificate_unknown`.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        match peer_id(&PeerIdentity::of(end_entity), &self.trust_domains) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(why) => Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(Refused(why))),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // webpki checks the name only after the chain: a name error means a good chain.
        match self
            .chain
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(_)
            | Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let identity = PeerIdentity::of(end_entity);
        accepts(&self.identities, &self.trust_domains, &identity)
            .map(|()| ServerCertVerified::assertion())
            .map_err(Error::General)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
        KeyPair as RcKey, SanType,
    };

    struct Ca {
        params: CertificateParams,
        key: RcKey,
        roots: Arc<RootCertStore>,
    }

    fn ca(name: &str) -> Ca {
        let key = RcKey::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.clone().self_signed(&key).expect("ca");
        let roots = crate::roots(cert.pem().as_bytes()).expect("roots");
        Ca { params, key, roots }
    }

    /// A workload certificate with the URI SANs in `spiffe` (space-separated).
    fn workload(ca: &Ca, spiffe: Option<&str>) -> CertificateDer<'static> {
        let key = RcKey::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = (spiffe.into_iter().flat_map(|ids| ids.split(' ')))
            .map(|id| SanType::URI(id.try_into().expect("uri")))
            .collect();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = ca.params.clone().self_signed(&ca.key).expect("issuer");
        let cert = params.signed_by(&key, &issuer, &ca.key).expect("cert");
        cert.der().clone()
    }

    fn verify(
        ca: &Ca,
        trusted: &Ca,
        identities: &[&str],
        spiffe: Option<&str>,
    ) -> Result<(), String> {
        let verifier = MeshServerVerifier {
            chain: WebPkiServerVerifier::builder_with_provider(trusted.roots.clone(), provider())
                .build()
                .expect("verifier"),
            identities: identities.iter().map(|s| s.to_string()).collect(),
            trust_domains: vec!["mesh.local".into()],
        };
        let name = ServerName::try_from("reviews").expect("name");
        verifier
            .verify_server_cert(&workload(ca, spiffe), &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_client_names_one_spiffe_id_of_the_trust_domains() {
        let mesh = ca("mesh");
        let verifier =
            client_verifier(mesh.roots.clone(), vec!["mesh.local".into()]).expect("verifier");
        let check = |spiffe: Option<&str>| {
            (verifier.verify_client_cert(&workload(&mesh, spiffe), &[], UnixTime::now()))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            check(Some("spiffe://mesh.local/ns/default/sa/productpage")),
            Ok(())
        );
        let err = check(Some("spiffe://other.mesh/ns/default/sa/productpage")).unwrap_err();
        assert!(err.contains("not in the trust domains"), "{err}");
        let err = check(None).unwrap_err();
        assert!(err.contains("names no SPIFFE id"), "{err}");
        // An id no config could name would slip past a deny of `.../sa/other`.
        for odd in ["sa/other/", "sa/other/.", "sa/x/../other", "sa/oth%65r"] {
            let id = format!("spiffe://mesh.local/ns/default/{odd}");
            let err = check(Some(&id)).unwrap_err();
            assert!(err.contains("not a well-formed SPIFFE id"), "{err}");
        }
    }

    #[test]
    fn a_server_is_accepted_by_its_spiffe_id_under_the_trust_bundle() {
        let (mesh, other) = (ca("mesh"), ca("other"));
        let reviews = "spiffe://mesh.local/ns/default/sa/reviews";
        assert_eq!(verify(&mesh, &mesh, &[reviews], Some(reviews)), Ok(()));
        assert_eq!(verify(&mesh, &mesh, &[], Some(reviews)), Ok(()));
        let err = verify(
            &mesh,
            &mesh,
            &[reviews],
            Some("spiffe://mesh.local/ns/default/sa/evil"),
        )
        .unwrap_err();
        assert!(err.contains("sa/evil is not one of"), "{err}");
        let err = verify(&mesh, &mesh, &[], None).unwrap_err();
        assert!(err.contains("names no SPIFFE id"), "{err}");
        // One id, the X.509-SVID way, also when the service names the identities it takes.
        let two = format!("spiffe://evil.local/x {reviews}");
        for identities in [&[reviews][..], &[]] {
            let err = verify(&mesh, &mesh, identities, Some(&two)).unwrap_err();
            assert!(err.contains("names 2 SPIFFE ids"), "{err}");
        }
        // Without identities, only the trust domain's: the CA may serve other meshes too.
        let foreign = "spiffe://other.mesh/ns/default/sa/reviews";
        let err = verify(&mesh, &mesh, &[], Some(foreign)).unwrap_err();
        assert!(
            err.contains("not in the trust domains [\"mesh.local\"]"),
            "{err}"
        );
        // Named, it is accepted.
        assert_eq!(verify(&mesh, &mesh, &[foreign], Some(foreign)), Ok(()));
        let err = verify(&other, &mesh, &[reviews], Some(reviews)).unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
    }
}
