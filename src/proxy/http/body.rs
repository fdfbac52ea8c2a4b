//! The one body type of the data path: a streamed body from a peer, a small body of our own
//! (error responses), or nothing. A streamed response body from a pooled HTTP/1.1 connection
//! carries the connection back to its pool when it is read to the end.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;

use super::client::PoolReturn;
use super::edge::Exchange;
use super::outcome::{Attempt, End};

/// The error of a body on the data path: the peer's (hyper's), or meshlet cutting a stream
/// short (see `edge::ServedBody`).
#[derive(Debug)]
pub struct BodyError(Box<dyn std::error::Error + Send + Sync>);

impl BodyError {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> BodyError {
        BodyError(Box::new(e))
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl From<hyper::Error> for BodyError {
    fn from(e: hyper::Error) -> BodyError {
        BodyError(Box::new(e))
    }
}

pub struct Body {
    kind: Kind,
    on_end: Option<PoolReturn>,
    /// The attempt this response answers: told of the trailers and of how the body ends.
    attempt: Option<Box<Attempt>>,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    /// A request body from the client: a failure in it is the client's (see `edge::Exchange`).
    Client(Incoming, std::sync::Arc<Exchange>),
    /// A body of another stage, named for `Debug`: the client's request body teed for
    /// retries and its replays (`replay`), a response shared by deduplicated requests
    /// (`dedup`). Boxed, so that this type depends on none of them.
    Boxed(&'static str, Pin<Box<Dyn>>),
}

type Dyn = dyn http_body::Body<Data = Bytes, Error = BodyError> + Send;

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Empty => "empty",
            Kind::Full(_) => "full",
            Kind::Incoming(_) => "streaming",
            Kind::Client(..) => "client",
            Kind::Boxed(name, _) => name,
        };
        f.debug_struct("Body").field("kind", &kind).finish()
    }
}

impl Body {
    pub fn empty() -> Body {
        Body {
            kind: Kind::Empty,
            on_end: None,
            attempt: None,
        }
    }

    pub fn full(bytes: impl Into<Bytes>) -> Body {
        let bytes = bytes.into();
        Body {
            kind: if bytes.is_empty() {
                Kind::Empty
            } else {
                Kind::Full(Some(bytes))
            },
            on_end: None,
            attempt: None,
        }
    }

    pub fn incoming(b: Incoming) -> Body {
        Body {
            kind: Kind::Incoming(b),
            on_end: None,
            attempt: None,
        }
    }

    /// The client's request body; its failures are marked on `exchange` as the client's.
    pub fn from_client(b: Incoming, exchange: std::sync::Arc<Exchange>) -> Body {
        Body {
            kind: Kind::Client(b, exchange),
            on_end: None,
            attempt: None,
        }
    }

    /// Another stage's body (`name` shows in `Debug`).
    pub fn boxed<B>(name: &'static str, b: B) -> Body
    where
        B: http_body::Body<Data = Bytes, Error = BodyError> + Send + 'static,
    {
        Body {
            kind: Kind::Boxed(name, Box::pin(b)),
            on_end: None,
            attempt: None,
        }
    }

    /// A response body that returns its HTTP/1.1 connection to the pool once read to the end.
    pub(crate) fn pooled(b: Incoming, ret: PoolReturn) -> Body {
        Body {
            kind: Kind::Incoming(b),
            on_end: Some(ret),
            attempt: None,
        }
    }

    /// The response of `attempt`: its outcome is recorded when the body ends (or is dropped).
    pub fn observed(mut self, attempt: Attempt) -> Body {
        self.attempt = Some(Box::new(attempt));
        if self.kind_end_stream() {
            self.end_attempt(End::Complete);
        }
        self
    }

    fn end_attempt(&mut self, end: End) {
        if let Some(mut a) = self.attempt.take() {
            a.end(end);
        }
    }

    fn finish(&mut self) {
        if let Some(ret) = self.on_end.take() {
            ret.release();
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let res = this.poll_kind(cx);
        if this.attempt.is_some() {
            match &res {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(a) = this.attempt.as_mut() {
                        a.frame(f);
                    }
                    if this.kind_end_stream() {
                        this.end_attempt(End::Complete);
                    }
                }
                Poll::Ready(Some(Err(_))) => this.end_attempt(End::Failed),
                Poll::Ready(None) => this.end_attempt(End::Complete),
                Poll::Pending => {}
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.kind_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.kind_size_hint()
    }
}

impl Body {
    fn poll_kind(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self;
        match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Incoming(b) => {
                let res = Pin::new(b).poll_frame(cx);
                if let Poll::Ready(None) = res {
                    this.finish();
                }
                res.map_err(BodyError::from)
            }
            Kind::Client(b, ex) => {
                let res = Pin::new(b).poll_frame(cx);
                match &res {
                    Poll::Ready(Some(Ok(_))) => ex.touch(),
                    Poll::Ready(Some(Err(_))) => ex.mark_client_failed(),
                    _ => {}
                }
                res.map_err(BodyError::from)
            }
            Kind::Boxed(_, b) => b.as_mut().poll_frame(cx),
        }
    }

    fn kind_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Incoming(b) => b.is_end_stream(),
            Kind::Client(b, _) => b.is_end_stream(),
            Kind::Boxed(_, b) => b.is_end_stream(),
        }
    }

    fn kind_size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Incoming(b) => b.size_hint(),
            Kind::Client(b, _) => b.size_hint(),
            Kind::Boxed(_, b) => b.size_hint(),
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Some(mut a) = self.attempt.take() {
            let end = if self.kind_end_stream() {
                End::Complete
            } else {
                End::dropped(a.exchange())
            };
            a.end(end);
        }
        // A body read to its end leaves the connection reusable; hyper's server may stop
        // polling once `is_end_stream` says so, without asking for the final `None`.
        if self.on_end.is_some() && http_body::Body::is_end_stream(self) {
            self.finish();
        }
    }
}
