"""How many times one sanity run loads its model and images (predicting and hashing them): the count
`docs/architecture.md` quotes. Run: .venv/bin/python benchmarks/opens_per_protocol.py tasks.protocols.sanity"""
import sys, tempfile, importlib
from prefect.testing.utilities import prefect_test_harness
mod = importlib.import_module(sys.argv[1])
from flows.cli import main
calls = []
real = mod.load_inputs
mod.load_inputs = lambda spec: calls.append(1) or real(spec)
with tempfile.TemporaryDirectory() as tmp, prefect_test_harness():
    assert main(["sanity", "--methods", "saliency,gradcam", "--samples", "8", "--figure", "none", "--json",
                 "--store", f"{tmp}/s.zarr"]) == 0
    import storage
    L = len(storage.ResultStore(f"{tmp}/s.zarr", "r").coord("layer"))
print(f"OPENS: {len(calls)} loads of the model and images in one sanity run over {L} layers")
