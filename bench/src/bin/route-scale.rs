//! Route-table scale: for each size, the time to load + validate + compile a config of N
//! routes over 10,000 services, the process RSS after, and the time of one `find`.
//!
//! Usage: route-scale [ROUTES...]   (default 10 1000 10000); prints one JSON object per size.
//!        route-scale --config ROUTES  prints the services and routes of that size (the
//!                                     benchmark runs the gateway on it for its RSS).
#![allow(clippy::print_stdout)]

use std::time::Instant;

use weir_config::Role;
use weir_routing::{HeaderList, Request, RouteTable};

#[global_allocator]
static GLOBAL: weir_proxy::alloc::MiMalloc = weir_proxy::alloc::MiMalloc;

const SERVICES: usize = 10_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, routes] = &args[..] {
        if flag == "--config" {
            print!(
                "{}",
                weir_bench::scale_config(routes.parse().unwrap_or(0), SERVICES)
            );
            return;
        }
    }
    let sizes: Vec<usize> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![10, 1_000, 10_000]
    } else {
        sizes
    };
    for routes in sizes {
        let text = weir_bench::scale_config(routes, SERVICES);
        let rss_before = rss_kib();
        let start = Instant::now();
        let loaded = match weir_config::parse("scale.toml", &text, Role::Gateway) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
        let validated = start.elapsed();
        let table = RouteTable::new(&loaded.config, "any");
        let compiled = start.elapsed();
        let rss_after = rss_kib();

        // Requests that hit a route in the middle of its host's list, and misses.
        let hosts = (routes / 4).max(1);
        let names: Vec<String> = (0..1_000)
            .map(|i| format!("host-{}.example.com", (i * 7919) % (hosts + hosts / 10 + 1)))
            .collect();
        let mut samples = Vec::with_capacity(200_000);
        let mut found = 0usize;
        for round in 0..200 {
            for (i, host) in names.iter().enumerate() {
                let tenant = format!("t{}", (i + round) % 7);
                let headers = [("x-tenant", tenant.as_str())];
                let req = Request {
                    method: "GET",
                    host,
                    path: "/api/v2/users/42",
                    query: None,
                    headers: &HeaderList(&headers),
                };
                let t = Instant::now();
                let hit = table.find(&req).is_some();
                samples.push(t.elapsed().as_nanos() as u64);
                found += usize::from(hit);
            }
        }
        samples.sort_unstable();
        let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
        println!(
            "{{\"routes\": {routes}, \"services\": {SERVICES}, \"validate_ms\": {:.1}, \"compile_ms\": {:.1}, \
             \"rss_mib\": {:.1}, \"rss_growth_mib\": {:.1}, \"match_p50_ns\": {}, \"match_p99_ns\": {}, \
             \"match_p999_ns\": {}, \"hit_ratio\": {:.2}}}",
            validated.as_secs_f64() * 1e3,
            compiled.as_secs_f64() * 1e3,
            rss_after as f64 / 1024.0,
            rss_after.saturating_sub(rss_before) as f64 / 1024.0,
            pct(0.5),
            pct(0.99),
            pct(0.999),
            found as f64 / samples.len() as f64,
        );
        drop(table);
        drop(loaded);
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
