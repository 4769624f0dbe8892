//! The bridge plugin's config: every field the reference `bridge` accepts, validated before
//! anything is touched.

use cni_proto::Request;
use serde::Deserialize;
use serde_json::Value;

use crate::error::BridgeError;
use crate::firewall::Backend;
use crate::mac::parse_mac;

/// A trunk entry: one VLAN or a range.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trunk {
    /// A single VLAN id (`id`); an entry has either this or `minID`/`maxID`.
    pub id: Option<i64>,
    /// The first VLAN id of a range (`minID`), given together with `maxID`.
    #[serde(rename = "minID")]
    pub min_id: Option<i64>,
    /// The last VLAN id of the range (`maxID`), inclusive.
    #[serde(rename = "maxID")]
    pub max_id: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Raw {
    bridge: Option<String>,
    is_gateway: bool,
    is_default_gateway: bool,
    force_address: bool,
    ip_masq: bool,
    ip_masq_backend: Option<String>,
    mtu: Option<i64>,
    hairpin_mode: bool,
    promisc_mode: bool,
    vlan: Option<i64>,
    vlan_trunk: Vec<Trunk>,
    preserve_default_vlan: bool,
    macspoofchk: bool,
    ipspoofchk: bool,
    enabledad: bool,
    disable_container_interface: bool,
    port_isolation: bool,
}

/// The validated bridge config.
#[derive(Debug, Clone)]
pub struct BridgeConf {
    /// The bridge's interface name (`bridge`, default `cni0`), shared by every pod of the network.
    pub bridge: String,
    /// Put the gateway address on the bridge.
    pub is_gateway: bool,
    /// Add a default route via the gateway in the pod.
    pub is_default_gateway: bool,
    /// Replace a different address on the bridge.
    pub force_address: bool,
    /// Masquerade pod traffic leaving the pod network.
    pub ip_masq: bool,
    /// MTU of bridge and veth.
    pub mtu: Option<u32>,
    /// Hairpin on the bridge port.
    pub hairpin: bool,
    /// Put the bridge in promiscuous mode (`promiscMode`): it then sees frames for any MAC,
    /// which some hairpin setups need.
    pub promisc: bool,
    /// DAD on the pod interface.
    pub enable_dad: bool,
    /// Leave the pod interface down, without addresses.
    pub disable_container_interface: bool,
    /// Mark the pod's bridge port isolated (`portIsolation`): isolated ports cannot reach
    /// each other, only the bridge and non-isolated ports.
    pub port_isolation: bool,
    /// The IPAM plugin type, if any.
    pub ipam_type: Option<String>,
    /// Requested MAC of the pod interface.
    pub mac: Option<[u8; 6]>,
    /// DNS from the config (overrides IPAM's).
    pub dns: Option<cni_proto::Dns>,
    /// Access VLAN of the pod's port (0: none).
    pub vlan: u16,
    /// Tagged VLANs of the pod's port, sorted.
    pub trunk: Vec<u16>,
    /// Keep VLAN 1 on the port when vlan/vlanTrunk are set.
    pub preserve_default_vlan: bool,
    /// Drop frames from the pod whose source MAC is not the pod's.
    pub mac_spoof_check: bool,
    /// Drop packets, ARP and neighbour advertisements from the pod that claim an address
    /// other than the pod's own (`ipspoofchk`, ours: the reference has no such field).
    pub ip_spoof_check: bool,
    /// Where the masquerade rules go.
    pub masq_backend: Backend,
}

impl BridgeConf {
    /// Whether the bridge filters by VLAN.
    pub fn vlan_filtering(&self) -> bool {
        self.vlan != 0 || !self.trunk.is_empty()
    }
}

fn cfg(why: impl Into<String>) -> BridgeError {
    BridgeError::Config(why.into())
}

impl BridgeConf {
    /// Reads and validates `req`'s config.
    pub fn from_request(req: &Request) -> Result<BridgeConf, BridgeError> {
        let raw: Raw = serde_json::from_value(Value::Object(req.conf.rest.clone()))
            .map_err(|e| cfg(format!("invalid bridge config: {e}")))?;
        let bridge = raw.bridge.filter(|b| !b.is_empty()).unwrap_or_else(|| "cni0".into());
        if let Some(why) = cni_proto::env::invalid_ifname(&bridge) {
            return Err(cfg(format!("invalid bridge name {bridge:?}: {why}")));
        }
        if raw.hairpin_mode && raw.promisc_mode {
            return Err(cfg("cannot set hairpin mode and promiscuous mode at the same time"));
        }
        let mtu = match raw.mtu {
            None | Some(0) => None,
            Some(m) if (68..=65535).contains(&m) => Some(m as u32),
            Some(m) => return Err(cfg(format!("invalid mtu {m}: must be between 68 and 65535"))),
        };
        if let Some(v) = raw.vlan {
            if !(0..=4094).contains(&v) {
                return Err(cfg(format!("invalid VLAN ID {v} (must be between 0 and 4094)")));
            }
        }
        let trunk = collect_trunk(&raw.vlan_trunk)?;
        let masq_backend = Backend::choose(raw.ip_masq_backend.as_deref()).ok_or_else(|| {
            cfg(format!(
                "invalid ipMasqBackend {:?}: want \"nftables\" or \"iptables\"",
                raw.ip_masq_backend.as_deref().unwrap_or("")
            ))
        })?;
        let ipam_type = req
            .conf
            .ipam
            .as_ref()
            .and_then(|i| i.get("type"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        if raw.disable_container_interface && ipam_type.is_some() {
            return Err(cfg(
                "cannot use IPAM when the container interface is disabled (disableContainerInterface)",
            ));
        }
        // The check allows the IPAM result's addresses: without IPAM it would silently cut
        // the pod off every IP packet but link-local IPv6.
        if raw.ipspoofchk && ipam_type.is_none() {
            return Err(cfg("ipspoofchk needs ipam: it lets the pod send from its IPAM addresses only"));
        }
        let mac = mac_from(req)?;
        Ok(BridgeConf {
            bridge,
            is_gateway: raw.is_gateway || raw.is_default_gateway,
            is_default_gateway: raw.is_default_gateway,
            force_address: raw.force_address,
            ip_masq: raw.ip_masq,
            mtu,
            hairpin: raw.hairpin_mode,
            promisc: raw.promisc_mode,
            enable_dad: raw.enabledad,
            disable_container_interface: raw.disable_container_interface,
            port_isolation: raw.port_isolation,
            ipam_type,
            mac,
            dns: req.conf.dns.clone().filter(|d| !d.is_empty()),
            vlan: raw.vlan.unwrap_or(0) as u16,
            trunk,
            preserve_default_vlan: raw.preserve_default_vlan,
            mac_spoof_check: raw.macspoofchk,
            ip_spoof_check: raw.ipspoofchk,
            masq_backend,
        })
    }
}

/// The trunk's VLAN ids, sorted and unique, checked as the reference checks them.
fn collect_trunk(items: &[Trunk]) -> Result<Vec<u16>, BridgeError> {
    let ok = |vid: i64, what: &str| -> Result<u16, BridgeError> {
        if (1..=4094).contains(&vid) {
            Ok(vid as u16)
        } else {
            Err(cfg(format!("incorrect trunk {what} parameter {vid} (must be between 1 and 4094)")))
        }
    };
    let mut ids = std::collections::BTreeSet::new();
    for trunk in items {
        match (trunk.min_id, trunk.max_id) {
            (Some(min), Some(max)) => {
                let (min, max) = (ok(min, "minID")?, ok(max, "maxID")?);
                if min > max {
                    return Err(cfg(format!("minID {min} is greater than maxID {max} in trunk parameter")));
                }
                ids.extend(min..=max);
            }
            (None, Some(_)) => {
                return Err(cfg("minID and maxID should be configured simultaneously, minID is missing"))
            }
            (Some(_), None) => {
                return Err(cfg("minID and maxID should be configured simultaneously, maxID is missing"))
            }
            (None, None) => {}
        }
        if let Some(id) = trunk.id {
            ids.insert(ok(id, "id")?);
        }
    }
    Ok(ids.into_iter().collect())
}

/// The pod MAC: runtimeConfig.mac over args.cni.mac over CNI_ARGS MAC.
fn mac_from(req: &Request) -> Result<Option<[u8; 6]>, BridgeError> {
    let candidates = [
        (
            "runtimeConfig.mac",
            req.raw.pointer("/runtimeConfig/mac").and_then(Value::as_str).map(str::to_string),
        ),
        ("args.cni.mac", req.raw.pointer("/args/cni/mac").and_then(Value::as_str).map(str::to_string)),
        ("CNI_ARGS MAC", req.inv.args.get("MAC").map(str::to_string)),
    ];
    for (src, value) in candidates {
        if let Some(text) = value.filter(|text| !text.is_empty()) {
            let mac = parse_mac(&text).ok_or_else(|| cfg(format!("{src}: invalid MAC address {text:?}")))?;
            if mac[0] & 1 == 1 {
                return Err(cfg(format!("{src}: {text} is a multicast MAC address")));
            }
            return Ok(Some(mac));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trunks_collect_like_the_reference() {
        let t = |id: Option<i64>, min: Option<i64>, max: Option<i64>| Trunk { id, min_id: min, max_id: max };
        assert_eq!(
            collect_trunk(&[t(Some(5), None, None), t(None, Some(2), Some(4)), t(Some(3), None, None)])
                .unwrap(),
            [2, 3, 4, 5]
        );
        assert!(collect_trunk(&[t(None, Some(4), Some(2))]).is_err());
        assert!(collect_trunk(&[t(None, Some(4), None)]).is_err());
        assert!(collect_trunk(&[t(Some(0), None, None)]).is_err());
        assert!(collect_trunk(&[t(Some(4095), None, None)]).is_err());
        assert!(collect_trunk(&[]).unwrap().is_empty());
    }
}
