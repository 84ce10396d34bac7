"""Built-in datasets (with ground-truth masks) and models, and loaders for users' own.

>>> ds = load_dataset("shapes", split="test", limit=256)
>>> model = load_model("shapes-cnn")
>>> batch = ds.load(0, 32)
>>> logits = model(model.preprocess(torch.from_numpy(batch.images)))
"""

from .base import Batch, Dataset, Preprocess
from .datasets import DATASETS, load_dataset
from .folder import FolderDataset
from .models import MODELS, ShapesCNN, load_model, model_fingerprint
from .shapes import ShapesDataset

__all__ = ["DATASETS", "MODELS", "Batch", "Dataset", "FolderDataset", "Preprocess", "ShapesCNN",
           "ShapesDataset", "load_dataset", "load_model", "model_fingerprint"]
