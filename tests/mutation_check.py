"""``make mutate``: break the code on purpose, one way at a time, and check that the tests notice (issue #14).

Each mutation below is data: a name, a file, an exact snippet of that file, what replaces it, and
the tests that must fail once it is replaced. The script copies the working tree (the files git
tracks, plus untracked files git does not ignore) to a temporary folder, first runs every selected
test there unchanged (the baseline: a test that already fails would count every mutation as
caught), then applies each mutation on its own, runs its tests and puts the file back.

A mutation is ``caught`` when its tests fail and ``survived`` when they pass. A snippet that is not
in its file exactly once is an error naming the mutation, found before anything runs, so the list
cannot rot silently. Exit status: 0 when every mutation was caught, 1 when any survived or timed
out, 2 on an error (a snippet not found, a baseline failure, a selection matching no test).

    python tests/mutation_check.py                 # every mutation
    python tests/mutation_check.py --list          # names and selections only
    python tests/mutation_check.py -k seed -k lru  # mutations whose name holds any of these
    python tests/mutation_check.py --no-baseline   # skip the unchanged run (quicker, less sure)

    python tests/mutation_check.py --jobs 1        # one mutation at a time

Mutations run ``--jobs`` at a time (default: one per CPU, at most 4), each in a copy of the tree of
its own, so that no run sees another's mutated file. Most of a mutation's time is pytest and torch
starting up on one core (tests run with one torch thread), so two runs on two cores finish in little
more than one's time. Rows print in the list's order, whatever order the runs finish in.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT_S = 900  # one mutation's tests
BASELINE_TIMEOUT_S = 3600  # every selected test at once: 12 minutes on a busy 2-core machine
# Past 4, runs that each start a ``bentoml serve`` or a training run compete for memory more than they gain.
MAX_DEFAULT_JOBS = 4


@dataclass(frozen=True)
class Select:
    """Tests of one file: all of them, or those a pytest ``-k`` expression picks."""

    file: str
    k: str | None = None

    def expression(self) -> str:
        # -k matches names along each test's chain, the module's file name included, so this
        # restricts the expression to this file even when several files run together. (So a
        # k that is part of the file's name, such as "claim" in test_name_claims.py, picks it all.)
        module = Path(self.file).name
        return module if self.k is None else f"{module} and ({self.k})"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[Select, ...]


def pytest_arguments(selections: list[Select]) -> list[str]:
    files = list(dict.fromkeys(select.file for select in selections))
    if all(select.k is None for select in selections):
        return files
    expression = " or ".join(f"({select.expression()})" for select in dict.fromkeys(selections))
    return [*files, "-k", expression]


MUTATIONS = [
    # --- training ---------------------------------------------------------------------------------
    Mutation(
        "a finished training job's entry is listed by the worker that ran it only",
        "serving/sagemaker_api.py",
        "    manager.refresh_catalog()\n    loaded = manager.loaded_ids()",
        "    loaded = manager.loaded_ids()",
        (Select("tests/test_train_jobs.py", "cancel_then_resume"),),
    ),
    Mutation(
        "a training job's cancel (SIGTERM) kills the trainer without a checkpoint",
        "training/dreambooth.py",
        "for number in (signal.SIGINT, signal.SIGTERM)",
        "for number in (signal.SIGINT,)",
        (Select("tests/test_train_jobs.py", "cancel_then_resume"),),
    ),
    Mutation(
        "optimizer step is a no-op",
        "training/dreambooth.py",
        "            run.optimizer.step()\n",
        "",
        (Select("tests/test_train.py", "full_finetune"),),
    ),
    Mutation(
        "resume without the RNG state",
        "training/dreambooth.py",
        "    accelerator.load_state(str(checkpoint), strict=False)",
        "    accelerator.load_state(str(checkpoint), strict=False)\n"
        '    __import__("accelerate").utils.set_seed(request.hp.seed, device_specific=True)',
        (Select("tests/test_train.py", "resume"),),
    ),
    Mutation(
        "resume without the optimizer state",
        "training/dreambooth.py",
        "    accelerator.load_state(str(checkpoint), strict=False)",
        "    accelerator.load_state(str(checkpoint), strict=False)\n    run.optimizer.optimizer.state.clear()",
        (Select("tests/test_train.py", "resume"),),
    ),
    Mutation(
        "--resume takes other hyperparameters than the run's",
        "training/dreambooth.py",
        "        if request.resume:\n"
        "            _check_resumed_hyperparameters(request.name, output_dir, request.hp)\n",
        "",
        (Select("tests/test_name_claims.py", "resume_registers"),),
    ),
    Mutation(
        "prior-preservation loss weight 0",
        "training/dreambooth.py",
        "loss = loss + hp.prior_loss_weight * errors[batch.num_instance :].mean()",
        "loss = loss + 0 * errors[batch.num_instance :].mean()",
        (Select("tests/test_train.py", "prior"),),
    ),
    Mutation(
        "training ignores captions",
        "training/dreambooth.py",
        "            embeddings = torch.stack([run.prompt_cache[prompt] for prompt in batch.prompts])\n",
        "            embeddings = encode_prompts(\n"
        '                run.pipeline.tokenizer, run.pipeline.text_encoder, [""] * len(batch.prompts)\n'
        "            )\n",
        (Select("tests/test_train.py", "caption"),),
    ),
    Mutation(
        "tune --parallel runs trials one at a time",
        "training/tuning.py",
        "while len(running) < config.parallel and _claimed(study) < config.trials:",
        "while len(running) < 1 and _claimed(study) < config.trials:",
        (Select("tests/test_tuning_parallel.py"),),
    ),
    Mutation(
        "a resumed study's sampler starts over from the bare seed",
        "training/tuning.py",
        "    seed = int(numpy.random.SeedSequence([config.seed, number]).generate_state(1)[0])\n",
        "    seed = config.seed\n",
        (Select("tests/test_tuning.py", "never_repeats"),),
    ),
    # --- evaluation -------------------------------------------------------------------------------
    Mutation(
        "frechet_distance returns 0",
        "training/metrics.py",
        "    return float(max(distance, 0.0))\n",
        "    return 0.0\n",
        (Select("tests/test_evaluation.py", "frechet or fid"),),
    ),
    Mutation(
        "FID treats covariances as diagonal",
        "training/metrics.py",
        "    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False))\n"
        "    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))\n",
        "    cov_a = np.diag(np.diag(np.atleast_2d(np.cov(features_a, rowvar=False))))\n"
        "    cov_b = np.diag(np.diag(np.atleast_2d(np.cov(features_b, rowvar=False))))\n",
        (Select("tests/test_evaluation.py", "frechet or fid"),),
    ),
    Mutation(
        "a model folder without its processor config gets default preprocessing",
        "training/metrics.py",
        "    if not any((folder / name).is_file() for name in PROCESSOR_CONFIG_NAMES):\n"
        "        raise MissingWeights(\n",
        "    if not any((folder / name).is_file() for name in PROCESSOR_CONFIG_NAMES):\n"
        "        return processor_class()\n"
        "        raise MissingWeights(\n",
        (Select("tests/test_evaluation.py", "without_its_image_processor_config"),),
    ),
    # --- catalog ----------------------------------------------------------------------------------
    Mutation(
        "catalog list folds model ids in its table",
        "txt2img/cli/catalog.py",
        '    table.add_column("id", style="bold cyan", no_wrap=True)\n',
        '    table.add_column("id", style="bold cyan", overflow="fold")\n',
        (Select("tests/test_catalog_cli.py", "keeps_every_id_whole"),),
    ),
    Mutation(
        "demo photos writes over a folder that holds files",
        "txt2img/cli/demo.py",
        "    if directory.exists() and any(directory.iterdir()):\n",
        "    if False:\n",
        (Select("tests/test_demo_cli.py", "refused_in_one_line"),),
    ),
    Mutation(
        "catalog write in place, not atomic",
        "catalog/paths.py",
        "        temporary = _write_temporary(path, data)\n        try:\n            os.replace(temporary, path)\n",
        "        path.parent.mkdir(parents=True, exist_ok=True)\n"
        "        path.write_bytes(data)\n"
        "        try:\n"
        "            pass\n",
        (Select("tests/test_catalog_store.py"),),
    ),
    Mutation(
        "claim_name claims nothing",
        "catalog/store.py",
        "            fcntl.flock(claim, ",
        "            (lambda *_: None)(claim, ",
        (Select("tests/test_name_claims.py", "a_claim_refuses or concurrent_train"),),
    ),
    Mutation(
        "registration replaces instead of creating exclusively",
        "catalog/store.py",
        '        exclusive_create_bytes(path, text.encode("utf-8"))\n',
        "        atomic_write_text(path, text)\n",
        (Select("tests/test_name_claims.py", "racing_registrations"),),
    ),
    Mutation(
        "follow_umask leaves modes as they are",
        "catalog/paths.py",
        "    umask = current_umask()\n    for root, _, files in os.walk(tree):\n",
        "    umask = current_umask()\n    for root, _, files in []:\n",
        (Select("tests/test_name_claims.py", "umask"),),
    ),
    Mutation(
        "writing() passes errors through, not as one line",
        "catalog/paths.py",
        "    try:\n        yield\n    except FileExistsError:",
        "    yield\n    return\n    try:\n        yield\n    except FileExistsError:",
        (Select("tests/test_disk_full.py"),),
    ),
    Mutation(
        "a TXT2IMG_HOME that is a file is taken as a folder",
        "catalog/paths.py",
        '        return require_folder(Path(configured).expanduser(), "TXT2IMG_HOME")\n',
        "        return Path(configured).expanduser()\n",
        (Select("tests/test_home_and_outputs.py", "home_that_is_a_file_is_one_line and validate"),),
    ),
    Mutation(
        "the server's catalog views fail on one bad user catalog file",
        "catalog/index.py",
        "        return load_index(user_dir), []\n    except CatalogError:\n",
        "        return load_index(user_dir), []\n    except ZeroDivisionError:\n",
        (Select("tests/test_playground_home.py", "runs_read_no_report"),),
    ),
    Mutation(
        "checkpoint family detection ignores SDXL's keys",
        "catalog/checkpoint_files.py",
        "    if any(name.startswith(SDXL_PREFIX) for name in names):\n",
        "    if False:\n",
        (Select("tests/test_catalog_add.py", "header_alone"),),
    ),
    Mutation(
        "catalog add reads a pickled checkpoint",
        "catalog/checkpoint_files.py",
        "    if path.suffix.lower() in PICKLE_SUFFIXES or start.startswith(PICKLE_MAGIC):\n",
        "    if False:\n",
        (Select("tests/test_catalog_add.py", "pickled"),),
    ),
    # --- serving: the playground ------------------------------------------------------------------
    Mutation(
        "the runs view reads reports through links leading out of home",
        "serving/playground.py",
        'report = json.loads(run_file(home, f"{folder}/metrics.json").read_text(encoding="utf-8"))',
        'report = json.loads((home / folder / "metrics.json").read_text(encoding="utf-8"))',
        (Select("tests/test_playground_home.py", "runs_read_no_report"),),
    ),
    Mutation(
        "a run file link is served whatever type it leads to",
        "serving/playground.py",
        "    if RUN_FILE_TYPES.get(path.suffix.lower()) != RUN_FILE_TYPES[Path(relative).suffix.lower()]:\n",
        "    if False:\n",
        (Select("tests/test_playground_home.py", "run_file_refuses"),),
    ),
    # --- the generate command ---------------------------------------------------------------------
    Mutation(
        "generate makes every image in one pipeline call",
        "txt2img/cli/generate.py",
        "    batch_size = settings.max_batch_size",
        "    batch_size = len(seeds)",
        (Select("tests/test_generate.py", "max_batch_size_at_a_time"),),
    ),
    Mutation(
        "generate ignores the server's limits",
        "txt2img/cli/generate.py",
        "    if limits:\n        _check_server_limits(",
        "    if False:\n        _check_server_limits(",
        (Select("tests/test_generate.py", "servers_limits_hold and args1"),),
    ),
    Mutation(
        "generate writes under a file it was not told about",
        "txt2img/cli/generate.py",
        '    require_folder(output.parent, "output folder")\n',
        "",
        (Select("tests/test_home_and_outputs.py", "writing_under_a_file and generate"),),
    ),
    # --- serving: the manager ---------------------------------------------------------------------
    Mutation(
        "manager ignores its byte budget",
        "serving/manager.py",
        "or (self.memory_budget is not None and self.resident_bytes() + incoming > self.memory_budget)",
        "or False",
        (Select("tests/test_serving_manager.py", "budget"),),
    ),
    Mutation(
        "manager evicts first in, first out (not LRU)",
        "serving/manager.py",
        "                self._bases.move_to_end(entry.id)\n",
        "",
        (Select("tests/test_serving_manager.py", "least_recently_used"),),
    ),
    Mutation(
        "manager makes room after the new model is on the device",
        "serving/manager.py",
        "        self._make_room(nbytes)\n"
        "        attention = optimize_for_device(pipeline, self.device, self.settings)\n",
        "        attention = optimize_for_device(pipeline, self.device, self.settings)\n"
        "        self._make_room(nbytes)\n",
        (Select("tests/test_serving_manager.py", "budget"),),
    ),
    Mutation(
        "a request's LoRA scales are ignored (every adapter at 1.0)",
        "serving/manager.py",
        "[base.adapters[lora_id].name for lora_id, _ in adapters], [scale for _, scale in adapters]",
        "[base.adapters[lora_id].name for lora_id, _ in adapters], [1.0 for _ in adapters]",
        (Select("tests/test_lora_composition.py", "diffusers_set_adapters"),),
    ),
    Mutation(
        "an evicted LoRA adapter stays loaded (no delete_adapters)",
        "serving/manager.py",
        "            base.pipeline.delete_adapters(adapter.name)\n",
        "",
        (Select("tests/test_lora_composition.py", "cycling"),),
    ),
    # --- serving: the queue -----------------------------------------------------------------------
    Mutation(
        "batcher never combines requests",
        "serving/generation_queue.py",
        "fits = images + len(job.seeds) <= self.settings.max_batch_size",
        "fits = False",
        (Select("tests/test_serving.py", "batched"),),
    ),
    Mutation(
        "batched images handed to the wrong requests",
        "serving/generation_queue.py",
        "GenerationResult(images[offset : offset + count], job.seeds, len(images), job_flags, job)",
        "GenerationResult(images[::-1][offset : offset + count], job.seeds, len(images), job_flags, job)",
        (Select("tests/test_serving.py", "batched"),),
    ),
    Mutation(
        "a failed batch fails every request in it",
        "serving/generation_queue.py",
        "            if len(batch) > 1 and not isinstance(error, ModelLoadError):",
        "            if False:",
        (Select("tests/test_front_door.py", "failed_batch"),),
    ),
    Mutation(
        "a model that failed to warm up stops the queue",
        "serving/generation_queue.py",
        "                self._failed_loads[warm_model] = (self.warm_up_error, time.monotonic())\n"
        "        else:\n            self.ready.set()\n",
        "                return\n        else:\n            self.ready.set()\n",
        (Select("tests/test_faults.py", "cannot_warm"),),
    ),
    Mutation(
        "adapters leaking across a batch (a mixed batch weighs every image as its first)",
        "serving/mixed_loras.py",
        "    return weights.repeat(batch // images, 1)\n",
        "    return weights[:1].repeat(batch, 1)\n",
        (Select("tests/test_lora_composition.py", "mixed_batch"), Select("tests/test_lora_serving.py", "together")),
    ),
    Mutation(
        "a LoRA with text-encoder layers mixes with other sets in one pipeline call",
        "serving/manager.py",
        "        return (runs_on.id, adapters if exclusive else None)\n",
        "        return (runs_on.id, None)\n",
        (Select("tests/test_lora_composition.py", "share_a_batch"),),
    ),
    # --- serving: prompt syntax and the prompt cache ------------------------------------------------
    Mutation(
        "the prompt cache ignores the text encoder's LoRA adapters",
        "serving/prompts.py",
        "        return tuple((number, adapter_state(encoder)) for number, encoder in zip(numbers, encoders))\n",
        "        return tuple((number, ()) for number, encoder in zip(numbers, encoders))\n",
        (Select("tests/test_prompt_syntax.py", "adapter"),),
    ),
    Mutation(
        "the prompt cache key names the first text encoder only (SDXL's and Flux's second is left out)",
        "serving/prompts.py",
        '    names = sorted(name for name in components if name.startswith("text_encoder"))\n',
        '    names = ["text_encoder"]\n',
        (Select("tests/test_prompt_syntax.py", "second_text_encoder"),),
    ),
    Mutation(
        "the prompt cache key ignores the prompt syntax",
        "serving/prompts.py",
        "        key = (model_key, syntax, text) if cache is not None else None\n",
        "        key = (model_key, text) if cache is not None else None\n",
        (Select("tests/test_prompt_syntax.py", "syntaxes_apart"),),
    ),
    # --- serving: per-request LoRAs on every protocol (issue #23) -----------------------------------
    Mutation(
        "A1111's <lora:NAME:SCALE> tags are left in the prompt text",
        "serving/a1111.py",
        '        return ""\n\n    return EXTRA_NETWORK_TAG.sub(take, prompt), tags\n',
        "        return match[0]\n\n    return EXTRA_NETWORK_TAG.sub(take, prompt), tags\n",
        (
            Select("tests/test_protocol_adapters.py", "lora_tags_leave"),
            Select("tests/test_protocols.py", "lora_tags_leave"),
        ),
    ),
    Mutation(
        "the OpenAI route drops the loras of its extra body",
        "serving/openai_images.py",
        '        "loras": request.loras,\n',
        "",
        (
            Select("tests/test_protocol_adapters.py", "every_route_takes_loras"),
            Select("tests/test_protocols.py", "extra_body_applies"),
        ),
    ),
    # --- serving: the front door (one body reader, one type policy, one set of limits) ------------
    Mutation(
        "the body reader lets a lone surrogate through",
        "serving/json_body.py",
        "        elif isinstance(item, str):\n            _check_text(item, path, what)\n",
        "        elif isinstance(item, str):\n            pass\n",
        (Select("tests/test_front_door.py", "surrogate and (invocations or openai or a1111)"),),
    ),
    Mutation(
        "request types coerced, not strict",
        "serving/schema.py",
        '    model_config = ConfigDict(extra="forbid", strict=True)\n\n    model: Text | None',
        '    model_config = ConfigDict(extra="forbid")\n\n    model: Text | None',
        (Select("tests/test_front_door.py", "strict"),),
    ),
    Mutation(
        "seeds past 2**63 accepted",
        "serving/schema.py",
        "        if self.seed is not None and self.seed + self.num_images > SEED_END:",
        "        if False:",
        (Select("tests/test_front_door.py", "2_63"),),
    ),
    Mutation(
        "random seeds drawn below 2**63",
        "serving/schema.py",
        "random.randrange(RANDOM_SEED_END)",
        "random.randrange(SEED_END - self.num_images)",
        (Select("tests/test_front_door.py", "given_back"),),
    ),
    Mutation(
        "no work limit",
        "serving/schema.py",
        '        ("work", settings.max_work, work(width, height, request.num_inference_steps, request.num_images)),\n',
        "",
        (Select("tests/test_front_door.py", "work_past"),),
    ),
    Mutation(
        "an invocation's work counted per prompt only",
        "serving/engine.py",
        "        if total_work > self.settings.max_work:",
        "        if False:",
        (Select("tests/test_front_door.py", "every_prompt"),),
    ),
    # --- serving: the JumpStart wire format -------------------------------------------------------
    Mutation(
        "';verbose' answered as JPEG",
        "serving/invocations.py",
        '            if "jpeg" in flags:\n                return JPEG_ACCEPT\n',
        "            if flags:\n                return JPEG_ACCEPT\n",
        (Select("tests/test_serving.py", "jumpstart_json_accept"),),
    ),
    Mutation(
        "/invocations drops negative_prompt",
        "serving/invocation_requests.py",
        '            "negative_prompt": first.negative_prompt,\n',
        '            "negative_prompt": None,\n',
        (Select("tests/test_invocations_parity.py", "guidance_change_the_image and local"),),
    ),
    Mutation(
        "/invocations gives every prompt the same seed",
        "serving/invocation_requests.py",
        '            "seed": first.seed,\n',
        '            "seed": invocation.wanted_images()[0].seed,\n',
        (Select("tests/test_invocations_parity.py", "own_seed and local"),),
    ),
    Mutation(
        "/invocations limits images per prompt, not per request",
        "serving/invocation_requests.py",
        "    if invocation.image_count > settings.max_images:\n"
        '        raise LimitExceeded("images", settings.max_images, invocation.image_count)\n',
        "    if invocation.num_images_per_prompt > settings.max_images:\n"
        '        raise LimitExceeded("images", settings.max_images, invocation.num_images_per_prompt)\n',
        (Select("tests/test_invocations_parity.py", "limits_count_every_image"),),
    ),
    Mutation(
        "packed inference.py drops negative prompts",
        "jumpstart/inference_script.py",
        "                negative_prompt=negatives if any(negatives) else None,\n",
        "                negative_prompt=None,\n",
        (Select("tests/test_invocations_parity.py", "guidance_change_the_image and packed"),),
    ),
    Mutation(
        "the wire format drops negative prompts (both servers)",
        "serving/invocations.py",
        "WantedImage(prompt, negative, first + k)",
        "WantedImage(prompt, None, first + k)",
        (Select("tests/test_invocations_parity.py", "guidance_change_the_image and packed"),),
    ),
    # --- serving: the HTTP service ----------------------------------------------------------------
    Mutation(
        "OpenAPI keeps JSON Schema's null branches",
        "serving/openapi.py",
        '    if NULL in node.get("anyOf", []):  # pydantic\'s Optional[X]\n',
        "    if False:\n",
        (Select("tests/test_serving_openapi.py"),),
    ),
    Mutation(
        "OpenAPI keeps numeric exclusive bounds",
        "serving/openapi.py",
        "            node[exclusive] = True\n",
        "            pass\n",
        (Select("tests/test_serving_openapi.py"),),
    ),
    Mutation(
        "refused requests logged with their traceback",
        "serving/http_errors.py",
        "        error = record.exc_info[1] if record.exc_info else None\n",
        "        error = None\n",
        (Select("tests/test_serving_openapi.py", "one_info_line"),),
    ),
    Mutation(
        "the refusal logger is not the one BentoML logs refusals on",
        "serving/bentoml_compat.py",
        'REFUSAL_LOGGER_NAME = "bentoml._internal.server.http_app"\n',
        'REFUSAL_LOGGER_NAME = "bentoml._internal.server.base_app"\n',
        (Select("tests/test_bentoml_compat.py", "refusal_logger"),),
    ),
    # --- SageMaker deploy -------------------------------------------------------------------------
    Mutation(
        "deploy never calls create_endpoint",
        "jumpstart/deploy.py",
        "            sagemaker.create_endpoint(EndpointName=plan.endpoint_name, "
        "EndpointConfigName=plan.endpoint_name)\n",
        "            pass\n",
        (Select("tests/test_sagemaker_deploy.py", "uses_jumpstart_container"),),
    ),
    Mutation(
        "a failed deploy leaves its model behind",
        "jumpstart/deploy.py",
        'models=(created["model"],) if "model" in created else ()',
        "models=()",
        (Select("tests/test_sagemaker_deploy.py", "failed_endpoint_creation"),),
    ),
    # --- contracts of scale-out, auth and limits ------------------------------------------------
    Mutation(
        "a wrong bearer token is let through",
        "serving/guard.py",
        "if sent is None or not hmac.compare_digest(sent, self.token):",
        "if sent is None:",
        (Select("tests/test_serving_guard.py", "wrong_token"),),
    ),
    Mutation(
        "a chunked body is never counted against the limit",
        "serving/guard.py",
        'received += len(message.get("body", b""))',
        "received += 0",
        (Select("tests/test_serving_guard.py", "chunked"),),
    ),
    Mutation(
        "any Host is answered without a token (DNS rebinding)",
        "serving/guard.py",
        "if not (is_loopback(host_name(host)) or self.allows(host_name(host))):",
        "if False:",
        (Select("tests/test_browser_safety.py", "host_that_is_not_loopback"),),
    ),
    Mutation(
        "any Origin is answered without a token",
        "serving/guard.py",
        "if origin is not None and not self.origin_allowed(scope, origin, host):",
        "if False:",
        (Select("tests/test_browser_safety.py", "origin"),),
    ),
    Mutation(
        "a body of any content type is read",
        "serving/guard.py",
        "        if problem is not None:\n            await send_json(send, 415,",
        "        if False:\n            await send_json(send, 415,",
        (Select("tests/test_browser_safety.py", "415"),),
    ),
    Mutation(
        "the playground and served images lose their Content-Security-Policy",
        "serving/guard.py",
        '            (b"content-security-policy", policy.encode()),\n',
        "",
        (Select("tests/test_browser_safety.py", "security_headers"),),
    ),
    Mutation(
        "the playground draws random seeds below 2**63, past what a JavaScript number holds exactly",
        "serving/playground/playground.js",
        "const RANDOM_SEEDS = 2 ** 32;",
        "const RANDOM_SEEDS = 2 ** 63;",
        (Select("tests/test_browser_safety.py", "reuse_this_seed"),),
    ),
    Mutation(
        "the Fine-tune view draws its loss curve only once the run is over",
        "serving/playground/finetune.js",
        '  drawLossCurve($("#ft-curve"), job.curve || []);',
        '  drawLossCurve($("#ft-curve"), running ? [] : job.curve || []);',
        (Select("tests/test_playground_finetune.py"),),
    ),
    Mutation(
        "every serving worker takes the first GPU",
        "serving/device.py",
        "gpu = 0 if worker_index is None else (worker_index - 1) % torch.cuda.device_count()",
        "gpu = 0",
        (Select("tests/test_serving_workers.py", "own_gpu"),),
    ),
    Mutation(
        "training ranks outlive their launcher",
        "training/distributed.py",
        '    die_with_parent(job.get("launcher_pid") or os.getppid())\n',
        "",
        (Select("tests/test_distributed_training.py", "ranks_die"),),
    ),
    Mutation(
        "a server's workers outlive it",
        "serving/worker_lifetime.py",
        "    if bentoml.server_context.worker_index is None:\n",
        "    if True:\n",
        (Select("tests/test_worker_lifetime.py", "sigkilled"),),
    ),
    Mutation(
        "fetching an image link scans the whole image folder",
        "serving/image_files.py",
        "        if not _IMAGE_NAME.fullmatch(name):\n            return None\n        try:",
        "        self.sweep()\n        if not _IMAGE_NAME.fullmatch(name):\n            return None\n        try:",
        (Select("tests/test_worker_lifetime.py", "only_their_own_file"),),
    ),
    Mutation(
        "a new server removes image folders that live workers use",
        "serving/image_files.py",
        "            remove_if_unused(folder)\n",
        "            shutil.rmtree(folder, ignore_errors=True)\n",
        (Select("tests/test_worker_lifetime.py", "new_server"),),
    ),
    Mutation(
        "a connection that never finishes its request head stays open",
        "serving/slow_clients.py",
        '    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:{HeaderTimeoutProtocol.__name__}"\n',
        "    pass\n",
        (Select("tests/test_worker_lifetime.py", "never_finishes_its_head"),),
    ),
    Mutation(
        "the batch-size histogram observes nothing",
        "serving/generation_queue.py",
        "            self.metrics.batch_images.observe(len(images))\n",
        "            pass\n",
        (Select("tests/test_serving.py", "metrics_count"),),
    ),
    Mutation(
        "every training process saves and registers the model",
        "training/dreambooth.py",
        "    if not run.accelerator.is_main_process:\n        return entry\n    atomic_write_text(request.output_dir",
        "    atomic_write_text(request.output_dir",
        (Select("tests/test_distributed_training.py", "register_one_entry"),),
    ),
    Mutation(
        "the last training process registers the model, not rank 0",
        "training/dreambooth.py",
        "    if not run.accelerator.is_main_process:\n        return entry\n",
        "    if run.accelerator.process_index != run.accelerator.num_processes - 1:\n        return entry\n",
        (Select("tests/test_distributed_training.py", "only_rank_0_registers"),),
    ),
    Mutation(
        "gradients never synchronised across processes (no_sync everywhere)",
        "training/dreambooth.py",
        "        with accelerator.accumulate(*run.models.values()):\n",
        "        with accelerator.no_sync(unet):\n",
        (Select("tests/test_distributed_training.py", "same_weights"),),
    ),
    Mutation(
        "sharding=fsdp silently trains plain DDP on the CPU",
        "training/dreambooth.py",
        "    if plugin is not None and accelerator.num_processes > 1:\n        shard_on_cpu(accelerator, plugin)\n",
        "",
        (Select("tests/test_distributed_training.py", "halves_the_state"),),
    ),
    Mutation(
        "a SageMaker run of our trainer leaves no inference code",
        "training/servable.py",
        "    shutil.copytree(inference_code, output_dir / SERVING_CODE_DIR)\n",
        "",
        (Select("tests/test_sagemaker_trainer_job.py", "packed_source_alone"),),
    ),
    Mutation(
        "a remote tuning job's training jobs never evaluate their model",
        "jumpstart/sagemaker_entry.py",
        '        "evaluation": _decoded(given.get(EVALUATION_KEY)),\n',
        '        "evaluation": None,\n',
        (Select("tests/test_sagemaker_trainer_job.py", "prints_the_metrics"),),
    ),
    Mutation(
        "a remote tuning job minimises an objective that should grow",
        "jumpstart/remote.py",
        '                "Type": METRIC_DIRECTIONS[self.objective].capitalize(),\n',
        '                "Type": "Minimize",\n',
        (Select("tests/test_sagemaker_trainer_job.py", "evaluates_each_job"),),
    ),
    Mutation(
        "a training job ignores its trainer's metric definitions",
        "jumpstart/remote.py",
        "            **_job_definition(setup, setup.trainer.training_metric_definitions),\n",
        "            **_job_definition(setup, []),\n",
        (Select("tests/test_sagemaker_remote.py", "third_trainer_is_one_entry"),),
    ),
    Mutation(
        "the service ignores guidance_scale",
        "serving/generation_queue.py",
        "                guidance_scale=head.request.guidance_scale,",
        "                guidance_scale=7.5,",
        (Select("tests/test_serving.py", "generation_field_changes"),),
    ),
    Mutation(
        "every pipeline class is given requires_safety_checker, Flux's and SDXL's included",
        "serving/generation.py",
        "    if family is not None and family.safety_checker:\n",
        "    if True:\n",
        (Select("tests/test_families.py", "stand_in_of_its_pipeline_class"),),
    ),
    Mutation(
        "every model gets Stable Diffusion 1's defaults, whatever its family",
        "serving/schema.py",
        '    defaults = {"model": entry.id, **families.model_defaults(entry.family, entry.resolution)}\n',
        '    defaults = {"model": entry.id, **families.model_defaults("sd1", entry.resolution)}\n',
        (Select("tests/test_families.py", "resolves_to_schnell_defaults"),),
    ),
    Mutation(
        "a scheduler its family cannot use is let through",
        "serving/schema.py",
        "    if request.scheduler is not None and request.scheduler not in family.schedulers:\n",
        "    if False:\n",
        (Select("tests/test_families.py", "cannot_use_is_refused"),),
    ),
    Mutation(
        "the lcm sampler runs another scheduler",
        "catalog/families.py",
        '    "lcm": "LCMScheduler",\n',
        '    "lcm": "DDIMScheduler",\n',
        (Select("tests/test_lora_fast.py", "own_few_step_schedulers"),),
    ),
    Mutation(
        "activating LoRAs on a compiled pipeline switches adapters with set_adapters (a recompile)",
        "serving/lora_hotswap.py",
        "            self._swap_in(index, wanted[content], content.scale)\n",
        "            self._swap_in(index, wanted[content], content.scale)\n"
        "        self.pipeline.unet.set_adapters(list(self.names))\n",
        (Select("tests/test_lora_fast.py", "never_recompiles"),),
    ),
    Mutation(
        "a LoRA's scale is ignored in a compiled pipeline's slots",
        "serving/lora_hotswap.py",
        "            module.scaling[name].mul_(scale)\n",
        "            module.scaling[name].mul_(1.0)\n",
        (Select("tests/test_lora_fast.py", "diffusers_own_adapters"),),
    ),
    Mutation(
        "an image's recipe omits its seed (records 0)",
        "serving/recipes.py",
        "        seed=seed,\n",
        "        seed=0,\n",
        (Select("tests/test_recipes.py", "generate_from_an_image_makes_the_same_bytes"),),
    ),
    Mutation(
        "a LoRA file's keys that match no module of its base are ignored",
        "catalog/lora_files.py",
        "    if unmatched:\n",
        "    if False:\n",
        (Select("tests/test_lora_files.py", "match_no_module"),),
    ),
    Mutation(
        "a job is claimed twice: the claim takes a running job again",
        "serving/jobs.py",
        "WHERE status = 'queued' AND kind = ?{local} ORDER BY created LIMIT 1\"\n"
        "            f\"{self.database.dialect.skip_locked}) AND status = 'queued'{limit} RETURNING *\"",
        "WHERE status != 'failed' AND kind = ?{local} ORDER BY created LIMIT 1\"\n"
        '            f"{self.database.dialect.skip_locked}){limit} RETURNING *"',
        (Select("tests/test_jobs_store.py", "claimed_once"),),
    ),
    Mutation(
        "on PostgreSQL a job is claimed twice: claimers at once neither skip locked rows nor check the status",
        "serving/jobs.py",
        """            f"{self.database.dialect.skip_locked}) AND status = 'queued'{limit} RETURNING *",
""",
        """            f"){limit} RETURNING *",
""",
        (Select("tests/test_jobs_store.py", "claimed_once and postgresql"),),
    ),
    Mutation(
        "the packed SageMaker endpoint's images carry no recipe",
        "jumpstart/inference_script.py",
        "        return render_response(invocation, images, accept_type, nsfw_content_detected, recipes)\n",
        "        return render_response(invocation, images, accept_type, nsfw_content_detected)\n",
        (Select("tests/test_invocations_parity.py", "carry_the_recipe"),),
    ),
    Mutation(
        "a webhook is not signed",
        "serving/webhooks.py",
        '        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature(secret, delivery.body)}\n',
        '        headers = {"Content-Type": "application/json"}\n',
        (Select("tests/test_jobs.py", "signed_and_retried"),),
    ),
    Mutation(
        "a job's seed is redrawn when it runs again after a restart",
        "serving/jobs_api.py",
        '    fixed = generation.model_copy(update={"seed": queued.seeds[0]})',
        "    fixed = generation",
        (Select("tests/test_jobs_restart.py"),),
    ),
]


def check_snippets(root: Path, mutations: list[Mutation]) -> list[str]:
    """Problems with the list itself: a snippet not in its file exactly once, a test file missing."""
    problems = []
    for mutation in mutations:
        path = root / mutation.file
        if not path.is_file():
            problems.append(f"{mutation.name}: {mutation.file} does not exist")
            continue
        count = path.read_text(encoding="utf-8").count(mutation.original)
        if count != 1:
            where = "not found" if count == 0 else f"found {count} times"
            problems.append(f"{mutation.name}: its original snippet is {where} in {mutation.file}")
        if mutation.original == mutation.replacement:
            problems.append(f"{mutation.name}: the replacement is the original")
        problems += [
            f"{mutation.name}: test file {select.file} does not exist"
            for select in mutation.tests
            if not (root / select.file).is_file()
        ]
    return problems


def copy_tree(destination: Path) -> None:
    """The working tree as git sees it: tracked files and untracked ones that are not ignored.

    Outside a git checkout (an unpacked archive), everything but virtual environments and caches.
    """
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True
    )
    if listing.returncode or not (REPO_ROOT / ".git").exists():
        skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "*.pyc")
        shutil.copytree(REPO_ROOT, destination, ignore=skip, dirs_exist_ok=True)
        return
    listed = listing.stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO_ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is left out
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


@dataclass
class Run:
    returncode: int | None  # None: timed out
    seconds: float
    summary: str
    output: str


class RunningTests:
    """The pytest runs under way, so that an interrupted script stops every one of them, not only its own."""

    def __init__(self) -> None:
        self._processes: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def add(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.add(process)

    def remove(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.discard(process)

    def kill_all(self) -> None:
        with self._lock:
            for process in self._processes:
                kill_session(process)


RUNNING = RunningTests()


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL pytest, its session and every process below it: a ``bentoml serve`` the tests started leads
    a session of its own, so killing pytest's session alone leaves it serving from a deleted copy."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for descendant in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            descendant.kill()


def run_pytest(root: Path, arguments: list[str], timeout_s: float, stop_at_first: bool) -> Run:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        # No stale bytecode: a mutated file and its restored original can share size and mtime.
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *arguments]
    if stop_at_first:
        command.append("-x")
    started = time.monotonic()
    # Its own session, so a timeout stops the tests' subprocesses (bentoml serve, training) too.
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    RUNNING.add(process)
    try:
        output, _ = process.communicate(timeout=timeout_s)
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        kill_session(process)
        output, _ = process.communicate()
        returncode = None
    except BaseException:  # Ctrl-C or SIGTERM: the tests go too, not only this script
        kill_session(process)
        raise
    finally:
        RUNNING.remove(process)
    lines = [line for line in output.splitlines() if line.strip()]
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ \w+ in [\d.]+s", line)), "")
    return Run(returncode, time.monotonic() - started, summary, output)


def verdict(run: Run) -> str:
    """caught, survived, timeout or error, from pytest's exit status."""
    if run.returncode is None:
        return "timeout"
    if run.returncode in (1, 2):  # tests failed, or the mutated code broke collection
        return "caught"
    if run.returncode == 0:
        return "survived"
    return "error"  # 3 internal error, 4 usage error, 5 no test selected


def default_jobs() -> int:
    """One run per CPU this process may use, at most MAX_DEFAULT_JOBS."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_DEFAULT_JOBS))


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a whole number of at least 1: {text!r}")
    return int(text)


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="names", action="append", default=[], help="mutations whose name holds this")
    parser.add_argument("--list", action="store_true", help="print the mutations and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unchanged tests")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds for one mutation's tests")
    parser.add_argument("--baseline-timeout", type=float, default=BASELINE_TIMEOUT_S, help="seconds for the baseline")
    parser.add_argument("--jobs", type=positive_int, default=default_jobs(), help="mutations run at once")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies and print where they are")
    parser.add_argument("--output", action="store_true", help="print the end of each mutation's pytest output")
    return parser.parse_args(argv)


def baseline_passes(root: Path, mutations: list[Mutation], timeout: float) -> bool:
    """Run every selected test on the unchanged copy; False (with the output on stderr) when any fails."""
    selections = [select for mutation in mutations for select in mutation.tests]
    print(f"baseline: the selected tests on the unchanged copy in {root} ...", flush=True)
    baseline = run_pytest(root, pytest_arguments(selections), timeout, stop_at_first=False)
    print(f"baseline: {baseline.summary or 'no summary'} ({baseline.seconds:.0f} s)", flush=True)
    if baseline.returncode == 0:
        return True
    if baseline.returncode is None:
        print(f"the baseline timed out after {timeout:.0f} s", file=sys.stderr)
    print(baseline.output[-6000:], file=sys.stderr)
    print("the unchanged tests do not pass, so no mutation result would mean anything", file=sys.stderr)
    return False


def run_mutation(root: Path, mutation: Mutation, options: argparse.Namespace, width: int) -> tuple[str, str]:
    """Apply ``mutation`` to the copy, run its tests, put the file back; returns its verdict and its row."""
    path = root / mutation.file
    original = path.read_text(encoding="utf-8")
    path.write_text(original.replace(mutation.original, mutation.replacement, 1), encoding="utf-8")
    try:
        run = run_pytest(root, pytest_arguments(list(mutation.tests)), options.timeout, stop_at_first=True)
    finally:
        path.write_text(original, encoding="utf-8")
    result = verdict(run)
    detail = run.summary or (f"timed out after {options.timeout:.0f} s" if run.returncode is None else "")
    if result == "error":
        detail += f" [pytest exit status {run.returncode}: the selection is broken]"
    row = f"{mutation.name:<{width}}  {result:<8}  {run.seconds:5.0f}s  {detail}"
    if options.output:
        row += "".join(f"\n    {line}" for line in run.output.splitlines()[-40:])
    return result, row


def run_mutations(copies: list[Path], mutations: list[Mutation], options: argparse.Namespace, width: int) -> dict:
    """Every mutation, one per copy of the tree at a time; prints each row in the list's order; the tally."""
    free_copies: queue.SimpleQueue[Path] = queue.SimpleQueue()
    for copy in copies:
        free_copies.put(copy)

    def on_a_free_copy(mutation: Mutation) -> tuple[str, str]:
        root = free_copies.get()
        try:
            return run_mutation(root, mutation, options, width)
        finally:
            free_copies.put(root)

    results: dict[str, int] = {"caught": 0, "survived": 0, "timeout": 0, "error": 0}
    pool = ThreadPoolExecutor(max_workers=len(copies))
    try:
        for result, row in pool.map(on_a_free_copy, mutations):  # map answers in the order it was given
            print(row, flush=True)
            results[result] += 1
    except BaseException:  # Ctrl-C or SIGTERM: no further run starts, and the running ones stop now
        pool.shutdown(wait=False, cancel_futures=True)
        RUNNING.kill_all()
        raise
    pool.shutdown()
    return results


def report_results(results: dict[str, int], seconds: float) -> int:
    """Print the tally; the exit status: 2 on a broken selection, 1 when any survived or timed out, else 0."""
    line = f"{results['caught']} caught, {results['survived']} survived"
    for other in ("timeout", "error"):
        if results[other]:
            line += f", {results[other]} {'timed out' if other == 'timeout' else 'errors'}"
    print(f"{line} ({seconds / 60:.1f} min in all)")
    if results["error"]:
        return 2
    return 1 if results["survived"] or results["timeout"] else 0


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the copy and the running tests are cleaned up

    mutations = [m for m in MUTATIONS if not options.names or any(n in m.name for n in options.names)]
    if not mutations:
        print(f"no mutation's name holds any of {options.names}", file=sys.stderr)
        return 2
    problems = check_snippets(REPO_ROOT, MUTATIONS)
    if problems:
        print("the mutation list no longer fits the code:", *problems, sep="\n  ", file=sys.stderr)
        return 2
    width = max(len(m.name) for m in mutations)
    if options.list:
        for mutation in mutations:
            print(f"{mutation.name:<{width}}  {mutation.file}  ->  {' '.join(pytest_arguments(list(mutation.tests)))}")
        return 0

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="txt2img-mutate-"))
    copies = [workdir / f"tree-{number}" for number in range(min(options.jobs, len(mutations)))]
    try:
        for copy in copies:
            copy_tree(copy)
        if not options.no_baseline and not baseline_passes(copies[0], mutations, options.baseline_timeout):
            return 2
        print(f"{'mutation':<{width}}  {'result':<8}  {'time':>6}  tests  ({len(copies)} at a time)")
        results = run_mutations(copies, mutations, options, width)
        return report_results(results, time.monotonic() - started)
    finally:
        if options.keep:
            print(f"the copies are kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
