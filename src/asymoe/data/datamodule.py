"""LightningDataModule over easy-VQA, LLaVA-format JSON or the generated scenes benchmark.

Splits: train, val, and one or more test splits (easy-VQA and LLaVA JSON: `test`; scenes:
`test_iid`, `test_prior_shift`, `test_pope_*`, `test_blind`), each its own test dataloader whose
batches carry the split's name, which evaluation reports the metrics under.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from asymoe.config import Config, ConfigError
from asymoe.data.records import (
    DataError,
    Encoded,
    ImageGroupedBatchSampler,
    encode_record,
    make_collate,
    without_image,
)
from asymoe.data.sources import Split, load_easy_vqa, load_llava_json, load_scenes
from asymoe.data.tokenizer import HFTokenizer, Tokenizer, WordTokenizer
from asymoe.models.vision import Preprocessing, resolve_preprocessing

log = logging.getLogger(__name__)
CACHE_LIMIT = 20000


class ImageStore:
    """Loads images as normalised float tensors (3, size, size); caches small data sets in memory.

    Size, interpolation, mean and std are the vision encoder's (`models.vision.resolve_preprocessing`).
    """

    def __init__(self, paths: dict[str, str], preprocessing: Preprocessing):
        self.paths = paths
        self.size = preprocessing.size
        self.resample = Image.Resampling[preprocessing.interpolation.upper()]
        self.mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
        self.std = torch.tensor(preprocessing.std).view(3, 1, 1)
        self.cache: dict[str, torch.Tensor] | None = {} if len(paths) <= CACHE_LIMIT else None

    def _read(self, key: str) -> torch.Tensor:
        with Image.open(self.paths[key]) as image:
            image = image.convert("RGB")
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), self.resample)
            array = np.asarray(image, dtype=np.uint8).copy()
        return torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W) uint8

    def __call__(self, key: str) -> torch.Tensor:
        if self.cache is None:
            raw = self._read(key)
        else:
            raw = self.cache.get(key)
            if raw is None:
                raw = self.cache[key] = self._read(key)
        return raw.float().div(255.0).sub(self.mean).div(self.std)


class VQADataModule(L.LightningDataModule):
    """Records -> tokenizer -> encoded samples -> image-grouped batches.

    Call `prepare(tokenizer_dir)` (loads records, builds or loads the tokenizer) before building
    the model, then `encode(num_image_tokens)` once the model knows its visual token count.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.data = config.data
        self.splits: dict[str, Split] = {}
        self.tokenizer: Tokenizer | None = None
        self.samples: dict[str, list[Encoded]] = {}
        self.stores: dict[str, ImageStore] = {}

    # -- set-up ---------------------------------------------------------------------------------

    def split_names(self) -> list[str]:
        """The splits this data source has, in order, without loading them."""
        data = self.data
        if data.source == "scenes":
            from asymoe.data.scenes.dataset import SPLIT_FILES

            return list(SPLIT_FILES)
        if data.source == "easy_vqa":
            return ["train", "val", "test"]
        return ["train"] + [name for name, path in (("val", data.val_path), ("test", data.test_path)) if path]

    def prepare(self, tokenizer_dir: str | Path | None = None, only: set[str] | None = None) -> Tokenizer:
        """Load the splits (all, or those in `only`, e.g. the one an analysis reads) and the tokenizer."""
        data = self.data
        if data.source == "easy_vqa":
            self.splits = load_easy_vqa(data)
        elif data.source == "scenes":
            self.splits = load_scenes(data, only)
        else:
            self.splits = {}
            for name, path in (("train", data.train_path), ("val", data.val_path), ("test", data.test_path)):
                if path is not None and (not only or name in only):
                    self.splits[name] = load_llava_json(path, data.image_root, data.on_error)
        if only:
            self.splits = {name: split for name, split in self.splits.items() if name in only}
        for name, split in self.splits.items():
            limit = data.limit_test if name.startswith("test") else getattr(data, f"limit_{name}")
            if limit is not None:
                split.records = split.records[:limit]
            if data.drop_images:
                split.records = [without_image(record) for record in split.records]
            if split.skipped:
                log.warning(
                    "data: skipped %d malformed records in the %s split (data.on_error=skip)", split.skipped, name
                )
            if not split.records:
                raise DataError(f"data: the {name} split has no records")
        lm_path = self.config.model.language.pretrained_path
        if lm_path is not None:
            self.tokenizer = HFTokenizer(lm_path)
        elif tokenizer_dir is not None and (Path(tokenizer_dir) / WordTokenizer.FILENAME).is_file():
            self.tokenizer = WordTokenizer.load(Path(tokenizer_dir))
        else:
            assert "train" in self.splits, "the word tokenizer is built from the train split"
            self.tokenizer = WordTokenizer.build(text for r in self.splits["train"].records for _, text in r.turns)
        return self.tokenizer

    def encode(self, num_image_tokens: int) -> None:
        assert self.tokenizer is not None, "prepare() first"
        for name, split in self.splits.items():
            encoded = []
            for record in split.records:
                try:
                    encoded.append(encode_record(record, self.tokenizer, num_image_tokens))
                except DataError:
                    if self.data.on_error == "raise":
                        raise
                    split.skipped += 1
            self.samples[name] = encoded
            self.stores[name] = ImageStore(split.image_paths, resolve_preprocessing(self.config.model.vision))

    @property
    def test_splits(self) -> list[str]:
        return [name for name in self.splits if name.startswith("test")]

    @property
    def skipped(self) -> dict[str, int]:
        return {name: split.skipped for name, split in self.splits.items()}

    # -- loaders ----------------------------------------------------------------------------------

    def _loader(self, name: str, train: bool) -> DataLoader:
        if name not in self.samples:
            raise ConfigError(f"data: no {name} split (set data.{name}_path)")
        samples = self.samples[name]
        keys = [s.image_key for s in samples]
        if train:
            sampler = ImageGroupedBatchSampler(keys, self.data.images_per_batch, shuffle=True, seed=self.config.seed)
        else:
            sampler = ImageGroupedBatchSampler(
                keys, images_per_batch=len(keys) + 1, shuffle=False, max_samples_per_batch=self.data.eval_batch_size
            )
        return DataLoader(
            list(range(len(samples))),
            batch_sampler=sampler,
            collate_fn=make_collate(samples, self.stores[name], self.tokenizer.pad_id, split=name),
            num_workers=self.data.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> list[DataLoader]:
        if not self.test_splits:
            raise ConfigError("data: no test split (set data.test_path)")
        return [self._loader(name, train=False) for name in self.test_splits]


__all__ = ["VQADataModule", "DataError"]
