"""How many times a resumed folder study reads each stored image file before and while it works, and how many
times a protocol run loads its model and images: the counts `docs/architecture.md` quotes (issue 33's before
and after). Run: .venv/bin/python benchmarks/reads_per_resume.py [N_IMAGES]"""
from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main(n: int = 24) -> None:
    import PIL.Image
    from prefect.testing.utilities import prefect_test_harness

    from flows.cli import main as cli
    from helpers import export_shapes

    reads: collections.Counter = collections.Counter()
    real_open, real_bytes = PIL.Image.open, Path.read_bytes

    def counted_open(fp, *a, **k):
        reads[str(fp)] += 1
        return real_open(fp, *a, **k)

    def counted_bytes(self):
        if self.suffix == ".png":
            reads[str(self)] += 1
        return real_bytes(self)

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness():
        root = export_shapes(Path(tmp) / "data", n)
        argv = ["study", "--dataset", str(root), "--samples", "all", "--methods", "saliency", "--block-size", "8",
                "--store", f"{tmp}/s.zarr", "--figure", "none"]
        assert cli(argv) == 0
        from tasks import loading
        from tasks.study import planning

        loading._load_dataset.cache_clear()  # as a new process would start
        made, real_plan = [], planning.plan
        planning.plan = lambda spec: made.append(spec) or real_plan(spec)  # the flow's, not the command line's
        PIL.Image.open, Path.read_bytes = counted_open, counted_bytes
        try:
            assert cli([*argv, "--methods", "saliency,gradcam"]) == 0  # resumed with a new method
            files = [p for p in root.rglob("*.png")]
            per_file = [reads[str(p)] for p in files]
            print(f"resumed folder study (one method added), {len(files)} images: each read {min(per_file)}-{max(per_file)} times "
                  f"({sum(per_file)} reads); plans made again by the flow: {len(made)}")
        finally:
            PIL.Image.open, Path.read_bytes, planning.plan = real_open, real_bytes, real_plan


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 24)
