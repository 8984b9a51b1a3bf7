//! Retrying whole transactions that lost a serialization race or a deadlock.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use crate::engine::Engine;
use crate::error::{Error, Retryable};
use crate::manager::PoolableConnection;

/// How [`Engine::transaction_with_retry`] retries.
///
/// ```
/// # use std::time::Duration;
/// let policy = diesel_runsync::RetryPolicy::default().max_attempts(20);
/// assert_eq!(policy.max_attempts, 20);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubled after each failure.
    pub base_delay: Duration,
    /// Upper bound of the backoff.
    pub max_delay: Duration,
    /// How long failovers are ridden through ([`Retryable::is_failover`]:
    /// failed connects, broken or terminated connections, a node turned
    /// read-only, before `COMMIT` was sent): such failures are retried,
    /// whatever `max_attempts` says, until this long after the first one,
    /// with a backoff of at least [`FAILOVER_MIN_DELAY`]. Zero turns it
    /// off (they then count as attempts like any retryable error).
    pub failover_window: Duration,
}

/// The shortest backoff after a failover error (a failed connect waits for
/// the engine's connect backoff anyway).
pub const FAILOVER_MIN_DELAY: Duration = Duration::from_millis(50);

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(2),
            max_delay: Duration::from_millis(200),
            failover_window: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Sets [`max_attempts`](Self::max_attempts): attempts in all, the first included.
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets [`base_delay`](Self::base_delay): the backoff before the second attempt.
    #[must_use]
    pub fn base_delay(mut self, delay: Duration) -> Self {
        self.base_delay = delay;
        self
    }

    /// Sets [`failover_window`](Self::failover_window): how long failovers
    /// are retried through.
    #[must_use]
    pub fn failover_window(mut self, window: Duration) -> Self {
        self.failover_window = window;
        self
    }

    /// Sets [`max_delay`](Self::max_delay): the upper bound of the backoff.
    #[must_use]
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// The jittered backoff after `failures` failed attempts: uniformly
    /// between half and all of `base_delay * 2^(failures-1)`, capped.
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let exponential = self
            .base_delay
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(self.max_delay);
        jitter(exponential)
    }
}

/// Uniformly between half and all of `delay`.
pub(crate) fn jitter(delay: Duration) -> Duration {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let fraction = 0.5 + (random % 1_000) as f64 / 2_000.0;
    delay.mul_f64(fraction)
}

/// A result and the number of attempts it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retried<R> {
    /// What the closure returned on the attempt that committed.
    pub value: R,
    /// Attempts made, 1 when the first one committed.
    pub attempts: u32,
}

impl<C: PoolableConnection> Engine<C> {
    /// Runs `f` in a transaction of its own ([`Engine::transaction`]: `BEGIN`,
    /// `f`, `COMMIT` in one hop), and runs the whole transaction again, after a jittered
    /// backoff, when it fails with a retryable error
    /// ([`Retryable::is_retryable`]: serialization failure, deadlock, lock
    /// timeout, SQLite busy), up to `policy.max_attempts` attempts. `f` may
    /// return any error type that says whether it is retryable: Diesel's
    /// `QueryResult`, this crate's [`Error`], or your own.
    ///
    /// Every attempt starts from `BEGIN`, so it is safe with servers that
    /// ask clients to restart transactions (CockroachDB's 40001). `f` may
    /// run several times: keep side effects outside the database out of it.
    pub async fn transaction_with_retry<R, E, F>(
        &self,
        policy: &RetryPolicy,
        f: F,
    ) -> Result<Retried<R>, E>
    where
        F: Fn(&mut C) -> Result<R, E> + Send + Sync + 'static,
        R: Send + 'static,
        E: From<Error> + Retryable + std::fmt::Display + Send + 'static,
    {
        let span = self.observe().retry_span();
        let attempted = crate::observe::in_span!(&span, self.retrying(policy, f));
        if !span.is_disabled() {
            match &attempted {
                Ok(done) => span.record("db.runsync.attempts", done.attempts),
                Err(e) => {
                    span.record("error.type", crate::observe::error_type_of(e));
                    span.record("otel.status_code", "error")
                }
            };
        }
        attempted
    }

    async fn retrying<R, E, F>(&self, policy: &RetryPolicy, f: F) -> Result<Retried<R>, E>
    where
        F: Fn(&mut C) -> Result<R, E> + Send + Sync + 'static,
        R: Send + 'static,
        E: From<Error> + Retryable + std::fmt::Display + Send + 'static,
    {
        let f = Arc::new(f);
        let mut attempts = 0;
        // Attempts that count against `max_attempts` (failovers within the
        // window do not), and when the first failover error was seen.
        let mut counted = 0;
        let mut failover_since: Option<std::time::Instant> = None;
        loop {
            attempts += 1;
            let attempt_f = f.clone();
            match self.transaction(move |conn| attempt_f(conn)).await {
                Ok(value) => return Ok(Retried { value, attempts }),
                Err(e) if e.is_retryable() => {
                    let riding = e.is_failover()
                        && !policy.failover_window.is_zero()
                        && failover_since
                            .get_or_insert_with(std::time::Instant::now)
                            .elapsed()
                            < policy.failover_window;
                    if !riding {
                        counted += 1;
                        if counted >= policy.max_attempts.max(1) {
                            return Err(e);
                        }
                    }
                    let delay = if riding {
                        policy.backoff(attempts).max(FAILOVER_MIN_DELAY)
                    } else {
                        policy.backoff(counted)
                    };
                    self.observe().retry(attempts, &e, delay);
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_is_capped() {
        let policy = RetryPolicy::default()
            .max_attempts(5)
            .base_delay(Duration::from_millis(10))
            .max_delay(Duration::from_millis(35));
        let first = policy.backoff(1);
        assert!(first >= Duration::from_millis(5) && first <= Duration::from_millis(10));
        let second = policy.backoff(2);
        assert!(second >= Duration::from_millis(10) && second <= Duration::from_millis(20));
        let capped = policy.backoff(10);
        assert!(capped <= Duration::from_millis(35), "{capped:?}");
    }
}
