//! Mesh mTLS, the client side: a sidecar calling another presents its workload certificate and
//! accepts the server by its SPIFFE id, not by a host name (workload certificates name
//! workloads, as in Istio and Linkerd, and often carry no DNS name at all).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
};

use crate::{provider, KeyPair, PeerIdentity, Presents};

/// A client config that presents `workload` and accepts a server whose certificate chains to
/// `roots` (the trust bundle) and carries one of `identities` as a URI SAN; with no
/// `identities`, any `spiffe://` id the bundle vouches for.
pub fn client_config(
    workload: &KeyPair,
    roots: Arc<RootCertStore>,
    identities: &[String],
) -> Result<Arc<ClientConfig>, String> {
    let chain = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| format!("cannot verify servers with this trust bundle: {e}"))?;
    let verifier = Arc::new(MeshServerVerifier {
        chain,
        identities: identities.to_vec(),
    });
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(Presents(workload.certified.clone())));
    Ok(Arc::new(config))
}

/// Whether `identity` is one the caller accepts: listed, or any SPIFFE id when none is.
pub fn accepts(identities: &[String], identity: &PeerIdentity) -> bool {
    identity.uris.iter().any(|uri| match identities.is_empty() {
        true => uri.starts_with("spiffe://"),
        false => identities.contains(uri),
    })
}

#[derive(Debug)]
struct MeshServerVerifier {
    /// Checks the chain up to the trust bundle, the validity dates and the signatures.
    chain: Arc<WebPkiServerVerifier>,
    identities: Vec<String>,
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
        if accepts(&self.identities, &identity) {
            return Ok(ServerCertVerified::assertion());
        }
        let shown = match identity.uris.is_empty() {
            true => "no URI SAN".to_string(),
            false => identity.uris.join(", "),
        };
        Err(Error::General(format!(
            "peer identity {shown} is not one of the service's identities {:?}",
            self.identities
        )))
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

    fn workload(ca: &Ca, spiffe: Option<&str>) -> CertificateDer<'static> {
        let key = RcKey::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = spiffe
            .map(|id| SanType::URI(id.try_into().expect("uri")))
            .into_iter()
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
        };
        let name = ServerName::try_from("reviews").expect("name");
        verifier
            .verify_server_cert(&workload(ca, spiffe), &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
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
        assert!(err.contains("no URI SAN"), "{err}");
        let err = verify(&other, &mesh, &[reviews], Some(reviews)).unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
    }
}
