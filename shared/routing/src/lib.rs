//! weir-routing: the route table (DESIGN.md §3, "Route precedence").
//!
//! Pure functions over the validated config: no I/O, no clock, no randomness of its own.
//! A [`RouteTable`] is compiled per listener; [`RouteTable::find`] picks the route for a
//! request, [`RouteTable::explain`] says why each candidate did or did not win, and
//! [`Split::pick`] turns a caller-supplied roll into a weighted backend choice.

pub mod authz;
mod explain;
mod matcher;
mod path;

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use weir_config::{Action, Config, HostPattern, Match, PathMatch, Route};

pub use explain::{Candidate, Verdict};

#[cfg(test)]
mod sampler_tests;
pub use matcher::{HeaderList, Headers, Request};
pub use path::normalize_path;

/// A route compiled for matching: the config plus its precomputed split.
#[derive(Debug)]
pub struct CompiledRoute {
    pub config: Route,
    /// The weighted split of `Action::Backends`; `None` for other actions.
    pub split: Option<Split>,
    /// Position in the config (files sorted by name, then position).
    pub order: usize,
    /// Which requests get the route's injected delay, and which its abort.
    pub delay_sampler: Sampler,
    pub abort_sampler: Sampler,
    /// Which requests are copied to the route's mirror.
    pub mirror_sampler: Sampler,
}

impl CompiledRoute {
    pub fn new(config: Route, order: usize) -> CompiledRoute {
        let split = match &config.action {
            Action::Backends(b) => Some(Split::new(b.iter().map(|b| b.weight))),
            _ => None,
        };
        CompiledRoute {
            config,
            split,
            order,
            delay_sampler: Sampler::new(0.618_033_988_749_895),
            abort_sampler: Sampler::new(0.414_213_562_373_095),
            mirror_sampler: Sampler::new(0.732_050_807_568_877),
        }
    }
}

/// Picks a given percentage of calls, evenly spread: call n is picked when the fractional part
/// of n × step falls below the percentage (a Weyl sequence). Unlike a random draw, the share
/// is exact to within a few calls over any window, so "5% of requests" means 5%.
#[derive(Debug)]
pub struct Sampler {
    calls: std::sync::atomic::AtomicU64,
    /// An irrational step; different samplers use different steps to stay independent.
    step: f64,
}

impl Sampler {
    /// Starts at a random place in the sequence: every reload makes new samplers, and a fixed
    /// start would give every route the same first picks after each one (with 1%, none in the
    /// first 89 calls; a route whose config changes often would never see its fault or mirror).
    pub fn new(step: f64) -> Sampler {
        Sampler {
            calls: std::sync::atomic::AtomicU64::new(fastrand::u64(1..1 << 24)),
            step,
        }
    }

    /// Whether this call is among the `percent` (0-100) picked.
    pub fn pick(&self, percent: f64) -> bool {
        if percent >= 100.0 {
            return true;
        }
        if percent <= 0.0 {
            return false;
        }
        let n = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (n as f64 * self.step).fract() * 100.0 < percent
    }
}

/// The routes attached to one listener, indexed by host.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<CompiledRoute>>,
    exact: HashMap<String, Entries>,
    /// Longest suffix first.
    suffix: Vec<(String, Entries)>,
    any: Entries,
}

/// One host's match blocks in precedence order, and the same narrowed by the first segment
/// of the path. Most routes name theirs (`/api/...`), so a request skips the routes of
/// other segments without looking at them.
#[derive(Debug, Default)]
struct Entries {
    all: Vec<Entry>,
    /// Sorted by segment. Each list holds the entries of that segment and every unkeyed one
    /// (regex, no path, or a prefix like `/` or `/ap` that ends inside the segment), in
    /// precedence order.
    by_segment: Vec<(Box<str>, Vec<Entry>)>,
    /// The unkeyed entries alone, for a path whose segment no entry names.
    unkeyed: Vec<Entry>,
}

impl Entries {
    fn new(mut all: Vec<Entry>, routes: &[Arc<CompiledRoute>]) -> Entries {
        all.sort_by_key(|e| e.rank);
        let key = |e: &Entry| {
            let m = e.block.map(|b| &routes[e.route].config.matches[b]);
            m.and_then(|m| m.path.as_ref()).and_then(segment_of)
        };
        let mut segments: Vec<&str> = all.iter().filter_map(key).collect();
        segments.sort_unstable();
        segments.dedup();
        let by_segment = segments
            .into_iter()
            .map(|seg| {
                let list = all.iter().filter(|e| key(e).is_none_or(|k| k == seg));
                (seg.into(), list.cloned().collect())
            })
            .collect();
        let unkeyed = all.iter().filter(|e| key(e).is_none()).cloned().collect();
        Entries {
            all,
            by_segment,
            unkeyed,
        }
    }

    /// The entries that can match `path`, in precedence order.
    fn for_path(&self, path: &str) -> &[Entry] {
        let Some(rest) = path.strip_prefix('/') else {
            return &self.unkeyed;
        };
        let seg = rest.split('/').next().unwrap_or("");
        match self.by_segment.binary_search_by(|(s, _)| (**s).cmp(seg)) {
            Ok(i) => &self.by_segment[i].1,
            Err(_) => &self.unkeyed,
        }
    }
}

/// The first path segment every request a path match accepts must have, if there is one:
/// `/api/users` and prefix `/api/` need `api`; prefix `/api` also takes `/apis`, so it has
/// none.
fn segment_of(path: &PathMatch) -> Option<&str> {
    match path {
        PathMatch::Exact(p) => p
            .strip_prefix('/')
            .map(|r| r.split('/').next().unwrap_or("")),
        PathMatch::Prefix(p) => p.strip_prefix('/')?.split_once('/').map(|(seg, _)| seg),
        PathMatch::Regex(_) => None,
    }
}

/// One match block of one route, with its precedence key.
#[derive(Debug, Clone)]
struct Entry {
    route: usize,
    /// `None` for a route without match blocks (it matches every request).
    block: Option<usize>,
    rank: Rank,
    /// The block's path test, also kept here: `find` passes over an entry whose path cannot
    /// match without reading its route, which in a big table is a few cache misses away.
    path: PathTest,
}

#[derive(Debug, Clone)]
enum PathTest {
    /// No path match, or a regex (left to the full match).
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
}

impl PathTest {
    fn new(m: Option<&PathMatch>) -> PathTest {
        match m {
            Some(PathMatch::Exact(p)) => PathTest::Exact(p.as_str().into()),
            Some(PathMatch::Prefix(p)) => PathTest::Prefix(p.as_str().into()),
            Some(PathMatch::Regex(_)) | None => PathTest::Any,
        }
    }

    fn admits(&self, path: &str) -> bool {
        match self {
            PathTest::Any => true,
            PathTest::Exact(p) => path == &**p,
            PathTest::Prefix(p) => path.starts_with(&**p),
        }
    }
}

/// Smaller sorts first: path exact > longest prefix > regex > none; then methods > none;
/// then more headers; then more query params; then declaration order.
type Rank = (
    u8,
    Reverse<usize>,
    bool,
    Reverse<usize>,
    Reverse<usize>,
    usize,
    usize,
);

/// The route chosen for a request, and which of its match blocks matched.
#[derive(Debug, Clone, Copy)]
pub struct Found<'a> {
    pub route: &'a Arc<CompiledRoute>,
    pub block: Option<usize>,
}

impl RouteTable {
    /// Compiles the routes attached to `listener` (routes without `listeners` attach to all).
    pub fn new(config: &Config, listener: &str) -> RouteTable {
        // A route without `listeners` is on every HTTP listener; `tcp` and `tls` ones take
        // only the routes that name them.
        let stream =
            (config.listeners.iter()).any(|l| l.name == listener && l.protocol.is_stream());
        let routes = config
            .routes
            .iter()
            .enumerate()
            // A route with `destinations` (the sidecar's captured TCP) is in no listener's
            // table: the connection's original address picks it.
            .filter(|(_, r)| {
                (r.listeners.is_empty() && !stream && r.destinations.is_empty())
                    || r.listeners.iter().any(|l| l == listener)
            })
            .map(|(order, r)| Arc::new(CompiledRoute::new(r.clone(), order)))
            .collect();
        Self::from_routes(routes)
    }

    /// Builds a table from compiled routes; their `order` decides ties.
    pub fn from_routes(routes: Vec<Arc<CompiledRoute>>) -> RouteTable {
        let mut table = RouteTable {
            routes,
            ..Default::default()
        };
        let mut exact: HashMap<String, Vec<Entry>> = HashMap::new();
        let mut suffix: HashMap<String, Vec<Entry>> = HashMap::new();
        let mut any = Vec::new();
        for (index, route) in table.routes.iter().enumerate() {
            let entries = entries(index, route);
            if route.config.hosts.is_empty() {
                any.extend(entries.iter().cloned());
            }
            for host in &route.config.hosts {
                let list = match host {
                    HostPattern::Exact(h) => exact.entry(h.clone()).or_default(),
                    HostPattern::Suffix(s) => suffix.entry(s.clone()).or_default(),
                };
                list.extend(entries.iter().cloned());
            }
        }
        let routes = &table.routes;
        table.exact = exact
            .into_iter()
            .map(|(host, list)| (host, Entries::new(list, routes)))
            .collect();
        table.suffix = suffix
            .into_iter()
            .map(|(host, list)| (host, Entries::new(list, routes)))
            .collect();
        table
            .suffix
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        table.any = Entries::new(any, routes);
        table
    }

    /// The winning route for `req`, or `None` (404 `NR`).
    pub fn find(&self, req: &Request<'_>) -> Option<Found<'_>> {
        self.tiers(req.host).find_map(|entries| {
            entries.for_path(req.path).iter().find_map(|e| {
                if !e.path.admits(req.path) {
                    return None;
                }
                let route = &self.routes[e.route];
                let hit = match e.block {
                    None => true,
                    Some(b) => matcher::matches(&route.config.matches[b], req),
                };
                hit.then_some(Found {
                    route,
                    block: e.block,
                })
            })
        })
    }

    /// Whether any route names hosts; when none does, `find` ignores the request's host.
    pub fn has_hosts(&self) -> bool {
        !self.exact.is_empty() || !self.suffix.is_empty()
    }

    /// Every route of the table, in declaration order.
    pub fn routes(&self) -> &[Arc<CompiledRoute>] {
        &self.routes
    }

    /// The entry lists that apply to `host`, most specific first.
    fn tiers<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Entries> + 'a {
        let exact = self.exact.get(host);
        let suffix = self
            .suffix
            .iter()
            .filter(move |(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
            .map(|(_, l)| l);
        exact
            .into_iter()
            .chain(suffix)
            .chain(std::iter::once(&self.any))
    }
}

fn entries(index: usize, route: &CompiledRoute) -> Vec<Entry> {
    let blocks = &route.config.matches;
    if blocks.is_empty() {
        let rank = (3, Reverse(0), true, Reverse(0), Reverse(0), route.order, 0);
        return vec![Entry {
            route: index,
            block: None,
            rank,
            path: PathTest::Any,
        }];
    }
    blocks
        .iter()
        .enumerate()
        .map(|(b, m)| Entry {
            route: index,
            block: Some(b),
            rank: rank(m, route.order, b),
            path: PathTest::new(m.path.as_ref()),
        })
        .collect()
}

fn rank(m: &Match, order: usize, block: usize) -> Rank {
    let (kind, len) = match &m.path {
        Some(PathMatch::Exact(p)) => (0, p.len()),
        Some(PathMatch::Prefix(p)) => (1, p.len()),
        Some(PathMatch::Regex(_)) => (2, 0),
        None => (3, 0),
    };
    (
        kind,
        Reverse(len),
        m.methods.is_empty(),
        Reverse(m.headers.len()),
        Reverse(m.query.len()),
        order,
        block,
    )
}

/// A weighted choice between backends.
#[derive(Debug, Clone)]
pub struct Split {
    /// Running sums of the weights; the last is the total.
    cumulative: Vec<u64>,
}

impl Split {
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Split {
        let mut total = 0;
        let cumulative = weights
            .into_iter()
            .map(|w| {
                total += u64::from(w);
                total
            })
            .collect();
        Split { cumulative }
    }

    /// Sum of the weights.
    pub fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The backend index for a roll drawn uniformly from all of `u64`: the roll's place in its
    /// range, scaled to `0..total()`, where backend i has `weight[i]` of the places. A place
    /// (a sticky user's) keeps its fraction of the range whatever the total, so growing the
    /// last backend's share only ever moves users onto it (`roll % total` would not).
    pub fn pick(&self, roll: u64) -> usize {
        let place = (u128::from(roll) * u128::from(self.total())) >> 64;
        self.cumulative.partition_point(|&c| u128::from(c) <= place)
    }
}

#[cfg(test)]
mod tests;
