//! The sample application of the demo: answers every request with its own service name and
//! cluster and the caller identity its proxy vouched for (the `x-trellis-peer-identity` header).

use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use tokio::net::TcpListener;

/// Serves forever on `listen` (port 0 picks one); writes `{"addr": "ip:port"}` to `ready_file`
/// once listening, so whoever started it never has to guess a free port.
pub async fn run(
    name: String,
    cluster: String,
    listen: SocketAddr,
    ready_file: Option<std::path::PathBuf>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, %name, %cluster, "demo app serving");
    if let Some(path) = ready_file {
        crate::context::write_private(&path, serde_json::json!({ "addr": addr.to_string() }).to_string().as_bytes())?;
    }
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (name, cluster) = (name.clone(), cluster.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let caller = req
                    .headers()
                    .get(trellis_proto::PEER_IDENTITY_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = serde_json::json!({
                    "service": name,
                    "cluster": cluster,
                    "caller": caller,
                    "path": req.uri().path(),
                });
                async move {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body.to_string())))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}
