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

# CLIP's and ImageNet's normalisation, used when a model folder has no preprocessor_config.json.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

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


def _pixel_batch(images: list[Image], size: int, mean, std):
    """Resize the short side to ``size``, centre-crop a square and normalise, as CLIP and ViT expect."""
    import numpy as np
    import torch
    from PIL import Image as PILImage

    arrays = []
    for image in images:
        image = image.convert("RGB")
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), PILImage.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _normalisation(folder: Path | None, fallback_mean, fallback_std):
    """The image mean and std a model folder's preprocessor_config.json declares."""
    import json

    config = folder / "preprocessor_config.json" if folder else None
    if config and config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        return tuple(data.get("image_mean", fallback_mean)), tuple(data.get("image_std", fallback_std))
    return fallback_mean, fallback_std


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
    """CLIP image and text embeddings from a transformers ``CLIPModel`` and its tokenizer."""

    def __init__(self, model, tokenizer, mean=CLIP_MEAN, std=CLIP_STD):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mean, self.std = mean, std

    @classmethod
    def from_path(cls, location: str) -> ClipFeatures:
        from transformers import CLIPModel, CLIPTokenizer

        folder = local_weights("clip", location)
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True).to(_device())
            tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise MissingWeights(f"cannot load CLIP from {folder}: {error}") from error
        return cls(model, tokenizer, *_normalisation(folder, CLIP_MEAN, CLIP_STD))

    @staticmethod
    def _embedding(output):
        # transformers 4 returns the projected embeddings; transformers 5 wraps them in pooler_output.
        return output if hasattr(output, "norm") else output.pooler_output

    def embed_images(self, images: list[Image]) -> np.ndarray:
        import torch

        size = self.model.config.vision_config.image_size
        pixels = _pixel_batch(images, size, self.mean, self.std).to(self.model.device)
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

    def __init__(self, model, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.model = model.eval()
        self.mean, self.std = mean, std

    @classmethod
    def from_path(cls, location: str) -> DinoFeatures:
        from transformers import AutoModel

        folder = local_weights("dino", location)
        try:
            model = AutoModel.from_pretrained(folder, local_files_only=True).to(_device())
        except (OSError, ValueError) as error:
            raise MissingWeights(f"cannot load DINO from {folder}: {error}") from error
        return cls(model, *_normalisation(folder, IMAGENET_MEAN, IMAGENET_STD))

    def embed_images(self, images: list[Image]) -> np.ndarray:
        import torch

        pixels = _pixel_batch(images, self.model.config.image_size, self.mean, self.std).to(self.model.device)
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
