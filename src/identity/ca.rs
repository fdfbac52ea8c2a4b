//! The signing itself, without I/O: an issuer (certificate and key, with the trust anchors it
//! chains to) turns a CSR and an identity that was already proven into a short-lived leaf.
//!
//! What a leaf carries is decided here and nowhere else: exactly one URI SAN, the SPIFFE ID the
//! token review gave, never a name the CSR asked for; `digitalSignature` only; server and client
//! authentication; not a CA; valid from `now - skew` to `now + ttl`; a random serial number.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use tokio_rustls::rustls;
use tokio_rustls::rustls::SignatureScheme;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, UnixTime,
};

/// A CSR is a few hundred bytes (an EC key, a name, a signature). More is not a sidecar's.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

/// A pod's identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl SpiffeId {
    /// The identity of `sa` in `ns`, if the three names are valid ones.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Option<SpiffeId> {
        let ok = check_trust_domain(trust_domain).is_ok()
            && name_ok(namespace)
            && name_ok(service_account);
        ok.then(|| SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`; `None` for anything else.
    pub fn parse(uri: &str) -> Option<SpiffeId> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        SpiffeId::new(td, ns, sa)
    }
}

/// A trust domain as SPIFFE allows it: lowercase letters, digits, `.`, `-` and `_`, at most 255.
pub fn check_trust_domain(td: &str) -> Result<(), String> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "trust domain {td:?}: use 1 to 255 of lowercase letters, digits, '.', '-' and '_'"
        ))
    }
}

/// A namespace or ServiceAccount name (DNS subdomain rules, which the API server enforced).
fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-".contains(&b))
}

/// Why a CSR was not signed. Each is the caller's fault (gRPC INVALID_ARGUMENT) except
/// `Signing`, which is ours.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("the CSR is {0} bytes, more than the {MAX_CSR_BYTES} a CSR needs")]
    TooLarge(usize),
    #[error("the CSR is empty")]
    Empty,
    #[error("the CSR is not a PKCS#10 request meshlet can read ({0})")]
    Unreadable(String),
    #[error("the CSR asks for {asked}, but the token proves {proven}; ask for it or for nothing")]
    OtherIdentity { asked: String, proven: String },
    #[error("cannot sign: {0}")]
    Signing(String),
}

/// Refuses an empty CSR or one larger than [`MAX_CSR_BYTES`] (cheap: the service checks it
/// before it asks the API server about the token).
pub fn check_csr_size(csr_der: &[u8]) -> Result<(), CertifyError> {
    match csr_der.len() {
        0 => Err(CertifyError::Empty),
        n if n > MAX_CSR_BYTES => Err(CertifyError::TooLarge(n)),
        _ => Ok(()),
    }
}

/// A signed leaf and what the sidecar needs with it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub leaf: CertificateDer<'static>,
    /// From the leaf's issuer up to, not including, the trust anchor.
    pub intermediates: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

/// The issuer: its key and certificate, the chain above it and the trust anchors.
pub struct Ca {
    issuer: Issuer<'static, IssuerKey>,
    /// What a leaf is sent with: the issuer's certificate and any intermediates above it,
    /// without the anchors (an issuer that is itself the anchor sends nothing).
    chain: Vec<CertificateDer<'static>>,
    anchors: Vec<CertificateDer<'static>>,
    trust_domain: String,
    ttl: Duration,
    skew: Duration,
}

impl fmt::Debug for Ca {
    // Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("chain", &self.chain.len())
            .field("anchors", &self.anchors.len())
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// The PEM material of an issuer, as the issuer Secret holds it (`tls.crt`, `tls.key`,
/// `ca.crt`).
pub struct IssuerPem<'a> {
    /// The issuer's certificate first, then any intermediates above it.
    pub chain: &'a [u8],
    /// The issuer's private key, PEM: PKCS#8, SEC1 (`EC PRIVATE KEY`, what Helm's
    /// `genPrivateKey "ecdsa"` makes) or PKCS#1 (`RSA PRIVATE KEY`, Helm's `genCA`).
    pub key: &'a [u8],
    /// The trust anchors: one, or two during a rotation.
    pub anchors: &'a [u8],
}

impl Ca {
    /// Loads an issuer and checks it: a CA certificate whose key is `key`, chaining to one of
    /// the anchors (checked by signing a leaf and verifying it as a peer would). An error names
    /// the part that is wrong.
    pub fn new(
        pem: IssuerPem<'_>,
        trust_domain: &str,
        ttl: Duration,
        skew: Duration,
    ) -> Result<Ca, String> {
        check_trust_domain(trust_domain)?;
        let certs = |what: &str, pem: &[u8]| {
            let v = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{what}: not PEM certificates: {e}"))?;
            if v.is_empty() {
                return Err(format!("{what}: no certificate in it"));
            }
            Ok(v)
        };
        let chain = certs("the issuer certificate (tls.crt)", pem.chain)?;
        let anchors = certs("the trust anchors (ca.crt)", pem.anchors)?;
        let key = IssuerKey::new(&chain[0], pem.key)?;
        let issuer = Issuer::from_ca_cert_der(&chain[0], key)
            .map_err(|e| format!("the issuer certificate (tls.crt): {e}"))?;
        let chain = chain.into_iter().filter(|c| !anchors.contains(c)).collect();
        let ca = Ca {
            issuer,
            chain,
            anchors,
            trust_domain: trust_domain.into(),
            ttl,
            skew,
        };
        // A leaf the peers could not verify would be refused at every handshake: find out now.
        let probe = SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: "meshlet-selfcheck".into(),
            service_account: "meshlet-selfcheck".into(),
        };
        let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
        let issued = ca
            .sign(&probe, &key, SystemTime::now())
            .map_err(|e| e.to_string())?;
        ca.verify(&issued, SystemTime::now()).map_err(|e| {
            format!("a leaf signed by the issuer (tls.crt) does not verify against the trust anchors (ca.crt): {e}")
        })?;
        Ok(ca)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The trust anchors (what `ca.crt` held).
    pub fn anchors(&self) -> &[CertificateDer<'static>] {
        &self.anchors
    }

    /// Signs the CSR's key for `id`, which the caller has proven. The CSR must be well formed
    /// and self-signed; it may ask for `id` as a URI SAN or for no name at all.
    pub fn certify(
        &self,
        id: &SpiffeId,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<Issued, CertifyError> {
        check_csr_size(csr_der)?;
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| CertifyError::Unreadable(e.to_string()))?;
        let proven = id.to_string();
        for san in &csr.params.subject_alt_names {
            let asked = match san {
                SanType::URI(u) if u.as_str() == proven => continue,
                SanType::URI(u) => u.as_str().to_string(),
                SanType::DnsName(d) => format!("DNS name {}", d.as_str()),
                SanType::IpAddress(ip) => format!("IP address {ip}"),
                SanType::Rfc822Name(m) => format!("email {}", m.as_str()),
                other => format!("{other:?}"),
            };
            return Err(CertifyError::OtherIdentity { asked, proven });
        }
        self.sign(id, &csr.public_key, now)
    }

    /// The leaf for `id` over `key`, without a CSR (the service's own serving certificate).
    pub fn sign(
        &self,
        id: &SpiffeId,
        key: &impl rcgen::PublicKeyData,
        now: SystemTime,
    ) -> Result<Issued, CertifyError> {
        self.sign_with(id, &[], key, now)
    }

    /// The leaf for `id` with extra DNS names (the service's own serving certificate, which
    /// sidecars reach by its Service's name).
    pub fn sign_with(
        &self,
        id: &SpiffeId,
        dns_names: &[String],
        key: &impl rcgen::PublicKeyData,
        now: SystemTime,
    ) -> Result<Issued, CertifyError> {
        let signing = |e: rcgen::Error| CertifyError::Signing(e.to_string());
        let mut params = CertificateParams::default();
        let mut names = vec![SanType::URI(id.to_string().try_into().map_err(signing)?)];
        for d in dns_names {
            names.push(SanType::DnsName(d.clone().try_into().map_err(signing)?));
        }
        params.subject_alt_names = names;
        // A subject only for people reading the certificate; peers check the URI SAN.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshlet");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial()?);
        let not_before = now.checked_sub(self.skew).unwrap_or(now);
        let not_after = now + self.ttl;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let leaf = params.signed_by(key, &self.issuer).map_err(signing)?;
        Ok(Issued {
            leaf: leaf.der().clone(),
            intermediates: self.chain.clone(),
            not_after,
        })
    }

    /// Verifies `issued` as a peer sidecar would: a client certificate chaining to the anchors.
    pub fn verify(&self, issued: &Issued, now: SystemTime) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        for a in &self.anchors {
            roots
                .add(a.clone())
                .map_err(|e| format!("trust anchor: {e}"))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        verifier
            .verify_client_cert(
                &issued.leaf,
                &issued.intermediates,
                UnixTime::since_unix_epoch(secs),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// 16 random bytes, positive: unique per certificate (RFC 5280), even when a sidecar renews
/// with the same key (rcgen's default serial is a hash of the key).
fn serial() -> Result<SerialNumber, CertifyError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CertifyError::Signing("no randomness for a serial number".into()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The issuer's key as rcgen signs with it: whatever rustls can load (PKCS#8, SEC1, PKCS#1),
/// where rcgen's own `KeyPair` (with ring) takes PKCS#8 only.
struct IssuerKey {
    signer: Arc<dyn rustls::sign::SigningKey>,
    scheme: SignatureScheme,
    algorithm: &'static rcgen::SignatureAlgorithm,
    /// The subject public key (the BIT STRING's bytes), from the issuer certificate.
    public: Vec<u8>,
}

impl IssuerKey {
    fn new(cert: &CertificateDer<'static>, pem: &[u8]) -> Result<IssuerKey, String> {
        use x509_parser::prelude::FromDer;
        let der = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|e| format!("the issuer key (tls.key): not a PEM private key: {e}"))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&der)
            .map_err(|e| format!("the issuer key (tls.key): unsupported: {e}"))?;
        rustls::sign::CertifiedKey::new(vec![cert.clone()], signer.clone())
            .keys_match()
            .map_err(|_| {
                "the issuer key (tls.key) is not the key of the issuer certificate (tls.crt)"
                    .to_string()
            })?;
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert)
            .map_err(|e| format!("the issuer certificate (tls.crt): cannot read it: {e}"))?;
        let spki = &parsed.tbs_certificate.subject_pki;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string());
        let (scheme, algorithm) = match (signer.algorithm(), curve.as_deref()) {
            (rustls::SignatureAlgorithm::ECDSA, Some("1.2.840.10045.3.1.7")) => (
                SignatureScheme::ECDSA_NISTP256_SHA256,
                &rcgen::PKCS_ECDSA_P256_SHA256,
            ),
            (rustls::SignatureAlgorithm::ECDSA, Some("1.3.132.0.34")) => (
                SignatureScheme::ECDSA_NISTP384_SHA384,
                &rcgen::PKCS_ECDSA_P384_SHA384,
            ),
            (rustls::SignatureAlgorithm::RSA, _) => {
                (SignatureScheme::RSA_PKCS1_SHA256, &rcgen::PKCS_RSA_SHA256)
            }
            (rustls::SignatureAlgorithm::ED25519, _) => {
                (SignatureScheme::ED25519, &rcgen::PKCS_ED25519)
            }
            (other, curve) => {
                return Err(format!(
                    "the issuer key (tls.key): {other:?} {} is not supported (use ECDSA P-256 or P-384, RSA or Ed25519)",
                    curve.unwrap_or_default()
                ));
            }
        };
        Ok(IssuerKey {
            signer,
            scheme,
            algorithm,
            public: spki.subject_public_key.data.to_vec(),
        })
    }
}

impl rcgen::PublicKeyData for IssuerKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

impl rcgen::SigningKey for IssuerKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let signer = self
            .signer
            .choose_scheme(&[self.scheme])
            .ok_or(rcgen::Error::RemoteKeyError)?;
        signer.sign(msg).map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::BasicConstraints;

    fn anchor_and_issuer() -> (String, String, String) {
        let root_key = KeyPair::generate().unwrap();
        let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root.distinguished_name.push(DnType::CommonName, "root");
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root_cert = root.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root, root_key);
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.distinguished_name.push(DnType::CommonName, "issuer");
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.signed_by(&key, &root_issuer).unwrap();
        (cert.pem(), key.serialize_pem(), root_cert.pem())
    }

    fn ca() -> Ca {
        let (chain, key, anchors) = anchor_and_issuer();
        let pem = IssuerPem {
            chain: chain.as_bytes(),
            key: key.as_bytes(),
            anchors: anchors.as_bytes(),
        };
        Ca::new(
            pem,
            "cluster.local",
            Duration::from_secs(3600),
            Duration::from_secs(60),
        )
        .unwrap()
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: "cluster.local".into(),
            namespace: "shop".into(),
            service_account: sa.into(),
        }
    }

    fn csr(names: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        for n in names {
            let san = if n.starts_with("spiffe://") {
                SanType::URI((*n).try_into().unwrap())
            } else {
                SanType::DnsName((*n).try_into().unwrap())
            };
            p.subject_alt_names.push(san);
        }
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    fn uris(der: &[u8]) -> Vec<String> {
        use x509_parser::prelude::*;
        let (_, c) = X509Certificate::from_der(der).unwrap();
        let san = c.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|g| match g {
                GeneralName::URI(u) => u.to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn spiffe_ids_print_and_parse() {
        let i = id("cart");
        assert_eq!(i.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(SpiffeId::parse(&i.to_string()), Some(i));
        for bad in [
            "spiffe://cluster.local/ns/shop/sa/cart/x",
            "spiffe://cluster.local/ns/shop",
            "spiffe://Cluster/ns/a/sa/b",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/sa/a/ns/b",
            "spiffe://cluster.local/ns//sa/b",
        ] {
            assert_eq!(SpiffeId::parse(bad), None, "{bad}");
        }
        assert!(check_trust_domain("example.org").is_ok());
        let e = check_trust_domain("Example.org").unwrap_err();
        assert!(e.contains("\"Example.org\""), "{e}");
    }

    #[test]
    fn a_leaf_carries_the_proven_identity_only() {
        let ca = ca();
        let now = SystemTime::now();
        for asked in [&[][..], &["spiffe://cluster.local/ns/shop/sa/cart"][..]] {
            let issued = ca.certify(&id("cart"), &csr(asked), now).unwrap();
            assert_eq!(
                uris(&issued.leaf),
                ["spiffe://cluster.local/ns/shop/sa/cart"]
            );
            ca.verify(&issued, now).unwrap();
            assert_eq!(issued.intermediates.len(), 1);
            assert_eq!(issued.not_after, now + Duration::from_secs(3600));
            // Valid a minute back for clocks behind ours, not after the lifetime.
            ca.verify(&issued, now - Duration::from_secs(59)).unwrap();
            assert!(ca.verify(&issued, now - Duration::from_secs(120)).is_err());
            assert!(ca.verify(&issued, now + Duration::from_secs(3700)).is_err());
        }
        // Two leaves for the same key have different serial numbers.
        let key = KeyPair::generate().unwrap();
        let a = ca.sign(&id("cart"), &key, now).unwrap();
        let b = ca.sign(&id("cart"), &key, now).unwrap();
        let serial = |d: &[u8]| {
            use x509_parser::prelude::*;
            X509Certificate::from_der(d)
                .unwrap()
                .1
                .raw_serial()
                .to_vec()
        };
        assert_ne!(serial(&a.leaf), serial(&b.leaf));
    }

    #[test]
    fn bad_csrs_are_refused_with_the_reason() {
        let ca = ca();
        let now = SystemTime::now();
        let e = ca
            .certify(
                &id("cart"),
                &csr(&["spiffe://cluster.local/ns/shop/sa/admin"]),
                now,
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the CSR asks for spiffe://cluster.local/ns/shop/sa/admin, but the token proves \
             spiffe://cluster.local/ns/shop/sa/cart; ask for it or for nothing"
        );
        let e = ca
            .certify(&id("cart"), &csr(&["evil.example"]), now)
            .unwrap_err();
        assert!(e.to_string().contains("DNS name evil.example"), "{e}");
        assert!(matches!(
            ca.certify(&id("cart"), b"garbage", now),
            Err(CertifyError::Unreadable(_))
        ));
        assert!(matches!(
            ca.certify(&id("cart"), &[], now),
            Err(CertifyError::Empty)
        ));
        assert!(matches!(
            ca.certify(&id("cart"), &vec![0x30; MAX_CSR_BYTES + 1], now),
            Err(CertifyError::TooLarge(_))
        ));
        // A CSR whose signature does not match its key: one bit of the signature flipped.
        let mut tampered = csr(&[]);
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let e = ca.certify(&id("cart"), &tampered, now).unwrap_err();
        assert!(matches!(e, CertifyError::Unreadable(_)), "{e}");
    }

    #[test]
    fn an_issuer_that_does_not_fit_is_named() {
        let (chain, key, anchors) = anchor_and_issuer();
        let (_, other_key, other_anchors) = anchor_and_issuer();
        let load = |chain: &str, key: &str, anchors: &str| {
            Ca::new(
                IssuerPem {
                    chain: chain.as_bytes(),
                    key: key.as_bytes(),
                    anchors: anchors.as_bytes(),
                },
                "cluster.local",
                Duration::from_secs(3600),
                Duration::ZERO,
            )
            .unwrap_err()
        };
        let e = load(&chain, &other_key, &anchors);
        assert!(e.contains("not the key of the issuer certificate"), "{e}");
        let e = load(&chain, &key, &other_anchors);
        assert!(
            e.contains("does not verify against the trust anchors"),
            "{e}"
        );
        let e = load("", &key, &anchors);
        assert!(e.contains("tls.crt") && e.contains("no certificate"), "{e}");
        let e = load(&chain, "nope", &anchors);
        assert!(e.contains("tls.key"), "{e}");
        // Two anchors (a rotation): the issuer chains to one of them.
        let both = format!("{other_anchors}{anchors}");
        Ca::new(
            IssuerPem {
                chain: chain.as_bytes(),
                key: key.as_bytes(),
                anchors: both.as_bytes(),
            },
            "cluster.local",
            Duration::from_secs(3600),
            Duration::ZERO,
        )
        .unwrap();
    }

    #[test]
    fn issuer_keys_as_helm_and_cert_manager_write_them_sign_too() {
        for (cert, key) in [
            (
                include_str!("testdata/ec-sec1.crt"),
                include_str!("testdata/ec-sec1.key"),
            ),
            (
                include_str!("testdata/rsa-pkcs1.crt"),
                include_str!("testdata/rsa-pkcs1.key"),
            ),
        ] {
            // The issuer is the anchor itself (what the chart generates by default).
            let ca = Ca::new(
                IssuerPem {
                    chain: cert.as_bytes(),
                    key: key.as_bytes(),
                    anchors: cert.as_bytes(),
                },
                "cluster.local",
                Duration::from_secs(3600),
                Duration::from_secs(60),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", key.lines().next().unwrap()));
            let now = SystemTime::now();
            let issued = ca.certify(&id("cart"), &csr(&[]), now).unwrap();
            assert!(issued.intermediates.is_empty(), "the anchor is not sent");
            ca.verify(&issued, now).unwrap();
        }
    }
}
