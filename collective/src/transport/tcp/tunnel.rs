//! TLS for the links between ranks. The progress engine reads and writes plain bytes on
//! file descriptors it polls; with TLS each link's descriptor is one end of a Unix socket
//! pair, and a thread of the link's own moves the bytes between the other end and rustls
//! over the TCP connection (both directions, with backpressure). The engine's framing,
//! timeouts and failure reports are the same either way: a broken TLS connection is a
//! closed link.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use parasync_proto::tls::{ClientTls, ServerTls};
use tokio_rustls::rustls::{ClientConnection, Connection, ServerConnection};

use super::sys::would_block;

/// Plaintext moved per step, each way.
const PIECE: usize = 256 << 10;
/// Plaintext held for the engine before the link stops reading the peer: as much as the
/// kernel would buffer on a plain connection, so that a peer sending ahead of this rank's
/// reads (a ring's next step) never waits on it.
const HOLD: usize = 16 << 20;

/// A link's byte stream as the engine sees it.
pub(super) enum LinkStream {
    /// The TCP connection itself.
    Tcp(TcpStream),
    /// The engine's end of the socket pair of a TLS link.
    Tls(UnixStream),
}

impl LinkStream {
    pub(super) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            LinkStream::Tcp(s) => s.set_read_timeout(t),
            LinkStream::Tls(s) => s.set_read_timeout(t),
        }
    }

    pub(super) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            LinkStream::Tcp(s) => s.set_nonblocking(on),
            LinkStream::Tls(s) => s.set_nonblocking(on),
        }
    }

    pub(super) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            LinkStream::Tcp(s) => s.shutdown(how),
            LinkStream::Tls(s) => s.shutdown(how),
        }
    }

    pub(super) fn fd(&self) -> i32 {
        match self {
            LinkStream::Tcp(s) => s.as_raw_fd(),
            LinkStream::Tls(s) => s.as_raw_fd(),
        }
    }
}

impl Read for LinkStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            LinkStream::Tcp(s) => s.read(buf),
            LinkStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for LinkStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LinkStream::Tcp(s) => s.write(buf),
            LinkStream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The connecting side: a TLS handshake as client over `tcp` (checking the peer's
/// certificate against `name`), then the tunnel.
pub(super) fn connect(tcp: TcpStream, tls: &ClientTls, name: &str) -> io::Result<LinkStream> {
    let server_name = tls.server_name(name).map_err(io::Error::other)?;
    let conn = ClientConnection::new(tls.rustls(), server_name).map_err(io::Error::other)?;
    start(tcp, Connection::Client(conn))
}

/// The accepting side: a TLS handshake as server over `tcp`, then the tunnel.
pub(super) fn accept(tcp: TcpStream, tls: &ServerTls) -> io::Result<LinkStream> {
    let conn = ServerConnection::new(tls.rustls()).map_err(io::Error::other)?;
    start(tcp, Connection::Server(conn))
}

fn start(mut tcp: TcpStream, mut conn: Connection) -> io::Result<LinkStream> {
    // Blocking, bounded by the socket timeouts `configure` set.
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
    }
    let (engine, inner) = UnixStream::pair()?;
    // The engine's end keeps the limits set on the connection (the rendezvous reads the
    // hello and its answer blocking: it must never wait longer than it would without TLS).
    engine.set_read_timeout(tcp.read_timeout()?)?;
    engine.set_write_timeout(tcp.write_timeout()?)?;
    tcp.set_nonblocking(true)?;
    inner.set_nonblocking(true)?;
    std::thread::Builder::new().name("collective-tls".into()).spawn(move || pump(tcp, conn, inner))?;
    Ok(LinkStream::Tls(engine))
}

/// Moves bytes until either side closes: plaintext from `plain` into `conn` and its records
/// onto `tcp`; records from `tcp` through `conn` and their plaintext onto `plain`.
fn pump(mut tcp: TcpStream, mut conn: Connection, mut plain: UnixStream) {
    let mut buf = vec![0u8; PIECE];
    // Plaintext taken from one side and not yet handed to the other.
    let mut to_plain: Vec<u8> = Vec::new();
    let mut to_tls: Vec<u8> = Vec::new();
    let (mut plain_open, mut tcp_open) = (true, true);
    let (mut tcp_shut, mut plain_shut) = (false, false);
    // Once the engine closed its end, how long to keep draining the peer's last bytes.
    let mut linger_until: Option<std::time::Instant> = None;
    // The handshake may have read the peer's first records with its last message (a hello
    // sent right behind the client's Finished): their plaintext waits in rustls already.
    take_plaintext(&mut conn, &mut buf, &mut to_plain, &mut tcp_open);
    loop {
        // Hand over what is pending, as far as each side takes it: plaintext into rustls
        // (which takes a limited amount at a time) and its records onto the socket, again
        // and again while both move.
        loop {
            let mut taken = false;
            while !to_tls.is_empty() {
                match conn.writer().write(&to_tls) {
                    Ok(0) => break,
                    Ok(n) => {
                        drop(to_tls.drain(..n));
                        taken = true;
                    }
                    Err(_) => return,
                }
            }
            while conn.wants_write() {
                match conn.write_tls(&mut tcp) {
                    Ok(_) => {}
                    Err(e) if would_block(&e) => break,
                    Err(_) => return,
                }
            }
            // Stop when the socket is full (then poll waits for room) or nothing is left.
            if !taken || to_tls.is_empty() || conn.wants_write() {
                break;
            }
        }
        while !to_plain.is_empty() {
            match plain.write(&to_plain) {
                Ok(n) => drop(to_plain.drain(..n)),
                Err(e) if would_block(&e) => break,
                Err(_) => return,
            }
        }
        if !plain_open && to_tls.is_empty() && !conn.wants_write() && !tcp_shut {
            // The engine closed its end: say so to the peer (close_notify went out above),
            // and keep passing on what the peer still sends for a moment.
            let _ = tcp.shutdown(Shutdown::Write);
            tcp_shut = true;
            linger_until = Some(std::time::Instant::now() + Duration::from_secs(2));
        }
        if !tcp_open && to_plain.is_empty() && !plain_shut {
            let _ = plain.shutdown(Shutdown::Write);
            plain_shut = true;
        }
        if (tcp_shut && plain_shut) || linger_until.is_some_and(|t| std::time::Instant::now() >= t) {
            return;
        }
        // Wait for what can move now; read a side only when its output has room.
        let mut fds = [
            libc::pollfd {
                fd: tcp.as_raw_fd(),
                events: (if tcp_open && to_plain.len() < HOLD { libc::POLLIN } else { 0 })
                    | (if conn.wants_write() { libc::POLLOUT } else { 0 }),
                revents: 0,
            },
            libc::pollfd {
                fd: plain.as_raw_fd(),
                events: (if plain_open && to_tls.is_empty() && !conn.wants_write() { libc::POLLIN } else { 0 })
                    | (if to_plain.is_empty() { 0 } else { libc::POLLOUT }),
                revents: 0,
            },
        ];
        // A side with nothing asked of it is left out (poll reports hang-ups whatever the
        // events, which would spin while the other side holds things up).
        for f in &mut fds {
            if f.events == 0 {
                f.fd = -1;
            }
        }
        // SAFETY: two valid pollfd entries.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if rc < 0 {
            if would_block(&io::Error::last_os_error()) {
                continue;
            }
            return;
        }
        let ready = |f: &libc::pollfd| f.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        if ready(&fds[0]) && tcp_open && to_plain.len() < HOLD {
            match conn.read_tls(&mut tcp) {
                Ok(0) => tcp_open = false,
                Ok(_) => {
                    if conn.process_new_packets().is_err() {
                        // (the alert is flushed above on the next turn, best effort)
                        let _ = conn.write_tls(&mut tcp);
                        return;
                    }
                    take_plaintext(&mut conn, &mut buf, &mut to_plain, &mut tcp_open);
                }
                Err(e) if would_block(&e) => {}
                Err(_) => tcp_open = false,
            }
        }
        if ready(&fds[1]) && plain_open && to_tls.is_empty() {
            match plain.read(&mut buf) {
                Ok(0) => {
                    plain_open = false;
                    conn.send_close_notify();
                }
                Ok(n) => to_tls.extend_from_slice(&buf[..n]),
                Err(e) if would_block(&e) => {}
                Err(_) => plain_open = false,
            }
        }
    }
}

/// Moves the plaintext rustls holds into `to_plain`; a close_notify (or a broken stream)
/// marks the peer's side closed.
fn take_plaintext(conn: &mut Connection, buf: &mut [u8], to_plain: &mut Vec<u8>, tcp_open: &mut bool) {
    loop {
        match conn.reader().read(buf) {
            Ok(0) => {
                *tcp_open = false; // close_notify
                return;
            }
            Ok(n) => to_plain.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => {
                *tcp_open = false;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use tokio_rustls::rustls::ClientConnection;

    /// A self-signed certificate for 127.0.0.1 as both sides' TLS, and a listener there.
    fn setup() -> (ServerTls, ClientTls, TcpListener) {
        let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let pem = key.cert.pem().into_bytes();
        let server = ServerTls::new(pem.clone(), key.key_pair.serialize_pem().into_bytes(), None).unwrap();
        let client = ClientTls::new(pem, None, None).unwrap();
        (server, client, TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// A peer that sends its first bytes right behind its Finished message (one segment, as
    /// a busy receiver finds them): the accepting side must pass them on at once, not when
    /// something more arrives (the rendezvous waited for a hello it already held).
    #[test]
    fn bytes_that_arrive_with_the_handshake_reach_the_engine() {
        let (server, client, listener) = setup();
        let addr = listener.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let mut tcp = TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let name = client.server_name("127.0.0.1").unwrap();
            let mut conn = ClientConnection::new(client.rustls(), name).unwrap();
            let mut out = Vec::new();
            while conn.is_handshaking() {
                while conn.wants_write() {
                    conn.write_tls(&mut out).unwrap();
                }
                tcp.write_all(&out).unwrap();
                out.clear();
                conn.read_tls(&mut tcp).unwrap();
                conn.process_new_packets().unwrap();
            }
            // The Finished is still queued: the first bytes go out with it.
            conn.writer().write_all(b"hello, rank 0").unwrap();
            while conn.wants_write() {
                conn.write_tls(&mut out).unwrap();
            }
            tcp.write_all(&out).unwrap();
            // Keep the connection open until the other side has read.
            let mut rest = [0u8; 1];
            let _ = tcp.read(&mut rest);
        });
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut engine = accept(tcp, &server).unwrap();
        engine.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 13];
        engine.read_exact(&mut got).expect("the first bytes reach the engine");
        assert_eq!(&got, b"hello, rank 0");
        drop(engine);
        peer.join().unwrap();
    }

    /// The engine's end keeps the connection's timeouts: a peer that never speaks is an
    /// error after them, not a wait without end.
    #[test]
    fn the_engine_end_keeps_the_connection_timeouts() {
        let (server, client, listener) = setup();
        let addr = listener.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let tcp = TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let silent = connect(tcp, &client, "127.0.0.1").unwrap();
            std::thread::sleep(Duration::from_secs(2));
            drop(silent);
        });
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut engine = accept(tcp, &server).unwrap();
        let started = std::time::Instant::now();
        let e = engine.read(&mut [0u8; 4]).expect_err("nothing was sent");
        assert!(would_block(&e), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        peer.join().unwrap();
    }
}
