"""The scenes benchmark: procedurally generated scene-reasoning VQA (Sort-of-CLEVR / CLEVR family).

world: objects, scenes, rendering; questions: the question families; splits: long-tailed train,
iid / prior-shift / POPE / blind test sets; dataset: generation into a cache as LLaVA JSON.
"""

from asymoe.data.scenes.dataset import TEST_SPLITS, ensure_dataset, split_files
from asymoe.data.scenes.questions import FAMILIES

__all__ = ["FAMILIES", "TEST_SPLITS", "ensure_dataset", "split_files"]
