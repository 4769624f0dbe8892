mod doctor;

fn main() {
    // `cni-bridge doctor ...` is for people; every other invocation is a runtime's CNI call.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "doctor") {
        let rest: Vec<String> = args[2..].iter().map(|a| a.to_string_lossy().into_owned()).collect();
        std::process::exit(doctor::main(&rest));
    }
    cni_proto::run_main(&cni_bridge::Bridge)
}
