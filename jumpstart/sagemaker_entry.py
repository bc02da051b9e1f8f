"""The entry point of ``txt2img train --remote --trainer txt2img`` in the SageMaker training container.

Packed as ``txt2img_train.py`` at the root of ``sourcedir.tar.gz`` next to the catalog, training
and txt2img packages; the container's training toolkit installs ``requirements.txt`` and runs it
once on every instance of the job. It starts torchrun with one process per GPU of the instance,
all instances in one static rendezvous led by the first host, and each process runs
``training.distributed``'s worker: the same data-parallel trainer as ``txt2img train --processes``.
Rank 0 writes the model and its ``entry.yaml`` to /opt/ml/model, which SageMaker uploads as the
job's model.tar.gz, and then the inference code packed in the source (``training.servable``), so
that ``txt2img deploy`` serves that archive as it is. In a training job of ``txt2img tune --remote
--trainer txt2img`` rank 0 then evaluates the model as a local trial would and prints its metrics as
``name=value`` lines, which the tuning job's metric definitions read; the networks the metrics need
come from the ``metrics`` channel. Standard library only: it runs before anything else is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# The hyperparameters that are not the trainer's: which model to fine-tune, the new model's name.
BASE_KEY = "txt2img_base"
NAME_KEY = "txt2img_name"
# Names the folder of sourcedir.tar.gz that holds code/ for the inference container (what
# jumpstart.package.write_inference_code writes); a job without it makes an archive that cannot be deployed.
INFERENCE_CODE_KEY = "txt2img_inference_code"
INFERENCE_CODE_DIR = "inference_code"
# The evaluation settings (``training.evaluation.EvaluationSettings`` as JSON, without the weights'
# locations) of a tuning job's training jobs; the objective is the first metric.
EVALUATION_KEY = "txt2img_evaluation"
OWN_KEYS = (BASE_KEY, NAME_KEY, INFERENCE_CODE_KEY, EVALUATION_KEY)
MASTER_PORT = "29500"
# The channel holding the metric networks a tuning job's evaluation needs, and each one's name in it.
METRICS_CHANNEL = "metrics"
METRIC_WEIGHT_NAMES = {"inception": "inception.pt", "clip": "clip", "dino": "dino"}


def job_environment(environment: dict[str, str]) -> dict[str, str]:
    """The trainer's environment: a home in /tmp (the built-in catalog is all the container needs),
    and TXT2IMG_<NETWORK>_PATH for each metric network in the metrics channel."""
    found = {"TXT2IMG_HOME": environment.get("TXT2IMG_HOME", "/tmp/txt2img-home")}
    channel = environment.get(f"SM_CHANNEL_{METRICS_CHANNEL.upper()}")
    for extractor, name in METRIC_WEIGHT_NAMES.items():
        if channel and os.path.exists(os.path.join(channel, name)):
            found[f"TXT2IMG_{extractor.upper()}_PATH"] = os.path.join(channel, name)
    return {**environment, **found}


def torchrun_command(environment: dict[str, str]) -> list[str]:
    """The torchrun command line for this instance, from the environment SageMaker's toolkit sets."""
    hosts = json.loads(environment.get("SM_HOSTS", '["algo-1"]'))
    current = environment.get("SM_CURRENT_HOST", hosts[0])
    gpus = int(environment.get("SM_NUM_GPUS", "0"))
    given = json.loads(environment["SM_HPS"])
    hyperparameters = {
        key: value for key, value in given.items() if key not in OWN_KEYS and not key.startswith("sagemaker_")
    }
    source_dir = os.path.dirname(os.path.abspath(__file__))
    payload = {
        "data_dir": environment["SM_CHANNEL_TRAINING"],
        "base": given[BASE_KEY],
        "name": given[NAME_KEY],
        "hyperparameters": hyperparameters,
        "resume": False,
        "output_dir": environment.get("SM_MODEL_DIR", "/opt/ml/model"),
        # Nothing to register in the container: the catalog entry is written where the job was started.
        "register": False,
        "inference_code": (
            os.path.join(source_dir, given[INFERENCE_CODE_KEY]) if given.get(INFERENCE_CODE_KEY) else None
        ),
        "evaluation": _decoded(given.get(EVALUATION_KEY)),
        # Uploaded as the job's output.tar.gz: the report, grid and images, not part of the model.
        "evaluation_dir": os.path.join(environment.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"), "evaluation"),
    }
    if len(hosts) == 1:
        rendezvous = ["--standalone", "--nnodes=1"]  # a free local port, no host name to resolve
    else:
        rendezvous = [
            f"--nnodes={len(hosts)}",
            f"--node_rank={hosts.index(current)}",
            f"--master_addr={hosts[0]}",
            f"--master_port={MASTER_PORT}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc_per_node={max(gpus, 1)}",
        "--max_restarts=0",
        "--module",
        "training.distributed",
        json.dumps(payload),
    ]


def _decoded(value):
    """A JSON hyperparameter as the toolkit hands it over: already decoded, or still a string."""
    return json.loads(value) if isinstance(value, str) else value


def main() -> int:
    environment = job_environment(dict(os.environ))
    return subprocess.call(torchrun_command(environment), env=environment)


if __name__ == "__main__":
    sys.exit(main())
