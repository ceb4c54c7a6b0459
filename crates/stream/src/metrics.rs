//! Prometheus metrics of the job and a minimal `/metrics` HTTP endpoint.

use std::net::SocketAddr;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The job's metrics, registered in their own [`Registry`] (so several jobs
/// can live in one process, e.g. in tests).
#[derive(Clone)]
pub struct Metrics {
    /// Registry holding all of the below.
    pub registry: Registry,
    /// `waterbear_stream_records_in_total`: input records processed and
    /// committed (rate() = records/s).
    pub records_in: IntCounter,
    /// `waterbear_stream_records_out_total{topic}`: outputs committed.
    pub records_out: IntCounterVec,
    /// `waterbear_stream_dlq_total`: records sent to the DLQ and committed.
    pub dlq: IntCounter,
    /// `waterbear_stream_consumer_lag{partition}`: last stable offset minus
    /// the position of the job, from librdkafka statistics.
    pub consumer_lag: IntGaugeVec,
    /// `waterbear_stream_transactions_total{result}`: committed / aborted.
    pub transactions: IntCounterVec,
    /// `waterbear_stream_batch_latency_seconds`: from the first record of a
    /// transaction being consumed to the transaction being committed (the
    /// longest time a record waits inside the job).
    pub batch_latency: Histogram,
    /// `waterbear_stream_record_latency_seconds`: from the Kafka timestamp of
    /// the oldest record in a transaction to its commit (end to end, includes
    /// time spent in the input topic).
    pub record_latency: Histogram,
    /// `waterbear_stream_commit_seconds`: time the loop spends committing a
    /// transaction (state writes, send offsets, commit incl. flush).
    pub commit_seconds: Histogram,
    /// `waterbear_stream_restore_seconds`: state restore time per assignment.
    pub restore_seconds: Histogram,
    /// `waterbear_stream_fetch_records`: records taken from the consumer in
    /// one batch (see [`crate::FetchQueue`]); a mean near 1 means the loop
    /// keeps up record by record, near 1024 that it is behind.
    pub fetch_records: Histogram,
    /// `waterbear_stream_assigned_partitions`.
    pub assigned_partitions: IntGauge,
    /// `waterbear_stream_rebalances_total`.
    pub rebalances: IntCounter,
    /// `waterbear_stream_consumer_replaced_total`: group consumers replaced after a
    /// fatal error or a stall.
    pub consumer_replaced: IntCounter,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    /// Creates and registers all metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        let records_in = IntCounter::new(
            "waterbear_stream_records_in_total",
            "Input records processed and committed",
        )
        .expect("valid metric");
        let records_out = IntCounterVec::new(
            Opts::new(
                "waterbear_stream_records_out_total",
                "Output records committed",
            ),
            &["topic"],
        )
        .expect("valid metric");
        let dlq = IntCounter::new(
            "waterbear_stream_dlq_total",
            "Records sent to the DLQ and committed",
        )
        .expect("valid metric");
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "waterbear_stream_consumer_lag",
                "Last stable offset minus job position",
            ),
            &["partition"],
        )
        .expect("valid metric");
        let transactions = IntCounterVec::new(
            Opts::new(
                "waterbear_stream_transactions_total",
                "Transactions by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let batch_latency = Histogram::with_opts(
            HistogramOpts::new(
                "waterbear_stream_batch_latency_seconds",
                "First record of a transaction consumed -> transaction committed",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let record_latency = Histogram::with_opts(
            HistogramOpts::new(
                "waterbear_stream_record_latency_seconds",
                "Kafka timestamp of the oldest record in a transaction -> commit",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "waterbear_stream_commit_seconds",
                "Time spent committing a transaction (state, offsets, commit incl. flush)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let restore_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "waterbear_stream_restore_seconds",
                "State restore time per assignment",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let fetch_records = Histogram::with_opts(
            HistogramOpts::new(
                "waterbear_stream_fetch_records",
                "Records taken from the consumer in one batch",
            )
            .buckets(prometheus::exponential_buckets(1.0, 4.0, 6).expect("valid buckets")),
        )
        .expect("valid metric");
        let assigned_partitions = IntGauge::new(
            "waterbear_stream_assigned_partitions",
            "Input partitions assigned",
        )
        .expect("valid metric");
        let rebalances = IntCounter::new("waterbear_stream_rebalances_total", "Rebalance events")
            .expect("valid metric");
        let consumer_replaced = IntCounter::new(
            "waterbear_stream_consumer_replaced_total",
            "Group consumers replaced after a fatal error or a stall",
        )
        .expect("valid metric");
        for c in [
            Box::new(records_in.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(records_out.clone()),
            Box::new(dlq.clone()),
            Box::new(consumer_lag.clone()),
            Box::new(transactions.clone()),
            Box::new(batch_latency.clone()),
            Box::new(record_latency.clone()),
            Box::new(commit_seconds.clone()),
            Box::new(restore_seconds.clone()),
            Box::new(fetch_records.clone()),
            Box::new(assigned_partitions.clone()),
            Box::new(rebalances.clone()),
            Box::new(consumer_replaced.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            records_in,
            records_out,
            dlq,
            consumer_lag,
            transactions,
            batch_latency,
            record_latency,
            commit_seconds,
            restore_seconds,
            fetch_records,
            assigned_partitions,
            rebalances,
            consumer_replaced,
        }
    }

    /// Text exposition format of all metrics.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to a Vec");
        String::from_utf8(buf).expect("prometheus text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `GET /metrics` (any other path: 404) on `addr` until the task is
/// dropped. Returns the bound address (useful with port 0).
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Metrics,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "serving /metrics");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut req = [0u8; 2048];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut req),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let head = String::from_utf8_lossy(&req[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("");
                let (status, ctype, body) = if path == "/metrics" || path.starts_with("/metrics?") {
                    ("200 OK", "text/plain; version=0.0.4", metrics.render())
                } else {
                    ("404 Not Found", "text/plain", "not found\n".to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let m = Metrics::new();
        m.records_in.inc_by(7);
        m.dlq.inc();
        let (addr, task) = serve_metrics("127.0.0.1:0".parse().unwrap(), m)
            .await
            .unwrap();
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).await.unwrap();
            body
        };
        let body = get("/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(
            body.contains("waterbear_stream_records_in_total 7"),
            "{body}"
        );
        assert!(body.contains("waterbear_stream_dlq_total 1"), "{body}");
        assert!(
            body.contains("# TYPE waterbear_stream_batch_latency_seconds histogram"),
            "{body}"
        );
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }
}
