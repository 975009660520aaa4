"""LightningDataModule of the intent task: release folder (or the synthetic default) -> loaders.

`prepare()` reads the splits, the label descriptions and the feature files of the enabled
modalities (only when anchors are on: the text-only model reads no features), builds the
tokenizer and the datasets. Out-of-scope utterances (MIntRec 2.0 `UNK`) are left out of training
and kept in dev / test for the out-of-scope figures. `data.limit_train|val|test` cap the splits
and `data.eval_batch_size`, `data.num_workers` apply, as for the VQA task.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from asymoe.config import Config
from asymoe.data.records import DataError
from asymoe.intent.data import (
    OUT_OF_SCOPE,
    SPLITS,
    IntentDataset,
    Utterance,
    feature_width,
    load_features,
    read_labels,
    read_split,
    shipped_labels_file,
)
from asymoe.intent.synthetic import synthetic_root
from asymoe.intent.tokens import IntentTokenizer


class IntentDataModule(L.LightningDataModule):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.intent = config.intent
        self.datasets: dict[str, IntentDataset] = {}
        self.samples: dict[str, list[Utterance]] = {}
        self.skipped: dict[str, int] = {}
        self.modality_dims: dict[str, int] = {}

    @property
    def root(self) -> Path:
        data = self.intent.data
        return Path(data.root).expanduser() if data.root is not None else synthetic_root(data.synthetic)

    def _modalities(self) -> list[str]:
        if not self.intent.anchors.enabled:
            return []
        return [m for m in ("video", "audio") if getattr(self.intent, f"use_{m}")]

    def prepare(self, run_dir: Path | None = None) -> IntentTokenizer:
        """Read everything and build the datasets; returns the tokenizer (`run_dir` is unused: the
        word vocabulary is rebuilt identically from the training split)."""
        data = self.intent.data
        root = self.root
        labels_file = Path(data.labels_file) if data.labels_file else shipped_labels_file(data.format)
        self.label_names, self.descriptions = read_labels(labels_file)
        splits = {split: read_split(root / f"{split}.tsv", data.format) for split in SPLITS}
        splits["train"] = [u for u in splits["train"] if u.label != OUT_OF_SCOPE]
        for split, limit in zip(
            SPLITS, (self.config.data.limit_train, self.config.data.limit_val, self.config.data.limit_test)
        ):
            splits[split] = splits[split][:limit] if limit is not None else splits[split]
        if not splits["train"]:
            raise DataError(f"{root / 'train.tsv'}: no in-scope utterance to train on")
        texts = [u.text for u in splits["train"]] + self.descriptions
        self.tokenizer = IntentTokenizer.build(texts, self.intent.text_encoder.pretrained_path)
        features = {}
        for name in self._modalities():
            path = root / getattr(data, f"{name}_features")
            features[name] = (load_features(path), path, getattr(data, f"{name}_max_length"))
            self.modality_dims[name] = feature_width(features[name][0], path)
        slots = self.intent.anchors.num_anchors if self.intent.anchors.enabled else 0
        self.samples = splits
        for split, utterances in splits.items():
            self.datasets[split] = self._dataset(utterances, root / f"{split}.tsv", features, slots)
        self.description_ids = torch.tensor(
            [self.tokenizer.encode(text, data.text_max_length) for text in self.descriptions]
        )  # (labels, text_max_length): descriptions carry no anchor slots
        return self.tokenizer

    def _dataset(self, utterances: list[Utterance], path: Path, features: dict, slots: int) -> IntentDataset:
        ids = [self.tokenizer.encode(u.text, self.intent.data.text_max_length, slots) for u in utterances]
        return IntentDataset(utterances, path, ids, self.label_names, features)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.config.data.num_workers,
            collate_fn=self.collate,
        )

    def collate(self, items: list[dict]) -> dict:
        batch = torch.utils.data.default_collate(items)
        batch["attention_mask"] = (batch["input_ids"] != self.tokenizer.pad_id).long()
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.intent.data.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("dev", self.config.data.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.config.data.eval_batch_size, shuffle=False)
