"""Every method's maps on the built-in model, bit for bit against a recording made before the
shared machinery was folded (tests/reference_cases.py). A case whose definition a fix changed
is listed in `reference_cases.CHANGED` with the reason, and checked by its own test instead."""
import numpy as np
import pytest
import torch

import reference_cases as rc


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    return rc.inputs(), np.load(rc.RECORDING)


def test_every_method_has_a_case():
    import xai_methods as xm

    covered = {method for method, _ in rc.CASES.values()}
    baselines = {n for n in xm.available() if xm.spec(n).category == "baseline"}
    assert covered >= set(xm.available()) - baselines


@pytest.mark.parametrize("case", [c for c in rc.CASES if c not in rc.CHANGED])
def test_maps_unchanged(setup, case):
    (model, images), recorded = setup
    maps = rc.compute(case, model, images)
    expected = recorded[case]
    assert maps.shape == expected.shape
    diff = np.abs(maps - expected)
    assert np.array_equal(maps, expected, equal_nan=True), f"{case}: max |difference| {np.nanmax(diff):.3g}"


def test_changed_cases_differ_from_the_recording(setup):
    """A case listed as changed really changed (else it belongs back in the bit-identical set)."""
    (model, images), recorded = setup
    for case in rc.CHANGED:
        assert not np.array_equal(rc.compute(case, model, images), recorded[case]), case
