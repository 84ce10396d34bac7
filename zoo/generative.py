"""The built-in generative model of ``shapes``: a small VAE, for CDeepEx and CEM's autoencoder term.

``load_generator("shapes-vae")`` returns a `Generative`: ``encode`` (normalised images ->
latent means), ``decode`` (latent -> normalised images) and ``reconstruct``, all in the
input space of the classifier (``SHAPES_PREPROCESS``), so contrastive methods can mix
its outputs with the classifier's inputs. ``load_model("shapes-cnn")`` attaches it as
``model.generative``. Weights ship in ``zoo/weights/shapes_vae.pt`` (float16, loaded with
``weights_only=True``); ``python -m zoo.train_shapes_vae`` trains them again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import Preprocess
from .shapes import PREPROCESS as SHAPES_PREPROCESS
from .state import _fit_state_dict, _read_state_dict

GENERATORS: tuple[str, ...] = ("shapes-vae",)
SHAPES_VAE_WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes_vae.pt"


class ShapesVAE(nn.Module):
    """Convolutional VAE for 64x64 RGB pixels in [0, 1] with a spatial latent: three stride-2
    convolutions to an 8x8 grid of `channels` Gaussian latents (`latent_dim` = 64 x channels, flat),
    and back with nearest upsampling + convolutions and a sigmoid. A grid latent keeps where
    things are, so a small model trained for minutes on a CPU still reproduces the outlines that
    make the class (a vector latent of the same budget gave colour blobs)."""

    def __init__(self, channels: int = 8, width: int = 64) -> None:
        super().__init__()
        self.channels = channels
        self.latent_dim = 64 * channels
        w = width

        def down(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 4, 2, 1), nn.LeakyReLU(0.2)]

        def up(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1), nn.LeakyReLU(0.2)]

        self.encoder = nn.Sequential(*down(3, w // 2), *down(w // 2, w), *down(w, w), nn.Conv2d(w, 2 * channels, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, w, 3, 1, 1), nn.LeakyReLU(0.2), *up(w, w), *up(w, w // 2),
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(w // 2, w // 2, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w // 2, 3, 3, 1, 1), nn.Sigmoid(),
        )

    def encode(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels (B, 3, 64, 64) in [0, 1] -> (mean, log-variance) of the latent, (B, latent_dim) each."""
        mean, logvar = self.encoder(pixels).chunk(2, dim=1)
        return mean.flatten(1), logvar.flatten(1).clamp(-12.0, 6.0)  # exp() stays finite

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, latent_dim) -> pixels (B, 3, 64, 64) in [0, 1]."""
        return self.decoder(z.view(z.shape[0], self.channels, 8, 8))

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction of a sampled latent, mean, log-variance), for training."""
        mean, logvar = self.encode(pixels)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        return self.decode(z), mean, logvar


@dataclass(frozen=True)
class Generative:
    """A generative model in a classifier's input space (normalised images). Not an nn.Module, so
    attaching it to a model (``model.generative``) leaves the model's state dict and fingerprint alone;
    the VAE follows the device of its inputs."""

    vae: ShapesVAE
    preprocess: Preprocess

    @property
    def latent_dim(self) -> int:
        return self.vae.latent_dim

    def _scale(self, like: Tensor) -> tuple[Tensor, Tensor]:
        self.vae.to(like.device)
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.preprocess.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.preprocess.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def encode(self, images: Tensor) -> Tensor:
        """Normalised images -> latent means (B, latent_dim)."""
        mean, std = self._scale(images)
        return self.vae.to(images.dtype).encode(images * std + mean)[0]

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, latent_dim) -> normalised images."""
        mean, std = self._scale(z)
        return (self.vae.to(z.dtype).decode(z) - mean) / std

    def reconstruct(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))


def load_generator(name: str = "shapes-vae", weights: str | os.PathLike | None = None) -> Generative:
    """A built-in generative model (frozen, eval mode, CPU until used elsewhere)."""

    if name != "shapes-vae":
        raise ValueError(f"unknown generator {name!r}; built-in generators: {', '.join(GENERATORS)}")
    path = SHAPES_VAE_WEIGHTS if weights is None else weights
    sd = {k: v.float() for k, v in _read_state_dict(path).items()}
    shape = {k: v.shape for k, v in sd.items()}
    vae = ShapesVAE(channels=shape.get("encoder.6.weight", (16,))[0] // 2, width=2 * shape.get("encoder.0.weight", (32,))[0])
    _fit_state_dict(vae, sd, path, name)
    vae.eval().requires_grad_(False)
    return Generative(vae, SHAPES_PREPROCESS)
