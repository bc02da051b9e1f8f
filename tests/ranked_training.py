"""A training run under torchrun that records, per rank, what the trainer's processes did: the
sum of its trained weights at the end (``weights-<rank>.json``) and whether it registered the
model (``registered-<rank>``). tests/test_distributed_training.py runs it; it is not a test.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/ranked_training.py DATA OUT HP_JSON
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import training.dreambooth as dreambooth
from training.hyperparameters import Hyperparameters


def main(data: Path, out: Path, hyperparameters: Hyperparameters) -> None:
    import torch

    torch.set_num_threads(1)
    rank = os.environ["RANK"]
    finish, register = dreambooth._finish, dreambooth._register

    def recording_finish(run, *args, **kwargs):
        with torch.no_grad():
            total = sum(float(parameter.double().sum()) for parameter in run.trainable.parameters())
        (out / f"weights-{rank}.json").write_text(json.dumps(total))
        return finish(run, *args, **kwargs)

    def recording_register(entry, *args, **kwargs):
        (out / f"registered-{rank}").touch()
        return register(entry, *args, **kwargs)

    dreambooth._finish, dreambooth._register = recording_finish, recording_register
    dreambooth.train(data, "tiny-sd", "ranked", hyperparameters, progress=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Hyperparameters.model_validate_json(sys.argv[3]))
