//! What the policy engine knows of the cluster: the few fields of Pods, Namespaces and
//! NetworkPolicies it needs, whatever the source. Sources convert the API's objects with
//! [`Pod::from_api`], [`Namespace::from_api`] and [`Policy::from_api`] as soon as they arrive
//! and keep nothing else, so a big cluster's objects cost little memory.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Namespace as ApiNamespace, Pod as ApiPod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy as ApiPolicy, NetworkPolicyPeer as ApiPeer, NetworkPolicyPort as ApiPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// The label the API server puts on every namespace (and this engine on every namespace a
/// file names only through its pods).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A transport protocol a policy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// Parses the API's spelling; `None` (absent) is TCP.
    pub fn parse(s: Option<&str>) -> Result<Protocol, String> {
        match s {
            None | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => Err(format!("unknown protocol {other:?}")),
        }
    }

    /// nft's name of the protocol.
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// A port a container declares with a name, the target of a named policy port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    /// The port's name.
    pub name: String,
    /// Its protocol.
    pub protocol: Protocol,
    /// Its number.
    pub port: u16,
}

/// A pod, as far as policy goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The node it runs on (empty until scheduled).
    pub node: String,
    /// Shares the node's network: never selected, never a pod peer.
    pub host_network: bool,
    /// Labels.
    pub labels: Labels,
    /// Its addresses (both families on a dual-stack cluster).
    pub ips: Vec<IpAddr>,
    /// Its containers' named ports.
    pub ports: Vec<NamedPort>,
    /// Creation time (RFC 3339 text sorts in time order): when two pods claim one address,
    /// the newer owns it, so a pod that inherits a deleted pod's address never inherits its
    /// allowances.
    pub created: String,
}

impl Pod {
    /// Converts an API object; `None` for a pod that policy cannot concern (finished, or
    /// without a name).
    pub fn from_api(pod: &ApiPod) -> Option<Pod> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        // A finished pod's address goes back to the pool while its object may linger.
        if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
            return None;
        }
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|v| v.iter().filter_map(|p| p.ip.parse().ok()).collect())
            .unwrap_or_default();
        if ips.is_empty() {
            ips.extend(status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse::<IpAddr>().ok()));
        }
        let ports = spec
            .map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
                    .flat_map(|c| c.ports.iter().flatten())
                    .filter_map(|p| {
                        Some(NamedPort {
                            name: p.name.clone()?,
                            protocol: Protocol::parse(p.protocol.as_deref()).ok()?,
                            port: u16::try_from(p.container_port).ok()?,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Pod {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone()?,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            labels: meta.labels.clone().unwrap_or_default(),
            ips,
            ports,
            created: meta.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
        })
    }

    /// The key the engine stores it under.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A namespace: its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Labels, always with [`NAMESPACE_NAME_LABEL`].
    pub labels: Labels,
}

impl Namespace {
    /// Converts an API object.
    pub fn from_api(ns: &ApiNamespace) -> Option<Namespace> {
        let name = ns.metadata.name.clone()?;
        Some(Namespace::new(&name, ns.metadata.labels.clone().unwrap_or_default()))
    }

    /// A namespace with `labels` plus the name label the API server always sets.
    pub fn new(name: &str, mut labels: Labels) -> Namespace {
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.into());
        Namespace { name: name.into(), labels }
    }
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// The label's value is one of these.
    In(String, Vec<String>),
    /// The label is absent or its value is none of these.
    NotIn(String, Vec<String>),
    /// The label is present.
    Exists(String),
    /// The label is absent.
    DoesNotExist(String),
}

/// A label selector: every requirement must hold; the empty selector selects everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(pub Vec<Requirement>);

impl Selector {
    /// Converts the API's selector, refusing unknown operators and malformed value lists.
    pub fn from_api(sel: &LabelSelector) -> Result<Selector, String> {
        let mut reqs: Vec<Requirement> = sel
            .match_labels
            .iter()
            .flatten()
            .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
            .collect();
        for e in sel.match_expressions.iter().flatten() {
            let values = e.values.clone().unwrap_or_default();
            let key = e.key.clone();
            reqs.push(match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!("selector {key} {}: needs values", e.operator))
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!("selector {key} {}: takes no values", e.operator))
                }
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => return Err(format!("selector {key}: unknown operator {other:?}")),
            });
        }
        Ok(Selector(reqs))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

/// Who a rule lets in (ingress) or out to (egress).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Pods chosen by labels. No namespace selector: the policy's own namespace; a pod
    /// selector of `None`: every pod of the chosen namespaces.
    Pods {
        /// Namespaces whose labels match; `None`: the policy's namespace only.
        namespaces: Option<Selector>,
        /// Pods whose labels match; `None`: all of them.
        pods: Option<Selector>,
    },
    /// Addresses: `cidr` less `except`.
    Block {
        /// The block.
        cidr: IpNetwork,
        /// Holes in it.
        except: Vec<IpNetwork>,
    },
}

/// The port part of a policy port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortMatch {
    /// Every port of the protocol.
    Any,
    /// A number or a range (`port`..=`endPort`).
    Range(u16, u16),
    /// A container port name, resolved on the destination pod.
    Named(String),
}

/// One entry of a rule's `ports`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortSpec {
    /// Protocol.
    pub protocol: Protocol,
    /// Ports.
    pub port: PortMatch,
}

/// One ingress or egress rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `None`: every peer (the field was empty or absent).
    pub peers: Option<Vec<Peer>>,
    /// `None`: every port.
    pub ports: Option<Vec<PortSpec>>,
}

/// A NetworkPolicy, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The pods of its namespace it selects.
    pub selector: Selector,
    /// `Some` when it isolates its pods for ingress: the rules that let traffic in.
    pub ingress: Option<Vec<Rule>>,
    /// `Some` when it isolates its pods for egress.
    pub egress: Option<Vec<Rule>>,
}

/// What was wrong with an object and what the engine did about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defect {
    /// `namespace/name` of the object.
    pub object: String,
    /// What is malformed.
    pub message: String,
}

impl Policy {
    /// Converts and validates an API object, applying the API server's defaults. A
    /// malformed part never widens what the policy allows: a malformed rule is left out
    /// (its traffic stays denied), a malformed pod selector makes the policy select every pod
    /// of its namespace with the rules it has (fail closed). Returns what was malformed.
    pub fn from_api(p: &ApiPolicy) -> (Option<Policy>, Vec<Defect>) {
        let namespace = p.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let Some(name) = p.metadata.name.clone() else {
            return (None, vec![Defect { object: namespace, message: "policy without a name".into() }]);
        };
        let object = format!("{namespace}/{name}");
        let mut defects = Vec::new();
        let mut defect = |message: String| defects.push(Defect { object: object.clone(), message });
        let spec = p.spec.clone().unwrap_or_default();
        let selector = match spec.pod_selector.as_ref().map(Selector::from_api).transpose() {
            Ok(sel) => sel.unwrap_or_default(),
            Err(e) => {
                defect(format!("podSelector: {e}; selecting every pod of the namespace"));
                Selector::default()
            }
        };
        let types = match &spec.policy_types {
            Some(t) if !t.is_empty() => t.clone(),
            // The API server's default: ingress always, egress when there are egress rules.
            _ => {
                let mut t = vec!["Ingress".to_string()];
                if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                    t.push("Egress".into());
                }
                t
            }
        };
        for t in &types {
            if t != "Ingress" && t != "Egress" {
                defect(format!("policyTypes: unknown type {t:?}, ignored"));
            }
        }
        let mut rules = |dir: &str, raw: Vec<RawRule>| -> Vec<Rule> {
            let mut out = Vec::new();
            for (i, (peers, ports)) in raw.into_iter().enumerate() {
                match convert_rule(peers, ports) {
                    Ok(rule) => out.push(rule),
                    Err(e) => defect(format!("{dir} rule {i}: {e}; rule left out")),
                }
            }
            out
        };
        let ingress = types.iter().any(|t| t == "Ingress").then(|| {
            let raw =
                spec.ingress.clone().unwrap_or_default().into_iter().map(|r| (r.from, r.ports)).collect();
            rules("ingress", raw)
        });
        let egress = types.iter().any(|t| t == "Egress").then(|| {
            let raw = spec.egress.clone().unwrap_or_default().into_iter().map(|r| (r.to, r.ports)).collect();
            rules("egress", raw)
        });
        (Some(Policy { namespace, name, selector, ingress, egress }), defects)
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A rule as the API has it: its peers and its ports.
type RawRule = (Option<Vec<ApiPeer>>, Option<Vec<ApiPort>>);

fn convert_rule(peers: Option<Vec<ApiPeer>>, ports: Option<Vec<ApiPort>>) -> Result<Rule, String> {
    let peers = match peers {
        Some(v) if !v.is_empty() => Some(v.iter().map(convert_peer).collect::<Result<Vec<_>, _>>()?),
        _ => None,
    };
    let ports = match ports {
        Some(v) if !v.is_empty() => Some(v.iter().map(convert_port).collect::<Result<Vec<_>, _>>()?),
        _ => None,
    };
    Ok(Rule { peers, ports })
}

fn convert_peer(p: &ApiPeer) -> Result<Peer, String> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(block), None, None) => {
            let cidr = parse_cidr(&block.cidr)?;
            let except =
                block.except.iter().flatten().map(|c| parse_cidr(c)).collect::<Result<Vec<_>, _>>()?;
            for e in &except {
                if e.is_ipv4() != cidr.is_ipv4() || !cidr.contains(e.network()) || e.prefix() < cidr.prefix()
                {
                    return Err(format!("ipBlock {}: except {e} is not inside it", block.cidr));
                }
            }
            Ok(Peer::Block { cidr, except })
        }
        (Some(_), _, _) => Err("ipBlock together with a selector".into()),
        (None, None, None) => Err("peer with neither selectors nor ipBlock".into()),
        (None, ns, pods) => Ok(Peer::Pods {
            namespaces: ns.as_ref().map(Selector::from_api).transpose()?,
            pods: pods.as_ref().map(Selector::from_api).transpose()?,
        }),
    }
}

fn parse_cidr(text: &str) -> Result<IpNetwork, String> {
    let net: IpNetwork = text.parse().map_err(|e| format!("CIDR {text:?}: {e}"))?;
    if !text.contains('/') {
        return Err(format!("CIDR {text:?}: no prefix length"));
    }
    IpNetwork::new(net.network(), net.prefix()).map_err(|e| format!("CIDR {text:?}: {e}"))
}

fn convert_port(p: &ApiPort) -> Result<PortSpec, String> {
    let protocol = Protocol::parse(p.protocol.as_deref())?;
    let number = |n: i32| u16::try_from(n).ok().filter(|n| *n > 0).ok_or(format!("port {n} out of range"));
    let port = match (&p.port, p.end_port) {
        (None, None) => PortMatch::Any,
        (None, Some(_)) => return Err("endPort without port".into()),
        (Some(IntOrString::Int(n)), end) => {
            let start = number(*n)?;
            let end = end.map(number).transpose()?.unwrap_or(start);
            if end < start {
                return Err(format!("endPort {end} below port {start}"));
            }
            PortMatch::Range(start, end)
        }
        (Some(IntOrString::String(name)), None) => match name.parse::<i32>() {
            // The API accepts "80" as a string; it means the number.
            Ok(n) => {
                let n = number(n)?;
                PortMatch::Range(n, n)
            }
            Err(_) if !name.is_empty() => PortMatch::Named(name.clone()),
            Err(_) => return Err("empty port name".into()),
        },
        (Some(IntOrString::String(_)), Some(_)) => return Err("endPort with a named port".into()),
    };
    Ok(PortSpec { protocol, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn policy(yaml: &str) -> (Option<Policy>, Vec<Defect>) {
        let api: ApiPolicy = serde_yaml::from_str(yaml).unwrap();
        Policy::from_api(&api)
    }

    #[test]
    fn selectors_follow_the_api_reference() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let sel = |reqs: Vec<Requirement>| Selector(reqs).matches(&l);
        assert!(sel(vec![]));
        assert!(sel(vec![Requirement::In("app".into(), vec!["db".into(), "web".into()])]));
        assert!(!sel(vec![Requirement::In("env".into(), vec!["x".into()])]));
        assert!(sel(vec![Requirement::NotIn("env".into(), vec!["x".into()])]), "absent is NotIn");
        assert!(!sel(vec![Requirement::NotIn("app".into(), vec!["web".into()])]));
        assert!(sel(vec![Requirement::Exists("tier".into())]));
        assert!(!sel(vec![Requirement::DoesNotExist("tier".into())]));
    }

    #[test]
    fn policy_types_default_as_the_api_server_does() {
        let (p, d) = policy("metadata: {name: p, namespace: x}\nspec: {podSelector: {}}");
        let p = p.unwrap();
        assert!(d.is_empty());
        assert_eq!(p.ingress, Some(vec![]), "no rules: deny all ingress");
        assert_eq!(p.egress, None);
        let (p, _) = policy("metadata: {name: p, namespace: x}\nspec: {podSelector: {}, egress: [{}]}");
        let p = p.unwrap();
        assert_eq!(p.egress, Some(vec![Rule { peers: None, ports: None }]));
        assert!(p.ingress.is_some());
    }

    #[test]
    fn malformed_parts_never_widen_the_policy() {
        let (p, d) = policy(
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchExpressions: [{key: a, operator: Maybe}]}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/33}}]\n  - ports: [{protocol: ICMP, port: 1}]\n  - from: [{podSelector: {}}]\n",
        );
        let p = p.unwrap();
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!(p.selector, Selector::default(), "a bad selector selects every pod: fail closed");
        assert_eq!(p.ingress.as_ref().map(Vec::len), Some(1), "only the well-formed rule remains");
    }

    #[test]
    fn ports_numbers_ranges_and_names() {
        let (p, d) = policy(
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 80}, {port: 81, endPort: 90, protocol: UDP}, {port: serve-80, protocol: SCTP}, {port: \"82\"}, {protocol: UDP}]\n",
        );
        assert!(d.is_empty(), "{d:?}");
        let ports = p.unwrap().ingress.unwrap()[0].ports.clone().unwrap();
        assert_eq!(
            ports,
            vec![
                PortSpec { protocol: Protocol::Tcp, port: PortMatch::Range(80, 80) },
                PortSpec { protocol: Protocol::Udp, port: PortMatch::Range(81, 90) },
                PortSpec { protocol: Protocol::Sctp, port: PortMatch::Named("serve-80".into()) },
                PortSpec { protocol: Protocol::Tcp, port: PortMatch::Range(82, 82) },
                PortSpec { protocol: Protocol::Udp, port: PortMatch::Any },
            ]
        );
    }
}
