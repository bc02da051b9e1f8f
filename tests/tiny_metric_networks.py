"""Random-weight stand-ins for the evaluation's metric networks (Inception, CLIP, DINO), small enough for a CPU test.

Each model folder also holds the image processor config its checkpoint would ship, so it loads offline."""

from __future__ import annotations

from pathlib import Path

from catalog.tiny_sd import write_tiny_tokenizer_files

TINY_IMAGE_SIZE = 32  # the tiny CLIP's and DINO's input side
TINY_DINO_MEAN, TINY_DINO_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_inception():
    """A scriptable stand-in for NVIDIA's TorchScript Inception: uint8 NCHW in, (N, 8) features out."""
    import torch

    class TinyInception(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)

        def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            features = self.conv(images.float() / 255.0).relu().mean(dim=(2, 3))
            return features if return_features else features.softmax(dim=1)

    torch.manual_seed(0)
    return TinyInception().eval()


def tiny_clip_folder(folder: Path) -> Path:
    """A random-weight CLIPModel and a character-level tokenizer, saved as a model folder."""
    import tempfile

    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as vocabulary:
        write_tiny_tokenizer_files(Path(vocabulary))
        tokenizer = CLIPTokenizer.from_pretrained(vocabulary, model_max_length=77)
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    square = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size=square).save_pretrained(folder)
    return folder


def tiny_dino_folder(folder: Path) -> Path:
    """A random-weight ViT and the processor DINOv2 checkpoints ship (short side, centre crop), with a
    normalisation of its own so that a test can tell it is read."""
    import torch
    from transformers import BitImageProcessorPil, ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    BitImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=list(TINY_DINO_MEAN),
        image_std=list(TINY_DINO_STD),
    ).save_pretrained(folder)
    return folder
