use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

#[tokio::test]
async fn unknown_routes_are_404_not_found() {
    let app = spawn_app().await;
    for path in ["/", "/nope", "/v1", "/healthz/extra", "/v1/products/x/y/z/w/v"] {
        let (status, code, _) = error_of(app.get(path).await).await;
        assert_eq!((status, code.as_str()), (404, "not_found"), "{path}");
    }
}

#[tokio::test]
async fn wrong_methods_are_405_with_allow() {
    let app = spawn_app().await;
    let resp = app.client.delete(app.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.headers()["allow"], "GET, HEAD");
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_HTTP__HEADER_READ_TIMEOUT_MS".into(), "300".into());
    })
    .await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server held a half-sent request open for 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before the timeout"
    );
    // A well-behaved client on a fresh connection is unaffected.
    assert_eq!(app.get("/healthz").await.status(), 200);
}

/// Sends `head` (requests without bodies) on a fresh connection and returns what came
/// back until the server closed it, or the error that ended it (a server that closes
/// with bytes still unread resets the connection, which may come before its answer).
async fn raw_answer(app: &TestApp, head: &[u8]) -> Result<String, std::io::Error> {
    let mut stream = TcpStream::connect(app.addr).await?;
    stream.write_all(head).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .expect("the connection was not closed")?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[tokio::test]
async fn oversized_headers_are_431_with_our_error_body_and_the_connection_closed() {
    let app = spawn_app().await;
    let head = |filler: usize| {
        format!(
            "GET /v1/products HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
            "a".repeat(filler)
        )
        .into_bytes()
    };
    // Under the limit (16 KiB by default) the request goes on to authentication, and
    // the connection serves the next one.
    let close = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let answer = raw_answer(&app, &[&head(15_000)[..], close].concat()).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("\"status\":\"ok\""), "kept alive after a 401: {answer}");

    let answer = raw_answer(&app, &head(20_000)).await.unwrap();
    let lower = answer.to_ascii_lowercase();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(lower.contains("x-request-id: req_"), "{answer}");
    assert!(lower.contains("connection: close"), "{answer}");
    assert!(answer.contains("\"code\":\"invalid_request\""), "{answer}");
    assert!(answer.contains("16384 bytes"), "names the limit: {answer}");
    // A long query string counts too.
    let long = format!("GET /healthz?{} HTTP/1.1\r\nHost: x\r\n\r\n", "q=1&".repeat(5000));
    let answer = raw_answer(&app, long.as_bytes()).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(200)]
    );

    // Far beyond it, hyper's read buffer is full first: a bare 431 (or a reset, the
    // rest being unread), never the half megabyte held and passed on.
    match raw_answer(&app, &head(500_000)).await {
        Ok(answer) => assert!(
            answer.starts_with("HTTP/1.1 431"),
            "{}",
            &answer[..answer.len().min(200)]
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
    }
    assert_eq!(app.get("/healthz").await.status(), 200);
}

fn login_body() -> serde_json::Value {
    serde_json::json!({"username": ROOT_USER, "password": "wrong-password"})
}

#[tokio::test]
async fn json_bodies_over_the_limit_are_413_by_length_or_while_streaming() {
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_HTTP__JSON_BODY_MAX_BYTES".into(), "1024".into());
    })
    .await;
    let big = format!("{{\"username\":\"{}\",\"password\":\"x\"}}", "a".repeat(2000));
    let resp = app
        .client
        .post(app.url("/admin/v1/login"))
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));

    // Chunked, no Content-Length: cut off while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.as_bytes().chunks(100).map(|c| Ok(c.to_vec())).collect();
    let resp = app
        .client
        .post(app.url("/admin/v1/login"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));
}

#[tokio::test]
async fn wrong_content_types_are_415_and_broken_json_is_400() {
    let app = spawn_app().await;
    let resp = app
        .client
        .post(app.url("/admin/v1/login"))
        .header("content-type", "text/plain")
        .body(login_body().to_string())
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (415, "unsupported_media_type"));

    for (body, want) in [
        ("{\"username\":", "invalid_json"),
        ("[1,2]", "invalid_request"),
        ("{\"username\":\"a\"}", "invalid_request"),
    ] {
        let resp = app
            .client
            .post(app.url("/admin/v1/login"))
            .header("content-type", "application/json; charset=utf-8")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, code, err) = error_of(resp).await;
        assert_eq!((status, code.as_str()), (400, want), "{body}: {err}");
    }
    let resp = app
        .client
        .post(app.url("/admin/v1/login"))
        .header("content-type", "application/json")
        .body("{\"username\":\"a\"}")
        .send()
        .await
        .unwrap();
    let (_, _, err) = error_of(resp).await;
    assert!(
        err["error"]["message"].as_str().unwrap().contains("password"),
        "names the missing field: {err}"
    );
}

#[tokio::test]
async fn a_slow_body_gets_400_and_the_connection_closed() {
    let app = spawn_app_with(|env| {
        env.insert("CARDGATE_HTTP__BODY_READ_TIMEOUT_MS".into(), "300".into());
    })
    .await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"POST /admin/v1/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection held open");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("invalid_request"), "{text}");
}

#[tokio::test]
async fn graceful_shutdown_completes_an_in_flight_request() {
    let mut app = spawn_app().await;
    let body = login_body().to_string();
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /admin/v1/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let server = app.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!server.is_finished(), "the server stopped with a request in flight");
    // New connections are refused once shutdown began.
    assert!(
        TcpStream::connect(app.addr).await.is_err(),
        "still accepting after shutdown"
    );

    stream.write_all(&body.as_bytes()[5..]).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.starts_with("HTTP/1.1 401"),
        "the in-flight request was answered: {text}"
    );
    let result = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server returned")
        .unwrap();
    assert!(result.is_ok());
}
