//! The control plane's stand-in for scripts/bench/callout-transport/run.sh, on loopback:
//! `POST /message` (HTTP/1.1 or h2c) answers 300 bytes; `POST /callout.Transport/Stream` (a
//! gRPC stream over h2c) answers each length-prefixed message with a 300-byte one, in order,
//! and ends with `grpc-status: 0` when the client ends the stream.
//!
//! `callout-transport-peer PORT`

use std::convert::Infallible;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;

const ANSWER: [u8; 300] = [b'r'; 300];
/// gRPC's message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

type Body = BoxBody<Bytes, Infallible>;

async fn serve(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if request.uri().path() != "/callout.Transport/Stream" {
        let _ = request.into_body().collect().await;
        let mut response = Response::new(Full::new(Bytes::from_static(&ANSWER)).boxed());
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(response);
    }
    let (frames, answers) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1024);
    tokio::spawn(answer_each(request.into_body(), frames));
    let answers = futures_util::stream::unfold(answers, |mut answers| async move {
        answers.recv().await.map(|frame| (frame, answers))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(answers)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    Ok(response)
}

/// One answer per complete message of `body`, then the trailers.
async fn answer_each(mut body: Incoming, frames: mpsc::Sender<Result<Frame<Bytes>, Infallible>>) {
    let mut received = BytesMut::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received.extend_from_slice(&data);
        while received.len() >= PREFIX {
            let length = u32::from_be_bytes([received[1], received[2], received[3], received[4]]);
            let end = PREFIX + length as usize;
            if received.len() < end {
                break;
            }
            received.advance(end);
            let mut message = BytesMut::with_capacity(PREFIX + ANSWER.len());
            message.put_u8(0);
            message.put_u32(ANSWER.len() as u32);
            message.put_slice(&ANSWER);
            if frames
                .send(Ok(Frame::data(message.freeze())))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let _ = frames.send(Ok(Frame::trailers(trailers))).await;
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let port = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "10290".to_owned());
    let listener =
        tokio::net::TcpListener::bind(("127.0.0.1", port.parse().unwrap_or(10290))).await?;
    loop {
        let (connection, _) = listener.accept().await?;
        // HTTP/2's small frames would otherwise wait for the previous write's ACK (Nagle)
        connection.set_nodelay(true)?;
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(connection), hyper::service::service_fn(serve))
                .await;
        });
    }
}
