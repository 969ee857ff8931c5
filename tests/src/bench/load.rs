//! The load generator: open loop at a fixed rate over a fixed number of connections, corrected
//! for coordinated omission. Every request has an intended start time on a fixed schedule; when
//! all connections are busy the request waits, and that wait counts in its latency. (Delay of the
//! scheduler itself, at most one timer tick, does not count: it is not the system under test.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

/// HTTP version spoken by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    /// HTTP/2 with prior knowledge, as gRPC clients speak.
    Http2,
}

impl Proto {
    /// Label of the protocol.
    pub fn label(self) -> &'static str {
        match self {
            Proto::Http1 => "http1",
            Proto::Http2 => "grpc-h2",
        }
    }
}

/// Latencies (µs) and errors of one run.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub latencies_us: Vec<u32>,
    pub errors: u64,
    pub elapsed: Duration,
}

impl Samples {
    /// Merges another run.
    pub fn merge(&mut self, other: Samples) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        self.elapsed += other.elapsed;
    }

    /// Percentile in µs (`p` in 0..=1).
    pub fn percentile_us(&self, p: f64) -> f64 {
        let mut v = self.latencies_us.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        f64::from(v[(((v.len() - 1) as f64) * p).round() as usize])
    }

    /// Achieved requests per second.
    pub fn rps(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect(addr: &str, proto: Proto) -> anyhow::Result<Sender> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let io = TokioIo::new(tcp);
    Ok(match proto {
        Proto::Http1 => {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Sender::H1(s)
        }
        Proto::Http2 => {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Sender::H2(s)
        }
    })
}

/// `conns` senders: one connection each for HTTP/1.1, or handles to one multiplexed HTTP/2
/// connection (as gRPC clients use).
async fn senders(addr: &str, proto: Proto, conns: usize) -> anyhow::Result<Vec<Sender>> {
    let shared = match proto {
        Proto::Http2 => Some(connect(addr, proto).await?),
        Proto::Http1 => None,
    };
    let mut out = Vec::with_capacity(conns);
    for _ in 0..conns {
        out.push(match &shared {
            Some(Sender::H2(s)) => Sender::H2(s.clone()),
            _ => connect(addr, proto).await?,
        });
    }
    Ok(out)
}

async fn send(sender: &mut Sender, addr: &str, body: &Bytes) -> anyhow::Result<()> {
    let req = Request::post(format!("http://{addr}/bench"))
        .header("content-type", "application/octet-stream")
        .body(Full::new(body.clone()))?;
    let resp = match sender {
        Sender::H1(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
        Sender::H2(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
    };
    let ok = resp.status().is_success();
    resp.into_body().collect().await?;
    anyhow::ensure!(ok, "non-success status");
    Ok(())
}

/// Runs `rate` requests/s for `duration` over `conns` connections (one multiplexed HTTP/2
/// connection with `conns` concurrent streams for [`Proto::Http2`]).
pub async fn fixed_rate(
    addr: &str,
    proto: Proto,
    rate: u32,
    duration: Duration,
    conns: usize,
    body: Bytes,
) -> anyhow::Result<Samples> {
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, Instant)>();
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for mut sender in senders(addr, proto, conns).await? {
        let rx = rx.clone();
        let addr = addr.to_string();
        let body = body.clone();
        workers.push(tokio::spawn(async move {
            let mut s = Samples::default();
            loop {
                let next = rx.lock().await.recv().await;
                let Some((intended, dispatched)) = next else { break };
                let result = send(&mut sender, &addr, &body).await;
                let start = intended.max(dispatched);
                match result {
                    Ok(()) => s.latencies_us.push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                    Err(_) => {
                        s.errors += 1;
                        if let Ok(fresh) = connect(&addr, proto).await {
                            sender = fresh;
                        }
                    }
                }
            }
            s
        }));
    }
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let total = (duration.as_secs_f64() * f64::from(rate)) as u64;
    let mut sent = 0u64;
    while sent < total {
        let now = Instant::now();
        let due = ((now - start).as_secs_f64() * f64::from(rate)) as u64 + 1;
        while sent < due.min(total) {
            let _ = tx.send((start + interval * sent as u32, now));
            sent += 1;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    drop(tx);
    let mut all = Samples::default();
    for w in workers {
        all.merge(w.await?);
    }
    all.elapsed = start.elapsed();
    Ok(all)
}

/// Closed loop: `conns` connections each sending back to back for `duration`; returns the count.
pub async fn saturate(
    addr: &str,
    proto: Proto,
    duration: Duration,
    conns: usize,
    body: Bytes,
) -> anyhow::Result<Samples> {
    let deadline = Instant::now() + duration;
    let mut workers = Vec::new();
    for mut sender in senders(addr, proto, conns).await? {
        let addr = addr.to_string();
        let body = body.clone();
        workers.push(tokio::spawn(async move {
            let mut s = Samples::default();
            while Instant::now() < deadline {
                let t = Instant::now();
                match send(&mut sender, &addr, &body).await {
                    Ok(()) => s.latencies_us.push(t.elapsed().as_micros() as u32),
                    Err(_) => s.errors += 1,
                }
            }
            s
        }));
    }
    let start = Instant::now();
    let mut all = Samples::default();
    for w in workers {
        all.merge(w.await?);
    }
    all.elapsed = start.elapsed();
    Ok(all)
}
