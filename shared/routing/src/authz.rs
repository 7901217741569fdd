//! Authorization of the sidecar's inbound requests (`[[inbound.policy]]`), after Istio's
//! AuthorizationPolicy: deny policies are checked first; then, if any allow policy exists,
//! the request must match one.

pub use weir_config::NO_ALLOW;
use weir_config::{Policy, PolicyAction};

/// `Ok` when the policies let `peer` (its SPIFFE id; `None` without a client certificate)
/// send `method` to `path`; else the name of the policy that refused it.
pub fn authorize<'a>(
    policies: &'a [Policy],
    peer: Option<&str>,
    method: &str,
    path: &str,
) -> Result<(), &'a str> {
    let of = |action| policies.iter().filter(move |p| p.action == action);
    let applies = |p: &&Policy| matches(p, peer, method, path);
    if let Some(deny) = of(PolicyAction::Deny).find(applies) {
        return Err(&deny.name);
    }
    let mut allows = of(PolicyAction::Allow).peekable();
    if allows.peek().is_none() || allows.any(|p| applies(&p)) {
        Ok(())
    } else {
        Err(NO_ALLOW)
    }
}

/// The same for a TCP connection to one of the app's `tcp_ports`, which has no method or
/// path. As Istio decides it, each way closed: a deny policy denies the connection when its
/// principals match, whatever its HTTP fields say; an allow policy with HTTP fields never
/// allows it.
pub fn authorize_connection<'a>(policies: &'a [Policy], peer: Option<&str>) -> Result<(), &'a str> {
    let of = |action| policies.iter().filter(move |p| p.action == action);
    if let Some(deny) = of(PolicyAction::Deny).find(|p| principal_matches(p, peer)) {
        return Err(&deny.name);
    }
    let mut allows = of(PolicyAction::Allow).peekable();
    let allows_tcp =
        |p: &Policy| p.methods.is_empty() && p.paths.is_empty() && principal_matches(p, peer);
    if allows.peek().is_none() || allows.any(allows_tcp) {
        Ok(())
    } else {
        Err(NO_ALLOW)
    }
}

fn principal_matches(p: &Policy, peer: Option<&str>) -> bool {
    // Only a SPIFFE id is a principal: a certificate's other URIs name no workload.
    let peer = peer.filter(|id| id.starts_with("spiffe://"));
    p.principals.is_empty()
        || peer.is_some_and(|id| p.principals.iter().any(|q| q == "*" || q == id))
}

/// Every field the policy sets matches; an unset one matches anything.
fn matches(p: &Policy, peer: Option<&str>, method: &str, path: &str) -> bool {
    let principal = principal_matches(p, peer);
    // Methods are case-sensitive (RFC 9110 §9.1), but an app may not be: "get" must not slip
    // past a deny of GET. The policy's are upper-case already.
    let method = p.methods.is_empty() || p.methods.iter().any(|m| m.eq_ignore_ascii_case(method));
    let path = p.paths.is_empty() || p.paths.iter().any(|pattern| path_matches(pattern, path));
    principal && method && path
}

/// Exact, "prefix*", "*suffix" or "*".
fn path_matches(pattern: &str, path: &str) -> bool {
    match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
        (Some(suffix), _) => path.ends_with(suffix),
        (None, Some(prefix)) => path.starts_with(prefix),
        (None, None) => pattern == path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(
        name: &str,
        action: PolicyAction,
        principals: &[&str],
        methods: &[&str],
        paths: &[&str],
    ) -> Policy {
        let strings = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        Policy {
            name: name.into(),
            action,
            principals: strings(principals),
            methods: strings(methods),
            paths: strings(paths),
        }
    }

    const PRODUCTPAGE: &str = "spiffe://mesh.local/ns/default/sa/productpage";
    const RATINGS: &str = "spiffe://mesh.local/ns/default/sa/ratings";

    #[test]
    fn a_method_in_lower_case_is_no_way_past_a_deny() {
        let deny = [policy(
            "no-deletes",
            PolicyAction::Deny,
            &[],
            &["DELETE"],
            &[],
        )];
        for method in ["DELETE", "delete", "Delete"] {
            assert_eq!(authorize(&deny, None, method, "/"), Err("no-deletes"));
        }
        assert_eq!(authorize(&deny, None, "GET", "/"), Ok(()));
    }

    #[test]
    fn no_policy_allows_everything() {
        assert_eq!(authorize(&[], None, "DELETE", "/"), Ok(()));
    }

    #[test]
    fn an_allow_policy_admits_only_what_it_matches() {
        let allow = [policy(
            "reads",
            PolicyAction::Allow,
            &[PRODUCTPAGE],
            &["GET"],
            &["/reviews/*"],
        )];
        assert_eq!(
            authorize(&allow, Some(PRODUCTPAGE), "GET", "/reviews/1"),
            Ok(())
        );
        for (peer, method, path) in [
            (Some(RATINGS), "GET", "/reviews/1"),
            (None, "GET", "/reviews/1"),
            (Some(PRODUCTPAGE), "POST", "/reviews/1"),
            (Some(PRODUCTPAGE), "GET", "/admin"),
        ] {
            assert_eq!(
                authorize(&allow, peer, method, path),
                Err(NO_ALLOW),
                "{peer:?} {method} {path}"
            );
        }
    }

    #[test]
    fn deny_wins_over_allow_and_star_means_any_verified_peer() {
        let policies = [
            policy("anyone-verified", PolicyAction::Allow, &["*"], &[], &[]),
            policy(
                "no-admin",
                PolicyAction::Deny,
                &[],
                &[],
                &["/admin*", "*.bak"],
            ),
        ];
        assert_eq!(authorize(&policies, Some(RATINGS), "GET", "/x"), Ok(()));
        assert_eq!(authorize(&policies, None, "GET", "/x"), Err(NO_ALLOW));
        // A certificate whose URI is no SPIFFE id names no workload: not "*".
        let other = Some("https://example.com/whoever");
        assert_eq!(authorize(&policies, other, "GET", "/x"), Err(NO_ALLOW));
        assert_eq!(
            authorize(&policies, Some(RATINGS), "GET", "/admin/users"),
            Err("no-admin")
        );
        assert_eq!(
            authorize(&policies, Some(RATINGS), "GET", "/db.bak"),
            Err("no-admin")
        );
    }

    #[test]
    fn a_connection_is_denied_by_principal_and_allowed_only_without_http_fields() {
        let policies = [
            policy(
                "no-ratings",
                PolicyAction::Deny,
                &[RATINGS],
                &[],
                &["/admin*"],
            ),
            policy("reads", PolicyAction::Allow, &["*"], &["GET"], &[]),
            policy("productpage", PolicyAction::Allow, &[PRODUCTPAGE], &[], &[]),
        ];
        // The deny policy's path does not narrow it for TCP: ratings is denied outright.
        assert_eq!(
            authorize_connection(&policies, Some(RATINGS)),
            Err("no-ratings")
        );
        assert_eq!(authorize_connection(&policies, Some(PRODUCTPAGE)), Ok(()));
        // "reads" would let any verified peer GET; it allows no connection.
        let other = "spiffe://mesh.local/ns/default/sa/other";
        assert_eq!(authorize_connection(&policies, Some(other)), Err(NO_ALLOW));
        assert_eq!(authorize_connection(&policies, None), Err(NO_ALLOW));
        assert_eq!(authorize_connection(&[], None), Ok(()));
    }

    #[test]
    fn path_patterns() {
        assert!(path_matches("*", "/anything"));
        assert!(path_matches("/a", "/a"));
        assert!(!path_matches("/a", "/a/b"));
        assert!(path_matches("/a/*", "/a/b"));
        assert!(!path_matches("/a/*", "/a"));
        assert!(path_matches("*.json", "/x/y.json"));
    }
}
