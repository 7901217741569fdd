//! `explain`: the decision of [`RouteTable::find`], with the reason for every other route.

use std::sync::Arc;

use weir_config::HostPattern;

use crate::matcher::{mismatch, Request};
use crate::{CompiledRoute, RouteTable};

/// One route (and match block) considered for a request, in precedence order.
#[derive(Debug)]
pub struct Candidate<'a> {
    pub route: &'a Arc<CompiledRoute>,
    pub block: Option<usize>,
    pub verdict: Verdict,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The first match: this route handles the request.
    Wins,
    /// Matches too, but a route of higher precedence won.
    Shadowed,
    /// Does not match, and why.
    NoMatch(String),
}

impl RouteTable {
    /// Every route of the table with its verdict for `req`: first the blocks of the hosts that
    /// apply, in the order `find` tries them, then the routes whose hosts do not apply.
    pub fn explain(&self, req: &Request<'_>) -> Vec<Candidate<'_>> {
        let mut out: Vec<Candidate<'_>> = Vec::new();
        let mut won = false;
        for entries in self.tiers(req.host) {
            for e in &entries.all {
                let route = &self.routes[e.route];
                let why = e
                    .block
                    .and_then(|b| mismatch(&route.config.matches[b], req));
                let verdict = match why {
                    Some(why) => Verdict::NoMatch(why),
                    None if won => Verdict::Shadowed,
                    None => {
                        won = true;
                        Verdict::Wins
                    }
                };
                out.push(Candidate {
                    route,
                    block: e.block,
                    verdict,
                });
            }
        }
        for route in &self.routes {
            if out.iter().any(|c| Arc::ptr_eq(c.route, route)) {
                continue;
            }
            let hosts: Vec<String> = route
                .config
                .hosts
                .iter()
                .map(|h| match h {
                    HostPattern::Exact(h) => h.clone(),
                    HostPattern::Suffix(s) => format!("*{s}"),
                })
                .collect();
            let why = format!("host {:?} is not one of {hosts:?}", req.host);
            out.push(Candidate {
                route,
                block: None,
                verdict: Verdict::NoMatch(why),
            });
        }
        out
    }
}
