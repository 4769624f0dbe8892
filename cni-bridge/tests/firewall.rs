//! The masquerade rules under address reuse, backend changes and failing tools: one
//! attachment's teardown never removes another's rules, and a failure never reads as
//! "nothing there".

mod common;

use cni_conformance::{require_root, Netns};
use common::*;
use serde_json::{json, Value};

fn path(ns: &Netns) -> String {
    ns.path.display().to_string()
}

fn with_prev(conf: &Value, add: &cni_conformance::Out) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = add.json.clone();
    c
}

/// X is DELeted while Y is ADDed on a one-address pool: Y can only get X's address once X's
/// lease is released, and retries until it does. Whatever the interleaving, Y's masquerade
/// entry must survive X's DEL.
#[test]
fn reused_address_keeps_its_new_owners_masquerade() {
    require_root("reused_address_keeps_its_new_owners_masquerade");
    let w = World::new("reuse");
    let (x, y) = (Netns::new("rx"), Netns::new("ry"));
    let conf = w.conf("1.1.0", "10.40.0.0/30", json!({"ipMasq": true})); // one usable address
    for round in 0..15 {
        let ox = w.call("ADD", &format!("x{round}"), &path(&x), &conf);
        assert_eq!(ox.code, 0, "{}", ox.stdout);
        let (dx, oy) = std::thread::scope(|s| {
            let del = s.spawn(|| w.call("DEL", &format!("x{round}"), &path(&x), &conf));
            let add = s.spawn(|| loop {
                let o = w.call("ADD", &format!("y{round}"), &path(&y), &conf);
                if o.err_code() != Some(100) {
                    break o;
                }
            });
            (del.join().unwrap(), add.join().unwrap())
        });
        assert_eq!(dx.code, 0, "round {round}: DEL x: {}", dx.stdout);
        assert_eq!(oy.code, 0, "round {round}: ADD y: {}", oy.stdout);
        assert_eq!(ip_of(&ox, 0), ip_of(&oy, 0), "one address in the pool");
        let k = w.call("CHECK", &format!("y{round}"), &path(&y), &with_prev(&conf, &oy));
        assert_eq!(k.code, 0, "round {round}: CHECK y after x's DEL: {}", k.stdout);
        assert_eq!(w.masq_entries(), [format!("{} testnet/y{round}/eth0", ip_of(&oy, 0))]);
        assert_eq!(w.call("DEL", &format!("y{round}"), &path(&y), &conf).code, 0);
        assert!(w.masq_entries().is_empty(), "round {round}");
    }
}
