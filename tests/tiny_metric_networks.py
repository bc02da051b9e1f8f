"""Random-weight stand-ins for the evaluation's metric networks (Inception, CLIP), small enough for a CPU test."""

from __future__ import annotations

from pathlib import Path

from catalog.tiny_sd import write_tiny_tokenizer_files


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
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

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
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
