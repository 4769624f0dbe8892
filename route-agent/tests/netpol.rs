//! NetworkPolicy conformance, anchored on Kubernetes' e2e suite
//! (test/e2e/network/netpol/network_policy.go): every case that applies to a CNI, run over
//! one simulated dual-stack cluster of two nodes with the route agents enforcing what a
//! manifest directory says, each probed over IPv4 and IPv6; and the cases the engine's own
//! design asks for (address reuse, agent restart, malformed policies, node-to-pod, established
//! connections, same-node filtering). docs/network-policy.md lists the upstream cases left out.
//!
//! `NETPOL_CASES=3,17,30 cargo test -p cni-route-agent --test netpol` runs only those upstream
//! cases.

use std::panic::AssertUnwindSafe;
use std::sync::Mutex;

use cni_conformance::require_root;

mod common;
mod netpol_fixture;

use netpol_fixture::{policy, Fixture, Proto, Reach};

/// The tests of this file build clusters; one at a time keeps a shared 2-core machine from
/// starving probes into false timeouts.
static SERIAL: Mutex<()> = Mutex::new(());

type Body = fn(&mut Fixture, &[&str]);

/// One upstream case: its number in the catalogue, its name, its pods, what it does.
struct Case {
    num: u32,
    name: &'static str,
    pods: &'static [&'static str],
    run: Body,
}

const TCP: Proto = Proto::Tcp;
const UDP: Proto = Proto::Udp;

/// Sets the policies, writes the manifests and waits until both agents synced them.
fn set(f: &mut Fixture, policies: Vec<String>) {
    f.policies = policies;
    f.apply();
}

fn all(p: &[&str]) -> Reach {
    Reach::new(p, true)
}

const DENY_INGRESS: &str = "{podSelector: {}, policyTypes: [Ingress], ingress: []}";
const NS_Y_LABEL: &str = "{kubernetes.io/metadata.name: y}";

/// The /4 holding `ip` (upstream's makeLargeCIDRForIP).
fn large_cidr(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(a) => format!("{}/4", std::net::Ipv4Addr::from(u32::from(a) & 0xf000_0000)),
        std::net::IpAddr::V6(a) => format!("{}/4", std::net::Ipv6Addr::from(u128::from(a) & (0xf << 124))),
    }
}

fn host(ip: std::net::IpAddr) -> String {
    format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })
}

/// ipBlocks for both families: upstream names only the primary pod IP; on a dual-stack
/// cluster the same intent needs one block per family (the IPv6-only variant is an extra).
fn blocks_except(f: &Fixture, pod: &str) -> String {
    let (a, b) = (f.ip(pod, false), f.ip(pod, true));
    format!(
        "[{{ipBlock: {{cidr: '{}', except: ['{}']}}}}, {{ipBlock: {{cidr: '{}', except: ['{}']}}}}]",
        large_cidr(a),
        host(a),
        large_cidr(b),
        host(b)
    )
}

fn blocks_host(f: &Fixture, pod: &str) -> String {
    format!(
        "[{{ipBlock: {{cidr: '{}'}}}}, {{ipBlock: {{cidr: '{}'}}}}]",
        host(f.ip(pod, false)),
        host(f.ip(pod, true))
    )
}

const CASES: &[Case] = &[
    Case {
        num: 1,
        name: "should support a 'default-deny-ingress' policy",
        pods: &["x/a", "x/b", "y/a", "y/b"],
        run: |f, p| {
            set(f, vec![policy("x", "deny-ingress", DENY_INGRESS)]);
            f.expect("1", p, TCP, 80, &all(p).peer("", "x", false));
        },
    },
    Case {
        num: 2,
        name: "should support a 'default-deny-all' policy",
        pods: &["x/a", "x/b", "y/a"],
        run: |f, p| {
            set(
                f,
                vec![policy(
                    "x",
                    "deny-all",
                    "{podSelector: {}, policyTypes: [Ingress, Egress], ingress: [], egress: []}",
                )],
            );
            f.expect("2", p, TCP, 80, &all(p).peer("", "x", false).peer("x", "", false));
        },
    },
    Case {
        num: 3,
        name: "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
        pods: &["x/a", "x/b", "x/c", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "x-a-allows-x-b", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}")]);
            f.expect("3", p, TCP, 80, &all(p).all_ingress("x/a", false).expect("x/b", "x/a", true));
        },
    },
    Case {
        num: 4,
        name: "should enforce policy to allow ingress traffic for a target",
        pods: &["x/a", "x/b", "y/a"],
        run: |f, p| {
            set(
                f,
                vec![
                    policy("x", "deny-all", DENY_INGRESS),
                    policy("x", "allow-all-to-a", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {}, namespaceSelector: {}}]}]}"),
                ],
            );
            f.expect("4", p, TCP, 80, &all(p).all_ingress("x/a", true).all_ingress("x/b", false));
        },
    },
    Case {
        num: 5,
        name: "should enforce policy to allow ingress traffic from pods in all namespaces",
        pods: &["x/a", "x/b", "y/a", "z/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-from-another-ns", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchLabels: {}}}]}]}")]);
            f.expect("5", p, TCP, 80, &all(p));
        },
    },
    Case {
        num: 6,
        name: "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
        pods: &["x/a", "x/b", "y/a", "z/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-client-a-via-ns-selector", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Ingress], ingress: [{{from: [{{namespaceSelector: {{matchLabels: {NS_Y_LABEL}}}}}]}}]}}"))]);
            f.expect("6", p, TCP, 80, &all(p).peer("x", "x/a", false).peer("z", "x/a", false));
        },
    },
    Case {
        num: 7,
        name: "should enforce policy based on PodSelector with MatchExpressions",
        pods: &["x/a", "x/b", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "x-a-allows-x-b", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: In, values: [b]}]}}]}]}")]);
            f.expect("7", p, TCP, 80, &all(p).all_ingress("x/a", false).expect("x/b", "x/a", true));
        },
    },
    Case {
        num: 8,
        name: "should enforce policy based on NamespaceSelector with MatchExpressions",
        pods: &["x/a", "x/b", "y/a", "z/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-ns-y-match-selector", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [y]}]}}]}]}")]);
            f.expect("8", p, TCP, 80, &all(p).peer("x", "x/a", false).peer("z", "x/a", false));
        },
    },
    Case {
        num: 9,
        name: "should enforce policy based on PodSelector or NamespaceSelector",
        pods: &["x/a", "x/b", "x/c", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-ns-y-match-selector", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]}}, {podSelector: {matchLabels: {pod: b}}}]}]}")]);
            f.expect("9", p, TCP, 80, &all(p).expect("x/a", "x/a", false).expect("x/c", "x/a", false));
        },
    },
    Case {
        num: 10,
        name: "should enforce policy based on PodSelector and NamespaceSelector",
        pods: &["x/a", "x/b", "y/a", "y/b", "z/b"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-ns-y-podselector-and-nsselector", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]}, podSelector: {matchLabels: {pod: b}}}]}]}")]);
            f.expect(
                "10",
                p,
                TCP,
                80,
                &all(p).all_ingress("x/a", false).expect("y/b", "x/a", true).expect("z/b", "x/a", true),
            );
        },
    },
    Case {
        num: 11,
        name: "should enforce policy based on Multiple PodSelectors and NamespaceSelectors",
        pods: &["x/a", "x/b", "y/a", "y/b", "y/c"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-ns-y-z-pod-b-c", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]}, podSelector: {matchExpressions: [{key: pod, operator: In, values: [b, c]}]}}]}]}")]);
            f.expect("11", p, TCP, 80, &all(p).peer("x", "x/a", false).expect("y/a", "x/a", false));
        },
    },
    Case {
        num: 12,
        name: "should enforce policy based on any PodSelectors",
        pods: &["x/a", "x/b", "x/c"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-ns-x-pod-b-c", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}, {podSelector: {matchLabels: {pod: c}}}]}]}")]);
            f.expect(
                "12",
                p,
                TCP,
                80,
                &all(p).all_ingress("x/a", false).expect("x/b", "x/a", true).expect("x/c", "x/a", true),
            );
        },
    },
    Case {
        num: 13,
        name: "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector",
        pods: &["x/a", "x/b", "y/a", "y/b", "z/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-ns-y-pod-a-via-namespace-pod-selector", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Ingress], ingress: [{{from: [{{namespaceSelector: {{matchLabels: {NS_Y_LABEL}}}, podSelector: {{matchLabels: {{pod: a}}}}}}]}}]}}"))]);
            f.expect("13", p, TCP, 80, &all(p).all_ingress("x/a", false).expect("y/a", "x/a", true));
        },
    },
    Case {
        num: 14,
        name: "should enforce policy based on Ports",
        pods: &["x/a", "x/b", "y/a", "y/b", "z/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-client-a-via-ns-selector", &allow_y_on_port(81))]);
            f.expect("14", p, TCP, 81, &allow_y(p));
        },
    },
    Case {
        num: 15,
        name: "should enforce multiple, stacked policies with overlapping podSelectors",
        pods: &["x/a", "x/b", "y/a", "y/b", "z/a"],
        run: |f, p| {
            let first = policy("x", "allow-client-a-via-ns-selector", &allow_y_on_port(81));
            set(f, vec![first.clone()]);
            f.expect("15 first policy", p, TCP, 81, &allow_y(p));
            f.expect("15 first policy", p, TCP, 80, &all(p).all_ingress("x/a", false));
            set(f, vec![first, policy("x", "allow-client-a-via-ns-selector-80", &allow_y_on_port(80))]);
            f.expect("15 both policies", p, TCP, 80, &allow_y(p));
        },
    },
    Case {
        num: 16,
        name: "should support allow-all policy",
        pods: &["x/a", "x/b", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-all", "{podSelector: {matchLabels: {}}, policyTypes: [Ingress], ingress: [{}]}")]);
            f.expect("16", p, TCP, 80, &all(p));
            f.expect("16", p, TCP, 81, &all(p));
        },
    },
    Case {
        num: 17,
        name: "should allow ingress access on one named port",
        pods: &["x/a", "x/b", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-all", "{podSelector: {matchLabels: {}}, policyTypes: [Ingress], ingress: [{ports: [{port: serve-81-tcp}]}]}")]);
            f.expect("17", p, TCP, 81, &all(p));
            f.expect("17", p, TCP, 80, &all(p).peer("", "x", false));
        },
    },
    Case {
        num: 18,
        name: "should allow ingress access from namespace on one named port",
        pods: &["x/a", "x/b", "y/a", "z/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-client-a-via-ns-selector-80", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Ingress], ingress: [{{from: [{{namespaceSelector: {{matchLabels: {NS_Y_LABEL}}}}}], ports: [{{protocol: TCP, port: serve-80-tcp}}]}}]}}"))]);
            f.expect("18", p, TCP, 80, &all(p).peer("x", "x/a", false).peer("z", "x/a", false));
            f.expect("18", p, TCP, 81, &all(p).all_ingress("x/a", false));
        },
    },
    Case {
        num: 19,
        name: "should allow egress access on one named port",
        pods: &["x/a", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-egress", "{podSelector: {matchLabels: {}}, policyTypes: [Egress], egress: [{ports: [{port: serve-80-tcp}]}]}")]);
            f.expect("19", p, TCP, 80, &all(p));
            f.expect("19", p, TCP, 81, &all(p).peer("x", "", false));
        },
    },
    Case {
        num: 20,
        name: "should enforce updated policy",
        pods: &["x/a", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-all-mutate-to-deny-all", "{podSelector: {matchLabels: {}}, policyTypes: [Ingress], ingress: [{}]}")]);
            f.expect("20 allow-all", p, TCP, 81, &all(p));
            set(f, vec![policy("x", "allow-all-mutate-to-deny-all", "{podSelector: {matchLabels: {}}, policyTypes: [Ingress], ingress: []}")]);
            f.expect("20 updated to deny-all", p, TCP, 81, &all(p).peer("", "x", false));
        },
    },
    Case {
        num: 21,
        name: "should allow ingress access from updated namespace",
        pods: &["x/a", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-client-a-via-ns-selector", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchLabels: {ns2: updated}}}]}]}")]);
            f.expect("21 before the label", p, TCP, 80, &all(p).all_ingress("x/a", false));
            f.set_ns_label("y", "ns2", "updated");
            f.apply();
            f.expect("21 namespace y labelled", p, TCP, 80, &all(p).all_ingress("x/a", false).peer("y", "", true));
        },
    },
    Case {
        num: 22,
        name: "should allow ingress access from updated pod",
        pods: &["x/a", "x/b"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-client-a-via-pod-selector", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {pod: b, pod2: updated}}}]}]}")]);
            f.expect("22 before the label", p, TCP, 80, &all(p).all_ingress("x/a", false));
            f.set_pod_label("x/b", "pod2", "updated");
            f.apply();
            f.expect("22 pod x/b labelled", p, TCP, 80, &all(p).all_ingress("x/a", false).expect("x/b", "x/a", true));
        },
    },
    Case {
        num: 23,
        name: "should deny ingress from pods on other namespaces",
        pods: &["x/a", "x/b", "y/a", "z/a"],
        run: |f, p| {
            set(f, vec![policy("x", "deny-empty-policy", "{podSelector: {}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {}}}]}]}")]);
            f.expect("23", p, TCP, 80, &all(p).peer("y", "x", false).peer("z", "x", false));
        },
    },
    Case {
        num: 24,
        name: "should deny ingress access to updated pod",
        pods: &["x/a", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "deny-ingress-via-label-selector", "{podSelector: {matchLabels: {target: isolated}}, policyTypes: [Ingress], ingress: []}")]);
            f.expect("24 selects nothing yet", p, TCP, 80, &all(p));
            f.set_pod_label("x/a", "target", "isolated");
            f.apply();
            f.expect("24 x/a labelled", p, TCP, 80, &all(p).all_ingress("x/a", false));
        },
    },
    Case {
        num: 25,
        name: "should deny egress from pods based on PodSelector",
        pods: &["x/a", "x/b", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "deny-egress-pod-a", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: []}")]);
            f.expect("25", p, TCP, 80, &all(p).all_egress("x/a", false));
        },
    },
    Case {
        num: 26,
        name: "should deny egress from all pods in a namespace",
        pods: &["x/a", "x/b", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "deny-egress-ns-x", "{podSelector: {}, policyTypes: [Egress], egress: []}")]);
            f.expect("26", p, TCP, 80, &all(p).peer("x", "", false));
        },
    },
    Case {
        num: 27,
        name: "should work with Ingress, Egress specified together",
        pods: &["x/a", "x/b", "x/c", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-client-a-via-pod-selector", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress, Ingress], ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}], egress: [{ports: [{port: 80}]}]}")]);
            f.expect("27", p, TCP, 80, &all(p).all_ingress("x/a", false).expect("x/b", "x/a", true));
            f.expect(
                "27",
                p,
                TCP,
                81,
                &all(p).all_ingress("x/a", false).all_egress("x/a", false).expect("x/b", "x/a", true),
            );
        },
    },
    Case {
        num: 28,
        name: "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
        pods: &["x/a", "y/a", "y/b"],
        run: |f, p| {
            let from_xa = "{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}, podSelector: {matchLabels: {pod: a}}}";
            set(
                f,
                vec![
                    policy("x", "allow-to-ns-y-pod-a", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: [{{namespaceSelector: {{matchLabels: {NS_Y_LABEL}}}, podSelector: {{matchLabels: {{pod: a}}}}}}]}}]}}")),
                    policy("y", "allow-from-xa-on-ya-match-selector", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Ingress], ingress: [{{from: [{from_xa}]}}]}}")),
                    policy("y", "allow-from-xa-on-yb-match-selector", &format!("{{podSelector: {{matchLabels: {{pod: b}}}}, policyTypes: [Ingress], ingress: [{{from: [{from_xa}]}}]}}")),
                ],
            );
            f.expect(
                "28",
                p,
                TCP,
                80,
                &all(p).peer("x/a", "", false).peer("", "y/a", false).peer("x/a", "y/a", true).peer("", "y/b", false),
            );
        },
    },
    Case {
        num: 29,
        name: "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector",
        pods: &["x/a", "y/a", "y/b"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-to-ns-y-pod-a", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: [{{namespaceSelector: {{matchLabels: {NS_Y_LABEL}}}, podSelector: {{matchLabels: {{pod: a}}}}}}]}}]}}"))]);
            f.expect("29", p, TCP, 80, &all(p).all_egress("x/a", false).expect("x/a", "y/a", true));
        },
    },
    Case {
        num: 30,
        name: "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
        pods: &["x/a", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-ingress-by-proto", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{ports: [{protocol: TCP}]}]}")]);
            f.expect("30", p, TCP, 80, &all(p));
            f.expect("30", p, UDP, 80, &all(p).peer("", "x/a", false));
        },
    },
    Case {
        num: 31,
        name: "should enforce multiple ingress policies with ingress allow-all policy taking precedence",
        pods: &["x/a", "y/a"],
        run: |f, p| {
            let first = policy("x", "allow-ingress-port-80", "{podSelector: {matchLabels: {}}, policyTypes: [Ingress], ingress: [{ports: [{port: 80}]}]}");
            set(f, vec![first.clone()]);
            f.expect("31 port 80 only", p, TCP, 81, &all(p).peer("", "x", false));
            set(f, vec![first, policy("x", "allow-ingress", "{podSelector: {matchLabels: {}}, policyTypes: [Ingress], ingress: [{}]}")]);
            f.expect("31 plus allow-all", p, TCP, 81, &all(p));
        },
    },
    Case {
        num: 32,
        name: "should enforce multiple egress policies with egress allow-all policy taking precedence",
        pods: &["x/a", "y/a"],
        run: |f, p| {
            let first = policy("x", "allow-egress-port-80", "{podSelector: {matchLabels: {}}, policyTypes: [Egress], egress: [{ports: [{port: 80}]}]}");
            set(f, vec![first.clone()]);
            f.expect("32 port 80 only", p, TCP, 81, &all(p).peer("x", "", false));
            set(f, vec![first, policy("x", "allow-egress", "{podSelector: {matchLabels: {}}, policyTypes: [Egress], egress: [{}]}")]);
            f.expect("32 plus allow-all", p, TCP, 81, &all(p));
        },
    },
    Case {
        num: 33,
        name: "should stop enforcing policies after they are deleted",
        pods: &["x/a", "y/a"],
        run: |f, p| {
            set(
                f,
                vec![policy(
                    "x",
                    "deny-all",
                    "{podSelector: {}, policyTypes: [Ingress, Egress], ingress: [], egress: []}",
                )],
            );
            f.expect("33 deny-all", p, TCP, 80, &all(p).peer("x", "", false).peer("", "x", false));
            set(f, vec![]);
            f.expect("33 deleted", p, TCP, 80, &all(p));
        },
    },
    Case {
        num: 34,
        name: "should allow egress access to server in CIDR block",
        pods: &["x/a", "y/a", "y/b"],
        run: |f, p| {
            let spec = format!(
                "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: {}}}]}}",
                blocks_host(f, "y/b")
            );
            set(f, vec![policy("x", "allow-client-a-via-cidr-egress-rule", &spec)]);
            f.expect("34", p, TCP, 80, &all(p).all_egress("x/a", false).expect("x/a", "y/b", true));
        },
    },
    Case {
        num: 35,
        name: "should enforce except clause while egress access to server in CIDR block",
        pods: &["x/a", "x/b", "x/c"],
        run: |f, p| {
            let spec = format!(
                "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: {}}}]}}",
                blocks_except(f, "x/b")
            );
            set(f, vec![policy("x", "allow-client-a-via-cidr-egress-rule", &spec)]);
            f.expect("35", p, TCP, 80, &all(p).expect("x/a", "x/b", false));
        },
    },
    Case {
        num: 36,
        name: "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
        pods: &["x/a", "x/b", "x/c"],
        run: |f, p| {
            let spec = format!(
                "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: {}}}]}}",
                blocks_except(f, "x/b")
            );
            set(f, vec![policy("x", "allow-client-a-via-cidr-egress-rule", &spec)]);
            f.expect("36 except", p, TCP, 80, &all(p).expect("x/a", "x/b", false));
            let spec = format!(
                "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: {}}}]}}",
                blocks_host(f, "x/b")
            );
            set(f, vec![policy("x", "allow-client-a-via-cidr-egress-rule", &spec)]);
            f.expect("36 updated", p, TCP, 80, &all(p).all_egress("x/a", false).expect("x/a", "x/b", true));
        },
    },
    Case {
        num: 37,
        name: "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector",
        pods: &["x/a", "x/b", "y/a"],
        run: |f, p| {
            let first = policy("x", "allow-egress-for-target", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{}]}");
            set(f, vec![first.clone()]);
            f.expect("37 egress allowed", p, TCP, 80, &all(p));
            set(f, vec![first, policy("x", "deny-ingress-via-label-selector", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: []}")]);
            f.expect("37 plus ingress denied", p, TCP, 80, &all(p).all_ingress("x/a", false));
        },
    },
    Case {
        num: 38,
        name: "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP",
        pods: &["x/a", "y/a"],
        run: |f, p| {
            set(
                f,
                vec![
                    policy("x", "deny-ingress", DENY_INGRESS),
                    policy("x", "allow-only-sctp-ingress-on-port-81", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{ports: [{protocol: SCTP, port: 81}]}]}"),
                ],
            );
            f.expect("38", p, TCP, 81, &all(p).peer("", "x", false));
        },
    },
    Case {
        num: 39,
        name: "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP",
        pods: &["x/a", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-only-sctp-ingress-on-port-80", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{ports: [{protocol: SCTP, port: 80}]}]}")]);
            f.expect("39", p, TCP, 81, &all(p).all_ingress("x/a", false));
        },
    },
    Case {
        num: 40,
        name: "should not allow access by TCP when a policy specifies only UDP",
        pods: &["x/a", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-only-udp-ingress-on-port-81", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{ports: [{protocol: UDP, port: 81}]}]}")]);
            f.expect("40", p, TCP, 81, &all(p).all_ingress("x/a", false));
        },
    },
    Case {
        num: 41,
        name: "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label",
        pods: &["x/a", "x/b", "y/a", "z/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-client-a-via-ns-selector-for-immutable-ns-label", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Ingress], ingress: [{{from: [{{namespaceSelector: {{matchLabels: {NS_Y_LABEL}}}}}]}}]}}"))]);
            f.expect("41", p, TCP, 80, &all(p).peer("x", "x/a", false).peer("z", "x/a", false));
        },
    },
    Case {
        num: 42,
        name: "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label",
        pods: &["x/a", "x/b", "y/a", "z/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-ns-y-match-selector-for-immutable-ns-label", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}]}}]}]}")]);
            f.expect("42", p, TCP, 80, &all(p).peer("x/a", "y", false));
        },
    },
    // "NetworkPolicy between server and client using UDP" [LinuxOnly].
    Case {
        num: 43,
        name: "should support a 'default-deny-ingress' policy (UDP)",
        pods: &["x/a", "x/b", "y/a", "y/b"],
        run: |f, p| {
            set(f, vec![policy("x", "deny-all", DENY_INGRESS)]);
            f.expect("43", p, UDP, 80, &all(p).peer("", "x", false));
        },
    },
    Case {
        num: 44,
        name: "should enforce policy based on Ports (UDP)",
        pods: &["x/a", "x/b", "y/a", "z/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-ingress-on-port-81-ns-x", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Ingress], ingress: [{{from: [{{namespaceSelector: {{matchLabels: {NS_Y_LABEL}}}}}], ports: [{{protocol: UDP, port: 81}}]}}]}}"))]);
            f.expect("44", p, UDP, 81, &all(p).peer("x", "x/a", false).peer("z", "x/a", false));
        },
    },
    Case {
        num: 45,
        name: "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector (UDP)",
        pods: &["x/a", "x/b", "y/a"],
        run: |f, p| {
            set(f, vec![policy("x", "allow-ns-y-pod-a-via-namespace-pod-selector", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Ingress], ingress: [{{from: [{{namespaceSelector: {{matchLabels: {NS_Y_LABEL}}}, podSelector: {{matchLabels: {{pod: a}}}}}}]}}]}}"))]);
            f.expect("45", p, UDP, 80, &all(p).all_ingress("x/a", false).expect("y/a", "x/a", true));
        },
    },
];

/// Cases 14 and 15: `allow-client-a-via-ns-selector` on one TCP port.
fn allow_y_on_port(port: u16) -> String {
    format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Ingress], ingress: [{{from: [{{namespaceSelector: {{matchLabels: {NS_Y_LABEL}}}}}], ports: [{{protocol: TCP, port: {port}}}]}}]}}")
}

/// Cases 14 and 15: x/a reachable from namespace y only.
fn allow_y(p: &[&str]) -> Reach {
    all(p).peer("x", "x/a", false).peer("y", "x/a", true).peer("z", "x/a", false)
}

/// Runs `cases` in order over `f`, each from the fixture's state (no policy, original
/// labels); a failing case is reported and the next one runs; fails at the end naming every
/// failed case.
type Named<'a> = (String, Box<dyn Fn(&mut Fixture) + 'a>);

fn run_cases(f: &mut Fixture, cases: &[Named]) {
    let mut failed = Vec::new();
    for (name, body) in cases {
        let started = std::time::Instant::now();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            f.reset();
            f.apply();
            body(f)
        }));
        let verdict = if r.is_ok() { "ok" } else { "FAILED" };
        eprintln!("netpol: {name}: {verdict} ({:.1}s)", started.elapsed().as_secs_f64());
        if r.is_err() {
            failed.push(name.clone());
        }
    }
    assert!(failed.is_empty(), "failed cases:\n  {}", failed.join("\n  "));
}

fn selected(num: u32) -> bool {
    match std::env::var("NETPOL_CASES") {
        Ok(list) => list.split(',').any(|n| n.trim() == num.to_string()),
        Err(_) => true,
    }
}

/// Upstream cases 1-45 (TCP block, UDP-policy and SCTP-policy-on-TCP cases, UDP block) over
/// one cluster.
#[test]
fn upstream_cases() {
    require_root("netpol upstream_cases");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut f = Fixture::new("np");
    let cases: Vec<Named> = CASES
        .iter()
        .filter(|c| selected(c.num))
        .map(|c| {
            let body: Box<dyn Fn(&mut Fixture)> = Box::new(move |f: &mut Fixture| (c.run)(f, c.pods));
            (format!("[{}] {}", c.num, c.name), body)
        })
        .collect();
    run_cases(&mut f, &cases);
}

/// Cases 46-48 ("NetworkPolicy between server and client using SCTP",
/// [Feature:SCTPConnectivity]): the same three policies as 43-45 with `protocol: SCTP`.
#[test]
#[ignore = "no SCTP here: socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) fails with EPROTONOSUPPORT in a \
            fresh network namespace of this kernel, so no pod can serve or probe SCTP"]
fn upstream_sctp_cases() {
    let sctp = std::process::Command::new("sh")
        .args(["-c", "grep -qw sctp /proc/net/protocols"])
        .status()
        .is_ok_and(|s| s.success());
    panic!(
        "cases 46-48 need an SCTP server and client in the pods; this kernel {} SCTP and the probe has no \
         SCTP client yet (std has none): see docs/network-policy.md",
        if sctp { "has" } else { "has no" }
    );
}

// ---------------------------------------------------------------------------------------
// Extra cases (not upstream): what this engine's design promises.

/// An echo server on `port` in namespace `ns`, one thread per accepted connection, until
/// [`Echo::stop`].
struct Echo {
    ns: std::fs::File,
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(ns: std::fs::File, port: u16) -> Echo {
        use std::io::{Read, Write};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (f, s) = (ns.try_clone().unwrap(), stop.clone());
        let thread = std::thread::spawn(move || {
            netpol_fixture::enter(&f);
            let l = std::net::TcpListener::bind(("::", port)).expect("bind the echo port");
            tx.send(()).unwrap();
            let mut conns = Vec::new();
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok((mut c, _)) = l.accept() else { continue };
                conns.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }));
            }
            for c in conns {
                let _ = c.join();
            }
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("echo server up");
        Echo { ns, port, stop, thread: Some(thread) }
    }

    fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let addr = std::net::SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), self.port);
        netpol_fixture::connects_from(
            self.ns.try_clone().unwrap(),
            TCP,
            addr,
            std::time::Duration::from_secs(1),
        );
        let _ = self.thread.take().unwrap().join();
    }
}

/// A client connection held open from a thread in the client's namespace; each
/// [`Conn::exchange`] sends a message and waits (bounded) for its echo.
struct Conn {
    ask: std::sync::mpsc::Sender<()>,
    answer: std::sync::mpsc::Receiver<Result<(), String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Conn {
    /// A TCP connection, or a UDP flow (a connected socket: one 5-tuple) to an echo server.
    fn open(ns: std::fs::File, proto: Proto, to: std::net::SocketAddr) -> Result<Conn, String> {
        use std::io::{Read, Write};
        let (ask, asked) = std::sync::mpsc::channel::<()>();
        let (tell, answer) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            netpol_fixture::enter(&ns);
            let wait = Some(std::time::Duration::from_secs(2));
            let mut exchange: Box<dyn FnMut() -> std::io::Result<()>> = match proto {
                Proto::Tcp => {
                    match std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2)) {
                        Ok(mut s) => {
                            let _ = s.set_read_timeout(wait);
                            Box::new(move || s.write_all(b"ping").and_then(|_| s.read_exact(&mut [0u8; 4])))
                        }
                        Err(e) => return drop(tell.send(Err(format!("connect {to}: {e}")))),
                    }
                }
                Proto::Udp => {
                    let local: std::net::SocketAddr =
                        if to.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
                    let u = std::net::UdpSocket::bind(local).and_then(|u| u.connect(to).map(|_| u));
                    match u {
                        Ok(u) => {
                            let _ = u.set_read_timeout(wait);
                            Box::new(move || u.send(b"ping").and_then(|_| u.recv(&mut [0u8; 4])).map(drop))
                        }
                        Err(e) => return drop(tell.send(Err(format!("UDP socket to {to}: {e}")))),
                    }
                }
            };
            let _ = tell.send(Ok(()));
            while asked.recv().is_ok() {
                let _ = tell.send(exchange().map_err(|e| e.to_string()));
            }
        });
        let conn = Conn { ask, answer, thread: Some(thread) };
        conn.answer.recv().map_err(|e| e.to_string())??;
        Ok(conn)
    }

    fn exchange(&self) -> Result<(), String> {
        self.ask.send(()).map_err(|e| e.to_string())?;
        self.answer.recv().map_err(|e| e.to_string())?
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let (ask, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.ask, ask));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// (f) Two pods on one bridge are filtered like any others: br_netfilter shows their
/// frames to the forward hook.
fn same_node(f: &mut Fixture) {
    let p = ["x/a", "x/c", "y/b", "z/a", "z/c"];
    for pod in p {
        assert_eq!(f.pods[pod].node, 0, "{pod} is on node 0 with the others");
    }
    f.expect("same node, no policy", &p, TCP, 80, &all(&p));
    set(f, vec![policy("x", "deny-ingress", DENY_INGRESS)]);
    f.expect("same node, x denies ingress", &p, TCP, 80, &all(&p).peer("", "x", false));
    f.expect("same node, x denies ingress", &p, UDP, 80, &all(&p).peer("", "x", false));
    set(f, vec![policy("z", "deny-egress", "{podSelector: {}, policyTypes: [Egress], egress: []}")]);
    f.expect("same node, z denies egress", &p, TCP, 80, &all(&p).peer("z", "", false));
}

/// (d) Under a default deny of everything, a node still reaches its own pods (kubelet
/// probes); the other node is a peer like any other (denied).
fn node_reaches_its_pods(f: &mut Fixture) {
    let deny_all = "{podSelector: {}, policyTypes: [Ingress, Egress], ingress: [], egress: []}";
    set(f, NAMESPACES_XYZ.iter().map(|ns| policy(ns, "deny-all", deny_all)).collect());
    let p = ["x/a", "x/b", "y/a", "y/b"];
    f.expect("pods under deny-all", &p, TCP, 80, &Reach::new(&p, false));
    let deadline = std::time::Instant::now() + netpol_fixture::MATRIX_BOUND;
    let seen = loop {
        let mut probes = Vec::new();
        for (key, pod) in &f.pods {
            for v6 in [false, true] {
                for node in 0..2 {
                    let addr = std::net::SocketAddr::new(f.ip(key, v6), 80);
                    let ns = f.cl.nodes[node].ns.file();
                    let own = node == pod.node;
                    let h = std::thread::spawn(move || netpol_fixture::connects_from(ns, TCP, addr, PROBE));
                    probes.push((format!("node {node} -> {key} {addr}"), own, h));
                }
            }
        }
        let seen: Vec<String> = probes
            .into_iter()
            .filter_map(|(what, own, h)| {
                let ok = h.join().unwrap();
                (ok != own).then(|| format!("{what}: connected={ok}"))
            })
            .collect();
        if seen.is_empty() || std::time::Instant::now() > deadline {
            break seen;
        }
    };
    assert!(
        seen.is_empty(),
        "a node reaches exactly its own pods under deny-all; not so:\n{}",
        seen.join("\n")
    );
}

const NAMESPACES_XYZ: [&str; 3] = ["x", "y", "z"];

/// Probes until `probe` says `want` or the matrix bound passes (a connect may time out on a
/// starved machine; a denied one never connects), then fails naming `what`.
fn settle(what: &str, want: bool, mut probe: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + netpol_fixture::MATRIX_BOUND;
    while probe() != want {
        assert!(std::time::Instant::now() < deadline, "{what}: expected connected={want}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
const PROBE: std::time::Duration = std::time::Duration::from_secs(1);

/// (e) A connection established before a policy denies it goes on (the engine accepts
/// `ct state established,related` first); new ones are denied.
fn established_connections(f: &mut Fixture) {
    let echo = Echo::start(f.ns_file("x/b"), 9000);
    let mut conns = Vec::new();
    for client in ["x/a", "y/a"] {
        for v6 in [false, true] {
            for (proto, port) in [(TCP, 9000), (UDP, 80)] {
                let to = std::net::SocketAddr::new(f.ip("x/b", v6), port);
                let what = format!("{client} -> {to} {}", proto.name());
                let c = Conn::open(f.ns_file(client), proto, to).unwrap_or_else(|e| panic!("{what}: {e}"));
                c.exchange().unwrap_or_else(|e| panic!("{what} before the policy: {e}"));
                conns.push((what, client, proto, to, c));
            }
        }
    }
    set(f, vec![policy("x", "deny-ingress", DENY_INGRESS)]);
    let p = ["x/a", "x/b", "y/a"];
    f.expect("new connections after deny-ingress", &p, TCP, 80, &all(&p).peer("", "x", false));
    let fresh: Vec<_> = conns
        .iter()
        .map(|(_, client, proto, to, _)| {
            let (ns, proto, to) = (f.ns_file(client), *proto, *to);
            std::thread::spawn(move || netpol_fixture::connects_from(ns, proto, to, PROBE))
        })
        .collect();
    for ((what, _, _, _, c), fresh) in conns.iter().zip(fresh) {
        assert!(!fresh.join().unwrap(), "{what}: a new connection (a new flow) is denied");
        c.exchange().unwrap_or_else(|e| panic!("{what}: the established connection goes on: {e}"));
    }
    drop(conns);
    echo.stop();
}

/// A policy in a file of its own next to the others: added, then deleted (the directory
/// source sees the file go).
fn policy_file_deleted(f: &mut Fixture) {
    let p = ["x/a", "x/b", "y/a"];
    f.put_file("50-deny.yaml", Some(&policy("x", "deny-ingress", DENY_INGRESS)));
    f.expect("policy file added", &p, TCP, 80, &all(&p).peer("", "x", false));
    f.put_file("50-deny.yaml", None);
    f.expect("policy file deleted", &p, TCP, 80, &all(&p));
}

/// The policy table deleted by hand (another tool's `nft flush ruleset`, say) comes back:
/// the agent checks its table on every resync, not only when the manifests change.
fn table_deleted_by_hand(f: &mut Fixture) {
    let p = ["x/a", "x/b", "x/c", "y/a", "y/b"];
    set(f, vec![policy("x", "deny-ingress", DENY_INGRESS)]);
    let want = all(&p).peer("", "x", false);
    f.expect("before", &p, TCP, 80, &want);
    for node in 0..2 {
        let out = f.cl.nodes[node].ns.run("nft", &["delete", "table", "inet", "cni_route_agent_policy"]);
        assert!(out.status.success(), "nft delete table: {}", String::from_utf8_lossy(&out.stderr));
    }
    f.expect("after the table was deleted by hand", &p, TCP, 80, &want);
    // And emptied (the chains stay, their rules go).
    let out = f.cl.nodes[0].ns.run("nft", &["flush", "table", "inet", "cni_route_agent_policy"]);
    assert!(out.status.success(), "nft flush table: {}", String::from_utf8_lossy(&out.stderr));
    f.expect("after the table was flushed by hand", &p, TCP, 80, &want);
}

/// ipBlocks for what is outside the cluster: a host on the underlay (IPv4), reached by pods
/// through the node's masquerade (egress is decided before it, on the pod's own address),
/// and reaching pods of node 0 through a route (ingress).
fn outside_the_cluster(f: &mut Fixture) {
    let ext = f.cl.external("npext", 50);
    let (cidr, gw) = (f.cl.nodes[0].pod_cidr.clone(), f.cl.nodes[0].ip.to_string());
    ext.ip(&["route", "add", &cidr, "via", &gw]);
    let echo = Echo::start(ext.file(), 9000);
    let host: std::net::SocketAddr = "10.200.0.50:9000".parse().unwrap();
    let out = |f: &Fixture, pod: &str| netpol_fixture::connects_from(f.ns_file(pod), TCP, host, PROBE);
    let inside = |f: &Fixture, pod: &str| {
        let to = std::net::SocketAddr::new(f.ip(pod, false), 80);
        netpol_fixture::connects_from(ext.file(), TCP, to, PROBE)
    };
    let p = ["x/a", "x/b", "y/a"];
    settle("x/a reaches the outside host", true, || out(f, "x/a"));
    settle("the outside host reaches x/a", true, || inside(f, "x/a"));
    let egress = |to: &str| {
        format!(
            "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: [{to}]}}]}}"
        )
    };
    set(f, vec![policy("x", "egress-to-host", &egress("{ipBlock: {cidr: 10.200.0.50/32}}"))]);
    f.expect("egress to the outside host only", &p, TCP, 80, &all(&p).all_egress("x/a", false));
    settle("x/a reaches the outside host its ipBlock names", true, || out(f, "x/a"));
    set(
        f,
        vec![policy(
            "x",
            "egress-to-host",
            &egress("{ipBlock: {cidr: 10.200.0.0/24, except: [10.200.0.50/32]}}"),
        )],
    );
    settle("x/a does not reach the outside host its ipBlock excepts", false, || out(f, "x/a"));
    settle("x/b is not selected", true, || out(f, "x/b"));
    let ingress = |from: &str| {
        format!(
            "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Ingress], ingress: [{{from: [{{ipBlock: {{cidr: {from}}}}}]}}]}}"
        )
    };
    set(f, vec![policy("x", "ingress-from-host", &ingress("10.200.0.50/32"))]);
    f.expect("ingress from the outside host only", &p, TCP, 80, &all(&p).all_ingress("x/a", false));
    settle("the outside host its ipBlock names reaches x/a", true, || inside(f, "x/a"));
    set(f, vec![policy("x", "ingress-from-host", &ingress("10.200.0.60/32"))]);
    settle("another outside host's ipBlock does not let this one in", false, || inside(f, "x/a"));
    echo.stop();
}

/// Port ranges (`endPort`, GA since 1.25; not in the upstream suite's current cases).
fn end_port_ranges(f: &mut Fixture) {
    let p = ["x/a", "x/b", "y/a"];
    set(f, vec![policy("x", "range-80-81", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{ports: [{protocol: TCP, port: 80, endPort: 81}]}]}")]);
    f.expect("80-81 open", &p, TCP, 80, &all(&p));
    f.expect("80-81 open", &p, TCP, 81, &all(&p));
    f.expect("80-81 TCP only", &p, UDP, 81, &all(&p).all_ingress("x/a", false));
    set(f, vec![policy("x", "range-81-90", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{ports: [{protocol: TCP, port: 81, endPort: 90}]}]}")]);
    f.expect("81-90 leaves 80 out", &p, TCP, 80, &all(&p).all_ingress("x/a", false));
    f.expect("81-90 open", &p, TCP, 81, &all(&p));
}

/// (c) Malformed policies are contained: the bad part is left out (its traffic stays
/// denied), a bad pod selector selects the whole namespace, an unparseable object is
/// skipped; each defect is counted once in /metrics; nothing opens.
fn malformed_policies(f: &mut Fixture) {
    let before: Vec<f64> = (0..2).map(|n| f.metric(n, "policy_malformed_total").unwrap_or(0.0)).collect();
    set(
        f,
        vec![
            policy("x", "bad-cidr", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}"),
            policy("y", "bad-operator-and-protocol", "{podSelector: {matchExpressions: [{key: pod, operator: Maybe, values: [a]}]}, policyTypes: [Ingress], ingress: [{ports: [{protocol: ICMP, port: 80}]}]}"),
            policy("z", "bad-peer-operator", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: Maybe, values: [b]}]}}]}, {from: [{podSelector: {matchLabels: {pod: b}}}]}]}"),
            // Not a NetworkPolicy at all (matchLabels is a list): skipped whole.
            policy("x", "bad-shape", "{podSelector: {matchLabels: [pod, b]}, policyTypes: [Ingress], ingress: [{}]}"),
        ],
    );
    let p = ["x/a", "x/b", "y/a", "y/b", "z/a", "z/b"];
    let want = all(&p)
        .all_ingress("x/a", false)
        .peer("", "y", false)
        .all_ingress("z/a", false)
        .expect("z/b", "z/a", true);
    f.expect("malformed policies", &p, TCP, 80, &want);
    f.expect("malformed policies", &p, UDP, 80, &want);
    for (n, b) in before.iter().enumerate() {
        assert_eq!(
            f.metric(n, "policy_malformed_total"),
            Some(b + 5.0),
            "node {n}: 5 defects (a CIDR, an operator and a protocol, a peer operator, a shape)"
        );
    }
    // Re-reading the same defects does not count them again.
    f.set_pod_label("x/c", "touched", "yes");
    f.apply();
    for (n, b) in before.iter().enumerate() {
        assert_eq!(f.metric(n, "policy_malformed_total"), Some(b + 5.0), "node {n}: counted once");
    }
}

/// The IPv4-only ipBlock of upstream case 34 on a dual-stack cluster: the pod's IPv6 address
/// is not in it, so IPv6 stays denied (no side door); the same for ingress.
fn single_family_ip_blocks(f: &mut Fixture) {
    let p = ["x/a", "y/a", "y/b"];
    let v4 = host(f.ip("y/b", false));
    set(f, vec![policy("x", "egress-v4-block", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: [{{ipBlock: {{cidr: '{v4}'}}}}]}}]}}"))]);
    let denied = all(&p).all_egress("x/a", false);
    f.expect_families(
        "egress to an IPv4 block",
        &p,
        TCP,
        80,
        &denied.clone().expect("x/a", "y/b", true),
        &denied,
    );
    let v6 = host(f.ip("y/a", true));
    set(f, vec![policy("x", "ingress-v6-block", &format!("{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Ingress], ingress: [{{from: [{{ipBlock: {{cidr: '{v6}'}}}}]}}]}}"))]);
    let denied = all(&p).all_ingress("x/a", false);
    f.expect_families(
        "ingress from an IPv6 block",
        &p,
        TCP,
        80,
        &denied,
        &denied.clone().expect("y/a", "x/a", true),
    );
}

/// (b) A killed agent leaves its table enforcing; a new one adopts it and replaces it in one
/// transaction: probes running all along never see a denied pair connect.
fn restarted_agent(f: &mut Fixture) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let p = ["x/a", "x/b", "x/c", "y/a", "y/b"];
    let allow_y_to_a = "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}";
    let allow_y_to_c = "{podSelector: {matchLabels: {pod: c}}, policyTypes: [Ingress], ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}";
    let base = vec![policy("x", "deny-ingress", DENY_INGRESS), policy("x", "allow-y-to-a", allow_y_to_a)];
    set(f, base.clone());
    let before = all(&p).peer("", "x", false).peer("y", "x/a", true);
    f.expect("before the restart", &p, TCP, 80, &before);
    f.stop_agent(0, false);
    f.expect("agent of node 0 killed", &p, TCP, 80, &before);
    // While it is down the manifests change: its node keeps the old table until it is back.
    let mut changed = base;
    changed.push(policy("x", "allow-y-to-c", allow_y_to_c));
    set(f, changed);
    let after = before.clone().peer("y", "x/c", true);
    // Denied before and after: must never connect, down, restarting or up.
    let denied: Vec<(String, String)> = p
        .iter()
        .flat_map(|a| p.iter().map(move |b| (a.to_string(), b.to_string())))
        .filter(|(a, b)| a != b && !after.allows(a, b))
        .collect();
    let targets: Vec<(String, std::fs::File, std::net::SocketAddr)> = denied
        .iter()
        .flat_map(|(a, b)| {
            [false, true].map(|v6| {
                let fam = if v6 { "IPv6" } else { "IPv4" };
                (format!("{a} -> {b} ({fam})"), f.ns_file(a), std::net::SocketAddr::new(f.ip(b, v6), 80))
            })
        })
        .collect();
    let stop = AtomicBool::new(false);
    let rounds = AtomicUsize::new(0);
    let violations = std::thread::scope(|s| {
        let prober = s.spawn(|| {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let probes: Vec<_> = targets
                    .iter()
                    .map(|(what, ns, addr)| {
                        let (ns, addr) = (ns.try_clone().unwrap(), *addr);
                        let t = std::time::Duration::from_millis(300);
                        (what, std::thread::spawn(move || netpol_fixture::connects_from(ns, TCP, addr, t)))
                    })
                    .collect();
                for (what, h) in probes {
                    if h.join().unwrap() {
                        seen.push(what.clone());
                    }
                }
                rounds.fetch_add(1, Ordering::SeqCst);
            }
            seen
        });
        let wait_rounds = |n: usize| {
            let r0 = rounds.load(Ordering::SeqCst);
            netpol_fixture::wait_for("probe rounds", std::time::Duration::from_secs(30), || {
                rounds.load(Ordering::SeqCst) >= r0 + n
            });
        };
        wait_rounds(2);
        f.start_agent(0);
        netpol_fixture::wait_for("the new agent syncs", std::time::Duration::from_secs(20), || {
            f.metric(0, "policy_syncs_total").unwrap_or(0.0) >= 1.0
        });
        wait_rounds(2);
        stop.store(true, Ordering::SeqCst);
        prober.join().unwrap()
    });
    assert!(violations.is_empty(), "denied pairs connected around the restart:\n{}", violations.join("\n"));
    f.expect("after the restart: the new manifests", &p, TCP, 80, &after);
    // A clean stop (SIGTERM, as a rolling update does) leaves the table too; a new agent
    // that finds only a half-written manifest keeps enforcing what it found until the
    // manifests are whole again.
    f.stop_agent(1, true);
    f.expect("agent of node 1 stopped", &p, TCP, 80, &after);
    let good = f.render();
    f.write_raw(&good[..good.len() / 2]);
    f.start_agent(1);
    netpol_fixture::wait_for("the new agent answers", std::time::Duration::from_secs(20), || {
        f.metric(1, "policy_syncs_total").is_some()
    });
    f.expect("new agent, half-written manifests", &p, TCP, 80, &after);
    assert_eq!(f.metric(1, "policy_syncs_total"), Some(0.0), "nothing applied from a half-written file");
    f.policies.clear();
    f.apply();
    f.expect("manifests whole again, no policy", &p, TCP, 80, &all(&p));
}

/// A pod created under policies that select it is isolated as soon as its object lists its
/// addresses (pod churn goes into the kernel as set elements), on either node.
fn new_pods_are_isolated(f: &mut Fixture) {
    set(f, vec![policy("x", "deny-ingress", DENY_INGRESS)]);
    let labels = netpol_fixture::Labels::from([("pod".to_string(), "d".to_string())]);
    f.add_pod("x/d", 0, labels.clone(), "2026-01-01T00:30:00Z", None);
    f.add_pod("x/e", 1, labels, "2026-01-01T00:30:00Z", None);
    f.apply();
    let p = ["x/a", "x/d", "x/e", "y/a", "y/b"];
    f.expect("new pods in x", &p, TCP, 80, &all(&p).peer("", "x", false));
    f.del_pod("x/d", true);
    f.del_pod("x/e", true);
    f.apply();
}

/// (a) A pod that gets a deleted pod's address never inherits its allowances, also while
/// both objects are listed (the newer one owns the address).
fn address_reuse(f: &mut Fixture) {
    let labels = |v: &str| netpol_fixture::Labels::from([("pod".to_string(), v.to_string())]);
    f.add_pod("x/old", 1, labels("p"), "2026-01-01T00:05:00Z", None);
    set(f, vec![policy("x", "allow-from-p", "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {pod: p}}}]}]}")]);
    let p = ["x/old", "x/a", "x/b"];
    f.expect(
        "x/old (pod: p) allowed",
        &p,
        TCP,
        80,
        &all(&p).all_ingress("x/a", false).expect("x/old", "x/a", true),
    );
    let old = f.pods["x/old"].clone();
    f.del_pod("x/old", true);
    f.apply();
    f.add_pod("x/new", 1, labels("q"), "2026-01-01T00:10:00Z", Some([old.v4, old.v6]));
    assert_eq!(
        (f.pods["x/new"].v4, f.pods["x/new"].v6),
        (old.v4, old.v6),
        "IPAM gave the new pod the deleted pod's addresses"
    );
    f.apply();
    let p = ["x/new", "x/a", "x/b"];
    let denied = all(&p).all_ingress("x/a", false);
    f.expect("x/new (pod: q) on x/old's addresses", &p, TCP, 80, &denied);
    // The deleted pod's object lingers (sorted after the new one in the manifests): the
    // newer creationTimestamp owns the addresses.
    let mut lingering = old.clone();
    lingering.cl_name = String::new();
    f.pods.insert("x/old".into(), lingering);
    f.apply();
    f.expect("both objects listed, x/new newer", &p, TCP, 80, &denied);
    // And the rule is the timestamp, not the order: were the old object the newer one, it
    // would own them.
    f.pods.get_mut("x/old").unwrap().created = "2026-01-01T00:20:00Z".into();
    f.apply();
    f.expect("both listed, x/old newer", &p, TCP, 80, &denied.clone().expect("x/new", "x/a", true));
    f.pods.remove("x/old");
    f.apply();
}

/// The extra cases over one cluster.
#[test]
fn extra_cases() {
    require_root("netpol extra_cases");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut f = Fixture::new("npx");
    let cases: Vec<Named> = vec![
        ("(f) same-node traffic is filtered".into(), Box::new(same_node)),
        ("(d) the node reaches its own pods under deny-all".into(), Box::new(node_reaches_its_pods)),
        ("(e) established connections go on".into(), Box::new(established_connections)),
        ("(c) malformed policies are contained and counted".into(), Box::new(malformed_policies)),
        ("endPort ranges".into(), Box::new(end_port_ranges)),
        ("ipBlocks outside the cluster (through masquerade)".into(), Box::new(outside_the_cluster)),
        ("a policy file deleted from the directory".into(), Box::new(policy_file_deleted)),
        ("a policy table deleted by hand comes back".into(), Box::new(table_deleted_by_hand)),
        ("single-family ipBlocks leave the other family denied".into(), Box::new(single_family_ip_blocks)),
        ("(b) a restarted agent adopts its table, no open window".into(), Box::new(restarted_agent)),
        ("new pods are isolated".into(), Box::new(new_pods_are_isolated)),
        ("(a) a reused pod address inherits nothing".into(), Box::new(address_reuse)),
    ];
    run_cases(&mut f, &cases);
}
