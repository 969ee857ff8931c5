//! The verification rules of `trellis_proto::verify`, one crafted certificate per rule. Each bad
//! certificate is otherwise valid, so a rejection can only come from the rule under test.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::{Duration, OffsetDateTime};
use trellis_proto::verify::{IdMatcher, TrustBundle, Usage, VerifyError};

struct Authority {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn authority(cn: &str) -> Authority {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = OffsetDateTime::now_utc() - Duration::days(1);
    p.not_after = OffsetDateTime::now_utc() + Duration::days(365);
    let cert = p.self_signed(&key).unwrap();
    Authority { cert: cert.der().clone(), issuer: Issuer::new(p, key) }
}

struct Leaf {
    uris: Vec<&'static str>,
    is_ca: bool,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

fn good() -> Leaf {
    Leaf {
        uris: vec!["spiffe://trellis.local/ns/default/sa/web"],
        is_ca: false,
        not_before: OffsetDateTime::now_utc() - Duration::hours(1),
        not_after: OffsetDateTime::now_utc() + Duration::hours(1),
    }
}

fn issue(by: &Authority, leaf: &Leaf) -> CertificateDer<'static> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "leaf");
    p.subject_alt_names = leaf.uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
    p.is_ca = if leaf.is_ca { IsCa::Ca(BasicConstraints::Unconstrained) } else { IsCa::ExplicitNoCa };
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = leaf.not_before;
    p.not_after = leaf.not_after;
    p.signed_by(&key, &by.issuer).unwrap().der().clone()
}

#[test]
fn verifier_rejects_each_bad_certificate_for_the_right_reason() {
    let root = authority("root");
    let stranger = authority("another root");
    let bundle = TrustBundle::new("trellis.local", vec![root.cert.clone()]).unwrap();
    let web = "spiffe://trellis.local/ns/default/sa/web".parse().unwrap();
    let now = UnixTime::now();

    let cases: Vec<(&str, CertificateDer<'static>, IdMatcher, Result<(), VerifyError>)> = vec![
        ("valid workload", issue(&root, &good()), IdMatcher::Exact(web), Ok(())),
        (
            "two URI SANs",
            issue(
                &root,
                &Leaf {
                    uris: vec![
                        "spiffe://trellis.local/ns/default/sa/web",
                        "spiffe://trellis.local/ns/default/sa/admin",
                    ],
                    ..good()
                },
            ),
            IdMatcher::AnyWorkload,
            Err(VerifyError::UriSanCount(2)),
        ),
        (
            "no URI SAN",
            issue(&root, &Leaf { uris: vec![], ..good() }),
            IdMatcher::AnyWorkload,
            Err(VerifyError::UriSanCount(0)),
        ),
        (
            "CA certificate as leaf",
            issue(&root, &Leaf { is_ca: true, ..good() }),
            IdMatcher::AnyWorkload,
            Err(VerifyError::CaAsLeaf),
        ),
        (
            "expired",
            issue(
                &root,
                &Leaf {
                    not_before: OffsetDateTime::now_utc() - Duration::days(2),
                    not_after: OffsetDateTime::now_utc() - Duration::days(1),
                    ..good()
                },
            ),
            IdMatcher::AnyWorkload,
            Err(VerifyError::Expired),
        ),
        (
            "not yet valid",
            issue(
                &root,
                &Leaf {
                    not_before: OffsetDateTime::now_utc() + Duration::days(1),
                    not_after: OffsetDateTime::now_utc() + Duration::days(2),
                    ..good()
                },
            ),
            IdMatcher::AnyWorkload,
            Err(VerifyError::NotYetValid),
        ),
        (
            "another trust domain",
            issue(&root, &Leaf { uris: vec!["spiffe://evil.example/ns/default/sa/web"], ..good() }),
            IdMatcher::AnyWorkload,
            Err(VerifyError::WrongTrustDomain { got: "evil.example".into(), expected: "trellis.local".into() }),
        ),
        (
            "wrong expected identity",
            issue(&root, &good()),
            IdMatcher::Exact("spiffe://trellis.local/ns/default/sa/api".parse().unwrap()),
            Err(VerifyError::UnexpectedIdentity {
                got: "spiffe://trellis.local/ns/default/sa/web".into(),
                expected: "spiffe://trellis.local/ns/default/sa/api".into(),
            }),
        ),
        (
            "workload where a control plane is expected",
            issue(&root, &good()),
            IdMatcher::AnyControlPlane,
            Err(VerifyError::UnexpectedIdentity {
                got: "spiffe://trellis.local/ns/default/sa/web".into(),
                expected: "a control-plane identity".into(),
            }),
        ),
        ("chain to an unknown root", issue(&stranger, &good()), IdMatcher::AnyWorkload, Err(VerifyError::UnknownRoot)),
        (
            "SAN that is not a SPIFFE ID",
            issue(&root, &Leaf { uris: vec!["https://trellis.local/ns/default/sa/web"], ..good() }),
            IdMatcher::AnyWorkload,
            Err(VerifyError::BadSpiffeId(
                "'https://trellis.local/ns/default/sa/web' is not a SPIFFE ID: it must start with spiffe://".into(),
            )),
        ),
    ];
    for (name, cert, matcher, want) in cases {
        for usage in [Usage::Client, Usage::Server] {
            let got = bundle.verify(std::slice::from_ref(&cert), usage, &matcher, now).map(|_| ());
            assert_eq!(got, want, "case '{name}' ({usage:?})");
        }
    }
    assert_eq!(
        bundle.verify(&[], Usage::Client, &IdMatcher::AnyWorkload, now).map(|_| ()),
        Err(VerifyError::NoCertificate)
    );
}

#[test]
fn bundle_with_two_roots_accepts_both_during_rotation() {
    let old = authority("old root");
    let new = authority("new root");
    let bundle = TrustBundle::new("trellis.local", vec![old.cert.clone(), new.cert.clone()]).unwrap();
    for by in [&old, &new] {
        bundle.verify(&[issue(by, &good())], Usage::Client, &IdMatcher::AnyWorkload, UnixTime::now()).unwrap();
    }
    assert!(TrustBundle::new("trellis.local", vec![]).is_err());
}
