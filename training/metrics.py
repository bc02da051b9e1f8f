"""The image metrics' math and the feature extractors they read, loaded only from local weights.

FID is the Fréchet distance between Gaussian fits of Inception features; CLIP-I, DINO and CLIP-T
are mean cosine similarities of CLIP or DINO embeddings. No weight here is ever downloaded:
each extractor comes from a local path or the local Hugging Face cache, and a missing one
is reported as a ``MissingWeights`` reason the evaluation shows as a skipped metric.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from catalog.paths import txt2img_home

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image

Direction = Literal["minimize", "maximize"]

# Every metric the evaluation reports, with the direction in which it gets better.
METRIC_DIRECTIONS: dict[str, Direction] = {
    "fid_score": "minimize",
    "clip_i": "maximize",
    "clip_t": "maximize",
    "dino": "maximize",
    "instance_loss": "minimize",
}

# The extractor each weight-hungry metric needs.
METRIC_EXTRACTOR: dict[str, str] = {"fid_score": "inception", "clip_i": "clip", "clip_t": "clip", "dino": "dino"}

# Hugging Face repos looked up in the local cache (never downloaded) when no path is configured:
# the CLIP model torchmetrics' CLIPScore defaults to, and the DINO ViT-S/16 of the DreamBooth paper.
DEFAULT_CLIP_REPO = "openai/clip-vit-large-patch14"
DEFAULT_DINO_REPO = "facebook/dino-vits16"
INCEPTION_FILE_NAME = "inception-2015-12-05.pt"
INCEPTION_INPUT_SIZE = 299

# Where a model folder keeps its image processor's settings: transformers' older and newer file names.
PROCESSOR_CONFIG_NAMES = ("preprocessor_config.json", "processor_config.json")

HOW_TO_PROVIDE = {
    "inception": (
        "get the TorchScript `inception-2015-12-05.pt` that StyleGAN and clean-fid use and put it there, "
        "or pass --inception-path / TXT2IMG_INCEPTION_PATH"
    ),
    "clip": (
        "pass --clip-path / TXT2IMG_CLIP_PATH with a local CLIP model folder, or copy in a Hugging Face cache "
        "holding {repo}"
    ),
    "dino": (
        "pass --dino-path / TXT2IMG_DINO_PATH with a local DINO ViT folder, or copy in a Hugging Face cache "
        "holding {repo}"
    ),
}


class MissingWeights(Exception):
    """An extractor's weights are not on this machine; the message says how to provide them."""


class ImageEmbedder(Protocol):
    """What the evaluation needs of a feature extractor (CLIP's also has ``embed_texts``)."""

    def embed_images(self, images: list[Image]) -> np.ndarray: ...


def metric_weights_dir() -> Path:
    """Where txt2img looks for metric weights when no flag or environment variable says otherwise."""
    return txt2img_home() / "metric-weights"


class MetricWeights(BaseModel):
    """Where each metric's network comes from: a local path, or a repo id looked up in the local HF cache."""

    model_config = ConfigDict(extra="forbid")

    inception: str | None = None
    clip: str | None = None
    dino: str | None = None

    @classmethod
    def from_env(cls, **overrides: str | None) -> MetricWeights:
        """Flags (``overrides``) first, then ``TXT2IMG_<NAME>_PATH``, then the defaults."""
        home = metric_weights_dir()
        defaults = {
            "inception": str(home / INCEPTION_FILE_NAME),
            "clip": str(home / "clip") if (home / "clip").is_dir() else DEFAULT_CLIP_REPO,
            "dino": str(home / "dino") if (home / "dino").is_dir() else DEFAULT_DINO_REPO,
        }
        values = {}
        for name, default in defaults.items():
            values[name] = overrides.get(name) or os.environ.get(f"TXT2IMG_{name.upper()}_PATH") or default
        return cls(**values)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _image_processor(folder: Path, extractor: str, processor_class, **options):
    """The image processor ``folder`` ships, loaded by ``processor_class`` with ``options``, offline.

    There is no fallback: scores are comparable only when images are prepared as the checkpoint
    expects, so a folder without a processor config cannot give this extractor's metrics."""
    if not any((folder / name).is_file() for name in PROCESSOR_CONFIG_NAMES):
        raise MissingWeights(
            f"no image processor config ({' or '.join(PROCESSOR_CONFIG_NAMES)}) in the {extractor} model folder "
            f"{folder}; copy in the one its checkpoint ships"
        )
    try:
        return processor_class.from_pretrained(folder, local_files_only=True, **options)
    except (OSError, ValueError) as error:
        raise MissingWeights(f"cannot load the {extractor} image processor from {folder}: {error}") from error


def _pixel_values(processor, images: list[Image], device):
    """The processor's pixel batch; images go in as RGB, as the processors of greyscale or RGBA photos differ."""
    batch = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
    return batch["pixel_values"].to(device)


def _local_model_folder(location: str, extractor: str, repo: str) -> Path:
    """A local folder for ``location`` (a path, or a repo id already in the HF cache); never downloads."""
    path = Path(location).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or location.startswith((".", "~")) or location.count("/") != 1:
        raise MissingWeights(f"no {extractor} model folder at {path}; " + HOW_TO_PROVIDE[extractor].format(repo=repo))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(location, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as error:
        raise MissingWeights(
            f"{location} is not in the local Hugging Face cache; " + HOW_TO_PROVIDE[extractor].format(repo=repo)
        ) from error


def local_weights(extractor: str, location: str) -> Path:
    """Where extractor ``location`` is on this machine: Inception's TorchScript file, or CLIP's or
    DINO's model folder; raises ``MissingWeights`` saying how to provide it. Never downloads."""
    if extractor == "inception":
        path = Path(location).expanduser()
        if not path.is_file():
            raise MissingWeights(f"no Inception weights at {path}; {HOW_TO_PROVIDE['inception']}")
        return path
    return _local_model_folder(location, extractor, {"clip": DEFAULT_CLIP_REPO, "dino": DEFAULT_DINO_REPO}[extractor])


class InceptionFeatures:
    """Pool features of an Inception-style network that maps uint8 NCHW images to (N, D) features."""

    def __init__(self, network, input_size: int = INCEPTION_INPUT_SIZE, call_kwargs: dict[str, Any] | None = None):
        self.network = network
        self.input_size = input_size
        self.call_kwargs = call_kwargs or {}

    @classmethod
    def from_path(cls, location: str) -> InceptionFeatures:
        """Load a TorchScript network; one taking ``return_features`` (NVIDIA's) is asked for its pool features."""
        import torch

        path = local_weights("inception", location)
        try:
            network = torch.jit.load(str(path), map_location=_device()).eval()
        except RuntimeError as error:
            raise MissingWeights(
                f"{path} is not a TorchScript network ({error}); {HOW_TO_PROVIDE['inception']}"
            ) from error
        takes_flag = "return_features" in str(network.forward.schema)
        return cls(network, call_kwargs={"return_features": True} if takes_flag else None)

    def embed_images(self, images: list[Image]) -> np.ndarray:
        import numpy as np
        import torch
        from PIL import Image as PILImage

        size = (self.input_size, self.input_size)
        arrays = [np.asarray(image.convert("RGB").resize(size, PILImage.BICUBIC), dtype=np.uint8) for image in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        device = next(iter(self.network.parameters()), torch.empty(0)).device
        with torch.no_grad():
            features = self.network(batch.to(device), **self.call_kwargs)
        return features.reshape(len(images), -1).double().cpu().numpy()


class ClipFeatures:
    """CLIP image and text embeddings from a transformers ``CLIPModel``, its tokenizer and image processor."""

    def __init__(self, model, tokenizer, processor):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor

    @classmethod
    def from_path(cls, location: str) -> ClipFeatures:
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        folder = local_weights("clip", location)
        # The PIL processor: transformers' default (fast) one needs torchvision, which breaks beside our torch.
        processor = _image_processor(folder, "clip", CLIPImageProcessorPil)
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True).to(_device())
            tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise MissingWeights(f"cannot load CLIP from {folder}: {error}") from error
        return cls(model, tokenizer, processor)

    @staticmethod
    def _embedding(output):
        # transformers 4 returns the projected embeddings; transformers 5 wraps them in pooler_output.
        return output if hasattr(output, "norm") else output.pooler_output

    def embed_images(self, images: list[Image]) -> np.ndarray:
        import torch

        pixels = _pixel_values(self.processor, images, self.model.device)
        with torch.no_grad():
            return self._embedding(self.model.get_image_features(pixel_values=pixels)).double().cpu().numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        tokens = {key: value.to(self.model.device) for key, value in tokens.items()}
        with torch.no_grad():
            return self._embedding(self.model.get_text_features(**tokens)).double().cpu().numpy()


class DinoFeatures:
    """The class-token embedding of a DINO ViT (any transformers vision backbone with a CLS token)."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_path(cls, location: str) -> DinoFeatures:
        from transformers import AutoImageProcessor, AutoModel

        folder = local_weights("dino", location)
        # DINO checkpoints ship a ViT (v1) or BiT (v2) processor config, which names the class; the
        # PIL backend, as the default (fast) one needs torchvision, which breaks beside our torch.
        processor = _image_processor(folder, "dino", AutoImageProcessor, backend="pil")
        try:
            model = AutoModel.from_pretrained(folder, local_files_only=True).to(_device())
        except (OSError, ValueError) as error:
            raise MissingWeights(f"cannot load DINO from {folder}: {error}") from error
        return cls(model, processor)

    def embed_images(self, images: list[Image]) -> np.ndarray:
        import torch

        pixels = _pixel_values(self.processor, images, self.model.device)
        with torch.no_grad():
            hidden = self.model(pixel_values=pixels).last_hidden_state
        return hidden[:, 0].double().cpu().numpy()


EXTRACTOR_LOADERS = {
    "inception": InceptionFeatures.from_path,
    "clip": ClipFeatures.from_path,
    "dino": DinoFeatures.from_path,
}


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID's formula: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), each set fitted by a Gaussian.

    tr((S_a S_b)^1/2) is computed as the sum of the square roots of the eigenvalues of
    S_a^1/2 S_b S_a^1/2, a symmetric PSD matrix, which stays real and stable when the covariances
    are rank-deficient, as they always are with DreamBooth's handful of images.
    """
    import numpy as np

    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("FID needs at least 2 images on each side")
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    eigenvalues, eigenvectors = np.linalg.eigh(cov_a)
    sqrt_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt_product = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt_product
    return float(max(distance, 0.0))


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    import numpy as np

    return matrix / np.clip(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12, None)


def mean_pairwise_cosine(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The mean cosine similarity over every (a, b) pair, as DreamBooth's DINO and CLIP-I are defined."""
    return float((_unit_rows(features_a) @ _unit_rows(features_b).T).mean())


def mean_matched_cosine(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The mean cosine similarity of row i of ``a`` with row i of ``b`` (CLIP-T: each image with its prompt)."""
    return float((_unit_rows(features_a) * _unit_rows(features_b)).sum(axis=1).mean())
