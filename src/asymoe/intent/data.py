"""Readers of the MIntRec and MIntRec 2.0 release formats, label descriptions, and the intent dataset.

A release folder holds `train.tsv`, `dev.tsv`, `test.tsv` (tab-separated, one header row) and one
pickled dict per non-text modality, utterance key -> (T, D) feature array (a (T, 1, D) array is
squeezed, as the releases' own loaders do). Columns are found by their header names, so extra
columns and other orders are accepted:

- MIntRec: `season episode clip text label`; key `{season}_{episode}_{clip}`, e.g. `S05_E16_329`.
- MIntRec 2.0: `Dialogue_id Utterance_id Text Label ...`; key `dia{d}_utt{u}`; label `UNK` marks an
  out-of-scope utterance (label id = number of in-scope labels).

Feature sequences are truncated or zero-padded at the end to the configured maximum length; the
mask marks the real frames (at least one, so that attention over an empty sequence stays defined).
"""

from __future__ import annotations

import csv
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from asymoe.data.records import DataError

OUT_OF_SCOPE = "UNK"
SPLITS = ("train", "dev", "test")
# format -> (key columns, text column, label column), header names compared case-insensitively.
COLUMNS = {
    "mintrec": (("season", "episode", "clip"), "text", "label"),
    "mintrec2": (("dialogue_id", "utterance_id"), "text", "label"),
}


@dataclass
class Utterance:
    key: str
    text: str
    label: str
    # "file:key", how reports (e.g. the non-finite-loss guard) name the utterance.
    origin: str = ""


def utterance_key(data_format: str, parts: list[str]) -> str:
    if data_format == "mintrec":
        return "_".join(parts)
    dialogue, utterance = parts
    return f"dia{dialogue}_utt{utterance}"


def read_split(path: Path, data_format: str) -> list[Utterance]:
    """The utterances of one TSV split file."""
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    key_columns, text_column, label_column = COLUMNS[data_format]
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path}: empty file (expected a header row)")
    header = [name.strip().lower() for name in rows[0]]
    needed = (*key_columns, text_column, label_column)
    missing = [name for name in needed if name not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} for intent.data.format='{data_format}' "
            f"(header: {' '.join(rows[0])})"
        )
    index = {name: header.index(name) for name in needed}
    utterances = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) <= max(index.values()):
            raise DataError(f"{path}:{line}: {len(row)} columns, expected at least {max(index.values()) + 1}")
        parts = [row[index[name]].strip() for name in key_columns]
        key = utterance_key(data_format, parts)
        utterances.append(Utterance(key, row[index[text_column]], row[index[label_column]].strip(), f"{path}:{key}"))
    return utterances


def read_labels(path: Path) -> tuple[list[str], list[str]]:
    """Label names (in label-id order) and their descriptions from a `label<TAB>description` file."""
    names, descriptions = [], []
    for line, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        if "\t" not in text:
            raise DataError(f"{path}:{line}: expected `label<TAB>description`")
        name, description = (part.strip() for part in text.split("\t", 1))
        names.append(name)
        descriptions.append(description)
    if len(set(names)) != len(names):
        raise DataError(f"{path}: a label is listed twice")
    return names, descriptions


def shipped_labels_file(data_format: str) -> Path:
    return Path(str(resources.files("asymoe.intent") / "labels" / f"{data_format}.tsv"))


def load_features(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    with open(path, "rb") as handle:
        features = pickle.load(handle)
    if not isinstance(features, dict):
        raise DataError(f"{path}: expected a pickled dict utterance key -> (T, D) array, got {type(features).__name__}")
    return features


def pad_sequence(array, max_length: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, D) features -> ((max_length, D) float32 zero-padded/truncated, (max_length,) bool mask)."""
    features = np.asarray(array, dtype=np.float32)
    if features.ndim == 3 and features.shape[1] == 1:
        features = features[:, 0]
    if features.ndim != 2:
        raise DataError(f"{where}: expected a (T, D) array, got shape {tuple(features.shape)}")
    length = min(features.shape[0], max_length)
    padded = torch.zeros(max_length, features.shape[1])
    padded[:length] = torch.from_numpy(features[:length])
    mask = torch.zeros(max_length, dtype=torch.bool)
    mask[: max(length, 1)] = True
    return padded, mask


def feature_width(features: dict, path: Path) -> int:
    for value in features.values():
        array = np.asarray(value)
        return int(array.shape[-1])
    raise DataError(f"{path}: no features")


class IntentDataset(Dataset):
    """Tokenised text plus padded video / audio features of a list of utterances.

    `video` / `audio`: the feature dict and its file, or None when the modality is switched off.
    Labels outside `label_names` are refused, except the out-of-scope label of MIntRec 2.0.
    """

    def __init__(
        self,
        utterances: list[Utterance],
        split_file: Path,
        token_ids: list[list[int]],
        label_names: list[str],
        modalities: dict[str, tuple[dict, Path, int]],
    ):
        label_ids = {name: i for i, name in enumerate(label_names)}
        self.token_ids = token_ids
        self.keys = [u.key for u in utterances]
        self.labels = []
        for utterance in utterances:
            if utterance.label == OUT_OF_SCOPE:
                self.labels.append(len(label_names))
            elif utterance.label in label_ids:
                self.labels.append(label_ids[utterance.label])
            else:
                raise DataError(f"{split_file}: utterance {utterance.key} has unknown label '{utterance.label}'")
        self.modalities = {}
        for name, (features, path, max_length) in modalities.items():
            for key in self.keys:
                if key not in features:
                    raise DataError(f"{path}: no features for utterance '{key}' (listed in {split_file})")
            self.modalities[name] = (features, path, max_length)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        key = self.keys[index]
        item = {"input_ids": torch.tensor(self.token_ids[index]), "label": self.labels[index]}
        for name, (features, path, max_length) in self.modalities.items():
            item[name], item[f"{name}_mask"] = pad_sequence(features[key], max_length, f"{path}: {key}")
        return item
