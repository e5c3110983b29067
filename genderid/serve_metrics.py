"""The Serve application's metrics, through Ray's metrics API (exported by Ray's own Prometheus endpoint). Ray glue.

One set per replica process, made on first use: the ingress's middleware and exception handlers are shipped to
replicas by value, so they reach the metrics through this module rather than through a global of their own.
"""
from __future__ import annotations

from typing import Optional


class ServeMetrics:
    """The application's metrics, through Ray's metrics API (exported by Ray's own Prometheus endpoint).

    Names as Prometheus shows them (Ray adds ``ray_``): ``ray_genderid_requests_total{route, status}``,
    ``ray_genderid_rejected_total{reason}``, ``ray_genderid_predictions_total{label}``,
    ``ray_genderid_{body,decode,detect,forward}_seconds`` and ``ray_genderid_batch_size`` histograms.
    """

    SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

    def __init__(self):
        from ray.util.metrics import Counter, Histogram

        self.requests = Counter("genderid_requests", "HTTP requests answered, by route and status",
                                tag_keys=("route", "status"))
        self.rejected = Counter("genderid_rejected", "inputs refused, by reason", tag_keys=("reason",))
        self.predictions = Counter("genderid_predictions", "predictions made, by label", tag_keys=("label",))
        self.body_seconds = Histogram("genderid_body_seconds", "time to receive a request body", self.SECONDS)
        self.decode_seconds = Histogram("genderid_decode_seconds", "time to decode one image", self.SECONDS)
        self.detect_seconds = Histogram("genderid_detect_seconds", "time to find and align the faces of one photo",
                                        self.SECONDS)
        self.forward_seconds = Histogram("genderid_forward_seconds", "time of one batched forward pass",
                                         self.SECONDS)
        self.batch_size = Histogram("genderid_batch_size", "images per forward pass", [1, 2, 4, 8, 16, 32, 64])


_instance: Optional[ServeMetrics] = None


def metrics() -> ServeMetrics:
    """This process's metrics (made on first use)."""
    global _instance
    if _instance is None:
        _instance = ServeMetrics()
    return _instance
