"""The resilience protocol (MetaQuantus's meta-consistency, issue 35): its criteria against metaquantus's own
functions and their known answers, and the protocol end to end: the forward passes it states are the ones it
runs, it resumes without recomputing, the disruptive perturbations move the scores that should move."""
import json

import numpy as np
import pytest
import torch

from tasks.meta import consistency as C

mq = pytest.importorskip("metaquantus.meta_evaluation").MetaEvaluation


def test_the_criteria_agree_with_metaquantus():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=(3, 30))
        q_hat = q + rng.normal(scale=rng.choice([0.01, 1.0]), size=q.shape)
        everyone = np.ones(30, bool)
        for m in range(3):
            assert C.wilcoxon_p(q[m], q_hat[m]) == pytest.approx(
                mq.compute_iac_score(q[m], q_hat[m], everyone, "Model Resilience Test"), abs=1e-12)
            assert 1 - C.wilcoxon_p(q[m], q_hat[m]) == pytest.approx(
                mq.compute_iac_score(q[m], q_hat[m], everyone, "Model Adversary Test"), abs=1e-12)
        assert C.order_kept(q, q_hat) == pytest.approx(mq.compute_iec_resilience(q, q_hat, everyone))
        # metaquantus 0.0.5 counts a perturbed score above the original whatever its score_direction says: the
        # count that is right for a metric where lower is better
        assert C.got_worse(q, q_hat, higher_is_better=False) == pytest.approx(
            mq.compute_iec_adversary(q, q_hat, everyone, score_direction="lower"))


def test_the_criteria_have_their_known_answers():
    rng = np.random.default_rng(1)
    original = rng.normal(size=(3, 40)) + np.array([[2], [1], [0]])
    same = np.stack([original] * 2)
    kept = np.ones((2, 40), bool)
    ruined = same - 5.0  # every score much worse
    ideal = C.criteria(original, same, kept, ruined, higher_is_better=True)
    assert ideal == {"IAC_NR": 1.0, "IAC_AR": 1.0, "IEC_NR": 1.0, "IEC_AR": 1.0, "MC": 1.0}
    blind = C.criteria(original, same, kept, same, higher_is_better=True)  # the disruption changes nothing
    assert blind["IAC_AR"] == 0.0 and blind["IEC_AR"] == 0.0 and blind["MC"] == 0.5
    shaky = C.criteria(original, same + rng.normal(scale=3.0, size=same.shape), kept, ruined, True)
    assert shaky["IAC_NR"] < 0.5 and shaky["IEC_NR"] < 0.6  # noise moves the scores and the order
    nothing = C.criteria(original, same, np.zeros((2, 40), bool), ruined, True)  # no image kept its class
    assert nothing["IAC_NR"] is None and nothing["MC"] is None
    assert C.got_worse(np.array([1.0, np.nan]), np.array([0.0, 0.0]), True) == 1.0  # NaN pairs left out


@pytest.fixture(scope="module")
def resilience_run(prefect_api, tmp_path_factory):
    """A small run, with every image through the model counted (hooks travel with the perturbed copies)."""
    from flows.cli import main
    import tasks.protocols.common as common

    counted, load = [], common.model_of

    def counting(spec, device):
        model = load(spec, device)
        model.register_forward_pre_hook(lambda module, args: counted.append(len(args[0])))
        return model

    path = str(tmp_path_factory.mktemp("resilience") / "r.zarr")
    argv = ["resilience", "--samples", "10", "--draws", "2", "--methods", "saliency,gradcam", "--metrics",
            "pointing_game,deletion[steps=4],sparseness", "--store", path, "--device", "cpu", "--figure", "none",
            "--json"]
    mp = pytest.MonkeyPatch()
    mp.setattr(common, "model_of", counting)
    try:
        assert main(argv) == 0
    finally:
        mp.undo()
    return path, argv, sum(counted)


def test_the_protocol_runs_the_passes_it_states_and_the_disruptions_move_the_scores(resilience_run, capsys):
    from tasks.protocols.resilience import summary

    path, _, passes = resilience_run
    found = summary(path)
    assert passes <= sum(found["cost"].values()), (passes, found["cost"])
    assert passes >= 0.9 * sum(found["cost"].values())  # the cost line is not padded either
    assert set(found["metrics"]) == {"pointing_game", "deletion[steps=4]", "sparseness"}
    for metric, r in found["metrics"].items():
        assert set(r) == {"input", "model", "MC"} and set(r["input"]) == {*C.CRITERIA, "MC"}
        assert 0 <= r["MC"] <= 1
    # a random model's maps no longer point at the object: the pointing game reacts
    assert found["metrics"]["pointing_game"]["model"]["IAC_AR"] > 0.9
    # sparseness is a property of the map alone: maps shuffled across images keep their scores' spread
    assert found["metrics"]["sparseness"]["input"]["IEC_AR"] < found["metrics"]["pointing_game"]["input"]["IEC_AR"]
    assert found["kept"]["weight_noise"] > 0.8  # the minor weight noise keeps most predictions


def test_the_protocol_resumes_without_recomputing(resilience_run, capsys, monkeypatch):
    import storage
    import tasks.protocols.resilience as resilience
    from flows.cli import main

    path, argv, _ = resilience_run
    before = storage.ResultStore(path, mode="r").read("score").tobytes()
    scored = []
    monkeypatch.setattr(resilience, "score_maps", lambda *a: scored.append(a) or pytest.fail("rescored"))
    capsys.readouterr()
    assert main(argv) == 0
    assert not scored and storage.ResultStore(path, mode="r").read("score").tobytes() == before
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]
    store = storage.ResultStore(path, mode="r")
    assert not store.pending("original") and not store.pending("perturbed")


@pytest.mark.parametrize("args,message", [
    (["--methods", "saliency"], "give two or more methods"),
    (["--metrics", "pointing_gme"], "unknown metric 'pointing_gme'"),
    (["--draws", "0"], "draws must be > 0"),
])
def test_bad_options_are_one_line_before_any_work(prefect_api, tmp_path, capsys, args, message):
    from flows.cli import main

    store = tmp_path / "r.zarr"
    assert main(["resilience", "--samples", "4", "--store", str(store), "--device", "cpu", *args]) != 0
    err = capsys.readouterr().err
    assert message in err and not store.exists()


def test_the_perturbations_are_seeded_and_distinct():
    from tasks.protocols.resilience import derangement, draw_seed

    assert draw_seed(0, "input_noise", 1) == draw_seed(0, "input_noise", 1)
    assert len({draw_seed(0, t, d) for t in ("input_noise", "weight_noise") for d in range(3)}) == 6
    p = derangement(7, 3)
    assert sorted(p) == list(range(7)) and (p != np.arange(7)).all()
    assert (derangement(7, 3) == p).all() and list(derangement(1, 0)) == [0]
    from xai_methods import surgery
    from helpers import tiny_cnn

    model = tiny_cnn()
    a, b = surgery.weight_noise(model, 0.01, 5), surgery.weight_noise(model, 0.01, 5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    ratio = (a.conv1.weight / model.conv1.weight).detach() if hasattr(a, "conv1") else None
    assert ratio is None or abs(float(ratio.std()) - 0.01) < 0.005
