//! Orders are isolated from everything else (DESIGN.md invariant 9): the operator API on
//! a listener of its own, connections capped per client address, heavy operator work
//! bounded, and a flood of hostile traffic on every other route leaving orders served.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::helpers::*;

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the server closed `stream` without answering (read returns 0 or an error).
async fn closed_at_once(stream: &mut TcpStream) -> bool {
    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn the_operator_api_on_admin_listen_is_served_there_only() {
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_ADMIN_LISTEN".into(), "127.0.0.1:0".into());
    })
    .await;
    let admin = app.admin_addr.expect("admin_listen bound");
    assert_ne!(admin, app.addr);
    // root_token logs in through the admin listener (helpers route /admin there).
    let t = app.root_token().await;
    let k = app.reseller_with_key(&t, "gold", serde_json::json!({})).await;

    let public = |path: &str| format!("http://{}{path}", app.addr);
    let internal = |path: &str| format!("http://{admin}{path}");
    let login = serde_json::json!({"username": ROOT_USER, "password": "root-password-1"});
    let resp = app
        .client
        .post(public("/admin/v1/login"))
        .json(&login)
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(resp).await;
    assert_eq!(
        (status, code.as_str()),
        (404, "not_found"),
        "no operator API on the public listener"
    );
    // Not even a 405 that would tell a path exists.
    let resp = app.client.get(public("/admin/v1/login")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let resp = app
        .client
        .get(public("/admin/v1/products"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "a valid token does not open it either");

    let resp = app
        .client
        .get(internal("/admin/v1/products"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app.client.get(internal("/v1/products")).send().await.unwrap();
    assert_eq!(resp.status(), 404, "the reseller API is not on the admin listener");

    // Resellers are served on the public listener as before.
    let resp = app.signed(&k, reqwest::Method::GET, "/v1/products", None).await;
    assert_eq!(resp.status(), 200);
    for path in ["/healthz", "/readyz", "/metrics"] {
        for url in [public(path), internal(path)] {
            assert_eq!(app.client.get(&url).send().await.unwrap().status(), 200, "{url}");
        }
    }
}

#[tokio::test]
async fn one_client_address_cannot_hold_more_than_its_share_of_connections() {
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_HTTP__CONNECTIONS_PER_CLIENT_MAX".into(), "8".into());
    })
    .await;
    // Eight idle connections (as slow clients would hold) from one address...
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from("127.0.0.2", app.addr).await);
    }
    // ...are answered as ever: the cap counts, it does not refuse what is under it.
    let mut s = held.pop().unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    held.push(s);

    let mut ninth = connect_from("127.0.0.2", app.addr).await;
    assert!(
        closed_at_once(&mut ninth).await,
        "a ninth connection from one address is closed"
    );
    // Other clients are not affected.
    let mut other = connect_from("127.0.0.3", app.addr).await;
    assert!(!closed_at_once(&mut other).await, "another address is served");
    assert!(metric(&app, "cardgate_http_client_connections_refused_total").await >= 1.0);

    drop(held);
    let ok = eventually(Duration::from_secs(5), || async {
        let mut s = connect_from("127.0.0.2", app.addr).await;
        !closed_at_once(&mut s).await
    })
    .await;
    assert!(ok, "the address gets its slots back when its connections close");
}
