//! Conversions between the state machine's types and the wire types, at the edge only.

use trellis_proto::pb;

use crate::state::{Endpoint, Protocol, Service, ServicePort, State};

/// Wire form of a service.
pub fn service_to_pb(s: &Service) -> pb::Service {
    pb::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        ports: s.ports.iter().map(|p| pb::ServicePort { name: p.name.clone(), port: u32::from(p.port) }).collect(),
        protocol: s.protocol.as_str().to_string(),
        exported: s.exported,
        revision: s.revision,
        vip: s.vip.clone(),
    }
}

/// Domain form of a service sent by an administrator.
pub fn service_from_pb(s: &pb::Service) -> Result<Service, String> {
    let ports = s
        .ports
        .iter()
        .map(|p| {
            u16::try_from(p.port)
                .ok()
                .filter(|p| *p != 0)
                .map(|port| ServicePort { name: p.name.clone(), port })
                .ok_or_else(|| format!("port {} of service {}.{} is not in 1..65535", p.port, s.name, s.namespace))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Service {
        name: s.name.clone(),
        namespace: if s.namespace.is_empty() { "default".into() } else { s.namespace.clone() },
        ports,
        protocol: Protocol::parse(&s.protocol).map_err(|e| e.to_string())?,
        exported: s.exported,
        revision: 0,
        // Given by the state machine; an administrator cannot choose it.
        vip: String::new(),
    })
}

/// Wire form of an endpoint.
pub fn endpoint_to_pb(state: &State, e: &Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        id: e.id.clone(),
        service: e.service.clone(),
        cluster: e.cluster.clone(),
        zone: e.zone.clone(),
        address: e.address.clone(),
        identity: e.identity.clone(),
        healthy: e.healthy,
        weight: e.weight,
        revision: e.revision,
        region: state.clusters.get(&e.cluster).map(|c| c.region.clone()).unwrap_or_default(),
        // A cluster reached directly is dialled directly even if it has gateways.
        gateways: state
            .clusters
            .get(&e.cluster)
            .filter(|c| c.reached_via_gateways())
            .map(|c| c.gateways.values().cloned().collect())
            .unwrap_or_default(),
        via_gateways: state.clusters.get(&e.cluster).is_some_and(|c| c.reached_via_gateways()),
    }
}

/// The trust bundle of the federation.
pub fn bundle_to_pb(state: &State) -> pb::TrustBundle {
    pb::TrustBundle {
        trust_domain: state.trust_domain().unwrap_or_default().to_string(),
        roots_pem: state.roots.iter().map(|r| r.cert_pem.clone()).collect(),
    }
}
