"""The Prometheus metrics the service adds to BentoML's ``/metrics``: latency, queue depth, batches, interrupts.

prometheus_client is imported when the metrics are first made, inside the BentoML worker, after
BentoML has switched it to multiprocess mode; importing it earlier would hide these metrics.

BentoML's workers write their metrics as files in one folder that ``/metrics`` sums up. BentoML puts
that folder at ``$BENTOML_HOME/prometheus_multiproc_dir`` and empties it whenever a server starts, so a
second ``bentoml serve`` sharing the home wipes the first one's counters; each server here gets a
folder of its own instead (``own_prometheus_dir``).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
from dataclasses import dataclass
from functools import cache

from serving.bentoml_compat import bentoml_home, set_prometheus_multiproc_dir
from txt2img.processes import process_alive

PROMETHEUS_DIRS = "txt2img-prometheus"  # under BENTOML_HOME, one folder per server: <host>-<pid>
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]*_(\d+)\.db")


def own_prometheus_dir() -> None:
    """In the ``bentoml serve`` process, make BentoML give its workers a Prometheus folder of this server's own.

    ``bentoml serve`` imports the service before it picks the folder (``bentoml.serving.ensure_prometheus_dir``
    reads BentoML's ``prometheus_multiproc_dir`` setting), so setting it here takes effect, and the workers
    receive it as ``PROMETHEUS_MULTIPROC_DIR``. A worker, which imports the service too, changes nothing.
    The folder goes when the server exits; those of servers killed before that go when the next one starts.
    """
    import bentoml

    if bentoml.server_context.worker_index is not None:
        return
    root = bentoml_home() / PROMETHEUS_DIRS
    host = socket.gethostname()
    if root.is_dir():
        for folder in root.iterdir():
            name, _, pid = folder.name.rpartition("-")
            if name == host and pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
    directory = root / f"{host}-{os.getpid()}"
    set_prometheus_multiproc_dir(directory)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)


def forget_dead_workers() -> None:
    """Drop the live gauges of workers that died without saying so (kill -9, out of memory).

    Live gauges (queue depth, running images, BentoML's requests in progress) are summed over the
    workers' files; a worker that exits normally removes its own, a killed one leaves its last values
    behind, which would be counted forever. Counters and histograms stay: what a dead worker served
    still counts.
    """
    import prometheus_client.multiprocess

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory or not os.path.isdir(directory):
        return
    pids = {int(match.group(1)) for name in os.listdir(directory) if (match := _LIVE_GAUGE_FILE.fullmatch(name))}
    for pid in pids - {os.getpid()}:
        if not process_alive(pid):
            prometheus_client.multiprocess.mark_process_dead(pid, directory)


@dataclass(frozen=True)
class ServingMetrics:
    generation_seconds: object
    queue_depth: object
    running_images: object
    batch_images: object
    interrupted: object
    prompt_cache_lookups: object


@cache
def serving_metrics() -> ServingMetrics:
    import prometheus_client

    forget_dead_workers()

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
        prompt_cache_lookups=prometheus_client.Counter(
            "txt2img_prompt_cache_lookups",
            "Prompts and negative prompts looked up in the prompt cache, by result: hit (the text encoder "
            "was skipped) or miss.",
            ["result"],
        ),
    )
