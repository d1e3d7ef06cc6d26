//! The data plane: tensor bytes over plain TCP, beside the gRPC service.
//!
//! Through tonic and HTTP/2, every tensor byte is copied twice more in user space on each
//! side (into and out of HTTP/2 frames and protobuf messages). On this port a push's bytes
//! go from the socket straight into the gradient buffer, and a pull's bytes from the
//! variable into the socket: one copy each way. The framing is described at `DataRequest`
//! in `ps.proto`. Validation, consistency decisions, metrics and error statuses are the
//! gRPC service's own: this module only moves bytes and calls [`PsService`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use parasync_proto::auth::AuthToken;
use parasync_proto::tls::DataStream;
use parasync_proto::data::{frame_len, put_frame, MAGIC};
use parasync_proto::ps::{self, data_request::Op};
use parasync_tensor::DType;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::Status;

use crate::convert;
use crate::error::Error;
use crate::service::{pull_header, PsService};
use crate::store::{GradientBuffer, Variable, MAX_ELEMENTS};

/// Largest payload a request may announce: the largest variable in f32.
const MAX_PAYLOAD_BYTES: u64 = MAX_ELEMENTS * 4;
/// Bytes received per step of a push: each piece is checked for non-finite values while
/// it is still in cache.
const RECV_PIECE_BYTES: usize = 256 << 10;
/// Most payload bytes of one lookup or sparse push (read whole before it is served).
const MAX_SPARSE_PAYLOAD_BYTES: u64 = 256 << 20;
/// Bytes encoded and written per step of a pull.
const SEND_PIECE_BYTES: usize = 1 << 20;
/// A reply's first piece of values up to this size goes out in the same write as the reply.
const COALESCE_BYTES: usize = 64 << 10;
/// A connection idle this long releases buffers above [`IDLE_BUFFER_BYTES`].
const IDLE_RELEASE: Duration = Duration::from_secs(2);
const IDLE_BUFFER_BYTES: usize = 64 << 10;
/// How long a new connection may take to send its greeting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on the data plane's connections.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// A connection with no request for this long is closed (the client opens a new one
    /// when it needs one).
    pub idle_timeout: Duration,
}

/// Who may use the data plane: the token a connection's hello must present, and TLS.
#[derive(Clone, Default)]
pub struct Access {
    /// The shard's auth token (`None`: none needed).
    pub token: Option<AuthToken>,
    /// Terminates TLS on every connection when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Accepts data-plane connections on `listener` until `stop` turns true; then waits for the
/// requests in flight to finish (a pull waiting for its step is released by `stop`).
pub async fn serve(listener: TcpListener, service: PsService, stop: watch::Receiver<bool>, limits: Limits, access: Access) {
    let access = Arc::new(access);
    let mut conns = JoinSet::new();
    let mut stopped = stop.clone();
    let mut refused: u64 = 0;
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stopped_signal(&mut stopped) => break,
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) if conns.len() >= limits.max_connections => {
                    drop(sock);
                    refused += 1;
                    service.store().metrics().rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // One line per 10 s at most: a flood must not flood the log too.
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        last_warning = Some(tokio::time::Instant::now());
                        tracing::warn!(
                            %peer, open = conns.len(), refused,
                            "data plane: at its connection limit (--data-max-connections {}); closing new connections",
                            limits.max_connections
                        );
                    }
                }
                Ok((sock, peer)) => {
                    conns.spawn(connection(sock, peer, service.clone(), stop.clone(), limits.idle_timeout, Arc::clone(&access)));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "data plane: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Completes once `stop` turns true (or its sender is gone).
async fn stopped_signal(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|&s| s).await;
}

/// Socket options of every data-plane connection: no Nagle delay on small replies, and
/// keepalive probes so a peer whose machine died is noticed instead of waited on forever.
pub fn tune_socket(sock: &TcpStream) {
    let _ = sock.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = socket2::SockRef::from(sock).set_tcp_keepalive(&keepalive);
}

async fn connection(
    sock: TcpStream,
    peer: SocketAddr,
    service: PsService,
    mut stop: watch::Receiver<bool>,
    idle_timeout: Duration,
    access: Arc<Access>,
) {
    tune_socket(&sock);
    let mut sock = match &access.tls {
        None => DataStream::Plain(sock),
        Some(acceptor) => match tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(sock)).await {
            Ok(Ok(tls)) => DataStream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "data plane: TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "data plane: no TLS handshake within {HELLO_TIMEOUT:?}");
                return;
            }
        },
    };
    let token = access.token.clone();
    let mut hello = [0u8; 8];
    match tokio::time::timeout(HELLO_TIMEOUT, sock.read_exact(&mut hello)).await {
        Ok(Ok(_)) if &hello == MAGIC => {}
        _ => {
            tracing::debug!(%peer, "data plane: closing a connection without a valid greeting");
            return;
        }
    }
    let mut conn = Conn { sock, service, scratch: Vec::new(), out: Vec::new(), authenticated: token.is_none(), token };
    let mut idle_since = tokio::time::Instant::now();
    loop {
        // Between requests a connection closes at shutdown; a request already under way
        // runs to its end. A connection idle for a while gives its buffers back, so many
        // idle clients do not hold a megabyte each.
        // (The wait is on the request's first byte itself: `readable()` stays ready after a
        // read that took exactly what it asked for, so it would not wait at all.)
        let holds_memory = conn.scratch.capacity() > IDLE_BUFFER_BYTES || conn.out.capacity() > IDLE_BUFFER_BYTES;
        let mut prefix = [0u8; 4];
        tokio::select! {
            biased;
            _ = stopped_signal(&mut stop) => return,
            // `read` is cancel-safe: when another branch wins, no byte was taken.
            r = conn.sock.read(&mut prefix[..1]) => match r {
                Ok(1) => {}
                _ => return, // closed by the client
            },
            _ = tokio::time::sleep(IDLE_RELEASE), if holds_memory => {
                conn.scratch = Vec::new();
                conn.out = Vec::new();
                continue;
            }
            _ = tokio::time::sleep_until(idle_since + idle_timeout) => {
                tracing::debug!(%peer, ?idle_timeout, "data plane: closing an idle connection");
                return;
            }
        }
        if conn.sock.read_exact(&mut prefix[1..]).await.is_err() {
            return; // closed by the client
        }
        if let Err(e) = conn.request(prefix).await {
            tracing::debug!(%peer, error = %e, "data plane: connection closed");
            return;
        }
        // TLS keeps the last record of a reply until flushed.
        if conn.sock.flush().await.is_err() {
            return;
        }
        idle_since = tokio::time::Instant::now();
    }
}

/// One accepted connection and its reusable buffers.
struct Conn {
    sock: DataStream,
    service: PsService,
    /// Incoming header bytes, bf16 payload pieces, discarded bytes, encoded pull pieces.
    scratch: Vec<u8>,
    /// Outgoing reply frames.
    out: Vec<u8>,
    /// The shard's token, which a `hello` must present before any other request.
    token: Option<AuthToken>,
    /// Whether the connection may make requests (a right `hello`, or the shard has no token).
    authenticated: bool,
}

/// An error after which the byte stream cannot be followed: the connection closes.
fn broken(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Error messages are cut to this many bytes, so that a reply header stays far below the
/// 64 KiB a client accepts (a timeout may name thousands of missing workers).
const MAX_MESSAGE_BYTES: usize = 8 << 10;

fn status_reply(status: &Status, push: Option<ps::PushResponse>) -> ps::DataReply {
    let mut message = status.message().to_string();
    if message.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        let dropped = message.len() - cut;
        message.truncate(cut);
        message.push_str(&format!("… ({dropped} more bytes)"));
    }
    ps::DataReply { code: status.code() as u32, message, push, ..Default::default() }
}

impl Conn {
    /// Serves one request whose frame length is `prefix`. Refused requests get an error
    /// reply and leave the connection usable; an `Err` closes it.
    async fn request(&mut self, prefix: [u8; 4]) -> io::Result<()> {
        let len = match frame_len(prefix) {
            Ok(len) => len,
            Err(why) => {
                self.reply(&status_reply(&self.refuse(&why), None)).await?;
                return Err(broken(why));
            }
        };
        self.scratch.resize(len, 0);
        self.sock.read_exact(&mut self.scratch[..len]).await?;
        let req = match ps::DataRequest::decode(&self.scratch[..len]) {
            Ok(r) => r,
            Err(e) => {
                let why = format!("malformed data request: {e}");
                self.reply(&status_reply(&self.refuse(&why), None)).await?;
                return Err(broken(why));
            }
        };
        let payload = req.payload_bytes;
        if payload > MAX_PAYLOAD_BYTES {
            let why = format!("data request announces {payload} payload bytes; at most {MAX_PAYLOAD_BYTES} are allowed");
            self.reply(&status_reply(&self.refuse(&why), None)).await?;
            return Err(broken(why));
        }
        match req.op {
            Some(Op::Hello(hello)) => {
                self.discard(payload).await?;
                self.hello(&hello).await
            }
            _ if !self.authenticated => {
                let why = "this shard requires an auth token: open the connection with a hello presenting it \
                           (set PARASYNC_AUTH_TOKEN, or the client's auth_token option)";
                self.service.store().metrics().rejected.fetch_add(1, Relaxed);
                self.reply(&status_reply(&Status::unauthenticated(why), None)).await?;
                Err(broken(why.into()))
            }
            Some(Op::Push(header)) => match self.push(&header, payload).await? {
                Ok((push, ..)) => self.reply(&ps::DataReply { push: Some(push), ..Default::default() }).await,
                Err(s) => self.reply(&status_reply(&s, None)).await,
            },
            Some(Op::PushPull(header)) => match self.push(&header, payload).await? {
                Ok((push, var, wire)) => {
                    // The values for the worker's next step: sync waits for this step to complete.
                    let timeout = self.service.pull_timeout(header.pull_timeout_ms);
                    match self.service.wait_for_step(&var, header.step.saturating_add(1), timeout).await {
                        Ok(()) => self.send_values(&var, wire, Some(push)).await,
                        Err(e) => {
                            let status = self.service.pull_after_push_failed(&push, e);
                            self.reply(&status_reply(&status, Some(push))).await
                        }
                    }
                }
                Err(s) => self.reply(&status_reply(&s, None)).await,
            },
            Some(Op::Pull(r)) => {
                self.discard(payload).await?;
                match self.prepare_pull(&r, payload).await {
                    Ok((var, wire)) => self.send_values(&var, wire, None).await,
                    Err(s) => self.reply(&status_reply(&s, None)).await,
                }
            }
            Some(Op::Lookup(r)) => {
                let reply = match self.sparse_payload(&r.table, payload, r.num_ids, true).await? {
                    Ok(ids) => self.service.lookup_rows(&r, ids).await,
                    Err(s) => Err(s),
                };
                match reply {
                    Ok((header, rows)) => {
                        let reply = ps::DataReply { lookup: Some(header), payload_bytes: rows.len() as u64, ..Default::default() };
                        self.out.clear();
                        put_frame(&reply, &mut self.out);
                        self.sock.write_all(&self.out).await?;
                        self.sock.write_all(&rows).await
                    }
                    Err(s) => self.reply(&status_reply(&s, None)).await,
                }
            }
            Some(Op::PushSparse(r)) => {
                let reply = match self.sparse_payload(&r.table, payload, r.num_ids, false).await? {
                    Ok(ids) => {
                        let rows = std::mem::take(&mut self.scratch);
                        let reply = self.service.push_rows(&r, ids, &rows[r.num_ids as usize * 8..]).await;
                        self.scratch = rows;
                        reply
                    }
                    Err(s) => Err(s),
                };
                match reply {
                    Ok(push) => self.reply(&ps::DataReply { push: Some(push), ..Default::default() }).await,
                    Err(s) => self.reply(&status_reply(&s, None)).await,
                }
            }
            None => {
                self.discard(payload).await?;
                let s = self.refuse("data request names no operation (push, pull or push_pull)");
                self.reply(&status_reply(&s, None)).await
            }
        }
    }

    /// Receives a push's values and applies them; returns the reply, the variable and the
    /// wire dtype of values a push_pull sends back. The inner `Err` refuses the push after
    /// its whole payload was consumed, so the next request can follow.
    async fn push(
        &mut self,
        header: &ps::PushHeader,
        payload: u64,
    ) -> io::Result<Result<(ps::PushResponse, Arc<Variable>, DType), Status>> {
        let (pending, mut buf) = match self.service.begin_push(header) {
            Ok(p) => p,
            Err(s) => {
                self.discard(payload).await?;
                return Ok(Err(s));
            }
        };
        let expected = buf.remaining() as u64 * pending.wire.size() as u64;
        if payload != expected {
            self.discard(payload).await?;
            let why = format!(
                "push payload has {payload} bytes; {} elements of {} take {expected}",
                buf.remaining(),
                pending.wire
            );
            return Ok(Err(self.service.reject(Error::invalid(&header.variable, why))));
        }
        self.service.store().metrics().bytes_in.fetch_add(payload, Relaxed);
        if let Err(e) = self.receive_into(&mut buf).await? {
            return Ok(Err(self.service.reject(e)));
        }
        Ok(self.service.complete_push(&pending, buf).await.map(|r| (r, pending.var, pending.pull_wire)))
    }

    /// Reads the rest of a push's values into `buf`, piece by piece. A refused piece ends
    /// the transfer early, but the payload is still consumed to its end.
    async fn receive_into(&mut self, buf: &mut GradientBuffer) -> io::Result<Result<(), Error>> {
        let size = buf.wire().size();
        let per_piece = (RECV_PIECE_BYTES / size).max(1);
        while buf.remaining() > 0 {
            let n = buf.remaining().min(per_piece);
            let checked = match buf.direct_slot(n) {
                Some(slot) => {
                    self.sock.read_exact(slot).await?;
                    buf.commit_direct(n)
                }
                None => {
                    self.scratch.resize(n * size, 0);
                    self.sock.read_exact(&mut self.scratch[..n * size]).await?;
                    buf.append(&self.scratch[..n * size])
                }
            };
            if let Err(e) = checked {
                // The refused piece was read; skip what follows it.
                let left = (buf.remaining() - n) as u64 * size as u64;
                self.discard(left).await?;
                return Ok(Err(e));
            }
        }
        Ok(Ok(()))
    }

    /// Reads a table request's payload into `scratch` (the ids first, then for a push its
    /// rows) and returns the ids. The inner `Err` refuses the request after its payload was
    /// consumed. `ids_only`: the payload must be exactly the ids (a lookup).
    async fn sparse_payload(&mut self, table: &str, payload: u64, num_ids: u64, ids_only: bool) -> io::Result<Result<Vec<u64>, Status>> {
        let id_bytes = num_ids.checked_mul(8).filter(|&b| b <= payload);
        let refusal = if payload > MAX_SPARSE_PAYLOAD_BYTES {
            Some(format!("a table request carries at most {MAX_SPARSE_PAYLOAD_BYTES} payload bytes, this one announced {payload}; send fewer ids at a time"))
        } else if id_bytes.is_none() || (ids_only && id_bytes != Some(payload)) {
            Some(format!("num_ids {num_ids} (8 bytes each) does not fit the {payload} payload bytes announced"))
        } else {
            None
        };
        if let Some(why) = refusal {
            self.discard(payload).await?;
            return Ok(Err(self.service.reject(Error::invalid(table, why))));
        }
        self.scratch.resize(payload as usize, 0);
        self.sock.read_exact(&mut self.scratch[..payload as usize]).await?;
        let ids = crate::sparse::serve::decode_ids(&self.scratch[..num_ids as usize * 8], Some(num_ids), table);
        Ok(ids.map_err(|e| self.service.reject(e)))
    }

    /// The variable and wire dtype of a pull, once its step is readable.
    async fn prepare_pull(&self, r: &ps::PullRequest, payload: u64) -> Result<(Arc<Variable>, DType), Status> {
        let reject = |e| self.service.reject(e);
        if payload != 0 {
            return Err(reject(Error::invalid(&r.variable, format!("a pull carries no payload, this one announced {payload} bytes"))));
        }
        let var = self.service.store().get(&r.variable).map_err(reject)?;
        let wire = convert::dtype(r.wire_dtype, "wire_dtype", &r.variable).map_err(reject)?;
        let timeout = self.service.pull_timeout(r.timeout_ms);
        self.service.wait_for_step(&var, r.step, timeout).await.map_err(reject)?;
        Ok((var, wire))
    }

    /// Sends the reply of a pull (or push-pull) and the variable's values of one version
    /// (the one the reply carries), encoded piece by piece.
    async fn send_values(&mut self, var: &Variable, wire: DType, push: Option<ps::PushResponse>) -> io::Result<()> {
        let metrics = self.service.store().metrics();
        metrics.pulls.fetch_add(1, Relaxed);
        let total = var.len() * wire.size();
        metrics.bytes_out.fetch_add(total as u64, Relaxed);
        let snap = var.values_snapshot().await;
        let reply = ps::DataReply {
            push,
            values: Some(pull_header(var, snap.version(), wire)),
            payload_bytes: total as u64,
            ..Default::default()
        };
        self.out.clear();
        put_frame(&reply, &mut self.out);
        if wire == DType::F32 && total > COALESCE_BYTES {
            if let Some(bytes) = snap.f32_le_bytes() {
                // Stored as the wire wants them: straight from the values to the socket.
                self.sock.write_all(&self.out).await?;
                return self.sock.write_all(bytes).await;
            }
        }
        let per_piece = (SEND_PIECE_BYTES / wire.size()).max(1);
        let mut end = per_piece.min(var.len());
        self.scratch.clear();
        snap.encode_range(0, end, wire, &mut self.scratch);
        if self.scratch.len() <= COALESCE_BYTES {
            self.out.extend_from_slice(&self.scratch);
            self.sock.write_all(&self.out).await?;
        } else {
            self.sock.write_all(&self.out).await?;
            self.sock.write_all(&self.scratch).await?;
        }
        while end < var.len() {
            let start = end;
            end = (start + per_piece).min(var.len());
            self.scratch.clear();
            snap.encode_range(start, end, wire, &mut self.scratch);
            self.sock.write_all(&self.scratch).await?;
        }
        Ok(())
    }

    /// Reads and drops `n` bytes (the payload of a refused request).
    async fn discard(&mut self, mut n: u64) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.scratch.resize(RECV_PIECE_BYTES, 0);
        while n > 0 {
            let k = n.min(RECV_PIECE_BYTES as u64) as usize;
            self.sock.read_exact(&mut self.scratch[..k]).await?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Answers a connection's `hello`: OK when it presents the shard's token (or the shard
    /// has none); otherwise `unauthenticated`, and the connection closes.
    async fn hello(&mut self, hello: &ps::DataHello) -> io::Result<()> {
        match &self.token {
            Some(t) if !t.matches(hello.auth_token.as_bytes()) => {
                let why = if hello.auth_token.is_empty() {
                    "this shard requires an auth token and the connection presented none (set PARASYNC_AUTH_TOKEN, or the client's auth_token option)"
                } else {
                    "wrong auth token"
                };
                self.service.store().metrics().rejected.fetch_add(1, Relaxed);
                self.reply(&status_reply(&Status::unauthenticated(why), None)).await?;
                Err(broken(why.into()))
            }
            _ => {
                self.authenticated = true;
                self.reply(&ps::DataReply::default()).await
            }
        }
    }

    /// An `invalid_argument` status for a request that names no variable, counted with the
    /// other refusals.
    fn refuse(&self, why: &str) -> Status {
        self.service.store().metrics().rejected.fetch_add(1, Relaxed);
        tracing::debug!(error = why, "data request rejected");
        Status::invalid_argument(why)
    }

    async fn reply(&mut self, reply: &ps::DataReply) -> io::Result<()> {
        self.out.clear();
        put_frame(reply, &mut self.out);
        self.sock.write_all(&self.out).await?;
        self.sock.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_error_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(10_000); // 20 000 bytes of two-byte characters
        let reply = status_reply(&Status::deadline_exceeded(long), None);
        assert!(reply.message.len() < MAX_MESSAGE_BYTES + 40, "{}", reply.message.len());
        assert!(reply.message.ends_with("more bytes)"), "{}", &reply.message[reply.message.len() - 30..]);
        assert_eq!(reply.code, tonic::Code::DeadlineExceeded as u32);
        let short = status_reply(&Status::not_found("no variable \"w\""), None);
        assert_eq!(short.message, "no variable \"w\"");
    }
}
