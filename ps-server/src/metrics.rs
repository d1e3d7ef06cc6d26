//! Prometheus metrics of one shard, kept in atomics and rendered in the text exposition
//! format on `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A cumulative histogram over fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus the `+Inf` bucket last (non-cumulative; summed on render).
    counts: Vec<AtomicU64>,
    /// Sum of observations, as f64 bits (updated with a CAS loop).
    sum_bits: AtomicU64,
}

impl Histogram {
    /// A histogram with the given strictly increasing bucket bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        let _ = self.sum_bits.fetch_update(Relaxed, Relaxed, |s| Some((f64::from_bits(s) + v).to_bits()));
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Renders the histogram; `labels` (such as `shard="0",`) go before `le` on every line.
    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{b}\"}} {cum}");
        }
        cum += self.counts[self.bounds.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cum}");
        let plain = labels.trim_end_matches(',');
        let _ = writeln!(out, "{name}_sum{{{plain}}} {}", f64::from_bits(self.sum_bits.load(Relaxed)));
        let _ = writeln!(out, "{name}_count{{{plain}}} {cum}");
    }
}

/// Every metric one shard exports.
#[derive(Debug)]
pub struct Metrics {
    /// Gradient pushes accepted (applied or buffered).
    pub pushes: AtomicU64,
    /// Pulls served.
    pub pulls: AtomicU64,
    /// Tensor payload bytes received.
    pub bytes_in: AtomicU64,
    /// Tensor payload bytes sent.
    pub bytes_out: AtomicU64,
    /// Late sync gradients dropped.
    pub dropped_stale: AtomicU64,
    /// Requests refused with an error status.
    pub rejected: AtomicU64,
    /// Registered variables.
    pub variables: AtomicU64,
    /// Bytes of gradient buffers kept for reuse (the store's spare budget in use).
    pub spare_buffer_bytes: AtomicU64,
    /// Seconds from a sync step's first gradient to its update (async: time to apply).
    pub step_latency: Histogram,
    /// Staleness (in versions) of applied async / bounded gradients.
    pub staleness: Histogram,
    /// Retried pushes answered with their first result instead of being applied again.
    pub duplicate_pushes: AtomicU64,
    /// Checkpoints written, and writes that failed.
    pub checkpoints: AtomicU64,
    pub checkpoint_failures: AtomicU64,
    /// Seconds to write one checkpoint file (data, manifest, fsyncs).
    pub checkpoint_seconds: Histogram,
    /// Step of the checkpoint the shard was restored from (0: none).
    pub restored_step: AtomicU64,
}

const LATENCY_BOUNDS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const STALENESS_BOUNDS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0];

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            pushes: AtomicU64::new(0),
            pulls: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            dropped_stale: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            variables: AtomicU64::new(0),
            spare_buffer_bytes: AtomicU64::new(0),
            step_latency: Histogram::new(LATENCY_BOUNDS),
            staleness: Histogram::new(STALENESS_BOUNDS),
            duplicate_pushes: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            checkpoint_failures: AtomicU64::new(0),
            checkpoint_seconds: Histogram::new(LATENCY_BOUNDS),
            restored_step: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Renders all metrics in the Prometheus text format; `shard` becomes a constant label.
    pub fn render(&self, shard: u32) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64); 9] = [
            ("parasync_pushes_total", "Gradient pushes accepted.", &self.pushes),
            ("parasync_pulls_total", "Pulls served.", &self.pulls),
            ("parasync_bytes_in_total", "Tensor bytes received.", &self.bytes_in),
            ("parasync_bytes_out_total", "Tensor bytes sent.", &self.bytes_out),
            ("parasync_dropped_stale_gradients_total", "Late sync gradients dropped.", &self.dropped_stale),
            ("parasync_rejected_requests_total", "Requests refused with an error.", &self.rejected),
            ("parasync_duplicate_pushes_total", "Retried pushes answered with their first result.", &self.duplicate_pushes),
            ("parasync_checkpoints_total", "Checkpoints written.", &self.checkpoints),
            ("parasync_checkpoint_failures_total", "Checkpoint writes that failed.", &self.checkpoint_failures),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{shard=\"{shard}\"}} {}", v.load(Relaxed));
        }
        let gauges: [(&str, &str, &AtomicU64); 3] = [
            ("parasync_variables", "Registered variables.", &self.variables),
            ("parasync_spare_buffer_bytes", "Bytes of gradient buffers kept for reuse.", &self.spare_buffer_bytes),
            ("parasync_restored_step", "Step of the checkpoint this shard started from (0: none).", &self.restored_step),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{shard=\"{shard}\"}} {}", v.load(Relaxed));
        }
        let labels = format!("shard=\"{shard}\",");
        self.step_latency.render(&mut out, "parasync_step_latency_seconds", "Sync step latency (first gradient to update).", &labels);
        self.staleness.render(&mut out, "parasync_staleness", "Staleness of applied gradients, in versions.", &labels);
        self.checkpoint_seconds.render(&mut out, "parasync_checkpoint_seconds", "Time to write one checkpoint file.", &labels);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "help", "shard=\"2\",");
        assert!(s.contains("x_bucket{shard=\"2\",le=\"1\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{shard=\"2\",le=\"2\"} 3\n"), "{s}");
        assert!(s.contains("x_bucket{shard=\"2\",le=\"+Inf\"} 4\n"), "{s}");
        assert!(s.contains("x_sum{shard=\"2\"} 6\n"), "{s}");
        assert!(s.contains("x_count{shard=\"2\"} 4\n"), "{s}");
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn render_has_every_counter() {
        let m = Metrics::default();
        m.pushes.fetch_add(3, Relaxed);
        let s = m.render(1);
        assert!(s.contains("parasync_pushes_total{shard=\"1\"} 3"));
        for name in ["parasync_pulls_total", "parasync_bytes_in_total", "parasync_dropped_stale_gradients_total", "parasync_staleness_bucket", "parasync_spare_buffer_bytes"] {
            assert!(s.contains(name), "{name} missing");
        }
    }
}
