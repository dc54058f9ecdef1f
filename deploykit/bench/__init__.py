"""Offline latency and throughput measurement: warm-up, stability windows, percentiles, peak memory."""

from deploykit.bench.measure import Measurement, current_rss_mb, measure, peak_rss_mb, percentile

__all__ = ["Measurement", "current_rss_mb", "measure", "peak_rss_mb", "percentile"]
