//! Where a kernel's threads come from.
//!
//! A kernel that splits its work calls [`for_each`] with numbered tasks. By
//! default the calling thread and scoped threads started for the call take
//! tasks until none is left. A host process that already keeps a pool of
//! worker threads can hand in its fork-join entry instead ([`set_fork_join`]):
//! torch's OpenMP runtime keeps its workers spinning between ops, so on a
//! machine with as many workers as cores a thread started beside them waits
//! for a core, while the same work handed to the workers starts at once.

use std::any::Any;
use std::ffi::{c_uint, c_void};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;

/// A fork-join entry with the signature and contract of GNU OpenMP's
/// `GOMP_parallel`: calls `task(data)` on `threads` threads, the calling one
/// among them, and returns once every call has returned.
pub type ForkJoin =
    unsafe extern "C" fn(task: unsafe extern "C" fn(*mut c_void), data: *mut c_void, threads: c_uint, flags: c_uint);

/// The fork-join in use (its address), 0 for threads started per call.
static FORK_JOIN: AtomicUsize = AtomicUsize::new(0);

/// Runs the kernels' split work on `fork_join`'s threads from now on (`None`:
/// on threads started per call again).
///
/// # Safety
/// `fork_join` must keep to the [`ForkJoin`] contract for as long as it is
/// set (the library it lives in stays loaded).
pub unsafe fn set_fork_join(fork_join: Option<ForkJoin>) {
    FORK_JOIN.store(fork_join.map_or(0, |f| f as usize), Ordering::Release);
}

/// Whether a host's fork-join runs the split work (a split is then cheap: its
/// workers are already running).
pub fn pooled() -> bool {
    FORK_JOIN.load(Ordering::Acquire) != 0
}

/// The state one split shares between its threads.
struct Split<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Split<'_> {
    /// Takes tasks until none is left; a panicking task is kept, to be raised
    /// on the calling thread once every thread is done (an unwind must not
    /// cross the fork-join's C frames).
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.tasks {
                return;
            }
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| (self.task)(i))) {
                self.next.store(self.tasks, Ordering::Relaxed);
                self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(payload);
                return;
            }
        }
    }
}

unsafe extern "C" fn trampoline(data: *mut c_void) {
    // SAFETY: `data` is the `Split` that `for_each` lent for the call, alive until it returns.
    let split = unsafe { &*(data as *const Split<'_>) };
    split.work();
}

/// `task(i)` for every `i` in `0..tasks`, on up to `threads` threads (the
/// calling one included): a host's fork-join if one is set, else threads
/// started for this call. Returns when every task has run; a task's panic is
/// raised here.
pub fn for_each(threads: usize, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    let threads = threads.min(tasks);
    if threads <= 1 {
        (0..tasks).for_each(task);
        return;
    }
    let split = Split { task, tasks, next: AtomicUsize::new(0), panic: Mutex::new(None) };
    let fork_join = FORK_JOIN.load(Ordering::Acquire);
    if fork_join != 0 {
        // SAFETY: only `set_fork_join` stores a non-zero value, the address of a `ForkJoin`.
        let fork_join: ForkJoin = unsafe { std::mem::transmute::<usize, ForkJoin>(fork_join) };
        let threads = c_uint::try_from(threads).unwrap_or(c_uint::MAX);
        // SAFETY: `split` outlives the call, which returns after every thread's last
        // access; `trampoline` reads it as the `Split` it is and never unwinds.
        unsafe { fork_join(trampoline, &split as *const Split<'_> as *mut c_void, threads, 0) };
    } else {
        thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(|| split.work());
            }
            split.work();
        });
    }
    if let Some(payload) = split.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        panic::resume_unwind(payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// A fork-join by hand with the contract of `GOMP_parallel`.
    unsafe extern "C" fn scoped_fork_join(
        task: unsafe extern "C" fn(*mut c_void),
        data: *mut c_void,
        threads: c_uint,
        _flags: c_uint,
    ) {
        let data = data as usize;
        thread::scope(|scope| {
            for _ in 1..threads {
                // SAFETY: the caller's contract
                scope.spawn(move || unsafe { task(data as *mut c_void) });
            }
            // SAFETY: the caller's contract
            unsafe { task(data as *mut c_void) };
        });
    }

    fn runs_every_task_once() {
        for (threads, tasks) in [(1, 5), (2, 1), (2, 7), (4, 3), (3, 100)] {
            let seen: Vec<AtomicU64> = (0..tasks).map(|_| AtomicU64::new(0)).collect();
            for_each(threads, tasks, &|i| {
                seen[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1), "threads={threads} tasks={tasks}");
        }
    }

    fn raises_a_tasks_panic() {
        let got = panic::catch_unwind(|| for_each(2, 6, &|i| assert!(i != 3, "task 3 fails")));
        let payload = got.expect_err("the panic reaches the caller");
        let text = payload.downcast_ref::<&str>().copied().unwrap_or_default();
        assert!(text.contains("task 3 fails"), "{text}");
    }

    // one test: the fork-join is process-wide, and tests run in parallel
    #[test]
    fn splits_on_started_threads_and_on_a_hosts_fork_join() {
        runs_every_task_once();
        raises_a_tasks_panic();
        // SAFETY: scoped_fork_join keeps the contract.
        unsafe { set_fork_join(Some(scoped_fork_join)) };
        assert!(pooled());
        runs_every_task_once();
        raises_a_tasks_panic();
        // SAFETY: unset
        unsafe { set_fork_join(None) };
        assert!(!pooled());
    }
}
