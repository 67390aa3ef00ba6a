//! The uplink's own event loop, which a lone session's worker thread drives itself while it
//! waits for the cloud.
//!
//! A masked call from a worker thread used to cross to the agent's event loop (to send) and back
//! (with the answer): two wake-ups of another thread a call, each tens of microseconds on a VM,
//! beside a stage's product of about a hundred. Here the QUIC endpoint and its connection live
//! on a runtime of their own ([`NetLoop`]). While one session is open, its worker drives that
//! runtime itself for each call ([`NetLoop::drive`]): it sends on its own thread and sleeps in
//! `epoll_wait` until the answer arrives, then goes on computing. With more sessions open, a
//! background thread drives the runtime and wakes each caller, as the agent's event loop did for
//! every call: handing the runtime from one worker to the next would cost a wake-up of its own.
//! The background thread also drives it whenever no worker has for [`LINGER`] (keep-alives, a
//! connection that closes, an admission), and steps aside when a lone call asks for it.

use std::future::Future;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long after a worker's last call the background thread waits before it drives the
/// runtime again: longer than the compute between two decode calls of a generation, so that the
/// runtime is not taken back between them (a long prefill's may be longer: then it goes back and
/// forth, which costs a wake-up, not an answer); short against QUIC's timers (its
/// acknowledgement delay is 25 ms, the idle timeout seconds). The background thread checks this
/// often while a worker drives, rather than being woken after each call, which would cost the
/// wake-up this module saves.
pub const LINGER: Duration = Duration::from_millis(5);

/// Who drives the uplink's runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    /// Nobody: between a lone worker's calls, or until the background thread wakes.
    Nobody,
    /// A worker whose call was the only one in flight when it began.
    Worker,
    Background,
}

#[derive(Debug)]
struct Lease {
    driver: Driver,
    /// Calls in flight (each a worker inside [`NetLoop::drive`]).
    calls: usize,
    /// Sessions open ([`NetLoop::session`]): with more than one, their calls overlap or follow
    /// each other closely, and one thread (the background one) drives for all of them.
    sessions: usize,
    /// When the last call ended.
    last: Instant,
}

impl Lease {
    /// Whether the background thread should drive the runtime now: calls wait that no worker
    /// drives, or none has driven it for [`LINGER`]. `None` when it should wait, at most so long.
    fn background_waits(&self) -> Option<Duration> {
        if self.driver == Driver::Worker {
            return Some(LINGER);
        }
        // With more than one session open no worker takes the runtime: drive for them.
        let quiet = self.last.elapsed();
        (self.calls == 0 && self.sessions <= 1 && quiet < LINGER).then(|| LINGER - quiet)
    }
}

/// A current-thread runtime for the uplink, driven by a lone call's worker or by one background
/// thread.
#[derive(Debug)]
pub struct NetLoop {
    /// Always there until dropped (then shut down without waiting: it may be dropped on an
    /// event loop, where a runtime may not block).
    runtime: Option<tokio::runtime::Runtime>,
    lease: Mutex<Lease>,
    /// Wakes the background thread while it is aside.
    wanted: Condvar,
    /// Asks the background thread to release the runtime.
    step_aside: tokio::sync::Notify,
}

impl NetLoop {
    /// The runtime, and its background thread started.
    pub fn start() -> std::io::Result<std::sync::Arc<Self>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("uplink-blocking")
            .build()?;
        let me = std::sync::Arc::new(Self {
            runtime: Some(runtime),
            lease: Mutex::new(Lease {
                driver: Driver::Nobody,
                calls: 0,
                sessions: 0,
                last: Instant::now(),
            }),
            wanted: Condvar::new(),
            step_aside: tokio::sync::Notify::new(),
        });
        let background = std::sync::Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("uplink".into())
            .spawn(move || {
                while let Some(me) = background.upgrade() {
                    me.background_turn();
                }
            })?;
        Ok(me)
    }

    /// The runtime's handle: what runs on it (the endpoint, its connections, an admission) is
    /// made or spawned through it.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime().handle()
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("taken only when dropped")
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One turn of the background thread: wait aside while a lone worker drives (and for
    /// [`LINGER`] after its last call), then drive the runtime until a lone call asks for it (or
    /// a second passes, so that a dropped `NetLoop` is noticed).
    fn background_turn(&self) {
        {
            let mut lease = self.lease();
            while let Some(wait) = lease.background_waits() {
                lease = self
                    .wanted
                    .wait_timeout(lease, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            lease.driver = Driver::Background;
        }
        self.runtime().block_on(async {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(1) {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), self.step_aside.notified()).await;
                // A stale request (from a call that took the runtime while it was free) does
                // not count: only a lone call waiting for it now.
                if self.lease().driver == Driver::Worker {
                    return;
                }
            }
        });
        let mut lease = self.lease();
        if lease.driver == Driver::Background {
            lease.driver = Driver::Nobody;
        }
    }

    /// Counts a session open until the guard is dropped: its worker drives the runtime itself
    /// only while no other session is open. Several sessions' workers would otherwise take the
    /// runtime from each other and from the background thread, each a wake-up (measured: 5 %
    /// slower at eight sessions on one agent).
    pub fn session(self: &std::sync::Arc<Self>) -> SessionOpen {
        self.lease().sessions += 1;
        SessionOpen(self.clone())
    }

    /// Runs `future` to its end on this thread. The only call in flight of the only session
    /// open drives the uplink's runtime itself meanwhile; another waits to be woken by whoever
    /// drives it. Never on an event loop: it blocks the thread.
    pub fn drive<F: Future>(&self, future: F) -> F::Output {
        let call = {
            let mut lease = self.lease();
            lease.calls += 1;
            let lone = lease.calls == 1 && lease.sessions <= 1;
            if lone {
                lease.driver = Driver::Worker;
            } else if lease.driver == Driver::Nobody {
                // Nobody drives (the background thread waits out a lone worker's linger): it
                // must now, for this call.
                self.wanted.notify_one();
            }
            InFlight { net: self, lone }
        };
        talaria_actors::metrics::AGENT_UPLINK_CALLS
            .with_label_values(&[if call.lone { "worker" } else { "uplink" }])
            .inc();
        if call.lone {
            self.step_aside.notify_one();
            self.runtime().block_on(future)
        } else {
            // Its timers are the uplink runtime's, as they would be on the lone path.
            let _on = self.runtime().enter();
            futures::executor::block_on(future)
        }
    }
}

/// A call in [`NetLoop::drive`]; its end (an unwind too) is counted when dropped, so that a
/// panicking call cannot leave the runtime to a driver that is gone.
struct InFlight<'a> {
    net: &'a NetLoop,
    lone: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut lease = self.net.lease();
        lease.calls -= 1;
        lease.last = Instant::now();
        if self.lone {
            lease.driver = Driver::Nobody;
            if lease.calls > 0 {
                // Calls that began while this one drove wait for someone to drive: the
                // background thread, woken now.
                self.net.wanted.notify_one();
            }
        }
    }
}

impl Drop for NetLoop {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A session counted open by [`NetLoop::session`].
#[derive(Debug)]
pub struct SessionOpen(std::sync::Arc<NetLoop>);

impl Drop for SessionOpen {
    fn drop(&mut self) {
        self.0.lease().sessions -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread that runs a task spawned on the runtime, with no worker calling: a timer
    /// later (so not the spawning thread's turn).
    fn unattended(net: &NetLoop) -> Option<String> {
        let (tx, rx) = std::sync::mpsc::channel();
        net.handle().spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(std::thread::current().name().map(str::to_string));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("something drove the runtime")
    }

    #[test]
    fn a_lone_call_drives_the_runtime_itself_and_the_background_thread_drives_it_otherwise() {
        let net = NetLoop::start().expect("runtime");
        // A task spawned on the runtime runs with nobody driving but the background thread.
        assert_eq!(unattended(&net).as_deref(), Some("uplink"));
        // A worker's future (with a timer of the runtime) completes on the worker's own thread.
        let here = std::thread::current().id();
        let (on, slept) = net.drive(async {
            let t = Instant::now();
            tokio::time::sleep(Duration::from_millis(10)).await;
            (std::thread::current().id(), t.elapsed())
        });
        assert_eq!(on, here);
        assert!(slept >= Duration::from_millis(10));
        // Who drives: a task the future spawns runs on the driving thread. The lone call's own
        // thread; with two sessions open, the background thread, and the call still completes.
        let spawned_on = |net: &NetLoop| {
            net.drive(async {
                tokio::spawn(async { std::thread::current().name().map(str::to_string) })
                    .await
                    .expect("task")
            })
        };
        let me = std::thread::current().name().map(str::to_string);
        let one = net.session();
        assert_eq!(spawned_on(&net), me);
        let two = net.session();
        assert_eq!(spawned_on(&net).as_deref(), Some("uplink"));
        drop((one, two));
        assert_eq!(spawned_on(&net), me);
        // A call that panics leaves the runtime to be driven as before: by the background
        // thread when nobody calls, by the next lone call's worker.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            net.drive(async { panic!("a call that panics") })
        }));
        assert!(panicked.is_err());
        assert_eq!(unattended(&net).as_deref(), Some("uplink"));
        assert_eq!(spawned_on(&net), me);
        // Several workers at once, each its own future: all complete.
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let net = net.clone();
                std::thread::spawn(move || {
                    net.drive(async move {
                        tokio::time::sleep(Duration::from_millis(5 * i)).await;
                        i
                    })
                })
            })
            .collect();
        let done: Vec<u64> = threads
            .into_iter()
            .map(|t| t.join().expect("worker"))
            .collect();
        assert_eq!(done, vec![0, 1, 2, 3]);
        // And the background thread takes the runtime back afterwards.
        assert_eq!(unattended(&net).as_deref(), Some("uplink"));
    }
}
