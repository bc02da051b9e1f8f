"""The Prometheus metrics the service adds to BentoML's ``/metrics``: latency, queue depth, batches, interrupts.

prometheus_client is imported when the metrics are first made, inside the BentoML worker, after
BentoML has switched it to multiprocess mode; importing it earlier would hide these metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class ServingMetrics:
    generation_seconds: object
    queue_depth: object
    running_images: object
    batch_images: object
    interrupted: object


@cache
def serving_metrics() -> ServingMetrics:
    import prometheus_client

    return ServingMetrics(
        generation_seconds=prometheus_client.Histogram(
            "txt2img_generation_seconds",
            "Seconds from a request's arrival to its images being ready.",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        ),
        queue_depth=prometheus_client.Gauge(
            "txt2img_queue_depth", "Requests waiting for the device.", multiprocess_mode="livesum"
        ),
        running_images=prometheus_client.Gauge(
            "txt2img_running_images", "Images in the pipeline call running now.", multiprocess_mode="livesum"
        ),
        batch_images=prometheus_client.Histogram(
            "txt2img_batch_images",
            "Images generated per pipeline call.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
        ),
        interrupted=prometheus_client.Counter(
            "txt2img_interrupted",
            "Pipeline calls stopped before their last step because every request in them gave up.",
        ),
    )
