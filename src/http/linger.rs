//! Lingering close, as nginx's `lingering_close`: a connection answered before its request
//! body was read (`413` by declared length, `401`, `415`, a slow body, `431`) is closed
//! only after the client has had its answer. Closing a socket with unread data resets
//! it, and a client still writing its body (Python's `http.client`, most scripts) then
//! fails with a broken pipe and never reads the answer. So the close sends FIN first, then
//! reads and discards what the client still sends, into a fixed buffer, until it closes
//! its side or a bound in bytes or in time is reached.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Read per poll while discarding: a fixed buffer, so a flood of oversized bodies pins
/// no memory beyond it.
const DISCARD_CHUNK_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub time: Duration,
    pub bytes: u64,
}

/// A TCP stream whose shutdown lingers within [`Bounds`].
pub struct Linger {
    stream: TcpStream,
    bounds: Bounds,
    state: State,
}

enum State {
    Open,
    Lingering { until: Pin<Box<Sleep>>, discarded: u64 },
    Closed,
}

impl Linger {
    pub fn new(stream: TcpStream, bounds: Bounds) -> Self {
        Linger {
            stream,
            bounds,
            state: State::Open,
        }
    }
}

impl AsyncRead for Linger {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Linger {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Open => {
                    // FIN after the answer: the client reads it, then closes its side.
                    ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
                    this.state = State::Lingering {
                        until: Box::pin(tokio::time::sleep(this.bounds.time)),
                        discarded: 0,
                    };
                }
                State::Lingering { until, discarded } => {
                    let mut chunk = [0u8; DISCARD_CHUNK_BYTES];
                    let mut buf = ReadBuf::new(&mut chunk);
                    match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                            *discarded += buf.filled().len() as u64;
                            if *discarded >= this.bounds.bytes {
                                metrics::counter!("cardgate_http_lingering_cut_total", "bound" => "bytes").increment(1);
                                this.state = State::Closed;
                            }
                        }
                        // The client closed its side (or the connection broke): done.
                        Poll::Ready(_) => this.state = State::Closed,
                        Poll::Pending => {
                            ready!(until.as_mut().poll(cx));
                            metrics::counter!("cardgate_http_lingering_cut_total", "bound" => "time").increment(1);
                            this.state = State::Closed;
                        }
                    }
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}
