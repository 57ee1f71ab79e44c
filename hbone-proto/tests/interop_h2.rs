//! Interop with an independent HTTP/2 implementation (the `h2` crate), no sockets: h2 runs on
//! one end of a `tokio::io::duplex` pipe and the test pumps bytes between the other end and
//! our session.

use bytes::Bytes;
use hbone_proto::{ConnectRequest, Event, Input, Session, Settings, StreamId};
use std::cell::Cell;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Pumps bytes between `io` and `session` until `done` says stop. DATA payloads go through
/// the zero-copy path (`data_consumed`) and are collected per stream.
async fn pump(
    session: &mut Session,
    io: &mut DuplexStream,
    mut on_event: impl FnMut(&mut Session, Event, &mut Vec<u8>),
    mut done: impl FnMut(&Session, &[u8]) -> bool,
) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        session.poll_transmit(&mut out);
        if !out.is_empty() {
            io.write_all(&out).await.unwrap();
            out.clear();
        }
        if done(session, &received) {
            return received;
        }
        let n = io.read(&mut buf).await.unwrap();
        assert!(n > 0, "peer closed the pipe");
        let mut off = 0;
        while off < n {
            match session.handle_input(&buf[off..n], Instant::now()) {
                Input::Consumed(c) => off += c,
                Input::DataPayload {
                    consumed,
                    stream,
                    len,
                    ..
                } => {
                    off += consumed;
                    // Payload may continue past this read: take what is here, feed the rest
                    // through the session (the buffered fallback) on the next read.
                    let take = len.min(n - off);
                    received.extend_from_slice(&buf[off..off + take]);
                    session.data_consumed(stream, take).unwrap();
                    session.release_capacity(stream, take).unwrap();
                    off += take;
                }
            }
        }
        while let Some(ev) = session.poll_event() {
            if let Event::Data { stream, data } = &ev {
                received.extend_from_slice(data);
                session.release_capacity(*stream, data.len()).unwrap();
            }
            on_event(session, ev, &mut out);
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn h2_client_connects_through_our_server_session() {
    let (client_io, mut server_io) = tokio::io::duplex(1 << 20);
    let client = tokio::spawn(async move {
        let (mut send_req, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.7:8080")
            .header("forwarded", "for=\"10.0.0.1:40000\"")
            .body(())
            .unwrap();
        let (resp, mut send) = send_req.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let payload = vec![0x5a; 300_000];
        send.reserve_capacity(payload.len());
        send.send_data(Bytes::from(payload), true).unwrap();
        let mut body = resp.into_body();
        let mut echoed = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            echoed.extend_from_slice(&chunk);
        }
        echoed
    });

    let mut server = Session::server(Settings::default(), Instant::now());
    let mut stream_id = None;
    let ended = Cell::new(false);
    let received = pump(
        &mut server,
        &mut server_io,
        |s, ev, _| match ev {
            Event::Request { stream, request } => {
                assert_eq!(request.authority, "10.0.0.7:8080".parse().unwrap());
                assert_eq!(request.forwarded.as_deref(), Some("for=\"10.0.0.1:40000\""));
                s.send_response(stream, 200, false).unwrap();
                stream_id = Some(stream);
            }
            Event::StreamEnd { .. } => ended.set(true),
            _ => {}
        },
        |_, r| r.len() == 300_000 && ended.get(),
    )
    .await;
    assert!(received.iter().all(|&b| b == 0x5a));

    // Answer with a zero-copy DATA frame and END_STREAM: the h2 client reads it and a clean end.
    let id = stream_id.unwrap();
    let mut out = Vec::new();
    server.poll_transmit(&mut out);
    out.extend_from_slice(&server.data_frame_header(id, 5, true).unwrap());
    out.extend_from_slice(b"hello");
    server_io.write_all(&out).await.unwrap();
    let echoed = tokio::spawn(async move {
        // Keep reading so h2's writes do not block.
        let mut sink = vec![0u8; 4096];
        while let Ok(n) = server_io.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    assert_eq!(client.await.unwrap(), b"hello");
    echoed.abort();
}

#[tokio::test(flavor = "current_thread")]
async fn our_client_session_is_accepted_by_an_h2_server() {
    let (mut client_io, server_io) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let mut conn = h2::server::handshake(server_io).await.unwrap();
        let (req, mut respond) = conn.accept().await.unwrap().unwrap();
        assert_eq!(req.method(), http::Method::CONNECT);
        assert_eq!(req.uri().authority().unwrap().as_str(), "[fd00::7]:15008");
        assert!(req.uri().scheme().is_none() && req.uri().path_and_query().is_none());
        let mut send = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
        });
        let mut body = req.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        // Echo back, then half-close.
        send.send_data(Bytes::from(got.clone()), true).unwrap();
        got
    });

    let mut client = Session::client(Settings::default(), Instant::now());
    let id = client
        .open_stream(&ConnectRequest::new("[fd00::7]:15008".parse().unwrap()))
        .unwrap();
    let status = Cell::new(None);
    pump(
        &mut client,
        &mut client_io,
        |_, ev, _| {
            if let Event::Response { response, .. } = ev {
                status.set(Some(response.status));
            }
        },
        |_, _| status.get().is_some(),
    )
    .await;
    assert_eq!(status.get(), Some(200));

    // Send 200 KB in frames no larger than the h2 server allows, through data_frame_header.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut sent = 0;
    let mut out = Vec::new();
    while sent < payload.len() {
        client.poll_transmit(&mut out);
        let cap = client.send_capacity(id);
        if cap == 0 {
            client_io.write_all(&out).await.unwrap();
            out.clear();
            // Wait for a WINDOW_UPDATE.
            let mut buf = vec![0u8; 4096];
            let n = client_io.read(&mut buf).await.unwrap();
            let _ = client.handle_input(&buf[..n], Instant::now());
            while client.poll_event().is_some() {}
            continue;
        }
        let len = cap.min(payload.len() - sent);
        let last = sent + len == payload.len();
        out.extend_from_slice(&client.data_frame_header(id, len, last).unwrap());
        out.extend_from_slice(&payload[sent..sent + len]);
        sent += len;
    }
    client_io.write_all(&out).await.unwrap();

    let ended = Cell::new(false);
    let echoed = pump(
        &mut client,
        &mut client_io,
        |_, ev, _| {
            if ev
                == (Event::StreamEnd {
                    stream: StreamId::new(1),
                })
            {
                ended.set(true);
            }
        },
        |_, r| ended.get() && r.len() == 200_000,
    )
    .await;
    assert_eq!(echoed, payload);
    assert_eq!(server.await.unwrap(), payload);
}
