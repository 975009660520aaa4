"""Intent task (our reading of A-MESS): readers, metrics, losses, model identities, switches, a tiny fit."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from asymoe import config as config_lib
from asymoe.config import ConfigError
from asymoe.data.records import DataError
from asymoe.intent.config import IntentConfig
from asymoe.intent.data import IntentDataset, pad_sequence, read_labels, read_split, shipped_labels_file
from asymoe.intent.losses import infonce_loss, triplet_loss
from asymoe.intent.metrics import classification_metrics, open_set_metrics
from asymoe.intent.model import IntentModel
from asymoe.intent.synthetic import write_synthetic
from asymoe.intent.tokens import IntentTokenizer

# -- readers ----------------------------------------------------------------------------------


def _write_pickle(path: Path, features: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(features, handle)
    return path


def test_mintrec_reader_pads_truncates_and_names_missing_keys(tmp_path):
    split = tmp_path / "train.tsv"
    split.write_text(
        "season\tepisode\tclip\ttext\tlabel\nS05\tE16\t329\tthank you so much\tThank\nS01\tE02\t7\tsorry\tApologise\n"
    )
    utterances = read_split(split, "mintrec")
    assert [u.key for u in utterances] == ["S05_E16_329", "S01_E02_7"]
    assert (utterances[0].text, utterances[0].label) == ("thank you so much", "Thank")
    short = np.arange(6, dtype=np.float32).reshape(2, 3)  # (T=2, D=3)
    long = np.ones((7, 1, 3), dtype=np.float32)  # (T, 1, D) as some releases store it
    video = _write_pickle(tmp_path / "video_data" / "video_feats.pkl", {"S05_E16_329": short, "S01_E02_7": long})
    names, _ = read_labels(shipped_labels_file("mintrec"))
    features = pickle.loads(video.read_bytes())
    dataset = IntentDataset(utterances, split, [[1, 2], [1, 3]], names, {"video": (features, video, 4)})
    first, second = dataset[0], dataset[1]
    assert torch.equal(first["video"], torch.tensor([[0, 1, 2], [3, 4, 5], [0, 0, 0], [0, 0, 0]], dtype=torch.float32))
    assert first["video_mask"].tolist() == [True, True, False, False]
    assert second["video"].shape == (4, 3) and bool(second["video_mask"].all()) and float(second["video"].sum()) == 12
    assert (first["label"], second["label"]) == (names.index("Thank"), names.index("Apologise"))
    with pytest.raises(DataError) as error:
        IntentDataset(utterances, split, [[1], [1]], names, {"video": ({"S05_E16_329": short}, video, 4)})
    message = str(error.value)
    assert "S01_E02_7" in message and "video_feats.pkl" in message and "train.tsv" in message and "\n" not in message


def test_mintrec2_reader_keys_out_of_scope_and_errors(tmp_path):
    split = tmp_path / "test.tsv"
    split.write_text(
        "Dialogue_id\tUtterance_id\tText\tLabel\tSpeaker\n"
        "3\t7\tcan you help me\tAsk for help\tJoey\n3\t8\tuh huh\tUNK\tRoss\n"
    )
    utterances = read_split(split, "mintrec2")
    assert [u.key for u in utterances] == ["dia3_utt7", "dia3_utt8"]
    names, descriptions = read_labels(shipped_labels_file("mintrec2"))
    assert len(names) == 30 and names[0] == "Acknowledge" and names[-1] == "Warn" and all(descriptions)
    dataset = IntentDataset(utterances, split, [[1], [1]], names, {})
    assert dataset.labels == [names.index("Ask for help"), 30]  # UNK -> id = number of in-scope labels
    assert pad_sequence(np.zeros((0, 5)), 3, "x")[1].tolist() == [
        True,
        False,
        False,
    ]  # an empty sequence keeps one frame
    with pytest.raises(DataError, match=r"missing column\(s\) season, episode, clip"):
        read_split(split, "mintrec")
    split.write_text("Dialogue_id\tUtterance_id\tText\tLabel\n1\t1\thi\tNoSuchIntent\n")
    with pytest.raises(DataError, match="unknown label 'NoSuchIntent'"):
        IntentDataset(read_split(split, "mintrec2"), split, [[1]], names, {})
    mintrec = read_labels(shipped_labels_file("mintrec"))[0]
    assert len(mintrec) == 20 and mintrec[:3] == ["Complain", "Praise", "Apologise"] and mintrec[-1] == "Ask for help"


# -- metrics (hand-computed) --------------------------------------------------------------------


def test_classification_metrics_match_hand_computed_values():
    # Confusion: true 0 -> {0, 1}, true 1 -> {1, 1}, true 2 -> {0}. P = (1/2, 2/3, 0), R = (1/2, 1, 0),
    # F1 = (1/2, 4/5, 0), support = (2, 2, 1).
    scores = classification_metrics(torch.tensor([0, 1, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 2]), 3)
    assert scores["acc"] == pytest.approx(60.0)
    assert scores["wf1"] == pytest.approx(100 * (2 * 0.5 + 2 * 0.8) / 5)
    assert scores["wp"] == pytest.approx(100 * (2 * 0.5 + 2 * 2 / 3) / 5)
    assert scores["r"] == pytest.approx(50.0)
    assert scores["f1_per_class"].tolist() == pytest.approx([0.5, 0.8, 0.0])
    # A class that is only predicted counts in the macro recall (as scikit-learn); an absent one does not.
    scores = classification_metrics(torch.tensor([3, 1]), torch.tensor([0, 1]), 4)
    assert (scores["acc"], scores["wf1"], scores["wp"]) == pytest.approx((50.0, 50.0, 50.0))
    assert scores["r"] == pytest.approx(100 / 3)


def test_open_set_metrics_match_hand_computed_values():
    probabilities = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7], [0.5, 0.5]])
    targets = torch.tensor([0, 2, 1, 1])  # 2 = out-of-scope
    scores = open_set_metrics(probabilities, targets, threshold=0.6)
    # Predictions 0, OOS, 1, OOS: F1 = (1, 2/3, 2/3) for classes 0, 1, OOS.
    assert scores["acc"] == pytest.approx(75.0)
    assert scores["f1"] == pytest.approx(100 * 7 / 9)
    assert scores["f1_ind"] == pytest.approx(100 * 5 / 6)
    assert scores["f1_oos"] == pytest.approx(100 * 2 / 3)


# -- losses (hand-made embeddings) --------------------------------------------------------------

DESCRIPTIONS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def test_triplet_loss_values():
    samples, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    # Cosine distances: sample 0 -> (0, 1, 2), sample 1 -> (1, 0, 1); hardest negatives d = 1 and 0.
    hardest = triplet_loss(samples, DESCRIPTIONS, labels, 0.2, "cosine", "hardest")
    assert float(hardest) == pytest.approx((0.0 + 1.2) / 2)
    # Euclidean: d(s, e0) = 5, d(s, e1) = 4 for s = (3, 4), e0 = (0, 0), e1 = (3, 0).
    euclidean = triplet_loss(
        torch.tensor([[3.0, 4.0]]),
        torch.tensor([[0.0, 0.0], [3.0, 0.0]]),
        torch.tensor([0]),
        0.5,
        "euclidean",
        "random",
    )
    assert float(euclidean) == pytest.approx(1.5)
    # Random negatives are uniform over the other labels and never the positive: with margin 3 the
    # per-sample loss is 2 (negative e1) or 1 (e2), so the mean over many draws is about 1.5.
    many = torch.tensor([[1.0, 0.0]]).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    mean = float(
        triplet_loss(many, DESCRIPTIONS, torch.zeros(4000, dtype=torch.long), 3.0, "cosine", "random", generator)
    )
    assert mean == pytest.approx(1.5, abs=0.03)


def test_infonce_loss_value():
    loss = infonce_loss(torch.tensor([[1.0, 0.0]]), DESCRIPTIONS[:2], torch.tensor([0]), 0.5, "cosine")
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)  # logits (0, -2)


# -- model identities and switches ------------------------------------------------------------

DIMS = {"video": 5, "audio": 7}


def _intent(**switches) -> IntentConfig:
    intent = IntentConfig()
    intent.text_encoder.hidden_size, intent.text_encoder.intermediate_size = 16, 32
    for key, value in switches.items():
        target, attribute = (intent, key) if "." not in key else (getattr(intent, key.split(".")[0]), key.split(".")[1])
        setattr(target, attribute, value)
    return intent


def _model(intent: IntentConfig) -> IntentModel:
    dims = {m: d for m, d in DIMS.items() if getattr(intent, f"use_{m}")}
    return IntentModel(intent, vocab_size=50, pad_id=0, num_labels=6, modality_dims=dims)


def test_anchors_off_is_exactly_the_text_classifier():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = _model(_intent(**{"anchors.enabled": False})).eval()
    config = model.encoder.config
    config.num_labels = 6
    reference = BertForSequenceClassification(config).eval()
    reference.bert.load_state_dict(model.encoder.state_dict())
    reference.classifier.load_state_dict(model.classifier.state_dict())
    input_ids = torch.tensor([[1, 5, 9, 2, 0, 0], [1, 7, 8, 9, 4, 2]])
    attention_mask = (input_ids != 0).long()
    logits, _ = model({"input_ids": input_ids, "attention_mask": attention_mask})
    expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def _shapes(model: IntentModel) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_every_switch_changes_the_parameter_set_as_documented():
    full = _shapes(_model(_intent()))
    text_only = _shapes(_model(_intent(**{"anchors.enabled": False})))
    anchor_names = {n for n in full if n.startswith("anchor_embedding.")}
    assert anchor_names and set(full) - set(text_only) == anchor_names and set(text_only) <= set(full)
    k2 = _shapes(_model(_intent(**{"anchors.num_anchors": 2})))
    assert {n for n in full if full[n] != k2[n]} == {"anchor_embedding.anchors"} and k2["anchor_embedding.anchors"] == (
        2,
        16,
    )
    for modality, other in (("video", "audio"), ("audio", "video")):
        without = _shapes(_model(_intent(**{f"use_{modality}": False})))
        removed = set(full) - set(without)
        assert removed == {n for n in full if n.startswith(f"anchor_embedding.projections.{modality}.")}
        assert any(n.startswith(f"anchor_embedding.projections.{other}.") for n in without)
        assert without["anchor_embedding.modality_type"] == (1, 16)
    # Semantic synchronisation adds no parameters: descriptions go through the text encoder itself.
    assert _shapes(_model(_intent(**{"semantic_sync.enabled": False}))) == full
    assert _shapes(_model(_intent(**{"semantic_sync.weight": 2.0}))) == full
    table = _model(_intent()).parameter_table()
    assert table["total"] == sum(table[k] for k in ("text_encoder", "classifier", "anchors"))
    assert table["anchors"] > table["video_projection"] + table["audio_projection"] > 0


def test_anchor_slots_get_the_gain_scaled_summary():
    torch.manual_seed(0)
    model = _model(_intent()).eval()
    batch = {
        "input_ids": torch.tensor([[1] + [3] * 4 + [7, 2]]),
        "attention_mask": torch.ones(1, 7, dtype=torch.long),
        "video": torch.randn(1, 4, 5),
        "video_mask": torch.ones(1, 4, dtype=torch.bool),
        "audio": torch.randn(1, 3, 7),
        "audio_mask": torch.tensor([[True, True, False]]),
    }
    logits, _ = model(batch)
    changed = dict(batch, audio=batch["audio"].clone())
    changed["audio"][0, 2] += 100.0  # a padded frame: masked out of the anchors' attention
    assert torch.equal(model(changed)[0], logits)
    with torch.no_grad():
        model.anchor_embedding.gain.zero_()
    plain = model.encode(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(model(batch)[0], model.classifier(plain), rtol=0, atol=0)


def test_word_tokenizer_layout():
    tokenizer = IntentTokenizer.build(["hi there"], None)  # vocabulary: the 7 specials, then hi, there
    assert tokenizer.encode("hi", 5, slots=2) == [1, 4, 4, 7, 2, 0, 0]  # CLS, 2 slots, hi, SEP, padding
    assert tokenizer.encode("hi there you", 4) == [1, 7, 8, 2]  # text truncated to max_length - 2


def test_pretrained_encoder_and_tokenizer_from_a_local_directory(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path)
    config = BertConfig(vocab_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    saved = BertModel(config)
    saved.save_pretrained(tmp_path)
    intent = _intent(**{"text_encoder.pretrained_path": str(tmp_path)})
    tokenizer = IntentTokenizer.build([], str(tmp_path))
    assert tokenizer.slot_id == 7 and tokenizer.encode("hello world", 5, slots=1) == [2, 7, 5, 6, 3, 0]
    model = IntentModel(intent, tokenizer.vocab_size, tokenizer.pad_id, 4, DIMS)
    embeddings = model.encoder.get_input_embeddings().weight
    assert embeddings.shape == (8, 16)  # resized for the slot token
    assert torch.equal(embeddings[:7], saved.get_input_embeddings().weight)
    assert torch.equal(model.encoder.pooler.dense.weight, saved.pooler.dense.weight)


# -- config, synthetic data, and a tiny fit -----------------------------------------------------


def test_config_rules():
    with pytest.raises(ConfigError, match="intent.anchors.enabled needs a non-text modality"):
        config_lib.load("amess", ["intent.use_video=false", "intent.use_audio=false"])
    with pytest.raises(ConfigError, match="intent.semantic_sync.distance"):
        config_lib.load("amess", ["intent.semantic_sync.distance=manhattan"])
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        config_lib.load("amess", ["intent.text_encoder.max_position_embeddings=19"])


def test_synthetic_set_is_deterministic_and_in_mintrec_format(tmp_path):
    cfg = IntentConfig().data.synthetic
    cfg.train_per_label, cfg.dev_per_label, cfg.test_per_label = 2, 1, 1
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_synthetic(cfg, tmp_path / folder)
    for name in ("train.tsv", "test.tsv", "video_data/video_feats.pkl", "audio_data/audio_feats.pkl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = read_split(tmp_path / "a" / "train.tsv", "mintrec")
    names, _ = read_labels(shipped_labels_file("mintrec"))
    assert len(train) == 40 and sorted({u.label for u in train}) == sorted(names)
    video = pickle.loads((tmp_path / "a" / "video_data" / "video_feats.pkl").read_bytes())
    assert all(video[u.key].shape[1] == cfg.video_dim for u in train)


TINY_INTENT = [
    "intent.text_encoder.hidden_size=16",
    "intent.text_encoder.intermediate_size=32",
    "intent.text_encoder.num_heads=2",
    "intent.anchors.heads=2",
    "intent.data.batch_size=8",
    "trainer.max_steps=3",
    "trainer.max_epochs=1",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "optim.warmup_steps=1",
]
METRIC_KEYS = ("test/accuracy", "test/acc", "test/wf1", "test/wp", "test/r", "val/acc", "params/total")


def test_tiny_fit_writes_metrics_and_tensorboard(tmp_path, capsys):
    from asymoe import cli
    from asymoe.training.run import fit

    synthetic = [f"intent.data.synthetic.cache_dir={tmp_path / 'cache'}", "intent.data.synthetic.train_per_label=2"]
    synthetic += ["intent.data.synthetic.dev_per_label=1", "intent.data.synthetic.test_per_label=1"]
    cfg = config_lib.load("amess", TINY_INTENT + synthetic + [f"output_dir={tmp_path / 'run'}"])
    metrics = fit(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    capsys.readouterr()
    assert cli.main(["test", "amess", *TINY_INTENT, *synthetic, f"ckpt={saved['best_checkpoint']}"]) == 0
    out = capsys.readouterr().out
    reported = json.loads(out[out.index("{") :])
    assert reported["test/wf1"] == pytest.approx(metrics["test/wf1"], abs=1e-4)  # the checkpoint reproduces the run
    assert set(METRIC_KEYS) <= set(saved), set(METRIC_KEYS) - set(saved)
    assert saved["test/acc"] == pytest.approx(100 * saved["test/accuracy"]) and 0 <= saved["test/wf1"] <= 100
    assert metrics["params/anchors"] > 0 and math.isfinite(saved["train/loss"])
    assert not any(key.startswith("test/oos/") for key in saved)  # MIntRec has no out-of-scope class
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/align_loss", "train/ce_loss", "val_f1_per_class/Complain", "test_f1_per_class/Ask for help"} <= tags


def test_tiny_fit_on_mintrec2_reports_out_of_scope(tmp_path):
    """A MIntRec 2.0-format folder with `UNK` rows: trained on in-scope only, out-of-scope figures at test."""
    from asymoe.training.run import fit

    names, _ = read_labels(shipped_labels_file("mintrec2"))
    rng = np.random.default_rng(0)
    video, audio = {}, {}
    for split, count in (("train", 24), ("dev", 8), ("test", 8)):
        rows = ["Dialogue_id\tUtterance_id\tText\tLabel\tSpeaker"]
        for index in range(count):
            label = "UNK" if index % 4 == 3 else names[index % 5]
            rows.append(f"{split}{index}\t{index}\tword{index % 5} other\t{label}\tA")
            key = f"dia{split}{index}_utt{index}"
            video[key], audio[key] = rng.standard_normal((5, 3)), rng.standard_normal((9, 1, 4))
        (tmp_path / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    _write_pickle(tmp_path / "video_data" / "video_feats.pkl", video)
    _write_pickle(tmp_path / "audio_data" / "audio_feats.pkl", audio)
    data = [f"intent.data.root={tmp_path}", "intent.data.format=mintrec2", "intent.data.video_max_length=4"]
    cfg = config_lib.load("amess", TINY_INTENT + data + [f"output_dir={tmp_path / 'run'}", "logging.tensorboard=false"])
    metrics = fit(cfg)
    assert {"test/oos/acc", "test/oos/f1", "test/oos/f1_ind", "test/oos/f1_oos", "test/acc"} <= set(metrics)
    assert metrics["params/video_projection"] == 3 * 16 + 16 + 2 * 16  # Linear(3 -> 16) + LayerNorm(16)
