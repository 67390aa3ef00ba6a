//! The door of a port that anyone can reach: how many connections it keeps before their peers
//! prove who they are, and for how long.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use quinn::Connection;
use tokio::task::AbortHandle;

/// The connections of an untrusted port, handshakes under way included, oldest first.
///
/// - At most `max` are kept. When that many are, a new one lets go of the oldest that is not
///   trusted yet: its handshake is aborted, or its connection closed. With every one of them
///   trusted, the new one is refused.
/// - A connection not trusted within `window` of its handshake is closed.
/// - A trusted connection counts against `max` only if the door says so
///   ([`Doorway::counting_trusted`]): a tenant port keeps its tenants' connections within the
///   bound; a coordinator keeps any number of admitted agents.
///
/// So a stranger who opens connections, or starts handshakes it never finishes, holds at most
/// `max` of them, each for at most `window`, and never pushes out a trusted peer. Each
/// connection let go counts in `talaria_errors_total` as its log line says: `overloaded` (a
/// newcomer took its place) or `not_admitted` (its window ended).
#[derive(Clone)]
pub struct Doorway {
    inner: Arc<Inner>,
}

struct Inner {
    slots: Mutex<Slots>,
    max: usize,
    window: Duration,
    counts_trusted: bool,
    /// Who knocks, for the logs ("tenant", "agent").
    who: &'static str,
}

#[derive(Default)]
struct Slots {
    next: u64,
    list: VecDeque<Slot>,
}

struct Slot {
    id: u64,
    trusted: Arc<AtomicBool>,
    conn: Option<Connection>,
    task: Option<AbortHandle>,
}

impl Slot {
    /// Lets the slot's connection go: its handshake aborted or its connection closed.
    fn let_go(&self, who: &str, max: usize) {
        match &self.conn {
            Some(conn) => {
                tracing::warn!(
                    peer = %conn.remote_address(),
                    error_type = "overloaded",
                    "closing the oldest {who} connection not yet trusted: {max} kept"
                );
                conn.close(0u32.into(), b"too many connections");
            }
            None => tracing::warn!(
                error_type = "overloaded",
                "dropping the oldest {who} handshake under way: {max} kept"
            ),
        }
        if let Some(task) = &self.task {
            task.abort();
        }
        crate::metrics::error("overloaded");
    }
}

impl Doorway {
    /// A door keeping at most `max` connections not yet trusted (`who` names their peers in
    /// the logs), each for at most `window`; trusted ones do not count.
    pub fn new(who: &'static str, max: usize, window: Duration) -> Self {
        Self::build(who, max, window, false)
    }

    /// As [`Doorway::new`], where trusted connections count against `max` too.
    pub fn counting_trusted(who: &'static str, max: usize, window: Duration) -> Self {
        Self::build(who, max, window, true)
    }

    fn build(who: &'static str, max: usize, window: Duration, counts_trusted: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                slots: Mutex::default(),
                max: max.max(1),
                window,
                counts_trusted,
                who,
            }),
        }
    }

    /// The slots, locked. They are only pushed to, updated and taken from: a panic elsewhere
    /// leaves the list whole.
    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.inner.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for one more connection, whose handshake is about to be awaited; `None` when
    /// every place is held by a trusted one (refuse the connection).
    pub fn knock(&self) -> Option<Ticket> {
        let inner = &self.inner;
        let mut slots = self.lock();
        // Connections that are gone leave, whether or not their ticket was dropped.
        slots
            .list
            .retain(|s| s.conn.as_ref().is_none_or(|c| c.close_reason().is_none()));
        if slots.list.len() >= inner.max {
            let i = slots
                .list
                .iter()
                .position(|s| !s.trusted.load(Ordering::Acquire))?;
            let oldest = slots.list.remove(i).expect("a position in the list");
            oldest.let_go(inner.who, inner.max);
        }
        slots.next += 1;
        let (id, trusted) = (slots.next, Arc::new(AtomicBool::new(false)));
        slots.list.push_back(Slot {
            id,
            trusted: trusted.clone(),
            conn: None,
            task: None,
        });
        Some(Ticket {
            door: self.clone(),
            id,
            trusted,
            window: OnceLock::new(),
        })
    }

    /// How many places are held (handshakes under way included).
    pub fn held(&self) -> usize {
        self.lock().list.len()
    }
}

/// One connection's place at a [`Doorway`]; dropping it frees the place.
pub struct Ticket {
    door: Doorway,
    id: u64,
    trusted: Arc<AtomicBool>,
    /// The task that closes the connection at the end of the window.
    window: OnceLock<AbortHandle>,
}

impl Ticket {
    /// The task that awaits the handshake and serves the connection: aborted if the place is
    /// taken from it.
    pub fn hold(&self, task: AbortHandle) {
        if let Some(slot) = self.door.lock().list.iter_mut().find(|s| s.id == self.id) {
            slot.task = Some(task);
        } else {
            // Let go before it was recorded.
            task.abort();
        }
    }

    /// The handshake finished. `false` if the place was taken meanwhile: `conn` is closed, and
    /// the caller drops it. Otherwise `conn` is closed if it is not trusted within the window.
    /// Called once.
    pub fn connected(&self, conn: &Connection) -> bool {
        match self.door.lock().list.iter_mut().find(|s| s.id == self.id) {
            Some(slot) => slot.conn = Some(conn.clone()),
            None => {
                conn.close(0u32.into(), b"too many connections");
                return false;
            }
        }
        let (conn, trusted) = (conn.clone(), self.trusted.clone());
        let (window, who) = (self.door.inner.window, self.door.inner.who);
        let timer = tokio::spawn(async move {
            tokio::time::sleep(window).await;
            if !trusted.load(Ordering::Acquire) {
                tracing::warn!(
                    peer = %conn.remote_address(),
                    error_type = "not_admitted",
                    "closing a {who} connection not trusted within {window:?}"
                );
                crate::metrics::error("not_admitted");
                conn.close(0u32.into(), b"not trusted in time");
            }
        });
        let _ = self.window.set(timer.abort_handle());
        true
    }

    /// The peer proved who it is: the connection stays, is never let go for a newcomer, and
    /// gets QUIC's full receive window ([`talaria_net::trust_connection`]). A door that does not
    /// count trusted connections frees the place. `true` the first time.
    pub fn trust(&self) -> bool {
        if self.trusted.swap(true, Ordering::AcqRel) {
            return false;
        }
        let mut slots = self.door.lock();
        if let Some(i) = slots.list.iter().position(|s| s.id == self.id) {
            if let Some(conn) = &slots.list[i].conn {
                talaria_net::trust_connection(conn);
            }
            if !self.door.inner.counts_trusted {
                slots.list.remove(i);
            }
        }
        true
    }

    /// Whether [`Ticket::trust`] was called.
    pub fn is_trusted(&self) -> bool {
        self.trusted.load(Ordering::Acquire)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(timer) = self.window.get() {
            timer.abort();
        }
        self.door.lock().list.retain(|s| s.id != self.id);
    }
}
