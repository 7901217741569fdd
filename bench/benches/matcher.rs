//! Per-request route matching at 10, 1,000 and 10,000 routes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use weir_config::Role;
use weir_routing::{HeaderList, Request, RouteTable};

fn matcher(c: &mut Criterion) {
    let mut group = c.benchmark_group("find");
    for routes in [10, 1_000, 10_000] {
        let text = weir_bench::scale_config(routes, 10_000);
        let Ok(loaded) = weir_config::parse("scale.toml", &text, Role::Gateway) else {
            panic!("generated config is invalid");
        };
        let table = RouteTable::new(&loaded.config, "any");
        let host = format!("host-{}.example.com", routes / 8);
        let headers = [("x-tenant", "t3")];
        group.bench_with_input(BenchmarkId::from_parameter(routes), &routes, |b, _| {
            b.iter(|| {
                let req = Request {
                    method: "GET",
                    host: &host,
                    path: "/api/v2/users/42",
                    query: None,
                    headers: &HeaderList(&headers),
                };
                std::hint::black_box(table.find(std::hint::black_box(&req)).is_some())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, matcher);
criterion_main!(benches);
