//! What the intercept tests share: a session's registration and a server
//! that stands for an app on the loopback.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tpd_wire::intercept::{Filter, Request, Route};

/// Session `session` (held by `SESSION@laptop`) registering `routes`, with `home`.
pub fn register(session: &str, token: &str, home: SocketAddr, routes: Vec<Route>) -> Request {
    Request::Register {
        session: session.into(),
        token: token.into(),
        holder: format!("{session}@laptop"),
        since: "2026-12-07T10:00:00Z".into(),
        home,
        routes,
    }
}

/// Every request to `port`, by a path prefix of `/`.
pub fn every_request(port: u16) -> Route {
    Route { port, filter: Filter { path_prefix: Some("/".into()), ..Filter::default() }, mirror: None }
}

/// A TCP echo server on the loopback; its port.
pub async fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut rd, mut wr) = sock.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    port
}
