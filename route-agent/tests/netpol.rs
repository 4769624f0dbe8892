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
        f.reset();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| body(f)));
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
