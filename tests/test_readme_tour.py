"""`make demo`, then every command of the README's tour, in order, on the store the demo leaves.

The commands are read from the Makefile's demo recipe and from the README's own text (its code blocks and
inline commands between "A short tour" and the protocols' section, on the demo's store), so a command
added to the README is run here too, and a change of store layout that breaks an older command fails here.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = re.compile(r"(?:\$\(BIN\)|\.venv/bin)/saliency-atlas\s")


def _joined(lines: list[str]) -> list[str]:
    """Lines with their backslash continuations joined."""
    out, buffer = [], ""
    for line in lines:
        buffer += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            out.append(buffer.strip())
            buffer = ""
    return out


def _argv(line: str) -> list[str]:
    """A command line's arguments after the program: comments and optional `[...]` parts dropped."""
    line = re.sub(r"\s#.*$", "", line)
    line = re.sub(r"\[[^\]]*\]", "", line)
    return shlex.split(PROGRAM.split(line, maxsplit=1)[1])


def demo_commands() -> list[list[str]]:
    recipe = ROOT.joinpath("Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return [_argv(line) for line in _joined(recipe) if PROGRAM.search(line)]


def tour_commands() -> list[list[str]]:
    """The README's commands on the demo's store (or on no store: lists and help), in the order it gives them."""
    text = ROOT.joinpath("README.md").read_text()
    tour = text.split("## A short tour", 1)[1].split("## Is the method reliable?", 1)[0]
    found = []
    for block, inline in re.findall(r"```bash\n(.*?)```|`(saliency-atlas [^`]+)`", tour, re.S):
        lines = _joined(block.splitlines()) if block else [f".venv/bin/{inline}"]
        for line in lines:
            if not PROGRAM.match(line.strip()):
                continue
            argv = _argv(line.strip())
            stores = [a for a in argv if a.endswith(".zarr")]
            if "..." in argv or any(a.isupper() for a in argv) or stores not in ([], ["runs/shapes.zarr"]):
                continue  # a placeholder, or another store than the demo's
            found.append(argv)
    return found


def test_the_tour_is_read_from_the_readme():
    tour = tour_commands()
    assert ["methods"] in tour and ["metrics"] in tour
    assert sum(a[0] == "evaluate" for a in tour) >= 3 and any(a[0] == "clusters" for a in tour)
    assert any(a[0] == "aggregate" for a in tour) and any(a[0] == "report" for a in tour)
    assert [a[0] for a in demo_commands()] == ["study", "status", "evaluate", "clusters", "report"]


def _fewer_samples(argv: list[str]) -> list[str]:
    """`argv` with the demo's 256 samples cut to one block of 64: the store goes through the same states (every
    method, metric, cluster and growth of the tour) for a quarter of the work."""
    return [SAMPLES if a == "256" and argv[i - 1] == "--samples" else a for i, a in enumerate(argv)]


SAMPLES = "64"


@pytest.mark.slow
def test_make_demo_then_every_tour_command_works_on_its_store(prefect_api, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the README's paths (runs/...) are relative to where the user stands
    ran = []
    assert sum("256" in argv for argv in demo_commands()) == 1  # the demo's one sample count, cut below
    for argv in map(_fewer_samples, [*demo_commands(), *tour_commands()]):
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as e:  # --help
            code = e.code
        out, err = capsys.readouterr()
        assert code == 0 and "Traceback" not in err, f"{' '.join(argv)} -> {code}:\n{err[-3000:]}"
        ran.append(argv[0])
    assert (tmp_path / "runs" / "shapes.report" / "index.html").is_file()
    assert len(ran) >= 15, ran
