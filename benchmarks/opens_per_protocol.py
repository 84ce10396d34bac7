"""How many times one sanity run loads its model and images (each load predicts and hashes them): the count
`docs/architecture.md` quotes. Run: .venv/bin/python benchmarks/opens_per_protocol.py [MODULE]
(MODULE: where the sanity check's `load_inputs` is looked up; tasks.protocols.sanity)."""
from __future__ import annotations

import importlib
import sys
import tempfile


def main(module: str = "tasks.protocols.sanity") -> int:
    from prefect.testing.utilities import prefect_test_harness

    import storage
    from flows.cli import main as cli

    mod, calls = importlib.import_module(module), []
    real = mod.load_inputs
    mod.load_inputs = lambda spec: calls.append(spec) or real(spec)
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness():
        assert cli(["sanity", "--methods", "saliency,gradcam", "--samples", "8", "--figure", "none", "--json",
                    "--store", f"{tmp}/s.zarr"]) == 0
        layers = len(storage.ResultStore(f"{tmp}/s.zarr", "r").coord("layer"))
    print(f"{len(calls)} load(s) of the model and images in one sanity run over {layers} layers")
    return len(calls)


if __name__ == "__main__":
    main(*sys.argv[1:2])
