//! Real QUIC on loopback: a [`Doorway`] keeps at most its number of untrusted connections, lets
//! the oldest untrusted one go for a newcomer, never a trusted one, and closes a connection not
//! trusted within its window.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use talaria_actors::{Doorway, Ticket};
use talaria_net::{ClientAuth, TlsMaterial};

const ALPN: &[u8] = b"talaria-test";

/// Accepts connections through `door`; each accepted one's ticket goes to `tickets`, in
/// arrival order (the test trusts some of them).
async fn serve(
    server: quinn::Endpoint,
    door: Doorway,
    tickets: tokio::sync::mpsc::UnboundedSender<Option<Arc<Ticket>>>,
) {
    while let Some(incoming) = server.accept().await {
        let Some(ticket) = door.knock().map(Arc::new) else {
            incoming.refuse();
            let _ = tickets.send(None);
            continue;
        };
        let (held, tickets) = (ticket.clone(), tickets.clone());
        let task = tokio::spawn(async move {
            if let Ok(conn) = incoming.await
                && ticket.connected(&conn)
            {
                let _ = tickets.send(Some(ticket));
                conn.closed().await;
            }
        });
        held.hold(task.abort_handle());
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    tls: TlsMaterial,
    client: quinn::Endpoint,
    addr: SocketAddr,
    tickets: tokio::sync::mpsc::UnboundedReceiver<Option<Arc<Ticket>>>,
}

impl Setup {
    fn start(door: Doorway) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = TlsMaterial::generate(dir.path(), "talaria-test").expect("TLS material");
        let server = tls
            .server("127.0.0.1:0".parse().unwrap(), ALPN, ClientAuth::Anyone)
            .expect("server endpoint");
        let addr = server.local_addr().expect("server address");
        let (tx, tickets) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(serve(server, door, tx));
        let client = tls.client(ALPN).expect("client endpoint");
        Self {
            _dir: dir,
            tls,
            client,
            addr,
            tickets,
        }
    }

    /// Connects; the connection and the server's ticket for it (`None`: refused).
    async fn connect(&mut self) -> (Option<quinn::Connection>, Option<Arc<Ticket>>) {
        let conn = self.tls.connect(&self.client, self.addr).await.ok();
        let ticket = tokio::time::timeout(Duration::from_secs(5), self.tickets.recv())
            .await
            .expect("the server saw the connection")
            .expect("the server runs");
        (conn, ticket)
    }
}

/// `talaria_errors_total{type=...}` of this process.
fn errors(error_type: &str) -> f64 {
    let name = format!("talaria_errors_total{{type=\"{error_type}\"}}");
    talaria_actors::metrics::value(&talaria_actors::metrics::render(), &name).unwrap_or(0.0)
}

/// Whether `conn` is closed within a moment.
async fn closed_soon(conn: &quinn::Connection) -> bool {
    tokio::time::timeout(Duration::from_millis(500), conn.closed())
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_lets_the_oldest_untrusted_connection_go_never_a_trusted_one() {
    let door = Doorway::counting_trusted("test", 3, Duration::from_secs(60));
    let mut s = Setup::start(door.clone());
    let (a, ta) = s.connect().await;
    let (b, _tb) = s.connect().await;
    let (c, tc) = s.connect().await;
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    // a proved who it is; b is now the oldest untrusted one.
    assert!(ta.as_ref().unwrap().trust());
    assert!(!ta.as_ref().unwrap().trust(), "trusted once");
    let overloaded = errors("overloaded");
    let (d, _td) = s.connect().await;
    assert!(closed_soon(&b).await, "the oldest untrusted one is let go");
    assert_eq!(
        errors("overloaded"),
        overloaded + 1.0,
        "counted as its log says"
    );
    assert!(!closed_soon(&a).await, "a trusted one stays");
    assert!(!closed_soon(&c).await);
    assert_eq!(door.held(), 3);
    // With every place trusted, a newcomer is refused and nobody is let go.
    tc.as_ref().unwrap().trust();
    d.expect("d connected").close(0u32.into(), b"bye");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_e, te) = s.connect().await;
    assert!(te.is_some(), "the closed connection's place is free again");
    te.as_ref().unwrap().trust();
    let (f, tf) = s.connect().await;
    assert!(tf.is_none(), "every place trusted: refused");
    assert!(f.is_none());
    assert!(!closed_soon(&a).await && !closed_soon(&c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_connection_is_closed_at_the_end_of_its_window_a_trusted_one_stays() {
    let window = Duration::from_millis(400);
    let door = Doorway::new("test", 8, window);
    let mut s = Setup::start(door.clone());
    let (a, _ta) = s.connect().await;
    let (b, tb) = s.connect().await;
    let (a, b) = (a.unwrap(), b.unwrap());
    tb.as_ref().unwrap().trust();
    assert_eq!(door.held(), 1, "a trusted connection does not count here");
    let not_admitted = errors("not_admitted");
    assert!(
        tokio::time::timeout(Duration::from_secs(3), a.closed())
            .await
            .is_ok(),
        "closed at the end of its window"
    );
    assert_eq!(errors("not_admitted"), not_admitted + 1.0);
    assert!(!closed_soon(&b).await, "the trusted one stays");
}
