//! Spawning tasks: on tokio's runtime, or, on a thread that runs
//! simulations, on the thread's `LocalSet`.
//!
//! Every task the runtime (and the simulation's doubles) starts goes
//! through [`spawn`] or [`spawn_in`]; `tokio::spawn` itself is refused by
//! clippy (`clippy.toml`). The reason is the simulation's determinism: a
//! current-thread runtime keeps its tasks in lists sharded by tokio's task
//! id, and drops them at shutdown shard by shard. Task ids are numbered
//! process-wide, so when two simulations run on two threads of one process
//! (`tiproxy-sim --jobs 2`, `cargo test`), the order in which a crashed
//! host's tasks (and so its sockets) are dropped depended on how the other
//! thread's spawns interleaved; each dropped socket draws from the
//! simulated network's random numbers, and the seed's trace changed (seed
//! 6 in about one run of six). A `LocalSet` keeps its tasks in one list in
//! spawn order, so a simulation's thread spawns there.

use std::cell::Cell;
use std::future::Future;

use tokio::task::{AbortHandle, JoinHandle, JoinSet};

thread_local! {
    /// Whether this thread runs simulations (tasks go to its `LocalSet`).
    static LOCAL: Cell<bool> = const { Cell::new(false) };
}

/// Makes every task spawned on this thread from now on (until the guard
/// is dropped) a `LocalSet` task. The simulation calls it around each run;
/// spawning then needs a `LocalSet` (turmoil runs every host in one).
#[must_use = "the setting ends when the guard is dropped"]
pub fn spawn_locally_on_this_thread() -> LocalGuard {
    LocalGuard(LOCAL.replace(true))
}

/// Restores the thread's previous setting when dropped.
#[derive(Debug)]
pub struct LocalGuard(bool);

impl Drop for LocalGuard {
    fn drop(&mut self) {
        LOCAL.set(self.0);
    }
}

/// Spawns `fut`: `tokio::spawn`, or `spawn_local` on a simulation's thread.
#[allow(clippy::disallowed_methods)]
pub fn spawn<F>(fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    if LOCAL.get() {
        tokio::task::spawn_local(fut)
    } else {
        tokio::spawn(fut)
    }
}

/// Spawns `fut` into `set`, as [`spawn`] does.
#[allow(clippy::disallowed_methods)]
pub fn spawn_in<T, F>(set: &mut JoinSet<T>, fut: F) -> AbortHandle
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    if LOCAL.get() {
        set.spawn_local(fut)
    } else {
        set.spawn(fut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_is_per_thread_and_ends_with_its_guard() {
        assert!(!LOCAL.get());
        {
            let _g = spawn_locally_on_this_thread();
            assert!(LOCAL.get());
            std::thread::spawn(|| assert!(!LOCAL.get()))
                .join()
                .expect("other thread");
            let _inner = spawn_locally_on_this_thread();
        }
        assert!(!LOCAL.get());
    }

    #[test]
    fn outside_a_simulation_tasks_go_to_the_runtime() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        let on_worker = rt.block_on(async {
            let mut set = JoinSet::new();
            spawn_in(&mut set, async { std::thread::current().id() });
            let a = spawn(async { std::thread::current().id() })
                .await
                .expect("task");
            let b = set.join_next().await.expect("one").expect("task");
            (a, b)
        });
        // Neither ran on this thread (no LocalSet here to run them).
        let here = std::thread::current().id();
        assert!(on_worker.0 != here && on_worker.1 != here);
    }

    /// Sets a flag when dropped.
    struct Dropped(std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_simulation_threads_tasks_live_and_die_with_its_local_set() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        let _g = spawn_locally_on_this_thread();
        let (a, b) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let mut set = JoinSet::new();
        local.block_on(&rt, async {
            let d = Dropped(a.clone());
            spawn(async move {
                std::future::pending::<()>().await;
                drop(d);
            });
            let d = Dropped(b.clone());
            spawn_in(&mut set, async move {
                std::future::pending::<()>().await;
                drop(d);
            });
            tokio::task::yield_now().await;
        });
        assert!(!a.load(Ordering::SeqCst) && !b.load(Ordering::SeqCst));
        // Dropping the LocalSet, not the runtime, ends them: they were its.
        drop(local);
        assert!(a.load(Ordering::SeqCst), "spawn went to the runtime");
        assert!(b.load(Ordering::SeqCst), "spawn_in went to the runtime");
        drop(set);
        drop(rt);
    }
}
