//! The local demo: no cluster, no config file to write.
//!
//! `cargo run --release --example demo` starts three demo backends on loopback (one of them
//! 20 ms slower), starts meshlet in front of them as the service `web.default` on
//! 127.0.0.1:9000 (admin on 127.0.0.1:7190), sends requests through it and prints which
//! backend answered each, then keeps running until Ctrl-C so that you can try it yourself:
//!
//! ```text
//! curl -s localhost:9000/hello            # answered by one of the backends
//! curl -s localhost:7190/metrics | grep meshlet_requests_total
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshlet::app::App;
use meshlet::config::Config;
use tokio::net::{TcpListener, TcpStream};

async fn backend(name: &'static str, delay: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a demo backend");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(
                        http::Response::builder()
                            .header("x-backend", name)
                            .body(Full::new(Bytes::from(format!("hello from {name}\n"))))
                            .expect("valid response"),
                    )
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = backend("backend-a", Duration::ZERO).await;
    let b = backend("backend-b", Duration::ZERO).await;
    let c = backend("backend-c (20 ms slower)", Duration::from_millis(20)).await;
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:7190\nupstreams:\n  - listen: 127.0.0.1:9000\n    service: web.default\n\
         discovery:\n  static:\n    - service: web.default\n      endpoints: [\"{a}\", \"{b}\", \"{c}\"]\n"
    );
    println!("meshlet config:\n{yaml}");
    let app = App::bind(Config::parse("demo", &yaml)?)?;
    let shutdown = app.shutdown_token();
    let run = tokio::spawn(app.run());

    // One keep-alive connection; meshlet balances each request on its own.
    let stream = TcpStream::connect("127.0.0.1:9000").await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..30 {
        let req = http::Request::get(format!("/demo/{i}"))
            .header("host", "web.default")
            .body(Full::new(Bytes::new()))?;
        sender.ready().await?;
        let rsp = sender.send_request(req).await?;
        let status = rsp.status();
        let body = rsp.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&body).trim().to_string();
        println!("request {i:2}: {status} {text}");
        *tally.entry(text).or_default() += 1;
    }
    println!("\n30 requests over one connection, balanced per request (p2c, peak-EWMA):");
    for (who, n) in &tally {
        println!("  {n:3}  {who}");
    }
    println!(
        "\nmeshlet keeps running: try `curl -s localhost:9000/` and \
         `curl -s localhost:7190/metrics`; Ctrl-C to stop."
    );
    tokio::signal::ctrl_c().await?;
    shutdown.cancel();
    run.await?;
    Ok(())
}
