//! Shared by the benchmark binaries: generated configs of a given size.
#![allow(clippy::print_stdout)]

use std::fmt::Write;

/// A config with `routes` routes over `services` services, shaped like a real edge: routes
/// spread over hosts (a quarter of them), each with a path prefix and a header match, and
/// every tenth route a weighted split.
pub fn scale_config(routes: usize, services: usize) -> String {
    let mut out = String::with_capacity(routes * 200 + services * 80);
    for s in 0..services {
        let _ = writeln!(
            out,
            "[[service]]\nname = \"svc-{s}\"\nendpoints = [\"127.0.0.1:{}\"]",
            10_000 + s % 50_000
        );
    }
    let hosts = (routes / 4).max(1);
    for r in 0..routes {
        let host = r % hosts;
        let _ = writeln!(
            out,
            "[[route]]\nname = \"route-{r}\"\nhosts = [\"host-{host}.example.com\"]\n  [[route.match]]\n  \
             path = {{ prefix = \"/api/v{}/\" }}\n  headers = {{ \"x-tenant\" = {{ exact = \"t{}\" }} }}",
            r / hosts,
            r % 7
        );
        let _ = writeln!(
            out,
            "  [[route.backend]]\n  service = \"svc-{}\"\n  weight = 90",
            r % services
        );
        if r % 10 == 0 {
            let _ = writeln!(
                out,
                "  [[route.backend]]\n  service = \"svc-{}\"\n  weight = 10",
                (r + 1) % services
            );
        }
    }
    out
}
