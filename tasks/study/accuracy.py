"""The model's accuracy on a study's labelled samples, and the warning when it says the
preprocessing is not the one the model was trained with."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

import storage


def accuracy_warning(store: str) -> str | None:
    """One line when the model's accuracy on the labelled samples is near chance, or far below what its
    model card records: the usual cause is preprocessing other than the model was trained with."""
    s = storage.Store(store, mode="r")
    label, prediction = s.labels()
    known = (label >= 0) & (prediction >= 0)
    if known.sum() < 10:
        return None
    a, n = s.attrs, len(s.classes())
    acc, chance, recorded = float((label[known] == prediction[known]).mean()), 1 / n, a.get("model_card_accuracy")
    if recorded is not None and acc < recorded - 0.2:
        why = f"far below the {recorded:.1%} its model card records"
    elif acc <= max(1.5 * chance, chance + 0.1):
        why = f"near chance ({chance:.1%} for {n} classes)"
    else:
        return None
    h, w = a["image_shape"][1:]
    return (f"model accuracy on the {int(known.sum())} labelled samples is {acc:.1%}, {why}: the images were given "
            f"to the model at {h}x{w} with mean {a.get('image_mean')} and std {a.get('image_std')}; if it was trained "
            "otherwise, pass --input-size, --mean and --std (or put a model card beside the weights), and --classes "
            "if its classes are not the folder's in sorted order")


@task(cache_policy=NO_CACHE)
def accuracy(store: str) -> float | None:
    """The model's accuracy on the study's labelled samples (None when no sample has a label)."""
    s = storage.Store(store, mode="r")
    label, prediction = s.labels()
    known = label >= 0
    return float((label[known] == prediction[known]).mean()) if known.any() else None
