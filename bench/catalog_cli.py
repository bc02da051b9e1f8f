"""How fast `txt2img catalog search anime` answers, against a bare `python -c pass`.

Both run as fresh processes, the way a user's shell runs them; the median of N runs is
reported for each, with their ratio. The target is under 0.3 s wall for the search on a
warm catalog index (the first call after a catalog change re-validates and pays once).

    python bench/catalog_cli.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 0.3


def wall_times(command: list[str], runs: int, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()

    env = dict(os.environ, TXT2IMG_HOME=tempfile.mkdtemp(prefix="txt2img-bench-"), COLUMNS="160")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # The console script is what users run; fall back to `python -m` outside an installed venv.
    script = Path(sys.executable).with_name("txt2img")
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "txt2img"]
    search = [*cli, "catalog", "search", "anime"]

    cold = wall_times(search, 1, env)[0]  # builds the index cache
    baseline = statistics.median(wall_times([sys.executable, "-c", "pass"], args.runs, env))
    warm = statistics.median(wall_times(search, args.runs, env))
    verdict = "meets" if warm < TARGET_SECONDS else "MISSES"
    print(f"python -c pass                       median {baseline:.3f} s ({args.runs} runs)")
    print(f"txt2img catalog search anime (warm)  median {warm:.3f} s ({args.runs} runs)")
    print(f"txt2img catalog search anime (cold)  {cold:.3f} s (first call: validates and caches the catalog)")
    print(f"ratio search / bare python: {warm / baseline:.1f}x; overhead {warm - baseline:.3f} s")
    print(f"target < {TARGET_SECONDS:.2f} s: {verdict}")


if __name__ == "__main__":
    main()
