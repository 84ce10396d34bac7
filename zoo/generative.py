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

GENERATORS: tuple[str, ...] = ("shapes-vae",)
SHAPES_VAE_WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes_vae.pt"


class ShapesVAE(nn.Module):
    """Convolutional VAE for 64x64 RGB pixels in [0, 1]: 4 stride-2 convolutions to 4x4, a Gaussian
    latent of `latent_dim`, and the mirror image with transposed convolutions and a sigmoid."""

    def __init__(self, latent_dim: int = 32, width: int = 32) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        w = width

        def down(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 4, 2, 1), nn.LeakyReLU(0.2)]

        def up(cin: int, cout: int) -> list[nn.Module]:
            return [nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.LeakyReLU(0.2)]

        self.encoder = nn.Sequential(*down(3, w // 2), *down(w // 2, w), *down(w, w), *down(w, w), nn.Flatten())
        self.to_latent = nn.Linear(w * 16, 2 * latent_dim)
        self.from_latent = nn.Sequential(nn.Linear(latent_dim, w * 16), nn.LeakyReLU(0.2), nn.Unflatten(1, (w, 4, 4)))
        self.decoder = nn.Sequential(*up(w, w), *up(w, w), *up(w, w // 2), nn.ConvTranspose2d(w // 2, 3, 4, 2, 1), nn.Sigmoid())

    def encode(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels (B, 3, 64, 64) in [0, 1] -> (mean, log-variance) of the latent, (B, latent_dim) each."""
        mean, logvar = self.to_latent(self.encoder(pixels)).chunk(2, dim=1)
        return mean, logvar

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, latent_dim) -> pixels (B, 3, 64, 64) in [0, 1]."""
        return self.decoder(self.from_latent(z))

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
    from .models import SHAPES_PREPROCESS, _fit_state_dict, _read_state_dict

    if name != "shapes-vae":
        raise ValueError(f"unknown generator {name!r}; built-in generators: {', '.join(GENERATORS)}")
    path = SHAPES_VAE_WEIGHTS if weights is None else weights
    sd = {k: v.float() for k, v in _read_state_dict(path).items()}
    shape = {k: v.shape for k, v in sd.items()}
    vae = ShapesVAE(latent_dim=shape.get("to_latent.weight", (64,))[0] // 2, width=2 * shape.get("encoder.0.weight", (16,))[0])
    _fit_state_dict(vae, sd, path, name)
    vae.eval().requires_grad_(False)
    return Generative(vae, SHAPES_PREPROCESS)
