//! The sample application of the demo: answers every request with its own service name and
//! cluster and the caller identity its proxy vouched for (the `x-trellis-peer-identity` header).

use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use tokio::net::TcpListener;

/// Serves forever on `listen`.
pub async fn run(name: String, cluster: String, listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(addr = %listener.local_addr()?, %name, %cluster, "demo app serving");
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
