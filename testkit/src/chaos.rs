//! Helpers of the fault suites, shared by the program's tests
//! (`tests/faults.rs`, `tests/reset_kill.rs`) and the library's
//! (`runsync-tests`): reproducible pseudo-random numbers, and a future
//! dropped after a chosen number of polls.

/// A xorshift step: reproducible pseudo-random numbers without a dependency.
pub fn next_random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Polls `future` at most `polls` times, yielding to the runtime between
/// polls, then drops it if it has not finished: a cancellation at whatever
/// await it had reached. Returns its output, if any, and the polls made.
pub async fn poll_at_most<F: Future>(future: F, polls: u64) -> (Option<F::Output>, u64) {
    let mut future = std::pin::pin!(future);
    let mut made = 0;
    while made < polls {
        made += 1;
        let poll =
            std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx))).await;
        if let std::task::Poll::Ready(output) = poll {
            return (Some(output), made);
        }
        tokio::task::yield_now().await;
    }
    (None, made)
}
