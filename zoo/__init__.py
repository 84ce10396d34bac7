"""Built-in datasets (with ground-truth masks) and models, and loaders for users' own.

>>> ds = load_dataset("shapes", split="test", limit=256)
>>> model = load_model("shapes-cnn")
>>> batch = ds.load(0, 32)
>>> logits = model(model.preprocess(torch.from_numpy(batch.images)))
"""

from .base import Batch, Dataset, Preprocess
from .datasets import DATASETS, load_dataset
from .folder import FolderDataset
from .generative import GENERATORS, Generative, ShapesVAE, load_generator
from .models import MODELS, ShapesCNN, load_model, model_fingerprint
from .shapes import ShapesDataset

__all__ = ["DATASETS", "GENERATORS", "MODELS", "Batch", "Dataset", "FolderDataset", "Generative", "Preprocess",
           "ShapesCNN", "ShapesDataset", "ShapesVAE", "load_dataset", "load_generator", "load_model", "model_fingerprint"]
