"""Evaluation metrics: the math, the DreamBooth prompts, and `txt2img evaluate` end to end on tiny-sd."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny_metric_networks import (
    TINY_DINO_MEAN,
    TINY_DINO_STD,
    TINY_IMAGE_SIZE,
    tiny_clip_folder,
    tiny_dino_folder,
    tiny_inception,
)

from training.evaluation import (
    EvaluationSettings,
    dreambooth_prompts,
    evaluate_model,
    metric_lines,
    subject_phrase,
)
from training.metrics import (
    ClipFeatures,
    DinoFeatures,
    InceptionFeatures,
    MetricWeights,
    MissingWeights,
    frechet_distance,
    mean_matched_cosine,
    mean_pairwise_cosine,
)
from txt2img.cli import app

SAGEMAKER_FID_REGEX = r"fid_score=([-+]?\d\.?\d*)"


pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_local_metric_weights")


def write_dataset(directory: Path, count: int = 3) -> Path:
    """JumpStart's layout: a few 64 px photos and dataset_info.json."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for index in range(count):
        pixels = np.full((64, 64, 3), 120, dtype=np.uint8)
        pixels[16:48, 8 + 4 * index : 40 + 4 * index] = rng.integers(150, 255, size=3)
        Image.fromarray(pixels).save(directory / f"{index}.png")
    info = {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"}
    (directory / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return directory


# --- the math ---------------------------------------------------------------------------------


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(4000, 3)) * np.array([1.0, 2.0, 0.5])
    b = rng.normal(1.0, 1.0, size=(4000, 3)) * np.array([3.0, 1.0, 0.5])
    var_a, var_b = a.var(axis=0, ddof=1), b.var(axis=0, ddof=1)
    mean_gap = ((a.mean(axis=0) - b.mean(axis=0)) ** 2).sum()
    # With (near-)diagonal covariances the trace term is sum((sqrt(var_a) - sqrt(var_b))^2).
    expected = mean_gap + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def reference_frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID as pytorch-fid computes it (scipy's matrix square root of S_a S_b): an independent check."""
    import warnings

    from scipy import linalg

    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    with warnings.catch_warnings():
        # A handful of images gives singular covariances; scipy warns, and still finds the root.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covariance_mean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covariance_mean))


def test_frechet_distance_of_correlated_and_anti_correlated_features():
    # Same variances, opposite correlation: a diagonal-covariance shortcut calls these identical.
    rng = np.random.default_rng(2)
    correlated = rng.multivariate_normal([0.0, 0.0], [[1.0, 0.98], [0.98, 1.0]], size=4000)
    anti_correlated = rng.multivariate_normal([0.0, 0.0], [[1.0, -0.98], [-0.98, 1.0]], size=4000)
    # Population value: the covariances share eigenvectors with eigenvalues 1.98 and 0.02 swapped,
    # so the distance is 4 - 4 * sqrt(1 - 0.98^2), about 3.2.
    assert frechet_distance(correlated, anti_correlated) == pytest.approx(4 - 4 * np.sqrt(1 - 0.98**2), rel=0.05)
    assert frechet_distance(correlated, anti_correlated) == pytest.approx(
        reference_frechet_distance(correlated, anti_correlated), rel=1e-6
    )


def test_frechet_distance_works_with_fewer_images_than_feature_dimensions():
    rng = np.random.default_rng(1)
    few = rng.normal(size=(4, 64))  # DreamBooth: a handful of photos, a 2048-d feature space
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(few, few + 1.0) == pytest.approx(64.0, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(few[:1], few)


def test_cosine_similarities():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[3.0, 0.0]])
    assert mean_pairwise_cosine(a, b) == pytest.approx(0.5)
    assert mean_matched_cosine(a, np.array([[2.0, 0.0], [0.0, -1.0]])) == pytest.approx(0.0)


# --- preprocessing -----------------------------------------------------------------------------

# OpenAI CLIP's normalisation, which the tiny CLIP's processor keeps.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def hand_written_pixels(images: list[Image.Image], size: int, mean, std):
    """The preprocessing the metrics used before transformers' processors: short side to ``size``
    (bicubic), centre crop, scale to [0, 1], normalise. The reference the processors must match."""
    import torch

    arrays = []
    for image in images:
        image = image.convert("RGB")
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean) / std


def varied_images(size: tuple[int, int], seed: int) -> list[Image.Image]:
    """Noise in the modes photos come in: RGB, greyscale and RGBA."""
    rng = np.random.default_rng(seed)
    width, height = size
    return [
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, size=(height, width), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)),
    ]


@pytest.mark.parametrize("size", [(64, 64), (80, 48), (48, 96), (37, 100)])
def test_clip_and_dino_scores_match_the_hand_written_preprocessing(tmp_path, size):
    """The same images give the same CLIP and DINO embeddings, and so the same clip_i and dino scores,
    as the resize, crop and normalisation these metrics were first computed with. (For sizes whose
    scaled long side truncates and rounds alike: transformers truncates where that code rounded.)"""
    import torch

    clip = ClipFeatures.from_path(str(tiny_clip_folder(tmp_path / "clip")))
    dino = DinoFeatures.from_path(str(tiny_dino_folder(tmp_path / "dino")))
    # transformers' default (fast) processors need torchvision, which cannot import beside our torch.
    assert clip.processor.backend == dino.processor.backend == "pil"
    generated, real = varied_images(size, seed=3), varied_images((64, 64), seed=4)
    with torch.no_grad():
        clip_output = clip.model.get_image_features(
            pixel_values=hand_written_pixels(generated, TINY_IMAGE_SIZE, CLIP_MEAN, CLIP_STD)
        )
        dino_output = dino.model(
            pixel_values=hand_written_pixels(generated, TINY_IMAGE_SIZE, TINY_DINO_MEAN, TINY_DINO_STD)
        )
    clip_reference = getattr(clip_output, "pooler_output", clip_output).double().numpy()
    dino_reference = dino_output.last_hidden_state[:, 0].double().numpy()

    np.testing.assert_allclose(clip.embed_images(generated), clip_reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dino.embed_images(generated), dino_reference, rtol=1e-4, atol=1e-5)
    clip_real, dino_real = clip.embed_images(real), dino.embed_images(real)
    assert mean_pairwise_cosine(clip.embed_images(generated), clip_real) == pytest.approx(
        mean_pairwise_cosine(clip_reference, clip_real), abs=1e-6
    )
    assert mean_pairwise_cosine(dino.embed_images(generated), dino_real) == pytest.approx(
        mean_pairwise_cosine(dino_reference, dino_real), abs=1e-6
    )


@pytest.mark.parametrize("extractor", ["clip", "dino"])
def test_a_model_folder_without_its_image_processor_config_is_refused_by_name(tmp_path, extractor):
    """No default preprocessing stands in for the checkpoint's own: the metric is skipped, naming the folder."""
    folder = {"clip": tiny_clip_folder, "dino": tiny_dino_folder}[extractor](tmp_path / extractor)
    (folder / "preprocessor_config.json").unlink()
    loader = {"clip": ClipFeatures, "dino": DinoFeatures}[extractor]
    expected = f"no image processor config .* in the {extractor} model folder {re.escape(str(folder))};"
    with pytest.raises(MissingWeights, match=expected):
        loader.from_path(str(folder))


# --- prompts, metric lines, weights --------------------------------------------------------------


def test_subject_phrase_and_the_papers_prompts():
    assert subject_phrase("a photo of sks dog", "a photo of dog") == "sks dog"
    assert subject_phrase("a photo of sks backpack", None) == "sks backpack"
    live = dreambooth_prompts("sks dog", "a photo of dog")
    objects = dreambooth_prompts("sks backpack", "a photo of backpack")
    assert len(live) == len(objects) == 25 == len(set(live))
    assert "a sks dog wearing a santa hat" in live and "a sks dog on top of a mirror" not in live
    assert "a sks backpack on top of a mirror" in objects
    assert not any("santa" in prompt for prompt in objects)
    assert objects[-5:] == [
        "a red sks backpack",
        "a purple sks backpack",
        "a shiny sks backpack",
        "a wet sks backpack",
        "a cube shaped sks backpack",
    ]
    assert live[-1] == "a cube shaped sks dog"


def test_metric_lines_are_what_sagemaker_regexes_read():
    lines = metric_lines({"fid_score": 12.3456789, "instance_loss": 0.000123, "dino": None})
    assert lines == ["fid_score=12.345679", "instance_loss=0.000123"]
    assert re.search(SAGEMAKER_FID_REGEX, lines[0]).group(1) == "12"  # that regex keeps one integer digit
    assert re.fullmatch(r"fid_score=([-+]?[0-9.]+)", lines[0])


def test_metric_weights_come_from_flags_then_env_then_defaults(monkeypatch, txt2img_home):
    monkeypatch.setenv("TXT2IMG_CLIP_PATH", "/env/clip")
    monkeypatch.setenv("TXT2IMG_DINO_PATH", "/env/dino")
    weights = MetricWeights.from_env(dino="/flag/dino")
    assert weights.clip == "/env/clip" and weights.dino == "/flag/dino"
    assert weights.inception == str(txt2img_home / "metric-weights" / "inception-2015-12-05.pt")


# --- end to end ------------------------------------------------------------------------------------


def test_evaluate_with_injected_extractors_computes_every_metric(tmp_path):
    """FID end to end: the injected extractor's features of the real and generated images give the FID."""
    data = write_dataset(tmp_path / "data")
    inception = InceptionFeatures(tiny_inception(), input_size=32, call_kwargs={"return_features": True})
    extractors = {
        "inception": inception,
        "clip": ClipFeatures.from_path(str(tiny_clip_folder(tmp_path / "clip"))),
        "dino": DinoFeatures.from_path(str(tiny_dino_folder(tmp_path / "dino"))),
    }
    # The folder's own processor config is read, not a default normalisation.
    dino_processor = extractors["dino"].processor
    assert tuple(dino_processor.image_mean) == TINY_DINO_MEAN and tuple(dino_processor.image_std) == TINY_DINO_STD
    report = evaluate_model(
        "tiny-sd",
        data,
        EvaluationSettings(prompts_per_subject=3, images_per_prompt=2, inference_steps=1),
        output_dir=tmp_path / "out",
        feature_extractors=extractors,
        progress=False,
    )
    assert report.skipped == {}
    assert set(report.metrics) == {"fid_score", "clip_i", "clip_t", "dino", "instance_loss"}
    assert all(value is not None and np.isfinite(value) for value in report.metrics.values())
    for name in ("clip_i", "clip_t", "dino"):
        assert -1.0 <= report.metrics[name] <= 1.0

    assert [job.prompt for job in report.generations] == [
        "a sks dog in the jungle",
        "a sks dog in the snow",
        "a sks dog on the beach",
    ]
    generated = [Image.open(path).convert("RGB") for job in report.generations for path in job.images]
    real = [Image.open(path).convert("RGB") for path in sorted(data.glob("*.png"))]
    assert len(generated) == 6 and generated[0].size == (64, 64)
    expected = reference_frechet_distance(inception.embed_images(real), inception.embed_images(generated))
    assert report.metrics["fid_score"] == pytest.approx(expected, rel=1e-6)

    saved = json.loads(Path(report.json_path).read_text())
    assert saved["metrics"] == report.metrics
    with Image.open(report.grid_path) as grid:
        assert grid.size == (2 * 64, 3 * 64)  # one row per prompt, one column per image


def test_cli_loads_weights_from_paths_and_skips_a_missing_one(tmp_path):
    import torch

    data = write_dataset(tmp_path / "data")
    inception_file = tmp_path / "inception.pt"
    torch.jit.script(tiny_inception()).save(str(inception_file))
    clip_folder = tiny_clip_folder(tmp_path / "clip")
    output = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "tiny-sd",
            str(data),
            "--prompts-per-subject",
            "2",
            "--steps",
            "1",
            "--inception-path",
            str(inception_file),
            "--clip-path",
            str(clip_folder),
            "--dino-path",
            str(tmp_path / "no-dino-here"),
            "--output",
            str(output),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    saved = json.loads((output / "metrics.json").read_text())
    (fid_line,) = [line for line in lines if line.startswith("fid_score=")]
    assert re.fullmatch(r"fid_score=\d+\.\d{6}", fid_line)
    # Generated noise is not the photos: a zero FID (the regex alone allows 0.000000) compared nothing.
    fid = float(fid_line.split("=")[1])
    assert fid > 0 and fid == pytest.approx(saved["metrics"]["fid_score"], abs=1e-6)
    assert any(line.startswith("clip_t=") for line in lines)
    assert any(line.startswith("instance_loss=") for line in lines)
    assert not any(line.startswith("dino=") for line in lines)  # skipped, never printed as 0
    assert re.search(r"dino\s+.*skipped", result.output)

    assert saved["metrics"]["dino"] is None
    assert "TXT2IMG_DINO_PATH" in saved["skipped"]["dino"] and "no-dino-here" in saved["skipped"]["dino"]
    assert (output / "grid.png").is_file()


def test_cli_without_any_weights_still_reports_instance_loss(tmp_path):
    data = write_dataset(tmp_path / "data")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\na sks dog as a painting\n\n", encoding="utf-8")
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "tiny-sd",
            str(data),
            "--prompts",
            str(prompts),
            "--steps",
            "1",
            "--metric",
            "instance_loss",
            "--metric",
            "fid_score",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "instance_loss=" in result.output and "fid_score=" not in result.output
    assert "inception-2015-12-05.pt" in result.output  # the skipped row says how to provide the weights


def test_no_image_is_generated_when_every_image_metric_is_skipped(tmp_path):
    """The CLI says the image metrics are skipped before the model loads, and generates nothing."""
    data = write_dataset(tmp_path / "data")
    output = tmp_path / "out"
    result = CliRunner().invoke(app, ["evaluate", "tiny-sd", str(data), "--steps", "1", "--output", str(output)])
    assert result.exit_code == 0, result.output
    notice = "skipping fid_score, clip_i, clip_t, dino: weights not on this machine; no image metric can run"
    assert notice in result.stderr
    assert result.output.index(notice) < result.output.index("instance_loss")  # before the table
    assert sorted(path.name for path in output.iterdir()) == ["metrics.json"]  # no images/, no grid.png
    saved = json.loads((output / "metrics.json").read_text())
    assert saved["generations"] == [] and saved["grid_path"] is None
    assert saved["metrics"]["instance_loss"] is not None


def test_only_the_metrics_that_can_run_get_images(tmp_path):
    """With only Inception present, the images are generated once, for fid_score; clip and dino stay skipped."""
    from catalog.pipelines import load_pipeline
    from catalog.store import load_catalog
    from training.dataset import load_dataset
    from training.evaluation import evaluate_pipeline, plan_metrics
    from training.hyperparameters import Hyperparameters

    class CountingPipeline:
        """The tiny-sd pipeline, counting the images asked of it."""

        def __init__(self, pipeline) -> None:
            self.pipeline, self.images = pipeline, 0

        def __call__(self, *args, **kwargs):
            self.images += kwargs.get("num_images_per_prompt", 1)
            return self.pipeline(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.pipeline, name)

    data = write_dataset(tmp_path / "data")
    catalog = load_catalog()
    pipeline = CountingPipeline(load_pipeline(catalog.get("tiny-sd"), catalog))
    concepts = load_dataset(data, Hyperparameters(), 64).concepts
    inception = {"inception": InceptionFeatures(tiny_inception(), input_size=32, call_kwargs={"return_features": True})}
    settings = EvaluationSettings(prompts_per_subject=2, inference_steps=1)
    plan = plan_metrics(settings, inception)
    assert plan.image_metrics == ["fid_score"] and set(plan.skipped) == {"clip_i", "clip_t", "dino"}
    report = evaluate_pipeline(
        pipeline,
        concepts,
        settings,
        model_id="tiny-sd",
        data_dir=data,
        resolution=64,
        output_dir=tmp_path / "out",
        feature_extractors=inception,
        progress=False,
    )
    assert pipeline.images == 2 and len(list((tmp_path / "out" / "images").iterdir())) == 2
    assert report.metrics["fid_score"] is not None and report.metrics["instance_loss"] is not None
    assert set(report.skipped) == {"clip_i", "clip_t", "dino"}

    pipeline.images = 0
    only_loss = EvaluationSettings(metrics=["instance_loss", "fid_score"], weights=MetricWeights())
    report = evaluate_pipeline(
        pipeline, concepts, only_loss, model_id="tiny-sd", data_dir=data, resolution=64, output_dir=tmp_path / "loss"
    )
    assert pipeline.images == 0 and report.generations == [] and report.grid_path is None
    assert list(report.metrics) == ["instance_loss", "fid_score"] and report.metrics["fid_score"] is None


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["evaluate", "no-such-model", "{data}"], "no-such-model"),
        (["evaluate", "tiny-sd", "{data}", "--metric", "sharpness"], "unknown metric"),
        (["evaluate", "tiny-sd", "{missing}"], "missing"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, arguments, message):
    data = write_dataset(tmp_path / "data")
    filled = [a.format(data=data, missing=tmp_path / "missing") for a in arguments]
    result = CliRunner().invoke(app, filled)
    assert result.exit_code == 2, result.output
    assert "txt2img: error:" in result.output and message in result.output
    assert "Traceback" not in result.output
