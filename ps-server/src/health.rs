//! gRPC health (`grpc.health.v1.Health`) whose `Watch` streams end when the server shuts
//! down: tonic-health's own streams stay open until the client leaves, and an open stream
//! holds the server's drain for its whole timeout.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// tonic-health's service, with `Watch` streams cut at shutdown.
pub struct EndingHealth {
    inner: HealthService,
    stop: watch::Receiver<bool>,
}

/// The reporter that sets statuses and the service to add to the server; `stop` turns
/// true at shutdown, after the statuses that watchers should still see were set.
pub fn health_reporter(stop: watch::Receiver<bool>) -> (HealthReporter, HealthServer<EndingHealth>) {
    let reporter = HealthReporter::new();
    let inner = HealthService::from_health_reporter(reporter.clone());
    (reporter, HealthServer::new(EndingHealth { inner, stop }))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for EndingHealth {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let stop = self.stop.clone();
        // Statuses first (biased), so that the NOT_SERVING set before `stop` still reaches
        // the watcher; then the stream ends.
        let stream = futures::stream::unfold((statuses, stop), |(mut statuses, mut stop)| async move {
            let item = tokio::select! {
                biased;
                item = statuses.next() => item,
                _ = stop.wait_for(|&s| s) => None,
            };
            item.map(|item| (item, (statuses, stop)))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
