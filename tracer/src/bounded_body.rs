//! Reading an HTTP answer from a peer tcpstate does not control (an OTLP receiver, or anything
//! in its way; a daemon URL given on the command line) without letting the peer decide how
//! much memory it takes: at most a bound is kept, and reading stops there.

use http_body_util::BodyExt as _;
use hyper::body::{Body, Bytes};

/// An answer's body, or its first `limit` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BoundedBody {
    pub bytes: Vec<u8>,
    /// The body was longer than the limit: the rest was not read, and the connection it came
    /// on must not be reused.
    pub truncated: bool,
}

/// Reads `body` until it ends or `limit` bytes have come, whichever is first.
pub(crate) async fn read_at_most<B>(body: B, limit: usize) -> Result<BoundedBody, B::Error>
where
    B: Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        let room = limit - bytes.len();
        if data.len() > room {
            bytes.extend_from_slice(&data[..room]);
            return Ok(BoundedBody { bytes, truncated: true });
        }
        bytes.extend_from_slice(&data);
    }
    Ok(BoundedBody { bytes, truncated: false })
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;
    use hyper::body::Frame;

    use super::*;

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
    }

    #[test]
    fn a_body_within_the_limit_is_read_whole() {
        let body = Full::new(Bytes::from_static(b"hello"));
        let read = block_on(read_at_most(body, 5)).unwrap();
        assert_eq!(read, BoundedBody { bytes: b"hello".to_vec(), truncated: false });
    }

    /// A body without end: reading stops at the limit.
    #[test]
    fn an_endless_body_is_cut_at_the_limit() {
        let read = block_on(read_at_most(Endless, 2500)).unwrap();
        assert_eq!((read.bytes.len(), read.truncated), (2500, true));
    }

    /// A peer that never stops sending.
    struct Endless;

    impl Body for Endless {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 1000])))))
        }
    }
}
