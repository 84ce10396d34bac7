"""Every method's maps on the built-in model against a recording made before the shared machinery
was folded (tests/reference_cases.py). A case whose definition a fix changed is listed in
`reference_cases.CHANGED` with the reason, and checked by its own test instead.

On the recording's machine the maps are bit for bit the recorded ones. Another CPU's kernels round
the forward passes differently: on a Sapphire Rapids (AVX-512, AMX) the forward-only methods differ
by up to 2.2e-6 of the map's largest magnitude. So a map matches when its NaNs are the recording's
and it is within `RTOL` of the recorded map's largest magnitude: 45 times that rounding, far below
what a change of definition moves. Cases that an optimisation's rounding carries far past that on some
CPUs (`reference_cases.ROUNDING_SENSITIVE`) are left out, and shown to be so.
"""
import numpy as np
import pytest
import torch

import reference_cases as rc

RTOL = 1e-4
ROUNDING = 5e-6  # what another CPU's rounding moves a map by (2.2e-6 seen), with margin: a changed case moves more


def mismatch(maps: np.ndarray, expected: np.ndarray, rtol: float = RTOL) -> str:
    """Why `maps` is not the recorded map ('' when it is, within `rtol` of its largest magnitude)."""
    if maps.shape != expected.shape:
        return f"shape {maps.shape}, recorded {expected.shape}"
    if not np.array_equal(np.isnan(maps), np.isnan(expected)):
        return "NaN where the recording has none, or the reverse"
    diff, scale = np.nanmax(np.abs(maps - expected), initial=0), np.nanmax(np.abs(expected), initial=0)
    return f"max |difference| {diff:.3g} of a largest |value| {scale:.3g}" if diff > rtol * scale else ""


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    return rc.inputs(), np.load(rc.RECORDING)


def test_every_method_has_a_case():
    import xai_methods as xm

    covered = {method for method, _ in rc.CASES.values()}
    baselines = {n for n in xm.available() if xm.spec(n).category == "baseline"}
    assert covered >= set(xm.available()) - baselines


@pytest.mark.parametrize("case", [c for c in rc.CASES if c not in rc.CHANGED and c not in rc.ROUNDING_SENSITIVE])
def test_maps_unchanged(setup, case):
    (model, images), recorded = setup
    why = mismatch(rc.compute(case, model, images), recorded[case])
    assert not why, f"{case}: {why}"


def test_changed_cases_differ_from_the_recording(setup):
    """A case listed as changed really changed (else it belongs back in the unchanged set)."""
    (model, images), recorded = setup
    for case in rc.CHANGED:  # more than any CPU's rounding (an optimisation carries a fix's change unevenly)
        assert mismatch(rc.compute(case, model, images), recorded[case], rtol=ROUNDING), case


def test_rounding_sensitive_cases_are_so(setup):
    """A case left out for its rounding really moves with it: float64 arithmetic moves its map by more than a
    tenth of its largest value (else it belongs back in the unchanged set)."""
    import xai_methods as xm

    (model, images), _ = setup
    for case in rc.ROUNDING_SENSITIVE:
        method, params = rc.CASES[case]
        single = rc.compute(case, model, images)
        double = xm.attribute(method, model.double(), images.double(), **params).float().numpy()
        model.float()
        assert mismatch(double, single, rtol=0.1), case
