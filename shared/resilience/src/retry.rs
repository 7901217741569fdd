//! Retry policy (DESIGN.md `route.retry`): which failures are retried, how long to back off,
//! and the per-service budget that keeps retries from storming a failing upstream.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use weir_config::{Budget, RetryOn, GRPC_RETRY_ON};

/// How a try failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection was never made: the request provably did not reach the upstream.
    ConnectFailure,
    /// An HTTP/2 stream the upstream refused: it provably did not process the request.
    RefusedStream,
    /// The connection broke before a complete response.
    Reset,
    /// The per-try timeout ran out (treated as a 504 by the conditions).
    Timeout,
    /// The upstream answered with this status.
    Status(u16),
    /// A gRPC call failed with this `grpc-status` (in a trailers-only response).
    Grpc(u8),
}

impl Failure {
    /// Whether a try that failed so is repeated only for idempotent methods (or with
    /// `non_idempotent = true`): the upstream may have acted on the request. Not so when it
    /// provably never got it, nor for a gRPC status named in `on`: every gRPC call is a POST,
    /// and naming a status says the call may be repeated on it, as in gRPC's own retry policy.
    pub fn needs_idempotent_method(self) -> bool {
        !matches!(
            self,
            Failure::ConnectFailure | Failure::RefusedStream | Failure::Grpc(_)
        )
    }

    /// The `reason` label of `weir_upstream_retries_total`.
    pub fn reason(self) -> String {
        match self {
            Failure::ConnectFailure => "connect-failure".into(),
            Failure::RefusedStream => "refused-stream".into(),
            Failure::Reset => "reset".into(),
            Failure::Timeout => "timeout".into(),
            Failure::Status(code) => code.to_string(),
            Failure::Grpc(code) => (GRPC_RETRY_ON.iter())
                .find(|&&(_, c)| c == code)
                .map_or_else(|| format!("grpc-{code}"), |(name, _)| name.to_string()),
        }
    }
}

/// Whether `on` lists `failure` (Envoy's `retry_on` semantics: "5xx" and "gateway-error" also
/// cover failures without a response).
pub fn retriable(on: &RetryOn, failure: Failure) -> bool {
    let no_response = on.any_5xx || on.gateway_error;
    match failure {
        Failure::ConnectFailure => on.connect_failure || no_response,
        Failure::RefusedStream => on.refused_stream || no_response,
        Failure::Reset => on.reset || no_response,
        Failure::Timeout => on.reset || no_response || on.statuses.contains(&504),
        Failure::Status(code) => {
            on.statuses.contains(&code)
                || (on.any_5xx && code >= 500)
                || (on.gateway_error && matches!(code, 502..=504))
                || (on.retriable_4xx && code == 409)
        }
        Failure::Grpc(code) => on.grpc.contains(&code),
    }
}

/// The wait before retry number `retry` (1 for the first retry): exponential with full
/// jitter, a random time up to `base × 2^(retry-1)`, at most 10 × `base`.
pub fn backoff(base: Duration, retry: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(base * 10);
    ceiling.mul_f64(fastrand::f64())
}

/// Milli-tokens: one retry costs 1,000.
const TOKEN: i64 = 1000;

/// A service's retry budget, shared by every route to it: each request earns `ratio` of a
/// retry and the clock earns `min_per_second` retries a second; a retry spends one. So over
/// any stretch, retries ≤ ratio × requests + min_per_second × seconds + what was banked, and
/// at most 10 seconds' worth of `min_per_second` (at least 10) can be banked.
#[derive(Debug)]
pub struct RetryBudget {
    tokens: AtomicI64,
    /// Last refill, in ms after `epoch`.
    refilled: AtomicU64,
    epoch: Instant,
}

impl Default for RetryBudget {
    /// Starts with one second's worth of `min_per_second` to spend.
    fn default() -> Self {
        let now = Instant::now();
        RetryBudget {
            tokens: AtomicI64::new(0),
            refilled: AtomicU64::new(0),
            epoch: now.checked_sub(Duration::from_secs(1)).unwrap_or(now),
        }
    }
}

impl RetryBudget {
    /// A request to the service: earns `ratio` of a retry.
    pub fn deposit(&self, budget: &Budget) {
        let earned = (budget.ratio * TOKEN as f64) as i64;
        if earned > 0 {
            let cap = cap(budget);
            let before = self.tokens.fetch_add(earned, Ordering::AcqRel);
            if before + earned > cap {
                self.tokens.fetch_min(cap, Ordering::AcqRel);
            }
        }
    }

    /// Spends one retry if the budget has one.
    pub fn try_withdraw(&self, budget: &Budget) -> bool {
        let now = Instant::now().duration_since(self.epoch).as_millis() as u64;
        let last = self.refilled.load(Ordering::Acquire);
        if now > last
            && self
                .refilled
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let earned = ((now - last) as i64).saturating_mul(i64::from(budget.min_per_second));
            let before = self.tokens.fetch_add(earned, Ordering::AcqRel);
            if before + earned > cap(budget) {
                self.tokens.fetch_min(cap(budget), Ordering::AcqRel);
            }
        }
        self.tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t >= TOKEN).then_some(t - TOKEN)
            })
            .is_ok()
    }
}

fn cap(budget: &Budget) -> i64 {
    i64::from(budget.min_per_second.max(1)) * 10 * TOKEN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(names: &[&str]) -> RetryOn {
        let mut on = RetryOn::default();
        for n in names {
            match *n {
                "connect-failure" => on.connect_failure = true,
                "5xx" => on.any_5xx = true,
                "gateway-error" => on.gateway_error = true,
                "retriable-4xx" => on.retriable_4xx = true,
                code => on.statuses.push(code.parse().unwrap()),
            }
        }
        on
    }

    #[test]
    fn conditions_follow_envoy() {
        let default = on(&["connect-failure", "503"]);
        assert!(retriable(&default, Failure::ConnectFailure));
        assert!(retriable(&default, Failure::Status(503)));
        assert!(!retriable(&default, Failure::Status(500)));
        assert!(!retriable(&default, Failure::Reset));
        let gw = on(&["gateway-error"]);
        assert!(retriable(&gw, Failure::Status(504)));
        assert!(retriable(&gw, Failure::Timeout));
        assert!(!retriable(&gw, Failure::Status(500)));
        assert!(retriable(&on(&["5xx"]), Failure::Status(500)));
        assert!(retriable(&on(&["retriable-4xx"]), Failure::Status(409)));
        assert!(!Failure::ConnectFailure.needs_idempotent_method());
        assert!(Failure::Status(503).needs_idempotent_method());
    }

    #[test]
    fn grpc_conditions_name_statuses_and_repeat_posts() {
        let unavailable = RetryOn {
            grpc: vec![14],
            ..RetryOn::default()
        };
        assert!(retriable(&unavailable, Failure::Grpc(14)));
        assert!(!retriable(&unavailable, Failure::Grpc(13)));
        assert!(!retriable(&on(&["5xx"]), Failure::Grpc(14)));
        assert!(!Failure::Grpc(14).needs_idempotent_method());
        assert_eq!(Failure::Grpc(14).reason(), "unavailable");
        assert_eq!(Failure::Grpc(4).reason(), "deadline-exceeded");
    }

    #[test]
    fn backoff_has_full_jitter_under_a_growing_ceiling() {
        let base = Duration::from_millis(25);
        for retry in 1..8 {
            let ceiling = (base * (1 << (retry - 1))).min(base * 10);
            let waits: Vec<_> = (0..2000).map(|_| backoff(base, retry)).collect();
            assert!(waits.iter().all(|w| *w <= ceiling), "retry {retry}");
            // Full jitter: spread over the whole range, not bunched at the ceiling.
            assert!(waits.iter().any(|w| *w < ceiling / 4), "retry {retry}");
            assert!(waits.iter().any(|w| *w > ceiling * 3 / 4), "retry {retry}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_ratio_times_requests_plus_min_per_second() {
        let budget = Budget {
            ratio: 0.2,
            min_per_second: 5,
        };
        let b = RetryBudget::default();
        // 10 s of 100 requests a second, every one wanting a retry.
        let mut retries = 0;
        for _ in 0..10 {
            for _ in 0..100 {
                b.deposit(&budget);
                if b.try_withdraw(&budget) {
                    retries += 1;
                }
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // 0.2 × 1000 + 5 × 10 = 250 at most.
        assert!((240..=250).contains(&retries), "{retries}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_budget_banks_at_most_ten_seconds() {
        let budget = Budget {
            ratio: 0.0,
            min_per_second: 2,
        };
        let b = RetryBudget::default();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let burst = (0..1000).filter(|_| b.try_withdraw(&budget)).count();
        assert_eq!(burst, 20);
    }
}
