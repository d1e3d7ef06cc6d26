//! The client end of a shard's data plane: tensor bytes over plain TCP beside gRPC (the
//! framing is described at `DataRequest` in `ps.proto`).
//!
//! A push's f32 values go from the caller's slice straight into the socket, and a pull's
//! straight from the socket into the caller's buffer: no HTTP/2 or protobuf copies. Each
//! shard keeps a small pool of connections, one request in flight on each.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use parasync_proto::auth::AuthToken;
use parasync_proto::tls::DataStream;
use tokio_rustls::rustls::pki_types::ServerName;
use parasync_proto::data::{frame_len, put_frame, MAGIC};
use parasync_proto::ps::{self, data_request::Op};
use parasync_tensor::DType;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::error::{Error, ErrorKind, Result};
use crate::placement::Part;

/// Values of a request up to this size go out in the same write as its header.
const COALESCE_BYTES: usize = 64 << 10;
/// bf16 values are encoded and written (or read and decoded) this many bytes at a time.
const PIECE_BYTES: usize = 1 << 20;
/// How long opening a data connection may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads exactly `n` bytes from `sock` into `buf` (replacing its contents) through its spare
/// capacity, so that a reused buffer is not zeroed before every read.
async fn fill(sock: &mut DataStream, buf: &mut Vec<u8>, n: usize) -> std::io::Result<()> {
    buf.clear();
    buf.reserve(n);
    while buf.len() < n {
        let want = (n - buf.len()) as u64;
        if (&mut *sock).take(want).read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// One open connection and its scratch buffer.
struct Conn {
    sock: DataStream,
    scratch: Vec<u8>,
}

/// Asks the shard (over gRPC) where its data plane listens now.
pub(crate) type Resolve = Box<dyn Fn() -> futures::future::BoxFuture<'static, Option<SocketAddr>> + Send + Sync>;

/// The data plane of one shard: its address and a pool of idle connections.
pub(crate) struct DataPlane {
    addr: Mutex<SocketAddr>,
    /// Finds the address again when it stops answering: a restarted shard listens on a new
    /// port unless `--data-listen` fixes one.
    resolve: Resolve,
    idle: Mutex<Vec<Conn>>,
    /// At most this many requests (hence connections) in flight to the shard at once.
    in_flight: Semaphore,
    /// Large payloads to the shard are written one after another, not interleaved: the
    /// first part then arrives (and is applied) while the next is on the wire, instead of
    /// every part arriving at the end together.
    sending: tokio::sync::Mutex<()>,
    /// How long to busy-poll for the reply of a small request before sleeping.
    spin: Duration,
    /// The token and TLS settings of every connection.
    access: Access,
}

/// What a connection presents: the shard's auth token in its hello, and TLS (a connector
/// and the name the shard's certificate must carry).
#[derive(Clone, Default)]
pub(crate) struct Access {
    pub token: Option<AuthToken>,
    pub tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl DataPlane {
    /// Opens a first connection to `addr`, to learn early whether the port is reachable.
    pub async fn connect(
        addr: SocketAddr,
        resolve: Resolve,
        max_connections: usize,
        spin: Duration,
        access: Access,
    ) -> std::io::Result<DataPlane> {
        let conn = dial(addr, &access).await?;
        Ok(DataPlane {
            addr: Mutex::new(addr),
            resolve,
            idle: Mutex::new(vec![conn]),
            in_flight: Semaphore::new(max_connections.max(1)),
            sending: tokio::sync::Mutex::new(()),
            spin,
            access,
        })
    }

    /// The address of the shard's data plane.
    pub fn addr(&self) -> SocketAddr {
        *self.addr.lock().expect("address lock")
    }

    /// Pushes `data` (the values of `header`) and returns the server's answer.
    pub async fn push(&self, header: ps::PushHeader, data: &[f32], wire: DType, ctx: &str) -> Result<ps::PushResponse> {
        let (_permit, mut c) = self.lease(ctx).await?;
        let outcome = async {
            c.send(Op::Push(header), data, wire, &self.sending).await?;
            c.spin_for_reply(self.spin_for(data.len() * wire.size())).await;
            c.reply().await
        }
        .await;
        let reply = self.finish(c, outcome, ctx)?;
        reply.push.ok_or_else(|| protocol(ctx, "the reply carries no push result"))
    }

    /// Pulls a part's values into `dst`; returns their version.
    pub async fn pull(&self, req: ps::PullRequest, part: &Part, wire: DType, dst: &mut [f32], ctx: &str) -> Result<u64> {
        let (_permit, mut c) = self.lease(ctx).await?;
        let outcome = async {
            c.send(Op::Pull(req), &[], wire, &self.sending).await?;
            c.spin_for_reply(self.spin_for(dst.len() * wire.size())).await;
            c.reply_with_values(part, wire, dst).await
        }
        .await;
        let reply = self.finish(c, outcome, ctx)?;
        Ok(reply.values.map_or(0, |h| h.version))
    }

    /// Pushes `data` (as `wire`) and receives the values of the next step (as `pull_wire`)
    /// into `dst`: returns their version and the push's outcome.
    #[allow(clippy::too_many_arguments)]
    pub async fn push_pull(
        &self,
        header: ps::PushHeader,
        data: &[f32],
        wire: DType,
        part: &Part,
        pull_wire: DType,
        dst: &mut [f32],
        ctx: &str,
    ) -> Result<(u64, ps::PushResponse)> {
        let (_permit, mut c) = self.lease(ctx).await?;
        let outcome = async {
            c.send(Op::PushPull(header), data, wire, &self.sending).await?;
            c.spin_for_reply(self.spin_for(data.len() * wire.size() + dst.len() * pull_wire.size())).await;
            c.reply_with_values(part, pull_wire, dst).await
        }
        .await;
        let reply = self.finish(c, outcome, ctx)?;
        let push = reply.push.ok_or_else(|| protocol(ctx, "the reply carries no push result"))?;
        Ok((reply.values.map_or(0, |h| h.version), push))
    }

    /// Looks up the rows of `ids` (the request's `num_ids` set; `row_values` elements each,
    /// sent as `wire`); returns their version and the rows as they came (`wire` bytes).
    pub async fn lookup(&self, req: ps::LookupRequest, ids: &[u64], wire: DType, row_values: usize, ctx: &str) -> Result<(u64, Vec<u8>)> {
        let (_permit, mut c) = self.lease(ctx).await?;
        let n = ids.len() * row_values * wire.size();
        let mut rows = Vec::new();
        let outcome = async {
            c.send_rows(Op::Lookup(req), ids, &[]).await?;
            c.spin_for_reply(self.spin_for(n)).await;
            let reply = c.reply().await?;
            if reply.code != 0 {
                return Ok(reply);
            }
            let header = reply.lookup.as_ref().ok_or_else(|| Failure::Protocol("the reply carries no lookup header".into()))?;
            if header.wire_dtype != crate::spec::dtype_to_proto(wire) {
                return Err(Failure::Protocol(wrong_wire(header.wire_dtype, wire)));
            }
            if reply.payload_bytes != n as u64 {
                return Err(Failure::Protocol(format!("{} row bytes announced, {n} expected", reply.payload_bytes)));
            }
            rows.resize(n, 0);
            c.sock.read_exact(&mut rows).await?;
            Ok(reply)
        }
        .await;
        let reply = self.finish(c, outcome, ctx)?;
        Ok((reply.lookup.map_or(0, |h| h.version), rows))
    }

    /// Pushes gradient rows of `ids` (the request's `num_ids` and wire dtype set), already
    /// encoded in that dtype.
    pub async fn push_sparse(&self, req: ps::PushSparseRequest, ids: &[u64], rows: &[u8], ctx: &str) -> Result<ps::PushResponse> {
        let (_permit, mut c) = self.lease(ctx).await?;
        let outcome = async {
            c.send_rows(Op::PushSparse(req), ids, rows).await?;
            c.spin_for_reply(self.spin_for(rows.len())).await;
            c.reply().await
        }
        .await;
        let reply = self.finish(c, outcome, ctx)?;
        reply.push.ok_or_else(|| protocol(ctx, "the reply carries no push result"))
    }

    /// How long to busy-poll for the reply of a request moving `bytes` of values: only small
    /// ones, whose round trip is dominated by waking a sleeping thread.
    fn spin_for(&self, bytes: usize) -> Duration {
        if bytes <= COALESCE_BYTES {
            self.spin
        } else {
            Duration::ZERO
        }
    }

    /// A permit to send one request, and a pooled (or new) connection to send it on.
    async fn lease(&self, ctx: &str) -> Result<(tokio::sync::SemaphorePermit<'_>, Conn)> {
        let permit = self.in_flight.acquire().await.map_err(|_| protocol(ctx, "data plane closed"))?;
        if let Some(c) = self.take_idle() {
            return Ok((permit, c));
        }
        let addr = self.addr();
        let unavailable = |a: SocketAddr, e: std::io::Error| {
            let kind = match e.kind() {
                std::io::ErrorKind::PermissionDenied => ErrorKind::Unauthenticated,
                _ => ErrorKind::Unavailable,
            };
            Error::new(kind, format!("{ctx}: data plane {a}: {e}"))
        };
        match dial(addr, &self.access).await {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(unavailable(addr, e)),
            Ok(c) => Ok((permit, c)),
            Err(e) => {
                // Nothing was sent, so trying elsewhere is safe: the shard may have restarted
                // on another port. Ask it over gRPC (which reconnects on its own).
                match (self.resolve)().await {
                    Some(fresh) if fresh != addr => {
                        tracing::info!(old = %addr, new = %fresh, "the shard's data plane moved");
                        *self.addr.lock().expect("address lock") = fresh;
                        let c = dial(fresh, &self.access).await.map_err(|e| unavailable(fresh, e))?;
                        Ok((permit, c))
                    }
                    _ => Err(unavailable(addr, e)),
                }
            }
        }
    }

    /// Ends a request: the connection goes back to the pool only when the exchange
    /// completed (a failed one's byte stream may be anywhere, so it is closed; so is one
    /// whose future was dropped). A status other than OK becomes an error.
    fn finish(&self, conn: Conn, outcome: std::result::Result<ps::DataReply, Failure>, ctx: &str) -> Result<ps::DataReply> {
        match outcome {
            Ok(reply) => {
                self.idle.lock().expect("pool lock").push(conn);
                if reply.code != 0 {
                    let mut status = tonic::Status::new(tonic::Code::from(reply.code as i32), reply.message);
                    // The shard's own answer, never tonic's size limit.
                    parasync_proto::codec::mark_service_status(&mut status);
                    return Err(Error::from_status(status, ctx));
                }
                Ok(reply)
            }
            Err(Failure::Io(e)) => {
                Err(Error::new(ErrorKind::Unavailable, format!("{ctx}: data plane {} failed: {e}", self.addr())))
            }
            Err(Failure::Protocol(why)) => Err(protocol(ctx, &why)),
        }
    }

    /// An idle connection that the server has not closed, if the pool has one.
    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some(c) = idle.pop() {
            // Between requests nothing may arrive: readable means closed (or broken).
            let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
            match socket2::SockRef::from(c.sock.tcp()).peek(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(c),
                _ => continue,
            }
        }
        None
    }
}

/// Why an exchange failed before a complete reply arrived.
enum Failure {
    /// The connection broke.
    Io(std::io::Error),
    /// The server sent something this client cannot follow.
    Protocol(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}

/// The values came in another wire dtype than was asked for.
pub(crate) fn wrong_wire(got: i32, asked: DType) -> String {
    let got = ps::Dtype::try_from(got).map_or_else(|_| format!("dtype {got}"), |d| d.as_str_name().to_string());
    format!("the shard sent values as {got}, this client asked for {asked} (a shard too old for pull_wire_dtype?)")
}

fn protocol(ctx: &str, why: &str) -> Error {
    Error::new(ErrorKind::Internal, format!("{ctx}: data plane protocol error: {why}"))
}

/// Opens a data connection: connect, socket options, TLS, greeting, and a hello with the
/// token (a refused one is a `PermissionDenied` error carrying the shard's message).
async fn dial(addr: SocketAddr, access: &Access) -> std::io::Result<Conn> {
    let token = access.token.as_ref();
    let sock = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting took over {DIAL_TIMEOUT:?}")))??;
    sock.set_nodelay(true)?;
    // Keepalive probes notice a server whose machine died, instead of waiting forever.
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(10)).with_interval(Duration::from_secs(5));
    socket2::SockRef::from(&sock).set_tcp_keepalive(&keepalive.with_retries(3))?;
    let mut sock = match &access.tls {
        None => DataStream::Plain(sock),
        Some((connector, name)) => {
            let tls = tokio::time::timeout(DIAL_TIMEOUT, connector.connect(name.clone(), sock)).await.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no TLS handshake within {DIAL_TIMEOUT:?}"))
            })?;
            let tls = tls.map_err(|e| std::io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
            DataStream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls)))
        }
    };
    let hello = ps::DataRequest {
        op: Some(Op::Hello(ps::DataHello { auth_token: token.map_or_else(String::new, |t| t.expose().to_string()) })),
        payload_bytes: 0,
    };
    let mut greeting = MAGIC.to_vec();
    put_frame(&hello, &mut greeting);
    sock.write_all(&greeting).await?;
    sock.flush().await?;
    let mut conn = Conn { sock, scratch: Vec::new() };
    let answered = tokio::time::timeout(DIAL_TIMEOUT, conn.reply()).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, format!("the shard did not answer the hello within {DIAL_TIMEOUT:?}"))
    })?;
    match answered {
        Ok(r) if r.code == 0 => Ok(conn),
        Ok(r) if r.code == tonic::Code::Unauthenticated as u32 => Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, r.message)),
        Ok(r) => Err(std::io::Error::other(format!("the shard refused the connection: {}", r.message))),
        Err(Failure::Io(e)) => Err(e),
        Err(Failure::Protocol(why)) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why)),
    }
}

impl Conn {
    /// Sends a request and its values (encoded as `wire`).
    async fn send(&mut self, op: Op, data: &[f32], wire: DType, sending: &tokio::sync::Mutex<()>) -> std::result::Result<(), Failure> {
        let payload = data.len() * wire.size();
        let req = ps::DataRequest { op: Some(op), payload_bytes: payload as u64 };
        self.scratch.clear();
        put_frame(&req, &mut self.scratch);
        if payload <= COALESCE_BYTES {
            parasync_tensor::encode_f32(data, wire, &mut self.scratch);
            self.sock.write_all(&self.scratch).await?;
            // (TLS keeps the last record until flushed; plain TCP has nothing to flush.)
            self.sock.flush().await?;
            return Ok(());
        }
        let _turn = sending.lock().await;
        self.sock.write_all(&self.scratch).await?;
        #[cfg(target_endian = "little")]
        if wire == DType::F32 {
            self.sock.write_all(parasync_tensor::f32_as_le_bytes(data)).await?;
            self.sock.flush().await?;
            return Ok(());
        }
        for piece in data.chunks(PIECE_BYTES / wire.size()) {
            self.scratch.clear();
            parasync_tensor::encode_f32(piece, wire, &mut self.scratch);
            self.sock.write_all(&self.scratch).await?;
        }
        self.sock.flush().await?;
        Ok(())
    }

    /// Sends a table request: its frame, the ids, then `rows` encoded as `wire`, in one write.
    async fn send_rows(&mut self, op: Op, ids: &[u64], rows: &[u8]) -> std::result::Result<(), Failure> {
        let payload = ids.len() * 8 + rows.len();
        let req = ps::DataRequest { op: Some(op), payload_bytes: payload as u64 };
        self.scratch.clear();
        put_frame(&req, &mut self.scratch);
        for id in ids {
            self.scratch.extend_from_slice(&id.to_le_bytes());
        }
        if rows.len() > COALESCE_BYTES {
            // Large rows go from the caller's buffer straight to the socket.
            self.sock.write_all(&self.scratch).await?;
            self.sock.write_all(rows).await?;
            self.sock.flush().await?;
            return Ok(());
        }
        self.scratch.extend_from_slice(rows);
        self.sock.write_all(&self.scratch).await?;
        self.sock.flush().await?;
        Ok(())
    }

    /// Polls the socket for up to `limit` until the reply starts to arrive, yielding to the
    /// runtime's other tasks between polls (so other requests of this client go on). On an
    /// idle machine a sleeping thread takes tens of microseconds to wake, more than a small
    /// request's whole round trip; polling keeps this thread awake for that long instead.
    async fn spin_for_reply(&self, limit: Duration) {
        if limit.is_zero() {
            return;
        }
        let started = std::time::Instant::now();
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        loop {
            // The socket is non-blocking: WouldBlock means nothing yet. Anything else
            // (data, end of stream, an error) is for the normal read to take.
            match socket2::SockRef::from(self.sock.tcp()).peek(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                _ => return,
            }
            if started.elapsed() >= limit {
                return;
            }
            tokio::task::yield_now().await;
        }
    }

    /// Reads one reply frame.
    async fn reply(&mut self) -> std::result::Result<ps::DataReply, Failure> {
        let mut prefix = [0u8; 4];
        self.sock.read_exact(&mut prefix).await?;
        let len = frame_len(prefix).map_err(Failure::Protocol)?;
        fill(&mut self.sock, &mut self.scratch, len).await?;
        ps::DataReply::decode(&self.scratch[..len]).map_err(|e| Failure::Protocol(format!("malformed reply: {e}")))
    }

    /// Reads a reply and, when it is OK, the values that follow it into `dst`, after
    /// checking they are the part this client expects.
    async fn reply_with_values(&mut self, part: &Part, wire: DType, dst: &mut [f32]) -> std::result::Result<ps::DataReply, Failure> {
        let reply = self.reply().await?;
        if reply.code != 0 {
            return Ok(reply);
        }
        let header = reply.values.as_ref().ok_or_else(|| Failure::Protocol("the reply carries no values header".into()))?;
        let shape: Vec<usize> = header.shape.iter().map(|&d| d as usize).collect();
        if shape != part.shape {
            return Err(Failure::Protocol(format!("the shard holds shape {shape:?}, this client expects {:?}", part.shape)));
        }
        if header.wire_dtype != crate::spec::dtype_to_proto(wire) {
            return Err(Failure::Protocol(wrong_wire(header.wire_dtype, wire)));
        }
        let expected = dst.len() * wire.size();
        if reply.payload_bytes != expected as u64 {
            return Err(Failure::Protocol(format!("{} value bytes announced, {expected} expected", reply.payload_bytes)));
        }
        #[cfg(target_endian = "little")]
        if wire == DType::F32 {
            self.sock.read_exact(parasync_tensor::f32_as_le_bytes_mut(dst)).await?;
            return Ok(reply);
        }
        for piece in dst.chunks_mut(PIECE_BYTES / wire.size()) {
            let n = piece.len() * wire.size();
            fill(&mut self.sock, &mut self.scratch, n).await?;
            parasync_tensor::decode_into(&self.scratch[..n], wire, piece).map_err(|e| Failure::Protocol(e.to_string()))?;
        }
        Ok(reply)
    }
}
