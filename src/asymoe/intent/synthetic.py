"""The embedded default data set: synthetic utterances written in exactly the MIntRec release format.

Each of MIntRec's 20 intents is one cell of a 5 x 2 x 2 code: label id = 4·t + 2·v + a, where
- t (5 values) is carried only by the text: one cue word of group t among filler words;
- v (2 values) only by the video features: a short burst of pattern P_v at a random time;
- a (2 values) only by the audio features: a burst of pattern Q_a at a random time;
everything else is Gaussian noise. Intents 4t+2v+a and 4t+2v+(1-a) differ only in audio, 4t+v'..
only in video, and 4t'+.. only in text, so text alone reaches ~1/4 accuracy, text + one modality
~1/2, and only all three recover the label. Generation is deterministic from the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np

from asymoe.intent.config import SyntheticConfig
from asymoe.intent.data import SPLITS, read_labels, shipped_labels_file

TEXT_GROUPS = (
    ("seriously", "unbelievable", "ridiculous"),
    ("wonderful", "brilliant", "amazing"),
    ("please", "maybe", "should"),
    ("tomorrow", "schedule", "meeting"),
    ("hello", "goodbye", "welcome"),
)
FILLER = (
    "i you we they it that this the a so well just really now then here there what about with okay "
    "know think see go get make look come say tell right yeah oh hey all one thing time"
).split()
BURST = {"video": 6, "audio": 10}
AMPLITUDE = 3.0


def _feature_sequences(rng: np.random.Generator, patterns: np.ndarray, codes: list[int], max_len: int, burst: int):
    """One (T, D) float32 array per code: noise plus `AMPLITUDE * patterns[code]` on `burst` frames."""
    sequences = []
    burst = min(burst, max_len)
    for code in codes:
        length = int(rng.integers(max(max_len // 3, burst), max_len + 1))
        frames = rng.standard_normal((length, patterns.shape[1])).astype(np.float32)
        start = int(rng.integers(0, length - burst + 1))
        frames[start : start + burst] += AMPLITUDE * patterns[code]
        sequences.append(frames)
    return sequences


def _unit_patterns(rng: np.random.Generator, dim: int) -> np.ndarray:
    patterns = rng.standard_normal((2, dim)).astype(np.float32)
    return patterns / np.linalg.norm(patterns, axis=1, keepdims=True)


def _text(rng: np.random.Generator, group: int) -> str:
    words = list(rng.choice(FILLER, size=int(rng.integers(4, 11))))
    words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(TEXT_GROUPS[group])))
    return " ".join(words)


def write_synthetic(cfg: SyntheticConfig, folder: Path) -> None:
    """Write train/dev/test.tsv, video_data/video_feats.pkl and audio_data/audio_feats.pkl into `folder`."""
    labels, _ = read_labels(shipped_labels_file("mintrec"))
    assert len(labels) == len(TEXT_GROUPS) * 4
    rng = np.random.default_rng(cfg.seed)
    video_patterns, audio_patterns = _unit_patterns(rng, cfg.video_dim), _unit_patterns(rng, cfg.audio_dim)
    video, audio = {}, {}
    clip = 0
    for split, per_label in zip(SPLITS, (cfg.train_per_label, cfg.dev_per_label, cfg.test_per_label)):
        label_ids = rng.permutation(np.repeat(np.arange(len(labels)), per_label)).tolist()
        rows = ["season\tepisode\tclip\ttext\tlabel"]
        keys = []
        for label_id in label_ids:
            clip += 1
            season, episode = f"S{1 + clip % 5:02d}", f"E{1 + clip % 20:02d}"
            keys.append(f"{season}_{episode}_{clip}")
            rows.append(f"{season}\t{episode}\t{clip}\t{_text(rng, label_id // 4)}\t{labels[label_id]}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        video_codes = [(label_id // 2) % 2 for label_id in label_ids]
        audio_codes = [label_id % 2 for label_id in label_ids]
        video.update(zip(keys, _feature_sequences(rng, video_patterns, video_codes, cfg.video_max_len, BURST["video"])))
        audio.update(zip(keys, _feature_sequences(rng, audio_patterns, audio_codes, cfg.audio_max_len, BURST["audio"])))
    for name, features in (("video", video), ("audio", audio)):
        (folder / f"{name}_data").mkdir()
        with open(folder / f"{name}_data" / f"{name}_feats.pkl", "wb") as handle:
            pickle.dump(features, handle)


def synthetic_root(cfg: SyntheticConfig) -> Path:
    """The cached synthetic release folder for `cfg`, generated on first use (atomically)."""
    settings = json.dumps(vars(cfg) | {"cache_dir": None, "version": 1}, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asymoe" / "intent"
    root = (Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache) / f"mintrec_seed{cfg.seed}_{digest}"
    if (root / "test.tsv").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.parent / f".{root.name}.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    write_synthetic(cfg, partial)
    try:
        os.replace(partial, root)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(partial, ignore_errors=True)
    return root
