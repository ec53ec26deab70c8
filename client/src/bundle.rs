//! Lanes: one HTTP/2 connection to a node, and the requests waiting to go to it.
//!
//! A unary gRPC call costs both ends an HTTP/2 stream (headers, trailers, a task on the server)
//! and at least one write and one wake-up each way; on a busy client that overhead, not the
//! database, is most of the work. So the client coalesces: a request for a node joins its lane's
//! queue, and the lane's task sends everything queued at that moment as one `Kv.Bundle`, without
//! waiting for the bundles already in flight. No timer holds a request back: a lone request goes
//! alone at once (as a plain unary call, from the caller's task, when nothing else is outstanding
//! on the lane), and bundles grow only when requests arrive while others are under way, which is
//! exactly when the overhead matters: before a bundle leaves, the lane's task yields once to let
//! the callers already woken queue their next requests.
//!
//! Every item is answered on its own, as soon as it completes on the node (a read bundled with a
//! slow write does not wait for it), with the status it would have had alone, so the retry logic
//! above does not know whether a request went bundled. A node that does not serve `Bundle` (an
//! older version during a rolling upgrade) answers UNIMPLEMENTED: the lane then sends unary calls
//! for 30 s before it tries again, and the requests that learnt it are retried. A caller that
//! gives up while its request is queued sends nothing; each item carries its caller's remaining
//! time as its own deadline, and a bundle nobody waits for any more is dropped, which cancels it
//! on the node.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dossier_api::v1::kv_client::KvClient;
use dossier_api::v1::{BundleItem, BundleRequest, bundle_answer, bundle_item};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::BearerToken;

pub(crate) use bundle_answer::Answer;
pub(crate) use bundle_item::Request as Item;

/// Most items in one bundle; the server's smallest allowed `limits.bundle-items-max`.
const BUNDLE_ITEMS_MAX: usize = 32;
/// A bundle's encoded requests stop growing past this; a larger single request goes alone.
const BUNDLE_BYTES_MAX: usize = 4 << 20;
/// Largest answer message accepted, unary or bundled: the node stops adding answers to a message
/// past 4 MiB, and one answer holds at most one value (`state.value-bytes-max`, up to 64 MiB).
pub(crate) const ANSWER_BYTES_MAX: usize = 80 << 20;
/// How long a lane whose node answered a bundle UNIMPLEMENTED sends unary calls before trying
/// bundles again (the node may have been upgraded meanwhile).
const UNARY_FOR: Duration = Duration::from_secs(30);
/// Requests queued on one lane before callers wait for room.
const QUEUE_MAX: usize = 1024;

struct Pending {
    item: Item,
    /// The caller's deadline for this attempt.
    due: Instant,
    answer: oneshot::Sender<Result<Answer, Status>>,
}

/// One connection to a node and, when coalescing, the queue of its next bundle.
#[derive(Debug, Clone)]
pub(crate) struct Lane {
    pub(crate) channel: Channel,
    queue: Option<mpsc::Sender<Pending>>,
    /// Until when (in milliseconds after `born`) the lane sends unary calls only: set when the
    /// node answers a bundle UNIMPLEMENTED, or for good when the lane's task is gone.
    unary_until: Arc<AtomicU64>,
    born: Instant,
    /// Requests of this lane awaiting their answers.
    outstanding: Arc<AtomicUsize>,
    /// The caller's bearer token, sent with every Kv call.
    token: Option<BearerToken>,
}

/// Counts a request as outstanding on its lane while it lives.
struct Outstanding<'a>(&'a AtomicUsize);

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lane {
    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// A lane over `channel`; with `coalesce`, a task on the current runtime (if any) sends its
    /// bundles.
    pub(crate) fn new(channel: Channel, coalesce: bool, token: Option<BearerToken>) -> Lane {
        let runtime = tokio::runtime::Handle::try_current().ok();
        let queue = runtime.filter(|_| coalesce).map(|runtime| {
            let (tx, rx) = mpsc::channel(QUEUE_MAX);
            runtime.spawn(send_bundles(channel.clone(), rx, token.clone()));
            tx
        });
        Lane {
            channel,
            queue,
            unary_until: Arc::new(AtomicU64::new(0)),
            born: Instant::now(),
            outstanding: Arc::new(AtomicUsize::new(0)),
            token,
        }
    }

    /// Sends one request, in the lane's next bundle or alone, and returns its answer. A request
    /// that finds nothing outstanding on the lane goes alone from the caller's own task: it has
    /// nothing to share a bundle with, and skips the hand-over to the lane's task.
    pub(crate) async fn call(&self, item: Item, timeout: Duration) -> Result<Answer, Status> {
        let alone = self.outstanding.fetch_add(1, Ordering::Relaxed) == 0;
        let _outstanding = Outstanding(&self.outstanding);
        let Some(queue) = self
            .queue
            .as_ref()
            .filter(|_| !alone && self.now_ms() >= self.unary_until.load(Ordering::Relaxed))
        else {
            return unary(self.channel.clone(), item, timeout, self.token.as_ref()).await;
        };
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            item,
            due: Instant::now() + timeout,
            answer: tx,
        };
        if let Err(mpsc::error::SendError(pending)) = queue.send(pending).await {
            // The lane's task is gone (its runtime shut down): requests go alone from now on.
            self.unary_until.store(u64::MAX, Ordering::Relaxed);
            return unary(
                self.channel.clone(),
                pending.item,
                timeout,
                self.token.as_ref(),
            )
            .await;
        }
        match rx.await {
            Ok(Err(status)) if status.code() == Code::Unimplemented => {
                let until = self.now_ms().saturating_add(UNARY_FOR.as_millis() as u64);
                if self.unary_until.swap(until, Ordering::Relaxed) < self.now_ms() {
                    tracing::info!(
                        "a node does not serve Kv.Bundle (an older version?): unary calls to it \
                         for {UNARY_FOR:?}"
                    );
                }
                Err(Status::unavailable(
                    "the node does not serve bundles; sending requests alone for a while",
                ))
            }
            Ok(answer) => answer,
            Err(_) => Err(Status::unavailable("the bundle was dropped unanswered")),
        }
    }
}

/// The lane's task: takes whatever is queued, sends it as bundles, and goes back for more
/// without waiting for their answers. Ends when the client (every sender) is gone.
async fn send_bundles(
    channel: Channel,
    mut queue: mpsc::Receiver<Pending>,
    token: Option<BearerToken>,
) {
    let mut taken = Vec::with_capacity(BUNDLE_ITEMS_MAX);
    while queue.recv_many(&mut taken, BUNDLE_ITEMS_MAX).await > 0 {
        // Let the tasks that are already runnable (typically the callers woken by the last
        // answers) queue their next requests before this bundle leaves; on an idle client this
        // costs one trip through the scheduler.
        while taken.len() < BUNDLE_ITEMS_MAX {
            tokio::task::yield_now().await;
            let before = taken.len();
            while taken.len() < BUNDLE_ITEMS_MAX
                && let Ok(pending) = queue.try_recv()
            {
                taken.push(pending);
            }
            if taken.len() == before {
                break;
            }
        }
        let mut bundle = Vec::with_capacity(taken.len());
        let mut bytes = 0;
        // A caller that gave up while queued (its attempt timed out, or it was dropped) sends
        // nothing.
        for pending in taken.drain(..).filter(|p| !p.answer.is_closed()) {
            let size = pending.item.encoded_len();
            if !bundle.is_empty() && bytes + size > BUNDLE_BYTES_MAX {
                tokio::spawn(send(
                    channel.clone(),
                    std::mem::take(&mut bundle),
                    token.clone(),
                ));
                bytes = 0;
            }
            bytes += size;
            bundle.push(pending);
        }
        if !bundle.is_empty() {
            tokio::spawn(send(channel.clone(), bundle, token.clone()));
        }
    }
}

async fn send(channel: Channel, bundle: Vec<Pending>, token: Option<BearerToken>) {
    let now = Instant::now();
    let left = |p: &Pending| {
        p.due
            .saturating_duration_since(now)
            .max(Duration::from_micros(1))
    };
    let timeout = bundle.iter().map(left).max().unwrap_or_default();
    let mut waiting = Vec::with_capacity(bundle.len());
    let items = bundle
        .into_iter()
        .map(|p| {
            let own = left(&p);
            waiting.push(Some(p.answer));
            BundleItem {
                request: Some(p.item),
                timeout_micros: own.as_micros() as u64,
            }
        })
        .collect();
    let mut request = tonic::Request::new(BundleRequest { items });
    request.set_timeout(timeout);
    if let Some(token) = &token {
        token.stamp(&mut request);
    }
    let result = KvClient::new(channel)
        .max_decoding_message_size(ANSWER_BYTES_MAX)
        .bundle(request)
        .await;
    // Each answer goes to its caller as it arrives; whatever is left when the stream ends or
    // breaks gets the reason.
    let unanswered = match result {
        Err(status) => status,
        Ok(response) => {
            let mut answers = response.into_inner();
            loop {
                match answers.message().await {
                    Ok(Some(batch)) => {
                        for answer in batch.answers {
                            let caller = usize::try_from(answer.item)
                                .ok()
                                .and_then(|i| waiting.get_mut(i))
                                .and_then(Option::take);
                            if let Some(caller) = caller {
                                let _ = caller.send(item_result(answer.answer));
                            }
                        }
                        // Nobody left to answer: dropping the stream cancels the rest on the node.
                        if waiting.iter().flatten().all(oneshot::Sender::is_closed) {
                            return;
                        }
                    }
                    Ok(None) => {
                        break Status::internal("the node ended the bundle without answering");
                    }
                    Err(status) => break status,
                }
            }
        }
    };
    for caller in waiting.into_iter().flatten() {
        let _ = caller.send(Err(unanswered.clone()));
    }
}

/// An item's answer as the unary call would have given it.
fn item_result(answer: Option<Answer>) -> Result<Answer, Status> {
    match answer {
        Some(Answer::Error(e)) => Err(Status::with_details(
            Code::from_i32(e.code),
            e.message,
            e.detail
                .map(|d| d.encode_to_vec())
                .unwrap_or_default()
                .into(),
        )),
        Some(answer) => Ok(answer),
        None => Err(Status::internal("the node sent an empty bundle answer")),
    }
}

/// `message` as a request with `timeout` and, when there is one, the caller's token.
fn stamped<T>(message: T, timeout: Duration, token: Option<&BearerToken>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    if let Some(token) = token {
        token.stamp(&mut request);
    }
    request
}

/// The request sent alone, as its own unary call.
async fn unary(
    channel: Channel,
    item: Item,
    timeout: Duration,
    token: Option<&BearerToken>,
) -> Result<Answer, Status> {
    let mut kv = KvClient::new(channel).max_decoding_message_size(ANSWER_BYTES_MAX);
    let write = |r: tonic::Response<_>| Answer::Write(r.into_inner());
    match item {
        Item::Get(r) => kv
            .get(stamped(r, timeout, token))
            .await
            .map(|r| Answer::Get(r.into_inner())),
        Item::Put(r) => kv.put(stamped(r, timeout, token)).await.map(write),
        Item::Delete(r) => kv.delete(stamped(r, timeout, token)).await.map(write),
        Item::CompareAndSet(r) => kv
            .compare_and_set(stamped(r, timeout, token))
            .await
            .map(write),
        Item::Batch(r) => kv.batch(stamped(r, timeout, token)).await.map(write),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use dossier_api::v1::kv_server::{Kv, KvServer};
    use dossier_api::v1::{
        BatchRequest, BundleResponse, CompareAndSetRequest, DeleteRequest, GetRequest, GetResponse,
        PutRequest, ScanRequest, ScanResponse, WriteResponse,
    };
    use tonic::{Request, Response};

    use super::*;

    /// A node of an older version: unary calls only.
    struct UnaryOnly;

    #[tonic::async_trait]
    impl Kv for UnaryOnly {
        async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
            Ok(Response::new(GetResponse {
                found: true,
                value: b"v".to_vec(),
                applied_index: 1,
            }))
        }
        async fn put(&self, _: Request<PutRequest>) -> Result<Response<WriteResponse>, Status> {
            Err(Status::unimplemented("put"))
        }
        async fn delete(
            &self,
            _: Request<DeleteRequest>,
        ) -> Result<Response<WriteResponse>, Status> {
            Err(Status::unimplemented("delete"))
        }
        async fn compare_and_set(
            &self,
            _: Request<CompareAndSetRequest>,
        ) -> Result<Response<WriteResponse>, Status> {
            Err(Status::unimplemented("compare_and_set"))
        }
        async fn batch(&self, _: Request<BatchRequest>) -> Result<Response<WriteResponse>, Status> {
            Err(Status::unimplemented("batch"))
        }
        async fn scan(&self, _: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
            Err(Status::unimplemented("scan"))
        }
        type BundleStream = tokio_stream::Empty<Result<BundleResponse, Status>>;

        async fn bundle(
            &self,
            _: Request<BundleRequest>,
        ) -> Result<Response<Self::BundleStream>, Status> {
            Err(Status::unimplemented("bundle"))
        }
    }

    /// Against a node that does not serve bundles, the requests that went bundled are refused as
    /// retryable (never answered wrongly), the lane stops bundling, and every later request is
    /// answered through unary calls.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_bundles_gets_unary_calls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(KvServer::new(UnaryOnly))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let lane = Lane::new(channel, true, None);
        let timeout = Duration::from_secs(5);
        let get = || Item::Get(GetRequest::default());
        let answered =
            |r: &Result<Answer, Status>| matches!(r, Ok(Answer::Get(g)) if g.value == b"v");

        // The first of eight is alone on the lane and goes unary; the seven others queue behind
        // it and go as a bundle, which the node refuses.
        let first = futures_util::future::join_all((0..8).map(|_| lane.call(get(), timeout))).await;
        assert!(answered(&first[0]), "{:?}", first[0]);
        for r in &first[1..] {
            match r {
                Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
                Ok(a) => panic!("a bundled request was answered by a node without bundles: {a:?}"),
            }
        }
        assert!(
            lane.unary_until.load(Ordering::Relaxed) > lane.now_ms(),
            "the lane stopped bundling for a while"
        );

        let then = futures_util::future::join_all((0..8).map(|_| lane.call(get(), timeout))).await;
        assert!(then.iter().all(answered), "{then:?}");
    }
}
