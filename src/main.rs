fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    std::process::exit(unionfs_rs::cli::main_with(args));
}
