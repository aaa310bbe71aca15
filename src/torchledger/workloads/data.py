"""Synthetic data for the DataLoader benchmarks: a map-style dataset whose items cost real CPU work to make."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from torchledger.formulas._validate import positive_int


class SyntheticImages(Dataset[tuple[Tensor, Tensor]]):
    """``length`` images (C x H x W, float32) and labels, each generated from its index (deterministic), then
    normalized, as a decoding-and-augmenting pipeline would spend CPU time on every item."""

    def __init__(self, length: int, channels: int = 3, size: int = 64, n_classes: int = 10) -> None:
        self.length = positive_int("length", length)
        self.shape = (positive_int("channels", channels), positive_int("size", size), size)
        self.n_classes = positive_int("n_classes", n_classes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index={index} is out of range for {self.length} items")
        gen = torch.Generator().manual_seed(index)
        image = torch.rand(self.shape, generator=gen)
        image = (image - image.mean()) / (image.std() + 1e-6)  # per-image normalization
        return image, torch.tensor(index % self.n_classes)
