use std::sync::Arc;

use proptest::prelude::*;
use weir_config::Role;

use super::*;

fn table(toml: &str) -> RouteTable {
    let base = "[[service]]\nname = \"s\"\nendpoints = [\"127.0.0.1:1\"]\n";
    let loaded = weir_config::parse("test.toml", &format!("{base}{toml}"), Role::Gateway)
        .unwrap_or_else(|e| panic!("{e}"));
    RouteTable::new(&loaded.config, "any")
}

fn route(t: &RouteTable, method: &str, url: &str, headers: &[(&str, &str)]) -> Option<String> {
    let (host, rest) = url.split_once('/').unwrap_or((url, ""));
    let rest = format!("/{rest}");
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest.as_str(), None),
    };
    let req = Request {
        method,
        host,
        path,
        query,
        headers: &HeaderList(headers),
    };
    t.find(&req).map(|f| f.route.config.name.clone())
}

const BACKEND: &str = "[[route.backend]]\nservice = \"s\"\n";

#[test]
fn host_exact_beats_wildcard_beats_any() {
    let t = table(&format!(
        "[[route]]\nname = \"any\"\n{BACKEND}\
         [[route]]\nname = \"wild\"\nhosts = [\"*.example.com\"]\n{BACKEND}\
         [[route]]\nname = \"deeper\"\nhosts = [\"*.api.example.com\"]\n{BACKEND}\
         [[route]]\nname = \"exact\"\nhosts = [\"www.example.com\"]\n{BACKEND}"
    ));
    assert_eq!(
        route(&t, "GET", "www.example.com/", &[]).as_deref(),
        Some("exact")
    );
    assert_eq!(
        route(&t, "GET", "x.example.com/", &[]).as_deref(),
        Some("wild")
    );
    assert_eq!(
        route(&t, "GET", "v1.api.example.com/", &[]).as_deref(),
        Some("deeper")
    );
    assert_eq!(
        route(&t, "GET", "example.com/", &[]).as_deref(),
        Some("any")
    );
    assert_eq!(route(&t, "GET", "other.org/", &[]).as_deref(), Some("any"));
}

#[test]
fn path_exact_beats_longest_prefix_beats_regex_beats_none() {
    let t = table(&format!(
        "[[route]]\nname = \"none\"\n{BACKEND}\
         [[route]]\nname = \"regex\"\n[[route.match]]\npath = {{ regex = \"/api/v[0-9]+/.*\" }}\n{BACKEND}\
         [[route]]\nname = \"short\"\n[[route.match]]\npath = {{ prefix = \"/api/\" }}\n{BACKEND}\
         [[route]]\nname = \"long\"\n[[route.match]]\npath = {{ prefix = \"/api/v1/\" }}\n{BACKEND}\
         [[route]]\nname = \"exact\"\n[[route.match]]\npath = {{ exact = \"/api/v1/users\" }}\n{BACKEND}"
    ));
    assert_eq!(
        route(&t, "GET", "h/api/v1/users", &[]).as_deref(),
        Some("exact")
    );
    assert_eq!(
        route(&t, "GET", "h/api/v1/other", &[]).as_deref(),
        Some("long")
    );
    assert_eq!(
        route(&t, "GET", "h/api/v2/x", &[]).as_deref(),
        Some("short")
    );
    assert_eq!(route(&t, "GET", "h/x", &[]).as_deref(), Some("none"));
    // The regex must match the whole path.
    let only_regex = table(&format!(
        "[[route]]\nname = \"regex\"\n[[route.match]]\npath = {{ regex = \"/v[0-9]+\" }}\n{BACKEND}"
    ));
    assert_eq!(
        route(&only_regex, "GET", "h/v2", &[]).as_deref(),
        Some("regex")
    );
    assert_eq!(route(&only_regex, "GET", "h/v2/x", &[]), None);
}

#[test]
fn methods_headers_and_query_raise_precedence() {
    let t = table(&format!(
        "[[route]]\nname = \"plain\"\n[[route.match]]\npath = {{ prefix = \"/\" }}\n{BACKEND}\
         [[route]]\nname = \"one-header\"\n[[route.match]]\npath = {{ prefix = \"/\" }}\n\
         headers = {{ \"x-user\" = {{ exact = \"jason\" }} }}\n{BACKEND}\
         [[route]]\nname = \"two-headers\"\n[[route.match]]\npath = {{ prefix = \"/\" }}\n\
         headers = {{ \"x-user\" = {{ exact = \"jason\" }}, \"x-canary\" = {{ present = true }} }}\n{BACKEND}\
         [[route]]\nname = \"query\"\n[[route.match]]\npath = {{ prefix = \"/\" }}\n\
         query = {{ \"variant\" = {{ exact = \"b c\" }} }}\n{BACKEND}\
         [[route]]\nname = \"post\"\n[[route.match]]\npath = {{ prefix = \"/\" }}\nmethods = [\"post\"]\n{BACKEND}"
    ));
    assert_eq!(route(&t, "GET", "h/", &[]).as_deref(), Some("plain"));
    assert_eq!(
        route(&t, "POST", "h/", &[("x-user", "jason")]).as_deref(),
        Some("post")
    );
    assert_eq!(
        route(&t, "GET", "h/", &[("X-User", "jason")]).as_deref(),
        Some("one-header")
    );
    let both = [("x-user", "jason"), ("x-canary", "1")];
    assert_eq!(
        route(&t, "GET", "h/", &both).as_deref(),
        Some("two-headers")
    );
    assert_eq!(
        route(&t, "GET", "h/?variant=b%20c", &[]).as_deref(),
        Some("query")
    );
    assert_eq!(
        route(&t, "GET", "h/?variant=b", &[]).as_deref(),
        Some("plain")
    );
}

#[test]
fn no_route_is_none_and_explain_gives_reasons() {
    let t = table(&format!(
        "[[route]]\nname = \"api\"\nhosts = [\"api.test\"]\n[[route.match]]\npath = {{ prefix = \"/api/\" }}\n{BACKEND}\
         [[route]]\nname = \"other\"\nhosts = [\"other.test\"]\n{BACKEND}"
    ));
    assert_eq!(route(&t, "GET", "api.test/web", &[]), None);
    let req = Request {
        method: "GET",
        host: "api.test",
        path: "/web",
        query: None,
        headers: &HeaderList(&[]),
    };
    let why = t.explain(&req);
    assert_eq!(why.len(), 2);
    assert_eq!(
        why[0].verdict,
        Verdict::NoMatch("path \"/web\" does not start with \"/api/\"".into())
    );
    assert!(matches!(&why[1].verdict, Verdict::NoMatch(m) if m.contains("host \"api.test\"")));
}

#[test]
fn explain_marks_winner_and_shadowed() {
    let t = table(&format!(
        "[[route]]\nname = \"a\"\n[[route.match]]\npath = {{ prefix = \"/a\" }}\n{BACKEND}\
         [[route]]\nname = \"b\"\n{BACKEND}"
    ));
    let req = Request {
        method: "GET",
        host: "h",
        path: "/a",
        query: None,
        headers: &HeaderList(&[]),
    };
    let verdicts: Vec<_> = t
        .explain(&req)
        .into_iter()
        .map(|c| (c.route.config.name.clone(), c.verdict))
        .collect();
    assert_eq!(
        verdicts,
        [
            ("a".to_string(), Verdict::Wins),
            ("b".to_string(), Verdict::Shadowed)
        ]
    );
}

#[test]
fn routes_attach_to_their_listeners() {
    let loaded = weir_config::parse(
        "t.toml",
        "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n[[listener]]\nname = \"b\"\nlisten = \"127.0.0.1:2\"\n\
         [[service]]\nname = \"s\"\nendpoints = [\"127.0.0.1:1\"]\n\
         [[route]]\nname = \"only-b\"\nlisteners = [\"b\"]\n[[route.backend]]\nservice = \"s\"\n",
        Role::Gateway,
    )
    .unwrap();
    assert!(RouteTable::new(&loaded.config, "a").routes().is_empty());
    assert_eq!(RouteTable::new(&loaded.config, "b").routes().len(), 1);
}

proptest! {
    /// The first roll of each of the total's equal parts of the range picks backend i exactly
    /// weight[i] times, so a uniform roll converges to the weights.
    #[test]
    fn split_picks_each_backend_in_proportion(weights in prop::collection::vec(0u32..50, 1..6)) {
        prop_assume!(weights.iter().any(|&w| w > 0));
        let split = Split::new(weights.iter().copied());
        let total = u128::from(split.total());
        let mut counts = vec![0u32; weights.len()];
        for part in 0..total {
            let roll = u64::try_from((part << 64).div_ceil(total)).unwrap();
            counts[split.pick(roll)] += 1;
        }
        prop_assert_eq!(counts, weights);
    }

    /// Growing the last backend's share, whatever the totals before and after (4/1 to 1/1),
    /// never moves a sticky user off it.
    #[test]
    fn a_growing_last_share_keeps_its_users(
        (a, b, c, d) in (0u32..100, 1u32..100, 0u32..100, 1u32..100),
        roll in any::<u64>(),
    ) {
        prop_assume!(u64::from(d) * u64::from(a + b) >= u64::from(b) * u64::from(c + d));
        let (before, after) = (Split::new([a, b]).pick(roll), Split::new([c, d]).pick(roll));
        prop_assert!(before == 0 || after == 1, "{a}/{b} -> {c}/{d}: {before} -> {after}");
    }

    /// Shuffling the declaration order of routes that are not tied changes no decision.
    #[test]
    fn declaration_order_of_untied_routes_does_not_matter(
        specs in prop::collection::vec((0usize..3, 0usize..5, any::<bool>(), 0usize..3), 1..12),
        seed in any::<u64>(),
        requests in prop::collection::vec((0usize..3, 0usize..6, any::<bool>(), 0usize..3), 1..20),
    ) {
        // Keep one route per precedence key, so no two routes are tied.
        let mut seen = std::collections::HashSet::new();
        let specs: Vec<_> = specs.into_iter().filter(|s| seen.insert(*s)).collect();
        let routes: Vec<Arc<CompiledRoute>> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| spec_route(i, *s))
            .collect();
        let mut shuffled = routes.clone();
        fastrand_shuffle(&mut shuffled, seed);
        let shuffled: Vec<_> = shuffled
            .into_iter()
            .enumerate()
            .map(|(order, r)| Arc::new(CompiledRoute::new(r.config.clone(), order)))
            .collect();
        let a = RouteTable::from_routes(routes);
        let b = RouteTable::from_routes(shuffled);
        for (host, path, post, hdrs) in requests {
            let host = ["a.test", "x.a.test", "b.test"][host];
            let path = ["/", "/a", "/a/b", "/a/b/c", "/z", "/a/bc"][path];
            let values = [("x-h0", "1"), ("x-h1", "1")];
            let req = Request { method: if post { "POST" } else { "GET" }, host, path, query: None, headers: &HeaderList(&values[..hdrs.min(2)]) };
            let name = |t: &RouteTable| t.find(&req).map(|f| f.route.config.name.clone());
            prop_assert_eq!(name(&a), name(&b));
        }
    }
}

proptest! {
    /// `find` (fast, no allocation) and `explain` (with reasons) never disagree.
    #[test]
    fn matches_agrees_with_mismatch(
        spec in (0usize..3, 0usize..5, any::<bool>(), 0usize..3),
        path in 0usize..6,
        post in any::<bool>(),
        hdrs in 0usize..3,
    ) {
        let route = spec_route(0, spec);
        let m = &route.config.matches[0];
        let path = ["/", "/a", "/a/b", "/a/b/c", "/z", "/a/bc"][path];
        let values = [("x-h0", "1"), ("x-h1", "1")];
        let headers = HeaderList(&values[..hdrs]);
        let req = Request { method: if post { "POST" } else { "GET" }, host: "a.test", path, query: None, headers: &headers };
        prop_assert_eq!(matcher::matches(m, &req), matcher::mismatch(m, &req).is_none());
    }
}

proptest! {
    /// The first-segment index only skips entries that cannot match: `find` picks the
    /// route `explain`, which tries every entry, names the winner.
    #[test]
    fn find_agrees_with_explain(
        specs in prop::collection::vec((0usize..3, 0usize..8, any::<bool>(), 0usize..3), 1..16),
        requests in prop::collection::vec((0usize..3, 0usize..10, any::<bool>(), 0usize..3), 1..20),
    ) {
        let routes: Vec<_> = specs.iter().enumerate().map(|(i, s)| spec_route(i, *s)).collect();
        let table = RouteTable::from_routes(routes);
        for (host, path, post, hdrs) in requests {
            let host = ["a.test", "x.a.test", "b.test"][host];
            let path = ["/", "/a", "/a/b", "/a/b/c", "/z", "/a/bc", "/z/", "/zz", "/a/", "*"][path];
            let values = [("x-h0", "1"), ("x-h1", "1")];
            let req = Request { method: if post { "POST" } else { "GET" }, host, path, query: None, headers: &HeaderList(&values[..hdrs.min(2)]) };
            let found = table.find(&req).map(|f| (f.route.config.name.clone(), f.block));
            let winner = table
                .explain(&req)
                .into_iter()
                .find(|c| c.verdict == Verdict::Wins)
                .map(|c| (c.route.config.name.clone(), c.block));
            prop_assert_eq!(found, winner);
        }
    }
}

/// A route from (host kind, path kind, methods?, header count).
fn spec_route(
    i: usize,
    (host, path, post, headers): (usize, usize, bool, usize),
) -> Arc<CompiledRoute> {
    use weir_config::{Action, HostPattern, Match, PathMatch, Route, ValueMatch};
    let hosts = match host {
        0 => vec![],
        1 => vec![HostPattern::Suffix(".a.test".into())],
        _ => vec![HostPattern::Exact("a.test".into())],
    };
    let path = match path {
        0 => None,
        1 => Some(PathMatch::Prefix("/a".into())),
        2 => Some(PathMatch::Prefix("/a/b".into())),
        3 => Some(PathMatch::Exact("/a/b".into())),
        5 => Some(PathMatch::Prefix("/z/".into())),
        6 => Some(PathMatch::Exact("/".into())),
        7 => Some(PathMatch::Prefix("/".into())),
        _ => Some(PathMatch::Regex(weir_config::Pattern {
            source: "/a.*".into(),
            regex: regex_for("/a.*"),
        })),
    };
    let headers = (0..headers)
        .map(|h| (format!("x-h{h}"), ValueMatch::Present(true)))
        .collect();
    let methods = if post {
        vec!["POST".to_string()]
    } else {
        vec![]
    };
    let config = Route {
        name: format!("r{i}"),
        listeners: vec![],
        destinations: vec![],
        hosts,
        matches: vec![Match {
            path,
            methods,
            headers,
            query: vec![],
        }],
        action: Action::DirectResponse {
            status: 200,
            body: String::new(),
        },
        rewrite: None,
        fault: None,
        mirror: None,
        timeout: None,
        retry: Default::default(),
        request_headers: Default::default(),
        response_headers: Default::default(),
        origin: String::new(),
    };
    Arc::new(CompiledRoute::new(config, i))
}

fn regex_for(pattern: &str) -> regex::Regex {
    regex::Regex::new(&format!("^(?:{pattern})$")).unwrap()
}

fn fastrand_shuffle<T>(items: &mut [T], seed: u64) {
    // A tiny LCG keeps the test deterministic per proptest case.
    let mut state = seed | 1;
    for i in (1..items.len()).rev() {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = (state >> 33) as usize % (i + 1);
        items.swap(i, j);
    }
}

#[test]
fn tcp_and_tls_listeners_take_only_the_routes_that_name_them() {
    let text = format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\n\
         [[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:5432\"\nprotocol = \"tcp\"\n\
         [[listener]]\nname = \"pass\"\nlisten = \"127.0.0.1:8443\"\nprotocol = \"tls\"\n\
         [[service]]\nname = \"s\"\nendpoints = [\"127.0.0.1:1\"]\n\
         [[route]]\nname = \"pg\"\nlisteners = [\"db\"]\n{BACKEND}\
         [[route]]\nname = \"any\"\n{BACKEND}\
         [[route]]\nname = \"sni\"\nlisteners = [\"pass\"]\nhosts = [\"*.example.com\"]\n{BACKEND}"
    );
    let loaded =
        weir_config::parse("t.toml", &text, Role::Gateway).unwrap_or_else(|e| panic!("{e}"));
    let names = |listener: &str| -> Vec<String> {
        let table = RouteTable::new(&loaded.config, listener);
        table
            .routes()
            .iter()
            .map(|r| r.config.name.clone())
            .collect()
    };
    assert_eq!(names("web"), ["any"]);
    assert_eq!(names("db"), ["pg"]);
    assert_eq!(names("pass"), ["sni"]);
    // The SNI picks a tls listener's route as a Host would.
    let t = RouteTable::new(&loaded.config, "pass");
    assert_eq!(
        route(&t, "", "db.example.com/", &[]).as_deref(),
        Some("sni")
    );
    assert_eq!(route(&t, "", "example.org/", &[]), None);
}
