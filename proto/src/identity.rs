//! SPIFFE identities: `spiffe://<trust-domain>/<path>`.
//!
//! Trellis gives paths fixed shapes: workloads are `ns/<ns>/sa/<sa>`, control planes
//! `trellis/cluster/<cluster>/cp/<node>`, gateways `trellis/cluster/<cluster>/gateway` and
//! administrators `trellis/admin/<name>`. The same namespace and service account is the same
//! identity in every cluster.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a usable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("'{0}' is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error("'{0}' has an invalid trust domain: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
    #[error("'{0}' has an invalid path: segments must be non-empty and use [A-Za-z0-9._-]")]
    Path(String),
    #[error("'{0}' is not a valid name: use lowercase letters, digits and '-' (at most 63)")]
    Name(String),
}

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

/// What kind of principal an identity names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal<'a> {
    Workload { namespace: &'a str, service_account: &'a str },
    ControlPlane { cluster: &'a str, node: &'a str },
    Gateway { cluster: &'a str },
    Admin { name: &'a str },
    Other,
}

/// Checks a DNS-label-like name (namespace, service account, cluster, node).
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok { Ok(()) } else { Err(IdentityError::Name(name.to_string())) }
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

fn valid_path(path: &str) -> bool {
    // Path without the leading slash; segments are non-empty, not "." or "..".
    !path.is_empty()
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        })
}

impl SpiffeId {
    /// Builds an ID from a trust domain and a path without leading slash.
    pub fn new(trust_domain: &str, path: &str) -> Result<Self, IdentityError> {
        if !valid_trust_domain(trust_domain) {
            return Err(IdentityError::TrustDomain(trust_domain.to_string()));
        }
        if !valid_path(path) {
            return Err(IdentityError::Path(format!("spiffe://{trust_domain}/{path}")));
        }
        Ok(Self { trust_domain: trust_domain.to_string(), path: path.to_string() })
    }

    /// A workload identity: `ns/<ns>/sa/<sa>`.
    pub fn workload(td: &str, namespace: &str, service_account: &str) -> Result<Self, IdentityError> {
        validate_name(namespace)?;
        validate_name(service_account)?;
        Self::new(td, &format!("ns/{namespace}/sa/{service_account}"))
    }

    /// A control-plane instance identity.
    pub fn control_plane(td: &str, cluster: &str, node: &str) -> Result<Self, IdentityError> {
        validate_name(cluster)?;
        validate_name(node)?;
        Self::new(td, &format!("trellis/cluster/{cluster}/cp/{node}"))
    }

    /// A cluster's gateway identity.
    pub fn gateway(td: &str, cluster: &str) -> Result<Self, IdentityError> {
        validate_name(cluster)?;
        Self::new(td, &format!("trellis/cluster/{cluster}/gateway"))
    }

    /// An administrator identity.
    pub fn admin(td: &str, name: &str) -> Result<Self, IdentityError> {
        validate_name(name)?;
        Self::new(td, &format!("trellis/admin/{name}"))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, without the leading slash.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What this identity names, by the shapes Trellis uses.
    pub fn principal(&self) -> Principal<'_> {
        let segs: Vec<&str> = self.path.split('/').collect();
        match segs.as_slice() {
            ["ns", ns, "sa", sa] => Principal::Workload { namespace: ns, service_account: sa },
            ["trellis", "cluster", c, "cp", n] => Principal::ControlPlane { cluster: c, node: n },
            ["trellis", "cluster", c, "gateway"] => Principal::Gateway { cluster: c },
            ["trellis", "admin", n] => Principal::Admin { name: n },
            _ => Principal::Other,
        }
    }

    /// True for `ns/<ns>/sa/<sa>` identities.
    pub fn is_workload(&self) -> bool {
        matches!(self.principal(), Principal::Workload { .. })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| IdentityError::Scheme(s.to_string()))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| IdentityError::Path(s.to_string()))?;
        if !valid_trust_domain(td) {
            return Err(IdentityError::TrustDomain(s.to_string()));
        }
        if !valid_path(path) {
            return Err(IdentityError::Path(s.to_string()));
        }
        Ok(Self { trust_domain: td.to_string(), path: path.to_string() })
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_classifies() {
        let cases: &[(&str, Option<Principal<'_>>)] = &[
            (
                "spiffe://trellis.local/ns/default/sa/web",
                Some(Principal::Workload { namespace: "default", service_account: "web" }),
            ),
            (
                "spiffe://trellis.local/trellis/cluster/a/cp/cp-1",
                Some(Principal::ControlPlane { cluster: "a", node: "cp-1" }),
            ),
            ("spiffe://trellis.local/trellis/cluster/a/gateway", Some(Principal::Gateway { cluster: "a" })),
            ("spiffe://trellis.local/trellis/admin/root", Some(Principal::Admin { name: "root" })),
            ("spiffe://trellis.local/x/y", Some(Principal::Other)),
            ("http://trellis.local/ns/a/sa/b", None),
            ("spiffe://Trellis.local/ns/a/sa/b", None),
            ("spiffe://trellis.local", None),
            ("spiffe://trellis.local/", None),
            ("spiffe://trellis.local/ns//sa/b", None),
            ("spiffe://trellis.local/ns/../sa/b", None),
            ("spiffe://trellis.local/ns/a?/sa/b", None),
        ];
        for (input, want) in cases {
            let got = input.parse::<SpiffeId>();
            match want {
                Some(p) => {
                    let id = got.unwrap_or_else(|e| panic!("{input}: {e}"));
                    assert_eq!(&id.principal(), p, "{input}");
                    assert_eq!(id.to_string(), *input);
                }
                None => assert!(got.is_err(), "{input} should be rejected"),
            }
        }
    }

    #[test]
    fn builders_validate_names() {
        assert!(SpiffeId::workload("trellis.local", "default", "web").is_ok());
        assert!(SpiffeId::workload("trellis.local", "Default", "web").is_err());
        assert!(SpiffeId::workload("trellis.local", "", "web").is_err());
        assert!(SpiffeId::control_plane("trellis.local", "a", "-x").is_err());
    }
}
