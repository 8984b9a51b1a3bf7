//! Units of [`Engine::transaction`] handed to connections without a
//! checkout or a hop each: a unit that finds every connection busy waits in
//! the engine's queue, and the blocking thread that finishes a unit takes
//! the next one with the connection it holds (BENCHMARKS.md, "The
//! dispatch").
//!
//! What keeps the promises of the guide on failures:
//! - the caller of a queued unit also waits its turn at the gate, so a
//!   connection freed while units wait (its thread stopped serving) goes to
//!   the first of them, which takes its own unit back (or the queue's first)
//!   and runs it: no unit waits for a thread that has stopped;
//! - a unit taken back before it started (its future dropped, its deadline
//!   or the connection timeout passed) never runs; one that a thread took
//!   is cancelled as any running operation is (its watch gets the
//!   connection's canceller when it starts);
//! - a thread serves units back to back for at most [`SERVE_FOR`], and
//!   stops as soon as a checkout waits at the gate (a session's turn) or its
//!   connection must not be reused; the pool then checks, ages and hands out
//!   the connection as usual.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

use super::{Engine, Pooled};
use crate::error::Error;
use crate::manager::PoolableConnection;

/// One unit of work for a connection: run with the connection and when it
/// was handed to a new blocking thread (`None`: taken from the queue by a
/// thread already serving). Before it reports its result, it passes the
/// connection (unless it must go) to [`Keep`]: so a connection the thread
/// does not keep is back in the pool before the unit's caller is woken.
pub(crate) type Unit<C> = Box<dyn FnOnce(Pooled<C>, Option<Instant>, Keep<'_, C>) + Send>;

/// The serving thread's choice for a connection whose unit is done: keep
/// it for the next queued unit, or drop it (back to the pool).
pub(crate) type Keep<'a, C> = &'a mut dyn FnMut(Pooled<C>);

/// How long one blocking thread serves queued units back to back before
/// its connection goes back to the pool.
pub(crate) const SERVE_FOR: Duration = Duration::from_millis(100);

/// The units waiting for a connection, first come first served, each with
/// the id its caller takes it back by.
pub(crate) struct Queue<C: PoolableConnection> {
    units: Mutex<VecDeque<(u64, Unit<C>)>>,
    next_id: AtomicU64,
}

impl<C: PoolableConnection> Default for Queue<C> {
    fn default() -> Self {
        Queue {
            units: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(0),
        }
    }
}

impl<C: PoolableConnection> Queue<C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Unit<C>)>> {
        self.units.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Takes the unit `id` out of `units` if it is there, else (with
/// `or_first`) the first; counted off the pending requests in `observe`.
fn take_out<C: PoolableConnection>(
    units: &mut VecDeque<(u64, Unit<C>)>,
    id: Option<u64>,
    or_first: bool,
    observe: &crate::observe::Observe,
) -> Option<Unit<C>> {
    let at = match id.and_then(|id| units.iter().position(|(queued, _)| *queued == id)) {
        Some(at) => Some(at),
        None if or_first && !units.is_empty() => Some(0),
        None => None,
    };
    let (_, unit) = units.remove(at?)?;
    observe.units_waiting(-1.0);
    Some(unit)
}

/// Takes the unit `id` back out of the queue when dropped (its caller gave
/// up waiting): a unit no one waits for never runs.
struct TakeBack<'a, C: PoolableConnection>(&'a Engine<C>, u64);

impl<C: PoolableConnection> Drop for TakeBack<'_, C> {
    fn drop(&mut self) {
        self.0.take_back(self.1);
    }
}

impl<C: PoolableConnection> Engine<C> {
    /// A new id for a unit about to be handed over.
    pub(crate) fn unit_id(&self) -> u64 {
        self.shared.units.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A turn at the gate at once, if a connection is free and no unit
    /// waits for one (a unit that may run on the caller's thread:
    /// [`EngineOptions::run_inline`](crate::EngineOptions::run_inline)).
    pub(crate) fn free_turn(&self) -> Option<OwnedSemaphorePermit> {
        self.free_turn_while(&self.shared.units.lock())
    }

    /// [`free_turn`](Self::free_turn), the queue `units` locked by the caller.
    fn free_turn_while(&self, units: &VecDeque<(u64, Unit<C>)>) -> Option<OwnedSemaphorePermit> {
        if units.is_empty() {
            self.shared.gate.clone().try_acquire_owned().ok()
        } else {
            None
        }
    }

    /// Takes the unit `id` back if no thread took it yet: true if it was
    /// still queued (it will never run).
    pub(crate) fn take_back(&self, id: u64) -> bool {
        let mut units = self.shared.units.lock();
        take_out(&mut units, Some(id), false, &self.shared.observe).is_some()
    }

    /// Hands `unit` (id `id`) to a connection: at once to a new blocking
    /// thread when a connection is free and no unit waits; else into the
    /// queue, for a serving thread or the next free connection. Returns
    /// `Ok` once a thread has the unit or took it (its result comes through
    /// the unit), `Err` when it never will run (its checkout failed). If
    /// this future is dropped while the unit is queued, the unit is taken
    /// back. The caller bounds the wait (and takes the unit back when it
    /// ends: [`take_back`](Self::take_back)); `checking_out` is true while
    /// this future holds the unit itself, checking a connection out for it
    /// (dropping the future then drops the unit unrun).
    pub(crate) async fn hand_over(
        &self,
        unit: Unit<C>,
        id: u64,
        checking_out: &AtomicBool,
    ) -> Result<(), Error> {
        let free = {
            let mut units = self.shared.units.lock();
            match self.free_turn_while(&units) {
                Some(turn) => Some((turn, unit)),
                None => {
                    units.push_back((id, unit));
                    self.shared.observe.units_waiting(1.0);
                    None
                }
            }
        };
        match free {
            Some((turn, unit)) => {
                checking_out.store(true, Ordering::Relaxed);
                let pooled = self.checkout_with(Some(turn)).await;
                checking_out.store(false, Ordering::Relaxed);
                self.serve_on_new_thread(pooled?, unit);
                Ok(())
            }
            None => self.wait_turn(id).await,
        }
    }

    /// A queued unit's caller waits its turn at the gate: with it, checks a
    /// connection out and serves its own unit if still queued, else the
    /// queue's first; with none queued, lets the turn go.
    async fn wait_turn(&self, id: u64) -> Result<(), Error> {
        let _take_back = TakeBack(self, id);
        let turn = self
            .shared
            .gate
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::ConnectionLost)?;
        if self.shared.units.lock().is_empty() {
            return Ok(());
        }
        let pooled = match self.checkout_with(Some(turn)).await {
            Ok(pooled) => pooled,
            // The unit's own error, if it is still queued; else another
            // waiter takes the queue's first with the next turn.
            Err(e) if self.take_back(id) => return Err(e),
            Err(_) => return Ok(()),
        };
        // No await from here until the unit is on its thread: a unit taken
        // out of the queue is never dropped unrun.
        let unit = {
            let mut units = self.shared.units.lock();
            take_out(&mut units, Some(id), true, &self.shared.observe)
        };
        if let Some(unit) = unit {
            self.serve_on_new_thread(pooled, unit);
        }
        Ok(())
    }

    /// Runs `unit` on `pooled` on a new blocking thread, which then serves
    /// queued units. At runtime shutdown the unit is dropped unrun (its
    /// caller sees its result channel closed).
    fn serve_on_new_thread(&self, pooled: Pooled<C>, unit: Unit<C>) {
        let engine = self.clone();
        let handed = Instant::now();
        tokio::task::spawn_blocking(move || engine.serve(pooled, unit, Some(handed)));
    }

    /// A blocking thread's loop: runs `unit`, then the queue's next units
    /// with the same connection while it may ([`SERVE_FOR`], no checkout
    /// waiting, the connection reusable); then the connection goes back to
    /// the pool (or is closed, if it must not be reused), before the last
    /// unit's caller is woken.
    fn serve(&self, pooled: Pooled<C>, unit: Unit<C>, handed: Option<Instant>) {
        let until = Instant::now() + SERVE_FOR;
        let (mut pooled, mut unit, mut handed) = (pooled, unit, handed);
        loop {
            let mut next = None;
            unit(pooled, handed, &mut |mut back: Pooled<C>| {
                if self.shared.waiting_checkouts.load(Ordering::Acquire) > 0
                    || Instant::now() >= until
                    || back.is_unusable()
                {
                    return;
                }
                let mut units = self.shared.units.lock();
                if let Some(following) = take_out(&mut units, None, true, &self.shared.observe) {
                    next = Some((back, following));
                }
            });
            // Not kept (or given up): the connection went back already.
            let Some(kept) = next else { return };
            (pooled, unit) = kept;
            handed = None;
        }
    }
}
