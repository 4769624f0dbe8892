fn main() {
    cni_proto::run_main(&cni_host_local::HostLocal)
}
