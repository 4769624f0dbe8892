//! One result type, read from and printed in the shape of every supported version.

use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::Error;
use crate::version::Version;

/// An interface in a result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    /// The interface's name in its namespace (the host's, or the container's: see `sandbox`).
    pub name: String,
    /// Its hardware address as `aa:bb:cc:dd:ee:ff`; `None` for interfaces without one.
    pub mac: Option<String>,
    /// MTU (printed from 1.1.0).
    pub mtu: Option<u32>,
    /// The namespace path for interfaces inside the container.
    pub sandbox: Option<String>,
    /// vhost-user socket path (printed from 1.1.0).
    pub socket_path: Option<String>,
    /// PCI id (printed from 1.1.0).
    pub pci_id: Option<String>,
}

/// An address in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Address with prefix length, host bits kept (`10.1.2.5/24`).
    pub address: IpNetwork,
    /// The gateway of the address's subnet, which routes without `gw` go through.
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces` (absent in IPAM results).
    pub interface: Option<usize>,
}

/// A route in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The destination network (`0.0.0.0/0` for a default route).
    pub dst: IpNetwork,
    /// Next hop; `None` means the family's gateway, as the main plugin decides.
    pub gw: Option<IpAddr>,
    /// The route's MTU metric, for paths narrower than the link (printed from 1.1.0).
    pub mtu: Option<u32>,
    /// The TCP MSS advertised on this route (printed from 1.1.0).
    pub advmss: Option<u32>,
    /// The route's metric: lower wins among equal prefixes (printed from 1.1.0).
    pub priority: Option<u32>,
    /// The routing table to add it to instead of main (printed from 1.1.0).
    pub table: Option<u32>,
    /// The route scope (`RT_SCOPE_*`, 253 = link) (printed from 1.1.0).
    pub scope: Option<u8>,
}

impl Route {
    /// A route with only a destination and an optional gateway.
    pub fn new(dst: IpNetwork, gw: Option<IpAddr>) -> Route {
        Route { dst, gw, mtu: None, advmss: None, priority: None, table: None, scope: None }
    }

    /// Parses a route object (`{"dst", "gw"?, "mtu"?, ...}`), as in configs and results.
    pub fn from_json(json: &Value) -> Result<Route, String> {
        let dst = json.get("dst").and_then(Value::as_str).ok_or("route without dst")?;
        let dst = IpNetwork::from_str(dst).map_err(|e| format!("route dst {dst:?}: {e}"))?;
        let gw = match json.get("gw") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) if text.is_empty() => None,
            Some(Value::String(text)) => {
                Some(IpAddr::from_str(text).map_err(|e| format!("route gw {text:?}: {e}"))?)
            }
            Some(other) => return Err(format!("route gw {other} is not a string")),
        };
        if let Some(gw) = gw {
            if gw.is_ipv4() != dst.is_ipv4() {
                return Err(format!("route gw {gw} is not of the family of dst {dst}"));
            }
        }
        let num = |key: &str| -> Result<Option<u32>, String> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(number) => number
                    .as_u64()
                    .and_then(|number| u32::try_from(number).ok())
                    .map(Some)
                    .ok_or_else(|| format!("route {key} {number} is not a non-negative integer")),
            }
        };
        let scope = match num("scope")? {
            None => None,
            Some(scope) => Some(u8::try_from(scope).map_err(|_| format!("route scope {scope} is over 255"))?),
        };
        Ok(Route {
            dst,
            gw,
            mtu: num("mtu")?,
            advmss: num("advmss")?,
            priority: num("priority")?,
            table: num("table")?,
            scope,
        })
    }

    fn to_json(&self, version: Version) -> Value {
        let mut object = Map::new();
        object.insert("dst".into(), json!(self.dst.to_string()));
        if let Some(gw) = self.gw {
            object.insert("gw".into(), json!(gw.to_string()));
        }
        if version >= Version(1, 1, 0) {
            for (key, val) in [
                ("mtu", self.mtu),
                ("advmss", self.advmss),
                ("priority", self.priority),
                ("table", self.table),
                ("scope", self.scope.map(u32::from)),
            ] {
                if let Some(number) = val {
                    object.insert(key.into(), json!(number));
                }
            }
        }
        Value::Object(object)
    }
}

/// DNS settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name server addresses, in the order a resolver tries them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// The domain short names belong to (resolv.conf `domain`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_empty()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// A plugin's result, independent of the version it is printed in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    /// The interfaces the plugin made or used; `ips` and routes point into this list.
    pub interfaces: Vec<Interface>,
    /// The addresses assigned, each naming its interface by index.
    pub ips: Vec<IpConfig>,
    /// The routes added in the container.
    pub routes: Vec<Route>,
    /// DNS settings for the runtime to write into the container's resolv.conf; plugins
    /// do not apply them.
    pub dns: Dns,
}

fn decode_err(details: String) -> Error {
    Error::Decode { what: "result", details }
}

fn str_field(object: &Value, key: &str) -> Option<String> {
    object.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string)
}

fn parse_ip(text: &str) -> Result<IpAddr, Error> {
    IpAddr::from_str(text).map_err(|e| decode_err(format!("address {text:?}: {e}")))
}

fn parse_net(text: &str) -> Result<IpNetwork, Error> {
    IpNetwork::from_str(text).map_err(|e| decode_err(format!("address {text:?}: {e}")))
}

impl CniResult {
    /// Reads a result of any supported version; `default_version` is used when the object
    /// carries no `cniVersion` of its own.
    pub fn from_json(json: &Value, default_version: &str) -> Result<CniResult, Error> {
        if !json.is_object() {
            return Err(decode_err(format!("result is not an object: {json}")));
        }
        let ver_str = json.get("cniVersion").and_then(Value::as_str).unwrap_or(default_version);
        let ver = Version::parse(ver_str).unwrap_or(Version::CURRENT);
        let dns = match json.get("dns") {
            None | Some(Value::Null) => Dns::default(),
            Some(dns) => serde_json::from_value(dns.clone()).map_err(|e| decode_err(format!("dns: {e}")))?,
        };
        let mut result = CniResult { dns, ..Default::default() };
        if ver.is_legacy() || json.get("ip4").is_some() || json.get("ip6").is_some() {
            for key in ["ip4", "ip6"] {
                let Some(ipc) = json.get(key).filter(|x| x.is_object()) else {
                    continue;
                };
                let addr = str_field(ipc, "ip").ok_or_else(|| decode_err(format!("{key} without ip")))?;
                let gateway = str_field(ipc, "gateway").map(|gateway| parse_ip(&gateway)).transpose()?;
                result.ips.push(IpConfig { address: parse_net(&addr)?, gateway, interface: None });
                for rt in ipc.get("routes").and_then(Value::as_array).into_iter().flatten() {
                    result.routes.push(Route::from_json(rt).map_err(decode_err)?);
                }
            }
            return Ok(result);
        }
        for iface in json.get("interfaces").and_then(Value::as_array).into_iter().flatten() {
            result.interfaces.push(Interface {
                name: str_field(iface, "name").unwrap_or_default(),
                mac: str_field(iface, "mac"),
                mtu: iface.get("mtu").and_then(Value::as_u64).map(|mtu| mtu as u32),
                sandbox: str_field(iface, "sandbox"),
                socket_path: str_field(iface, "socketPath"),
                pci_id: str_field(iface, "pciID"),
            });
        }
        for ip in json.get("ips").and_then(Value::as_array).into_iter().flatten() {
            let addr =
                str_field(ip, "address").ok_or_else(|| decode_err("ips entry without address".into()))?;
            let gateway = str_field(ip, "gateway").map(|gateway| parse_ip(&gateway)).transpose()?;
            let interface = match ip.get("interface") {
                None | Some(Value::Null) => None,
                Some(number) => Some(
                    number
                        .as_u64()
                        .ok_or_else(|| decode_err(format!("ips interface {number} is not an index")))?
                        as usize,
                ),
            };
            result.ips.push(IpConfig { address: parse_net(&addr)?, gateway, interface });
        }
        for rt in json.get("routes").and_then(Value::as_array).into_iter().flatten() {
            result.routes.push(Route::from_json(rt).map_err(decode_err)?);
        }
        Ok(result)
    }

    /// The result as JSON in the shape of `version`.
    pub fn to_json(&self, version: Version) -> Value {
        let mut object = Map::new();
        object.insert("cniVersion".into(), json!(version.to_string()));
        if version.is_legacy() {
            // 0.1.0/0.2.0 know one address per family, and routes sit beside it.
            for (key, want_v4) in [("ip4", true), ("ip6", false)] {
                let Some(ip) = self.ips.iter().find(|ipc| ipc.address.is_ipv4() == want_v4) else {
                    continue;
                };
                let mut entry = Map::new();
                entry.insert("ip".into(), json!(ip.address.to_string()));
                if let Some(gateway) = ip.gateway {
                    entry.insert("gateway".into(), json!(gateway.to_string()));
                }
                let routes: Vec<Value> = self
                    .routes
                    .iter()
                    .filter(|route| route.dst.is_ipv4() == want_v4)
                    .map(|route| route.to_json(version))
                    .collect();
                if !routes.is_empty() {
                    entry.insert("routes".into(), Value::Array(routes));
                }
                object.insert(key.into(), Value::Object(entry));
            }
            object.insert("dns".into(), serde_json::to_value(&self.dns).expect("dns serializes"));
            return Value::Object(object);
        }
        if !self.interfaces.is_empty() {
            let ifs = self.interfaces.iter().map(|iface| {
                let mut entry = Map::new();
                entry.insert("name".into(), json!(iface.name));
                if let Some(mac) = &iface.mac {
                    entry.insert("mac".into(), json!(mac));
                }
                if version >= Version(1, 1, 0) {
                    if let Some(mtu) = iface.mtu {
                        entry.insert("mtu".into(), json!(mtu));
                    }
                }
                if let Some(text) = &iface.sandbox {
                    entry.insert("sandbox".into(), json!(text));
                }
                if version >= Version(1, 1, 0) {
                    if let Some(text) = &iface.socket_path {
                        entry.insert("socketPath".into(), json!(text));
                    }
                    if let Some(text) = &iface.pci_id {
                        entry.insert("pciID".into(), json!(text));
                    }
                }
                Value::Object(entry)
            });
            object.insert("interfaces".into(), Value::Array(ifs.collect()));
        }
        if !self.ips.is_empty() {
            let ips = self.ips.iter().map(|ip| {
                let mut entry = Map::new();
                if version.has_ip_version_field() {
                    entry.insert("version".into(), json!(if ip.address.is_ipv4() { "4" } else { "6" }));
                }
                if let Some(index) = ip.interface {
                    entry.insert("interface".into(), json!(index));
                }
                entry.insert("address".into(), json!(ip.address.to_string()));
                if let Some(gateway) = ip.gateway {
                    entry.insert("gateway".into(), json!(gateway.to_string()));
                }
                Value::Object(entry)
            });
            object.insert("ips".into(), Value::Array(ips.collect()));
        }
        if !self.routes.is_empty() {
            object.insert(
                "routes".into(),
                Value::Array(self.routes.iter().map(|route| route.to_json(version)).collect()),
            );
        }
        object.insert("dns".into(), serde_json::to_value(&self.dns).expect("dns serializes"));
        Value::Object(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:02".into()),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/p".into()),
                    ..Default::default()
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.1.2.5/24".parse().unwrap(),
                    gateway: Some("10.1.2.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig { address: "fd00::5/64".parse().unwrap(), gateway: None, interface: Some(1) },
            ],
            routes: vec![
                Route {
                    priority: Some(10),
                    table: Some(100),
                    scope: Some(0),
                    mtu: Some(1400),
                    advmss: Some(1360),
                    ..Route::new("0.0.0.0/0".parse().unwrap(), Some("10.1.2.1".parse().unwrap()))
                },
                Route::new("::/0".parse().unwrap(), None),
            ],
            dns: Dns { nameservers: vec!["10.96.0.10".into()], ..Default::default() },
        }
    }

    #[test]
    fn v110_has_route_and_interface_extras_and_no_ip_version() {
        let j = sample().to_json(Version(1, 1, 0));
        assert_eq!(j["cniVersion"], "1.1.0");
        assert_eq!(j["routes"][0]["priority"], 10);
        assert_eq!(j["routes"][0]["table"], 100);
        assert_eq!(j["routes"][0]["scope"], 0);
        assert_eq!(j["routes"][0]["mtu"], 1400);
        assert_eq!(j["routes"][0]["advmss"], 1360);
        assert_eq!(j["interfaces"][1]["mtu"], 1450);
        assert!(j["ips"][0].get("version").is_none());
        assert_eq!(j["ips"][0]["interface"], 1);
        assert_eq!(j["ips"][0]["address"], "10.1.2.5/24");
    }

    #[test]
    fn v100_drops_110_fields() {
        let j = sample().to_json(Version(1, 0, 0));
        assert!(j["routes"][0].get("priority").is_none());
        assert!(j["interfaces"][1].get("mtu").is_none());
        assert!(j["ips"][1].get("version").is_none());
        assert!(j["ips"][1].get("gateway").is_none());
    }

    #[test]
    fn v03x_and_040_carry_ip_version() {
        for v in [Version(0, 3, 0), Version(0, 3, 1), Version(0, 4, 0)] {
            let j = sample().to_json(v);
            assert_eq!(j["ips"][0]["version"], "4");
            assert_eq!(j["ips"][1]["version"], "6");
            assert!(j["routes"][0].get("table").is_none());
            assert_eq!(j["interfaces"][1]["sandbox"], "/run/netns/p");
        }
    }

    #[test]
    fn legacy_shape_has_ip4_ip6_and_routes_by_family() {
        let j = sample().to_json(Version(0, 2, 0));
        assert_eq!(j["ip4"]["ip"], "10.1.2.5/24");
        assert_eq!(j["ip4"]["gateway"], "10.1.2.1");
        assert_eq!(j["ip4"]["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(j["ip6"]["routes"][0]["dst"], "::/0");
        assert!(j.get("interfaces").is_none() && j.get("ips").is_none());
        assert_eq!(j["dns"]["nameservers"][0], "10.96.0.10");
    }

    #[test]
    fn round_trips_through_every_version() {
        let s = sample();
        for v in crate::version::SUPPORTED {
            let back = CniResult::from_json(&s.to_json(v), "1.1.0").unwrap();
            if v.is_legacy() {
                assert_eq!(back.ips.len(), 2);
                assert_eq!(back.routes.len(), 2);
            } else if v >= Version(1, 1, 0) {
                assert_eq!(back, s);
            } else {
                assert_eq!(back.ips, s.ips);
                assert_eq!(back.routes[0].dst, s.routes[0].dst);
                assert_eq!(back.routes[0].priority, None);
            }
        }
    }

    #[test]
    fn empty_dns_is_an_empty_object_and_empty_lists_are_omitted() {
        let j = CniResult::default().to_json(Version(1, 0, 0));
        assert_eq!(j, json!({"cniVersion": "1.0.0", "dns": {}}));
    }

    #[test]
    fn rejects_bad_routes() {
        assert!(Route::from_json(&json!({"dst": "10.0.0.0/8", "gw": "fd00::1"})).is_err());
        assert!(Route::from_json(&json!({"gw": "10.0.0.1"})).is_err());
        assert!(Route::from_json(&json!({"dst": "nope"})).is_err());
        assert!(Route::from_json(&json!({"dst": "10.0.0.0/8", "priority": -1})).is_err());
        assert_eq!(Route::from_json(&json!({"dst": "10.0.0.0/8", "gw": ""})).unwrap().gw, None);
    }
}
