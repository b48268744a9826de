//! Server hardening with raw TCP clients: body, header size and header count limits, the
//! request-smuggling corpus, the slow-header (slowloris) timeout, the request timeout and the
//! connection limit.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use tests::*;
use tokio::io::AsyncWriteExt;

const LIMITS: &str = r#"
limits:
  max_body_bytes: 1024
  max_header_bytes: 2048
  max_headers: 20
  header_read_timeout_secs: 1
  request_timeout_secs: 1
  max_connections: 2
policies:
  - name: echo
    route: { path: /echo }
    chain: [{ name: r, type: set_response, body: "b=${http.form.b}" }]
  - name: slow
    route: { path: /slow }
    chain:
      - { name: nap, type: test_sleep, ms: 3000 }
      - { name: r, type: set_response, body: late }
"#;

async fn gateway() -> (PolicyDir, Gateway) {
    let dir = PolicyDir::new(&[("p.yaml", LIMITS)]);
    let gw = dir.start_with(test_kinds::KINDS).await;
    (dir, gw)
}

const WINDOW: Duration = Duration::from_millis(1500);

fn form_head(len: usize) -> String {
    format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {len}\r\n\r\n"
    )
}

fn form_body(len: usize) -> Vec<u8> {
    let mut b = b"b=".to_vec();
    b.resize(len, b'x');
    b
}

/// A chunked form request whose body (`b=xxx...`) comes in chunks of these sizes, with a
/// trailer field after the last one or not.
fn chunked_form(chunks: &[usize], trailer: bool) -> Vec<u8> {
    let body = form_body(chunks.iter().sum());
    let mut req = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    let mut at = 0;
    for &n in chunks {
        req.extend(format!("{n:x}\r\n").into_bytes());
        req.extend(&body[at..at + n]);
        req.extend(b"\r\n");
        at += n;
    }
    req.extend(b"0\r\n");
    if trailer {
        req.extend(b"X-Checksum: 1\r\n");
    }
    req.extend(b"\r\n");
    req
}

#[tokio::test]
async fn a_body_in_frames_is_counted_to_the_byte_and_joined_in_order() {
    let (_dir, gw) = gateway().await;
    let a = gw.public_addr;
    // The limit is 1,024 bytes: reached in several chunks, passed by one byte in the last.
    for (chunks, status) in [
        (&[512, 512][..], 200),
        (&[1, 1023][..], 200),
        (&[512, 513][..], 413),
        (&[2, 1, 1, 1021][..], 413),
    ] {
        for trailer in [false, true] {
            let r = raw(a, &chunked_form(chunks, trailer), WINDOW).await;
            let what = format!("chunks {chunks:?}, trailer {trailer}: {}", r.text());
            assert_eq!(r.statuses(), [status], "{what}");
            if status == 200 {
                let len: usize = chunks.iter().sum();
                let echoed = format!("b={}", "x".repeat(len - 2));
                assert!(r.text().ends_with(&echoed), "{what}");
            } else {
                assert!(r.closed, "{what}");
            }
        }
    }
    // A declared length whose body arrives in pieces, read as several frames: joined whole.
    let head = form_head(1024).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let body = form_body(1024);
    for piece in body.chunks(300) {
        tokio::time::sleep(Duration::from_millis(30)).await;
        s.write_all(piece).await.unwrap();
    }
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut answer)
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(&format!("b={}", "x".repeat(1022))),
        "{answer}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn body_limit_413_with_content_length_and_chunked() {
    let (_dir, gw) = gateway().await;
    let a = gw.public_addr;

    // At the limit: accepted.
    let mut req = form_head(1024).into_bytes();
    req.extend(form_body(1024));
    let r = raw(a, &req, Duration::from_millis(300)).await;
    assert_eq!(r.statuses(), [200], "{}", r.text());

    // One byte over, declared: 413 JSON, connection closed.
    let mut req = form_head(1025).into_bytes();
    req.extend(form_body(1025));
    let r = raw(a, &req, WINDOW).await;
    assert_eq!(r.statuses(), [413], "{}", r.text());
    assert!(
        r.text().contains(r#""error":"invalid_request""#),
        "{}",
        r.text()
    );
    assert!(r.closed);

    // 10 MB declared, nothing sent: refused at once, without waiting for the body.
    let started = Instant::now();
    let r = raw(a, form_head(10_000_000).as_bytes(), WINDOW).await;
    assert_eq!(r.statuses(), [413], "{}", r.text());
    assert!(r.closed);
    assert!(started.elapsed() < Duration::from_secs(1));

    // Chunked, no length declared: counted as it streams.
    let mut req = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend(b"200\r\n");
        req.extend(vec![b'x'; 0x200]);
        req.extend(b"\r\n");
    }
    req.extend(b"0\r\n\r\n");
    let r = raw(a, &req, WINDOW).await;
    assert_eq!(r.statuses(), [413], "{}", r.text());
    assert!(r.closed);

    // Chunked within the limit: fine.
    let req = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nb=h\r\n2\r\nip\r\n0\r\n\r\n";
    let r = raw(a, req, WINDOW).await;
    assert_eq!(r.statuses(), [200], "{}", r.text());
    assert!(r.text().ends_with("b=hip"), "{}", r.text());

    // Through a real client as well.
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("b", &"y".repeat(5000))
        .finish();
    let resp = send(
        a,
        request(Method::POST, "/echo")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.json()["error"], "invalid_request");
    gw.shutdown().await;
}

#[tokio::test]
async fn header_size_and_count_limits_431() {
    let (_dir, gw) = gateway().await;
    let a = gw.public_addr;
    let big = format!(
        "GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "v".repeat(4000)
    );
    let r = raw(a, big.as_bytes(), WINDOW).await;
    assert_eq!(r.statuses(), [431], "{}", r.text());
    assert!(r.closed);

    let mut many = String::from("GET /echo HTTP/1.1\r\nHost: x\r\n");
    for i in 0..25 {
        many.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    let r = raw(a, many.as_bytes(), WINDOW).await;
    assert_eq!(r.statuses(), [431], "{}", r.text());
    assert!(r.closed);

    // Just under both limits: served.
    let mut ok = String::from("GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 0..15 {
        ok.push_str(&format!("X-H{i}: {}\r\n", "v".repeat(50)));
    }
    ok.push_str("\r\n");
    let r = raw(a, ok.as_bytes(), WINDOW).await;
    assert_eq!(r.statuses(), [200], "{}", r.text());
    gw.shutdown().await;
}

const SMUGGLED: &str = "GET /echo?smuggled=1 HTTP/1.1\r\nHost: x\r\n\r\n";

/// Each case: a request that a lenient or disagreeing parser could split differently, followed
/// by a second request. The gateway must answer 400 (or close) and never answer the rider.
#[tokio::test]
async fn smuggling_corpus_is_refused_and_nothing_rides_along() {
    let (_dir, gw) = gateway().await;
    let a = gw.public_addr;
    let post =
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n";
    let cases: Vec<(&str, String, bool)> = vec![
        // (name, bytes, whether a 200 to the first request is acceptable)
        (
            "CL+TE",
            format!(
                "{post}Content-Length: 47\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            true,
        ),
        (
            "TE+CL",
            format!(
                "{post}Transfer-Encoding: chunked\r\nContent-Length: 47\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            true,
        ),
        (
            "CL +3",
            format!("{post}Content-Length: +3\r\n\r\nb=1{SMUGGLED}"),
            false,
        ),
        (
            "CL -1",
            format!("{post}Content-Length: -1\r\n\r\n{SMUGGLED}"),
            false,
        ),
        (
            "two different CLs",
            format!("{post}Content-Length: 3\r\nContent-Length: 4\r\n\r\nb=1{SMUGGLED}"),
            false,
        ),
        (
            "CL list",
            format!("{post}Content-Length: 3, 4\r\n\r\nb=1{SMUGGLED}"),
            false,
        ),
        (
            "TE chunked then identity",
            format!(
                "{post}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            false,
        ),
        (
            "TE chunked, identity",
            format!("{post}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            false,
        ),
        (
            "TE xchunked",
            format!("{post}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            false,
        ),
        (
            "TE obs-fold",
            format!("{post}Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            false,
        ),
        (
            "TE on HTTP/1.0",
            format!(
                "POST /echo HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            false,
        ),
        (
            "space before colon",
            format!("{post}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"),
            false,
        ),
        (
            "huge chunk size",
            format!(
                "{post}Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\nb=1\r\n0\r\n\r\n{SMUGGLED}"
            ),
            false,
        ),
        (
            "chunk size overflow to small",
            format!(
                "{post}Transfer-Encoding: chunked\r\n\r\n10000000000000003\r\nb=1\r\n0\r\n\r\n{SMUGGLED}"
            ),
            false,
        ),
        (
            "bare LF chunk",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n3\nb=1\n0\n\n{SMUGGLED}"),
            false,
        ),
    ];
    for (name, bytes, ok_200) in cases {
        let r = raw(a, bytes.as_bytes(), WINDOW).await;
        let statuses = r.statuses();
        assert!(
            !r.text().contains("smuggled") && statuses.len() <= 1,
            "{name}: a second request rode along: {statuses:?}\n{}",
            r.text()
        );
        assert!(r.closed, "{name}: connection left open: {statuses:?}");
        match statuses.first() {
            None | Some(400) => {}
            Some(200) if ok_200 => {}
            Some(s) => panic!("{name}: answered {s}\n{}", r.text()),
        }
    }

    // A GET with a body: the body is consumed as a body, never parsed as a request.
    let req = format!(
        "GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
        SMUGGLED.len()
    );
    let r = raw(a, req.as_bytes(), Duration::from_millis(400)).await;
    assert_eq!(r.statuses(), [200], "{}", r.text());

    // Honest pipelining still works: two requests, two answers, in order.
    let req = "GET /echo HTTP/1.1\r\nHost: x\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let r = raw(a, req.as_bytes(), WINDOW).await;
    assert_eq!(r.statuses(), [200, 404], "{}", r.text());
    gw.shutdown().await;
}

async fn slow_client(a: SocketAddr, gap: Duration) -> (Duration, bool) {
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    let started = Instant::now();
    let head = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut = false;
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        // A closed peer shows as EOF on a read; peek without blocking the writer long.
        let mut buf = [0u8; 64];
        match tokio::time::timeout(gap, s.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            Ok(Ok(_)) => {
                // Something was written back (a 408); the server gave up on us.
                cut = true;
                break;
            }
            Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    (started.elapsed(), cut)
}

#[tokio::test]
async fn slow_headers_are_cut_off_at_the_header_read_timeout() {
    let (_dir, gw) = gateway().await;
    let a = gw.public_addr;
    // One header byte every 300 ms: the 1 s header timeout must end it, not the client.
    let (elapsed, cut) = slow_client(a, Duration::from_millis(300)).await;
    assert!(
        cut,
        "the server never cut the slow client off ({elapsed:?})"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(2300),
        "cut after {elapsed:?}, expected about 1 s"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn request_timeout_answers_504() {
    let (_dir, gw) = gateway().await;
    let started = Instant::now();
    let r = get(gw.public_addr, "/slow").await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.json()["error"], "timeout");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let (_dir, gw) = gateway().await;
    let a = gw.public_addr;
    // max_connections: 2. Two connections in the middle of a request hold both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
        s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let third = tokio::spawn(async move { get(a, "/echo").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served beyond max_connections"
    );
    drop(held.pop());
    let r = tokio::time::timeout(Duration::from_secs(2), third)
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test]
async fn idle_connections_are_closed_at_the_header_read_timeout() {
    let (_dir, gw) = gateway().await;
    let a = gw.public_addr;
    // Connected, silent.
    let started = Instant::now();
    let r = raw(a, b"", Duration::from_secs(4)).await;
    assert!(r.closed, "a silent connection was kept open");
    assert!(
        started.elapsed() < Duration::from_millis(2300),
        "{:?}",
        started.elapsed()
    );
    // Kept alive after one answer, then silent.
    let started = Instant::now();
    let r = raw(
        a,
        b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(4),
    )
    .await;
    assert_eq!(r.statuses(), [200]);
    assert!(r.closed, "an idle keep-alive connection was kept open");
    assert!(
        started.elapsed() < Duration::from_millis(2300),
        "{:?}",
        started.elapsed()
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_busy_keep_alive_connection_outlives_the_header_read_timeout() {
    use tokio::io::AsyncReadExt;
    let (_dir, gw) = gateway().await;
    // Each request starts the wait for a head over: a connection that keeps sending requests,
    // one every 200 ms for 2 s (twice header_read_timeout_secs), is never cut.
    let mut s = tokio::net::TcpStream::connect(gw.public_addr)
        .await
        .unwrap();
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(2) {
        s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("the connection is still open");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).ends_with("b=") {
            let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf))
                .await
                .expect("answered in time")
                .unwrap();
            assert!(
                n > 0,
                "closed after {answered} answers, {:?}",
                started.elapsed()
            );
            got.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
        answered += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(answered >= 8, "{answered}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_408_and_closed() {
    let (_dir, gw) = gateway().await;
    let started = Instant::now();
    // Head complete, body promised (10 bytes) but only 2 sent.
    let mut req = form_head(10).into_bytes();
    req.extend(b"b=");
    let r = raw(gw.public_addr, &req, Duration::from_secs(4)).await;
    let took = started.elapsed();
    assert_eq!(r.statuses(), [408], "{}", r.text());
    assert!(r.closed);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2300),
        "answered after {took:?}; request_timeout_secs is 1"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    use tokio::io::AsyncReadExt;
    let (_dir, gw) = gateway().await;
    // A client may shut its write side once its request is sent. The server must
    // still answer: here a request with a body, and one whose chain waits (the request
    // timeout answers it, 504 after 1 s), during which the client's FIN arrives.
    let mut echo = form_head(4).into_bytes();
    echo.extend_from_slice(b"b=hi");
    let slow = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    for (req, status, body) in [(echo, "200", "b=hi"), (slow, "504", r#""error":"timeout""#)] {
        let mut s = tokio::net::TcpStream::connect(gw.public_addr)
            .await
            .unwrap();
        s.write_all(&req).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out))
            .await
            .expect("the server answered and closed within the window")
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text:?}");
        assert!(text.contains(body), "{text:?}");
    }
    gw.shutdown().await;
}

/// A request that waits (here for its body) holds a count of its connection's own, not of the
/// gateway's shared state nor of its runtime: those counts are cache lines every worker would
/// write on every such request. The connection itself holds one state count, taken when it
/// was accepted.
#[tokio::test]
async fn a_waiting_request_holds_no_count_on_the_shared_state_or_runtime() {
    use tokio::io::AsyncReadExt;
    let (_dir, gw) = gateway().await;
    let counts = || {
        let runtime = gw.state.runtime.load_full();
        (
            std::sync::Arc::strong_count(&gw.state),
            std::sync::Arc::strong_count(&runtime),
        )
    };
    let mut s = tokio::net::TcpStream::connect(gw.public_addr)
        .await
        .unwrap();
    let answer = async |s: &mut tokio::net::TcpStream| {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).ends_with("b=hi") {
            let n = tokio::time::timeout(WINDOW, s.read(&mut buf))
                .await
                .expect("answered in time")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    };
    // One answered request: the connection is open and idle.
    let mut req = form_head(4).into_bytes();
    req.extend_from_slice(b"b=hi");
    s.write_all(&req).await.unwrap();
    answer(&mut s).await;
    let idle = counts();
    // The next one waits for the rest of its body, in its request future.
    s.write_all(&req[..req.len() - 2]).await.unwrap();
    let waiting = Instant::now();
    while !gw
        .state
        .monitoring
        .render()
        .contains("\ngateway_requests_in_flight 1\n")
    {
        assert!(waiting.elapsed() < WINDOW, "the request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        counts(),
        idle,
        "(state, runtime) counts while a request waits"
    );
    s.write_all(b"hi").await.unwrap();
    answer(&mut s).await;
    assert_eq!(counts(), idle);
    gw.shutdown().await;
}
