//! Reading HTTP/1.1 answers off a connection that carries several requests at once
//! (pipelining, RFC 9112 §9.3), for mirror copies. Pingora's client session reads one answer
//! per connection turn and drops bytes read past it, so the copies' lanes read with this.
//!
//! Only what a copy needs: each answer's status, where it ends, and whether the connection
//! ends with it. Bodies are skipped as they arrive, never buffered whole.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why the connection cannot carry on: it closed, failed, or sent something that is not HTTP.
#[derive(Debug, PartialEq)]
pub struct Broken;

/// The end of one answer: its status, and whether the server closes the connection after it.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub close: bool,
}

/// Reads the next answer off `stream`, which already gave the bytes in `buf`; bytes past the
/// answer stay in `buf` for the next one. `head` says the request was a HEAD (no body).
/// Informational answers (1xx) are skipped.
pub async fn read_answer<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    head: bool,
) -> Result<Answer, Broken> {
    let head = loop {
        match parse_head(buf, head)? {
            Some(h) => {
                buf.advance(h.len);
                if !h.informational {
                    break h;
                }
            }
            None => read_more(stream, buf).await?,
        }
    };
    let mut close = head.close;
    match head.body {
        Body::None => {}
        Body::Length(len) => skip(stream, buf, len).await?,
        Body::Chunked => loop {
            let size = loop {
                match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((n, size))) => {
                        buf.advance(n);
                        break size;
                    }
                    Ok(httparse::Status::Partial) => read_more(stream, buf).await?,
                    Err(_) => return Err(Broken),
                }
            };
            if size == 0 {
                skip_trailers(stream, buf).await?;
                break;
            }
            skip(stream, buf, usize::try_from(size).map_err(|_| Broken)?).await?;
            while buf.len() < 2 {
                read_more(stream, buf).await?;
            }
            if &buf[..2] != b"\r\n" {
                return Err(Broken);
            }
            buf.advance(2);
        },
        Body::UntilClose => {
            close = true;
            buf.clear();
            while read_more(stream, buf).await.is_ok() {
                buf.clear();
            }
        }
    }
    Ok(Answer {
        status: head.status,
        close,
    })
}

/// Most bytes held while a head, chunk-size line or trailer is incomplete: bodies are skipped
/// as they come, so only those ever accumulate, and a shadow sending an endless head costs
/// no more than this.
const MAX_PENDING: usize = 64 * 1024;

/// More bytes into `buf`; an end of stream is `Broken`: the answer is not complete.
async fn read_more<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> Result<(), Broken> {
    if buf.len() >= MAX_PENDING {
        return Err(Broken);
    }
    buf.reserve(4096);
    match stream.read_buf(buf).await {
        Ok(0) | Err(_) => Err(Broken),
        Ok(_) => Ok(()),
    }
}

/// Drops the next `len` bytes of the stream.
async fn skip<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    mut len: usize,
) -> Result<(), Broken> {
    loop {
        let n = len.min(buf.len());
        buf.advance(n);
        len -= n;
        if len == 0 {
            return Ok(());
        }
        read_more(stream, buf).await?;
    }
}

/// Drops the trailer lines after the last chunk, up to and with the empty line.
async fn skip_trailers<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(), Broken> {
    loop {
        match buf.windows(2).position(|w| w == b"\r\n") {
            Some(0) => {
                buf.advance(2);
                return Ok(());
            }
            Some(end) => buf.advance(end + 2),
            None => read_more(stream, buf).await?,
        }
    }
}

#[derive(Debug, PartialEq)]
enum Body {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

#[derive(Debug, PartialEq)]
struct Head {
    len: usize,
    status: u16,
    informational: bool,
    close: bool,
    body: Body,
}

/// The answer's head at the start of `buf`, or `None` while it is incomplete.
fn parse_head(buf: &[u8], head_request: bool) -> Result<Option<Head>, Broken> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Broken),
    };
    let status = response.code.unwrap_or(0);
    // HTTP/1.0 closes after each answer unless it says otherwise.
    let mut close = response.version == Some(0);
    let (mut chunked, mut length) = (false, None);
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| Broken)?;
        if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().unwrap_or("").trim();
            chunked = last.eq_ignore_ascii_case("chunked");
        } else if h.name.eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse().map_err(|_| Broken)?);
        }
    }
    let informational = (100..200).contains(&status) && status != 101;
    let body = if informational || head_request || status == 204 || status == 304 {
        Body::None
    } else if status == 101 {
        Body::UntilClose
    } else if chunked {
        Body::Chunked
    } else if let Some(len) = length {
        Body::Length(len)
    } else {
        Body::UntilClose
    };
    Ok(Some(Head {
        len,
        status,
        informational,
        close,
        body,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every answer in `wire`, read as pipelined answers to requests (`head` per request),
    /// with the stream delivering `piece` bytes per read.
    fn answers(wire: &[u8], heads: &[bool], piece: usize) -> Vec<Result<Answer, Broken>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut stream = Pieces(
                wire.chunks(piece)
                    .map(bytes::Bytes::copy_from_slice)
                    .collect(),
            );
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for &head in heads {
                let answer = read_answer(&mut stream, &mut buf, head).await;
                let stop = answer.is_err();
                out.push(answer);
                if stop {
                    break;
                }
            }
            out
        })
    }

    /// A stream that gives one piece per read, then ends.
    struct Pieces(std::collections::VecDeque<bytes::Bytes>);

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some(mut piece) = self.0.pop_front() {
                let n = piece.len().min(out.remaining());
                out.put_slice(&piece.split_to(n));
                if !piece.is_empty() {
                    self.0.push_front(piece);
                }
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn ok(status: u16, close: bool) -> Result<Answer, Broken> {
        Ok(Answer { status, close })
    }

    const MIXED: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n\
        HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello\
        HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n\
        3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nx-trailer: t\r\n\r\n\
        HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n\
        HTTP/1.1 204 No Content\r\n\r\n\
        HTTP/1.1 404 Not Found\r\nConnection: close\r\ncontent-length: 0\r\n\r\n";

    #[test]
    fn pipelined_answers_end_where_their_framing_says() {
        // The fourth request was a HEAD: its content-length announces a body that is not sent.
        let heads = [false, false, true, false, false];
        let want = vec![
            ok(200, false),
            ok(500, false),
            ok(200, false),
            ok(204, false),
            ok(404, true),
        ];
        for piece in [1, 2, 7, 64, MIXED.len()] {
            assert_eq!(
                answers(MIXED, &heads, piece),
                want,
                "{piece} bytes per read"
            );
        }
    }

    #[test]
    fn an_answer_without_length_ends_with_the_connection() {
        let wire = b"HTTP/1.0 200 OK\r\n\r\nsome body until the end";
        assert_eq!(answers(wire, &[false], 4), vec![ok(200, true)]);
        let keep = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(answers(keep, &[false], 4), vec![ok(200, false)]);
    }

    #[test]
    fn a_cut_or_garbled_answer_breaks_the_connection() {
        let cut = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort";
        assert_eq!(answers(cut, &[false], 3), vec![Err(Broken)]);
        let garbled = b"HTTP/1.1 200 OK\r\ncontent-length: ten\r\n\r\n";
        assert_eq!(answers(garbled, &[false], 64), vec![Err(Broken)]);
        let bad_chunk = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n";
        assert_eq!(answers(bad_chunk, &[false], 64), vec![Err(Broken)]);
        assert_eq!(
            answers(b"SSH-2.0-OpenSSH\r\n\r\n", &[false], 64),
            vec![Err(Broken)]
        );
        assert_eq!(answers(b"", &[false], 64), vec![Err(Broken)]);
    }

    #[test]
    fn an_endless_head_is_given_up_at_64_kib() {
        let wire = [b"HTTP/1.1 200 OK\r\nx-long: ".as_slice(), &[b'a'; 1 << 20]].concat();
        let mut stream = Pieces(
            wire.chunks(4096)
                .map(bytes::Bytes::copy_from_slice)
                .collect(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut buf = BytesMut::new();
        let answer = rt.block_on(read_answer(&mut stream, &mut buf, false));
        assert_eq!(answer, Err(Broken));
        // Given up long before the end of the stream.
        assert!(buf.len() <= MAX_PENDING + 4096, "{} bytes held", buf.len());
        assert!(stream.0.len() > 200, "read on to the end");
    }
}
