//! The `ipam` section and the runtime's additions (requested IPs, ranges), validated before
//! anything is written.

use std::net::IpAddr;
use std::path::PathBuf;

use cni_proto::{Request, Route, Version};
use serde::Deserialize;
use serde_json::Value;

use crate::error::IpamError;
use crate::range::{canonical, Range, RangeSet};

/// The reference's default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    #[serde(default)]
    subnet: String,
    range_start: Option<String>,
    range_end: Option<String>,
    gateway: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(flatten)]
    legacy: RawRange,
    #[serde(default)]
    ranges: Vec<Vec<RawRange>>,
    #[serde(default)]
    routes: Vec<Value>,
    data_dir: Option<String>,
    resolv_conf: Option<String>,
}

/// The validated IPAM configuration for one call.
#[derive(Debug, Clone)]
pub struct IpamConfig {
    /// The network name (the store's directory).
    pub name: String,
    /// Range sets: one address from each.
    pub ranges: Vec<RangeSet>,
    /// Routes returned as they are.
    pub routes: Vec<Route>,
    /// Where leases live.
    pub data_dir: PathBuf,
    /// resolv.conf to read DNS settings from.
    pub resolv_conf: Option<PathBuf>,
    /// Addresses the runtime asks for.
    pub requested: Vec<IpAddr>,
}

fn cfg_err(why: impl Into<String>) -> IpamError {
    IpamError::Config(why.into())
}

fn to_set(raw: Vec<RawRange>, what: &str) -> Result<RangeSet, IpamError> {
    let ranges = raw
        .into_iter()
        .map(|r| {
            Range::new(&r.subnet, r.range_start.as_deref(), r.range_end.as_deref(), r.gateway.as_deref())
                .map_err(|e| cfg_err(format!("invalid {what}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let set = RangeSet(ranges);
    set.validate().map_err(|e| cfg_err(format!("invalid {what}: {e}")))?;
    Ok(set)
}

/// Parses `10.1.2.3` or `10.1.2.3/24` (the prefix is dropped, as the reference does).
fn parse_requested(text: &str) -> Option<IpAddr> {
    let addr = text.split_once('/').map(|(a, _)| a).unwrap_or(text);
    addr.trim().parse().ok().map(canonical)
}

fn requested_list(value: Option<&Value>, what: &str) -> Result<Vec<IpAddr>, IpamError> {
    let Some(value) = value.filter(|value| !value.is_null()) else {
        return Ok(vec![]);
    };
    let arr = value.as_array().ok_or_else(|| cfg_err(format!("{what} is not a list")))?;
    arr.iter()
        .map(|x| {
            x.as_str()
                .and_then(parse_requested)
                .ok_or_else(|| cfg_err(format!("{what}: cannot understand ip {x}")))
        })
        .collect()
}

impl IpamConfig {
    /// Reads and validates the configuration of `req`.
    pub fn from_request(req: &Request) -> Result<IpamConfig, IpamError> {
        let ipam = req.conf.ipam.clone().ok_or_else(|| cfg_err("IPAM config missing 'ipam' key"))?;
        let raw: RawIpam =
            serde_json::from_value(ipam).map_err(|e| cfg_err(format!("invalid ipam section: {e}")))?;

        let mut requested = Vec::new();
        if let Some(ip) = req.inv.args.get("IP") {
            for part in ip.split(',').filter(|p| !p.is_empty()) {
                requested.push(
                    parse_requested(part)
                        .ok_or_else(|| IpamError::EnvArgs(format!("IP={part} is not an address")))?,
                );
            }
        }
        requested.extend(requested_list(req.raw.pointer("/args/cni/ips"), "args.cni.ips")?);
        requested.extend(requested_list(req.raw.pointer("/runtimeConfig/ips"), "runtimeConfig.ips")?);

        let mut ranges = Vec::new();
        if let Some(value) = req.raw.pointer("/runtimeConfig/ipRanges").filter(|value| !value.is_null()) {
            let sets: Vec<Vec<RawRange>> = serde_json::from_value(value.clone())
                .map_err(|e| cfg_err(format!("invalid runtimeConfig.ipRanges: {e}")))?;
            for (index, set) in sets.into_iter().enumerate() {
                ranges.push(to_set(set, &format!("runtimeConfig.ipRanges set {index}"))?);
            }
        }
        if !raw.legacy.subnet.is_empty() {
            ranges.push(to_set(vec![raw.legacy], "subnet")?);
        }
        for (index, set) in raw.ranges.into_iter().enumerate() {
            ranges.push(to_set(set, &format!("range set {index}"))?);
        }
        if ranges.is_empty() {
            return Err(cfg_err("no IP ranges specified"));
        }
        for (index, first) in ranges.iter().enumerate() {
            for (other, second) in ranges.iter().enumerate().skip(index + 1) {
                if first.overlaps(second) {
                    return Err(cfg_err(format!("range set {index} overlaps with {other}")));
                }
            }
        }
        let v4 = ranges.iter().filter(|set| set.is_ipv4()).count();
        if (v4 > 1 || ranges.len() - v4 > 1) && req.version < Version(0, 3, 0) {
            return Err(IpamError::TooManyForVersion(req.version.to_string()));
        }
        let routes = raw
            .routes
            .iter()
            .map(|r| Route::from_json(r).map_err(|e| cfg_err(format!("invalid route: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let data_dir =
            PathBuf::from(raw.data_dir.filter(|d| !d.is_empty()).unwrap_or_else(|| DEFAULT_DATA_DIR.into()));
        // Relative to the runtime's working directory, which no one chooses on purpose.
        if data_dir.is_relative() {
            return Err(cfg_err(format!("dataDir {:?} must be an absolute path", data_dir.display())));
        }
        Ok(IpamConfig {
            name: req.conf.name.clone(),
            ranges,
            routes,
            data_dir,
            resolv_conf: raw.resolv_conf.filter(|r| !r.is_empty()).map(PathBuf::from),
            requested,
        })
    }
}
