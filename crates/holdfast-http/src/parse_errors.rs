//! hyper answers a request it cannot parse (a bad request line or header: 400; a target too
//! long: 414; headers too large: 431) by itself, before any application code runs, with an
//! empty body. Wrapping a connection in [`ParseErrorsAsProblems`] turns exactly those answers
//! into problem+json ones, so a client gets the same kind of error from every layer.
//!
//! hyper writes such an answer as one head, `HTTP/1.1 <status> …` with `connection: close`
//! and `content-length: 0`, and then closes the connection. No response an application
//! gives through hyper has that shape with one of those statuses (every Holdfast error has a
//! body), so the wrapper recognises it by shape and writes a problem in its place.

use crate::Problem;
use http::StatusCode;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection whose parse-error answers are problem+json (see the module docs).
pub struct ParseErrorsAsProblems<T> {
    inner: T,
    /// A replacement being written: its bytes and how many are out.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> ParseErrorsAsProblems<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            pending: None,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

/// The problem hyper's bodiless answer stands for, if `head` is one.
fn parse_error_problem(head: &[u8]) -> Option<Problem> {
    let status = match head.get(..13)? {
        b"HTTP/1.1 400 " => StatusCode::BAD_REQUEST,
        b"HTTP/1.1 414 " => StatusCode::URI_TOO_LONG,
        b"HTTP/1.1 431 " => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => return None,
    };
    let text = std::str::from_utf8(head).ok()?;
    let lines: Vec<&str> = text.strip_suffix("\r\n\r\n")?.split("\r\n").collect();
    let has = |line: &str| lines.iter().any(|l| l.eq_ignore_ascii_case(line));
    if !(has("connection: close") && has("content-length: 0")) {
        return None;
    }
    Some(match status {
        StatusCode::URI_TOO_LONG => Problem::new(
            status,
            "uri-too-long",
            "the request target is longer than this server reads",
        ),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Problem::new(
            status,
            "headers-too-large",
            "the request's headers are larger than this server reads",
        ),
        _ => Problem::new(
            status,
            "malformed-request",
            "the request line or a header could not be parsed as HTTP/1.1",
        ),
    })
}

/// hyper's head with a problem+json body in place of its empty one.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    let problem = parse_error_problem(head)?;
    let text = std::str::from_utf8(head).ok()?;
    let body = problem.body();
    let mut out = String::with_capacity(head.len() + body.len() + 64);
    for line in text.trim_end_matches("\r\n").split("\r\n") {
        if !line.eq_ignore_ascii_case("content-length: 0") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str(&format!(
        "content-type: {}\r\ncontent-length: {}\r\n\r\n",
        crate::PROBLEM_JSON,
        body.len()
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&body);
    Some(bytes)
}

impl<T: AsyncWrite + Unpin> ParseErrorsAsProblems<T> {
    /// Writes out a pending replacement, if any.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.pending {
            if *done == bytes.len() {
                self.pending = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ParseErrorsAsProblems<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ParseErrorsAsProblems<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(replacement) = rewrite(buf) {
            // The caller's bytes are taken; ours go out now or at the next flush.
            self.pending = Some((replacement, 0));
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    /// Not vectored: hyper then writes a head in one contiguous buffer, which is what
    /// [`rewrite`] looks at.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sun, 29 Nov 2026 14:46:16 GMT\r\n\r\n";

    #[test]
    fn hypers_bodiless_parse_errors_become_problems() {
        let out = String::from_utf8(rewrite(HYPER_431).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "));
        assert!(head.contains("connection: close") && head.contains("date: "));
        assert!(head.contains("content-type: application/problem+json"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["status"], 431);
        assert_eq!(json["type"], "/problems/headers-too-large");
    }

    #[test]
    fn other_answers_pass_untouched() {
        for head in [
            // An application's 400 has a body.
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 80\r\n\r\n"[..],
            // A 200 with no body, closing.
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            // Not a whole head.
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n",
        ] {
            assert!(rewrite(head).is_none(), "{}", String::from_utf8_lossy(head));
        }
    }

    #[tokio::test]
    async fn a_slow_socket_still_gets_the_whole_problem() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A pipe that takes 7 bytes at a time.
        let (client, server) = tokio::io::duplex(7);
        let mut conn = ParseErrorsAsProblems::new(server);
        let writer = tokio::spawn(async move {
            let n = conn.write(HYPER_431).await.unwrap();
            assert_eq!(n, HYPER_431.len());
            conn.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        let mut client = client;
        client.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, rewrite(HYPER_431).unwrap());
    }
}
