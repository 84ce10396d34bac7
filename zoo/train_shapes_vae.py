"""Train the built-in ``shapes-vae`` (the generative model CDeepEx uses) on CPU, a few minutes.

    python -m zoo.train_shapes_vae [--out zoo/weights/shapes_vae.pt] [--epochs N] [--seed 0]

Trains on split "train" (seed ``--seed``) with the VAE loss (squared error summed over
pixels + ``--kl`` x KL divergence), saves the state dict in float16, reloads it
through ``zoo.load_generator`` and reports, on 1000 "test" samples, the reconstruction
error and how often shapes-cnn gives a reconstruction the class of the original.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .generative import SHAPES_VAE_WEIGHTS, ShapesVAE, load_generator
from .models import SHAPES_PREPROCESS, load_model
from .shapes import ShapesDataset


@torch.no_grad()
def reconstruction_report(generator_weights: Path, seed: int, n: int = 1000) -> dict[str, float]:
    """Mean squared error (pixels) and shapes-cnn's agreement on reconstructions of `n` test samples."""
    gen, model = load_generator(weights=generator_weights), load_model("shapes-cnn")
    test = ShapesDataset(seed=seed, split="test", length=n).load(0, n)
    x = SHAPES_PREPROCESS(torch.from_numpy(test.images))
    rec = torch.cat([gen.reconstruct(x[i:i + 250]) for i in range(0, n, 250)])
    labels = torch.from_numpy(test.labels)
    pixels = torch.from_numpy(test.images)
    rec_pixels = rec * torch.tensor(SHAPES_PREPROCESS.std).view(1, 3, 1, 1) + torch.tensor(SHAPES_PREPROCESS.mean).view(1, 3, 1, 1)
    return {
        "mse": float((rec_pixels - pixels).pow(2).mean()),
        "class_kept": float((model(rec).argmax(1) == labels).float().mean()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=SHAPES_VAE_WEIGHTS, help="where to save the state dict")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-samples", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--kl", type=float, default=0.01, help="weight of the KL term")
    ap.add_argument("--channels", type=int, default=8, help="latent channels of the 8x8 latent grid")
    ap.add_argument("--width", type=int, default=64, help="channels of the inner convolutions")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    images = torch.from_numpy(ShapesDataset(seed=args.seed, split="train", length=args.train_samples)
                              .load(0, args.train_samples).images)
    print(f"generated {len(images)} train images in {time.time() - t0:.1f}s", flush=True)
    vae = ShapesVAE(channels=args.channels, width=args.width)
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    steps = args.epochs * (len(images) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    for epoch in range(args.epochs):
        vae.train()
        order = torch.from_numpy(rng.permutation(len(images)))
        total = 0.0
        for i in range(len(images) // args.batch_size):
            batch = images[order[i * args.batch_size:(i + 1) * args.batch_size]]
            rec, mean, logvar = vae(batch)
            error = (rec - batch).pow(2).flatten(1).sum(1).mean()
            kl = (-0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(1)).mean()
            loss = error + args.kl * kl
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 100.0)  # a rare huge step made the KL explode
            opt.step()
            sched.step()
            total += loss.item()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / (i + 1):.1f} ({time.time() - t0:.0f}s)", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in vae.state_dict().items()}, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB); training took {time.time() - t0:.0f}s")
    report = reconstruction_report(args.out, args.seed)
    print(f"test (1000 samples): pixel MSE {report['mse']:.4f}; shapes-cnn keeps the class of "
          f"{report['class_kept']:.1%} of the reconstructions")


if __name__ == "__main__":
    main()
