fn main() {
    cni_proto::run_main(&cni_bridge::Bridge)
}
