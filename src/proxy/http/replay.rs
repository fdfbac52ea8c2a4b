//! Keeping a request body so that a retry can send it again, without holding the request back.
//!
//! The first attempt sends the client's body as it comes ([`Tee`]); a copy of each frame is
//! kept on the side (the bytes are shared, not copied) until the body passes the limit. A retry
//! is possible when the body ended within the limit: [`Kept::body`] then gives each further
//! attempt its own body with the same bytes and trailers. A body still streaming when an answer
//! asks for a retry (a client-streaming or bidirectional gRPC call, an upload in progress) is
//! not retried. The idea is linkerd2-proxy's `ReplayBody`; unlike it, a replay never takes over
//! the client's stream, which keeps the first attempt the only reader of it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use parking_lot::Mutex;

use super::body::{Body, BodyError};

/// The most request body kept for retries: enough for nearly every API call, little enough
/// that keeping thousands of requests at once costs little.
pub const DEFAULT_REPLAY_LIMIT: usize = 64 * 1024;

/// What has been kept of a body: shared by the first attempt's [`Tee`] and the retry loop.
#[derive(Clone)]
pub struct Kept(Arc<Mutex<State>>);

struct State {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    trailers: Option<HeaderMap>,
    /// The whole body went by.
    ended: bool,
    /// It passed the limit: nothing is kept, no retry.
    over: bool,
}

impl Kept {
    /// A body for another attempt: the same bytes and trailers, if the body ended within the
    /// limit; `None` otherwise (still streaming, or too long).
    pub fn body(&self) -> Option<Body> {
        let s = self.0.lock();
        if !s.ended || s.over {
            return None;
        }
        let data = match s.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut b = BytesMut::with_capacity(s.len);
                for c in many {
                    b.extend_from_slice(c);
                }
                b.freeze()
            }
        };
        Some(Body::boxed(
            "replayed",
            Replayed {
                data: (!data.is_empty()).then_some(data),
                trailers: s.trailers.clone(),
            },
        ))
    }
}

/// The client's body as the first attempt sends it, keeping a copy on the side (see the module
/// doc).
pub struct Tee<B: http_body::Body = Body> {
    /// A frame already read from `inner`, sent first.
    head: Option<Result<Frame<Bytes>, B::Error>>,
    inner: B,
    kept: Kept,
}

impl<B: http_body::Body> Tee<B> {
    /// `head` (a frame already read, if any) then `body`, sent as they come; up to `limit`
    /// bytes of them kept for retries.
    pub fn new(
        head: Option<Result<Frame<Bytes>, B::Error>>,
        body: B,
        limit: usize,
    ) -> (Tee<B>, Kept) {
        let state = State {
            chunks: Vec::new(),
            len: 0,
            limit,
            trailers: None,
            ended: head.is_none() && body.is_end_stream(),
            // A body announced longer than the limit is not kept at all.
            over: body.size_hint().lower() > limit as u64,
        };
        let kept = Kept(Arc::new(Mutex::new(state)));
        (
            Tee {
                head,
                inner: body,
                kept: kept.clone(),
            },
            kept,
        )
    }
}

impl<B> http_body::Body for Tee<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let res = match this.head.take() {
            Some(frame) => Poll::Ready(Some(frame)),
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                let mut s = this.kept.0.lock();
                if !s.over {
                    if let Some(d) = f.data_ref() {
                        s.len = s.len.saturating_add(d.len());
                        if s.len > s.limit {
                            s.over = true;
                            s.chunks = Vec::new();
                        } else if !d.is_empty() {
                            s.chunks.push(d.clone());
                        }
                    } else if let Some(t) = f.trailers_ref() {
                        s.trailers = Some(t.clone());
                    }
                }
                if this.inner.is_end_stream() {
                    s.ended = true;
                }
            }
            Poll::Ready(None) => this.kept.0.lock().ended = true,
            // A body that failed is never replayed (and the request is the client's fault).
            Poll::Ready(Some(Err(_))) => this.kept.0.lock().over = true,
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let head = match &self.head {
            Some(Ok(f)) => f.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        // The upper bound first: `set_lower` asserts it is not above the upper one.
        let mut h = SizeHint::new();
        if let Some(u) = inner.upper() {
            h.set_upper(u.saturating_add(head));
        }
        h.set_lower(inner.lower().saturating_add(head));
        h
    }
}

/// A kept body, sent again: its bytes, then its trailers.
#[derive(Debug)]
pub struct Replayed {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for Replayed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        t
    }

    /// A body of `frames` (data, then trailers if any), arriving one by one.
    fn stream(
        frames: Vec<Frame<Bytes>>,
    ) -> impl http_body::Body<Data = Bytes, Error = BodyError> + Unpin {
        let s = futures_util::stream::iter(frames.into_iter().map(Ok::<_, BodyError>));
        http_body_util::StreamBody::new(s)
    }

    async fn collect<B>(b: B) -> (Bytes, Option<HeaderMap>)
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let c = b.collect().await.unwrap();
        let t = c.trailers().cloned();
        (c.to_bytes(), t)
    }

    #[tokio::test]
    async fn the_first_attempt_streams_and_a_retry_sends_the_same() {
        let frames = vec![
            Frame::data(Bytes::from_static(b"hello ")),
            Frame::data(Bytes::from_static(b"world")),
            Frame::trailers(trailers()),
        ];
        let (tee, kept) = Tee::new(None, stream(frames), DEFAULT_REPLAY_LIMIT);
        // Nothing to replay before the body has gone by.
        assert!(kept.body().is_none());
        assert_eq!(
            collect(tee).await,
            (Bytes::from_static(b"hello world"), Some(trailers()))
        );
        for _ in 0..2 {
            let again = kept.body().expect("ended within the limit");
            assert_eq!(
                collect(again).await,
                (Bytes::from_static(b"hello world"), Some(trailers()))
            );
        }
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_sent_whole_and_not_kept() {
        let frames = vec![
            Frame::data(Bytes::from(vec![1u8; 40])),
            Frame::data(Bytes::from(vec![2u8; 40])),
        ];
        let (tee, kept) = Tee::new(None, stream(frames), 64);
        let (data, _) = collect(tee).await;
        assert_eq!(data.len(), 80);
        assert!(kept.body().is_none());
    }

    #[tokio::test]
    async fn empty_and_full_bodies_replay_at_once() {
        let (_tee, kept) = Tee::new(None, Body::empty(), DEFAULT_REPLAY_LIMIT);
        assert_eq!(collect(kept.body().unwrap()).await, (Bytes::new(), None));
        let (tee, kept) = Tee::new(None, Body::full("abc"), DEFAULT_REPLAY_LIMIT);
        assert_eq!(collect(tee).await.0, Bytes::from_static(b"abc"));
        assert_eq!(
            collect(kept.body().unwrap()).await.0,
            Bytes::from_static(b"abc")
        );
    }

    #[tokio::test]
    async fn a_streaming_body_is_not_held_back() {
        // One frame now, the rest later: the first frame goes out at once (no wait for the
        // body to end), and no retry is possible while it streams.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BodyError>>(1);
        let s =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
            );
        let (mut tee, kept) = Tee::new(None, Box::pin(http_body_util::StreamBody::new(s)), 64);
        tx.send(Ok(Frame::data(Bytes::from_static(b"msg"))))
            .await
            .unwrap();
        let first = tee.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"msg"));
        assert!(kept.body().is_none());
        drop(tx);
        assert!(tee.frame().await.is_none());
        assert_eq!(
            collect(kept.body().unwrap()).await.0,
            Bytes::from_static(b"msg")
        );
    }

    #[tokio::test]
    async fn a_frame_read_ahead_goes_first_and_counts_in_the_size() {
        let head = Some(Ok(Frame::data(Bytes::from_static(b"grpc-msg"))));
        let (tee, kept) = Tee::new(head, Body::full("rest"), DEFAULT_REPLAY_LIMIT);
        let hint = http_body::Body::size_hint(&tee);
        assert_eq!((hint.lower(), hint.upper()), (12, Some(12)));
        assert_eq!(collect(tee).await.0, Bytes::from_static(b"grpc-msgrest"));
        assert_eq!(
            collect(kept.body().unwrap()).await.0,
            Bytes::from_static(b"grpc-msgrest")
        );
    }
}
