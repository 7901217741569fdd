//! weir-gateway: see `weir-gateway --help` and docs/.

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: weir_proxy::alloc::MiMalloc = weir_proxy::alloc::MiMalloc;

fn main() -> ExitCode {
    weir_proxy::cli::main(weir_config::Role::Gateway)
}
