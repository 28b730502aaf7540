//! Prometheus metrics: requests by route and status with latencies, events persisted, sync
//! long-polls waiting, store size.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

const BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    pub events_persisted: AtomicU64,
    pub sync_waiting: AtomicI64,
}

/// Counts every event committed, whichever path committed it.
impl crate::rooms::AfterCommit for Metrics {
    fn committed(&self, events: &[crate::events::Pdu]) -> Option<crate::rooms::FollowUp> {
        self.events_persisted.fetch_add(events.len() as u64, Ordering::Relaxed);
        None
    }
}

impl Metrics {
    pub fn observe_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let mut requests = self.requests.lock().expect("metrics lock");
        let histogram = requests.entry((method.to_owned(), route.to_owned(), status)).or_default();
        let secs = elapsed.as_secs_f64();
        for (bucket, count) in BUCKETS.iter().zip(histogram.counts.iter_mut()) {
            if secs <= *bucket {
                *count += 1;
            }
        }
        histogram.count += 1;
        histogram.sum += secs;
    }

    pub fn render(&self, store_bytes: u64) -> String {
        let mut out = String::new();
        out.push_str("# HELP limbic_http_requests_seconds HTTP requests by route and status.\n");
        out.push_str("# TYPE limbic_http_requests_seconds histogram\n");
        for ((method, route, status), h) in self.requests.lock().expect("metrics lock").iter() {
            let labels = format!("method=\"{method}\",route=\"{}\",status=\"{status}\"", route.replace('"', "'"));
            for (bucket, count) in BUCKETS.iter().zip(h.counts.iter()) {
                let _ = writeln!(out, "limbic_http_requests_seconds_bucket{{{labels},le=\"{bucket}\"}} {count}");
            }
            let _ = writeln!(out, "limbic_http_requests_seconds_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "limbic_http_requests_seconds_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(out, "limbic_http_requests_seconds_count{{{labels}}} {}", h.count);
        }
        let _ = writeln!(out, "# HELP limbic_events_persisted_total Events persisted.\n# TYPE limbic_events_persisted_total counter");
        let _ = writeln!(out, "limbic_events_persisted_total {}", self.events_persisted.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP limbic_sync_waiting Long-polling /sync requests waiting.\n# TYPE limbic_sync_waiting gauge");
        let _ = writeln!(out, "limbic_sync_waiting {}", self.sync_waiting.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP limbic_store_bytes Approximate size of the store on disk.\n# TYPE limbic_store_bytes gauge");
        let _ = writeln!(out, "limbic_store_bytes {store_bytes}");
        out
    }
}
