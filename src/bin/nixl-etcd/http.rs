//! `serve --metrics HOST:PORT`: the operator's endpoints over HTTP/1 (hyper):
//! `/metrics` (the library's metrics, OpenMetrics text), `/healthz` (the
//! process is up) and `/readyz` (etcd answers a read within the client's
//! timeout, so the store can keep its writers' leases).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nixl_etcd::{Client, Status};

use crate::fail::CliError;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// An engine id no engine uses: `/readyz` reads it, and etcd's NOT_FOUND
/// answer is the proof that it answers.
const PROBE: &str = "nixl-etcd-readyz-probe";

/// Binds `addr` and serves on a thread of its own for the process's life;
/// returns the bound address.
pub fn start(addr: &str, client: Client) -> Result<SocketAddr, CliError> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| CliError::io(&format!("cannot listen for --metrics on {addr}"), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::io("cannot read the --metrics address", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| CliError::io("cannot set up the --metrics socket", e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::io("cannot start the --metrics runtime", e))?;
    let client = Arc::new(client);
    std::thread::Builder::new()
        .name("nixl-etcd-metrics".into())
        .spawn(move || runtime.block_on(accept(listener, client)))
        .map_err(|e| CliError::io("cannot start the --metrics thread", e))?;
    Ok(local)
}

async fn accept(listener: std::net::TcpListener, client: Arc<Client>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        log::error!("nixl-etcd serve: --metrics socket unusable; no metrics are served");
        return;
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::warn!("nixl-etcd serve: --metrics accept failed: {e}");
                continue;
            }
        };
        let client = client.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, client.clone()));
            // A client that sends garbage or hangs up only ends its own connection.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    client: Arc<Client>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, kind: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = kind.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        Ok(r)
    };
    let text = "text/plain; charset=utf-8";
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, text, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, OPENMETRICS, nixl_etcd::metrics::text()),
        "/healthz" => reply(StatusCode::OK, text, "ok\n".into()),
        "/readyz" => {
            // The read blocks up to the client's timeout: off the async thread.
            let probe = tokio::task::spawn_blocking(move || client.recheck(PROBE, 0)).await;
            match probe {
                Ok(Err(e)) if e.status == Status::ErrNotFound => {
                    reply(StatusCode::OK, text, "ready: etcd answers\n".into())
                }
                Ok(Ok(_)) => reply(StatusCode::OK, text, "ready: etcd answers\n".into()),
                Ok(Err(e)) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    text,
                    format!("not ready: {e}\n"),
                ),
                Err(e) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    text,
                    format!("not ready: the probe failed: {e}\n"),
                ),
            }
        }
        other => reply(
            StatusCode::NOT_FOUND,
            text,
            format!("no {other}: try /metrics, /healthz or /readyz\n"),
        ),
    }
}
