"""Nothing lost: kill -9 and torn checkpoint saves, corrupt checkpoints, reused run directories, NaN/Inf.

The kill scenarios come from benchmarks/faults.py (the benchmark repeats them with random kill
steps): a child process trains and is SIGKILLed after a step or inside a checkpoint write, then
`resume=last` runs here and must end with the uninterrupted run's weights (rtol 1e-5, atol 1e-6:
float32 reduction-order noise between thread counts) having trained on exactly the same batches.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from asymoe import cli
from asymoe import config as config_lib
from asymoe.config import ConfigError
from asymoe.training import checkpoints
from asymoe.training.checkpoints import CheckpointError, verify_checkpoint
from asymoe.training.guards import NonFiniteError
from asymoe.training.run import fit
from asymoe.training.rundir import claim_run_directory, holds_a_run
from conftest import REPO, TINY

sys.path.insert(0, str(REPO / "benchmarks"))
import faults  # noqa: E402

OVERRIDES = TINY + faults.FAULT_OVERRIDES


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    return faults.reference_run(OVERRIDES, folder), folder / "run"


# ---------------------------------------------------------------------------------------------
# kill -9, then resume=last


@pytest.mark.parametrize("scenario, seed", [("kill_at_step", 1), ("kill_in_save", 2), ("corrupt_last", 0)])
def test_killed_run_resumes_to_the_uninterrupted_weights(scenario, seed, reference, tmp_path, capfd):
    recorder, _ = reference
    epoch_batches = len(recorder.steps)
    outcome = faults.run_scenario(scenario, OVERRIDES, recorder, tmp_path, seed)
    assert outcome.survived, outcome.detail
    assert outcome.resumed_from_step in (2, 4)  # a checkpoint step, mid-epoch (the epoch is longer)
    assert epoch_batches == faults.MAX_STEPS and outcome.max_abs_diff <= 1e-5
    if scenario == "corrupt_last":
        notice = [line for line in capfd.readouterr().err.splitlines() if "resuming from" in line]
        assert len(notice) == 1 and "last.ckpt is corrupt (" in notice[0] and "the newest good checkpoint" in notice[0]


FSDP2_CASES = [("fsdp2_kill_at_step", 3), ("fsdp2_kill_in_swap", 1)]


@pytest.fixture(scope="module")
def fsdp2_outcomes(tmp_path_factory):
    """Both FSDP2 scenarios: a faulty 2-process launch each, then one for the uninterrupted run and both resumes."""
    folder = tmp_path_factory.mktemp("fsdp2")
    outcomes = faults.run_fsdp2_scenarios(FSDP2_CASES, OVERRIDES + faults.FSDP2_OVERRIDES, folder)
    return dict(zip(FSDP2_CASES, outcomes))


# Three 2-process launches for both scenarios: minutes on a 2-core machine. The ResNet encoder's
# BatchNorm statistics are per-rank buffers: without `broadcast_buffers` the resumed run's running
# means differed from the uninterrupted run's by ~1e-2.
@pytest.mark.slow
@pytest.mark.parametrize("scenario, seed", FSDP2_CASES)
def test_fsdp2_killed_run_resumes_to_the_uninterrupted_weights(scenario, seed, fsdp2_outcomes):
    outcome = fsdp2_outcomes[scenario, seed]
    assert outcome.scenario == scenario
    assert outcome.survived, outcome.detail
    assert outcome.resumed_from_step in (2, 4) and outcome.max_abs_diff <= 1e-5
    if scenario == "fsdp2_kill_in_swap":  # last.ckpt was moved aside: a complete step-4 folder is found
        assert outcome.resumed_from_step == 4
        assert any("last.ckpt not found" in n and "(step 4)" in n for n in outcome.notices), outcome.notices


def _corrupted_copy(run_dir, tmp_path, how: str):
    source = run_dir / "checkpoints" / "last.ckpt"
    target = tmp_path / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    shutil.copy(source, target)
    shutil.copy(checkpoints.sidecar(source), checkpoints.sidecar(target))
    data = bytearray(target.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 3]
    else:
        data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("how, reason", [("truncated", r"\(\d+ bytes, expected \d+\)"), ("bit flip", "SHA-256")])
def test_corrupt_checkpoint_is_one_line_for_test_and_resume(how, reason, reference, tmp_path, capsys):
    corrupt = _corrupted_copy(reference[1], tmp_path, how)
    assert cli.main(["test", "asymoe", *TINY, f"ckpt={corrupt}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"asymoe: error: checkpoint {corrupt} is corrupt (")
    assert re.search(reason, err)
    assert cli.main(["fit", "asymoe", *TINY, f"output_dir={tmp_path / 'new'}", f"resume={corrupt}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"checkpoint {corrupt} is corrupt (" in err


def test_unrecorded_unreadable_checkpoint_is_named(tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.ones(100)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is corrupt \(cannot be read: ") as error:
        verify_checkpoint(path)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Atomic writes (in-process: the crash is an exception at the worst moment)


def test_file_checkpoint_survives_a_crash_between_its_renames(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    checkpoints.save_checkpoint_file({"step": 1, "w": torch.zeros(3)}, path)
    real_replace = checkpoints.os.replace

    def crash_after_file_rename(src, dst):
        real_replace(src, dst)
        if str(dst) == str(path):
            raise KeyboardInterrupt  # the new file is in place, its final record not yet written

    monkeypatch.setattr(checkpoints.os, "replace", crash_after_file_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint_file({"step": 2, "w": torch.ones(3)}, path)
    monkeypatch.undo()
    verify_checkpoint(path)  # the record still lists the new file's checksum
    assert torch.load(path, weights_only=True)["step"] == 2
    assert len(json.loads(checkpoints.sidecar(path).read_text())["records"]) == 2


def _sharded_folder(path, step: int, shard_bytes: bytes = b"shard" * 100):
    path.mkdir(parents=True)
    torch.save({"global_step": step}, path / checkpoints.SHARDED_METADATA_FILE)
    (path / "__0_0.distcp").write_bytes(shard_bytes)
    (path / ".metadata").write_bytes(b"meta")
    checkpoints.write_folder_manifest(path)


def test_sharded_folder_manifest_detects_a_short_or_missing_shard(tmp_path):
    folder = tmp_path / "last.ckpt"
    _sharded_folder(folder, 4)
    verify_checkpoint(folder)
    (folder / "__0_0.distcp").write_bytes(b"shard" * 50)
    with pytest.raises(CheckpointError, match=r"is corrupt \(__0_0.distcp: 250 bytes, expected 500\)"):
        verify_checkpoint(folder)
    (folder / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"is incomplete \(__0_0.distcp is missing\)"):
        verify_checkpoint(folder)


def test_a_kill_during_the_folder_swap_leaves_the_new_checkpoint_findable(tmp_path):
    folder = tmp_path / "checkpoints"
    _sharded_folder(folder / "last.ckpt.old", 2)  # moved aside ...
    _sharded_folder(folder / "last.ckpt.partial", 4)  # ... the new one complete but not yet renamed
    (folder / "unfinished.ckpt.partial").mkdir()  # a staging folder whose shards were never finished
    torch.save({"global_step": 9}, folder / "unfinished.ckpt.partial" / checkpoints.SHARDED_METADATA_FILE)
    assert checkpoints.newest_good_checkpoint(folder) == (folder / "last.ckpt.partial", 4)
    checkpoints.swap_folder_into_place(folder / "last.ckpt.partial", folder / "last.ckpt")
    assert checkpoints.checkpoint_metadata(folder / "last.ckpt")["global_step"] == 4


# ---------------------------------------------------------------------------------------------
# Run directories


def test_fit_into_a_finished_run_is_refused_and_changes_nothing(reference, capsys):
    run_dir = reference[1]
    before = (run_dir / "metrics.json").read_bytes(), (run_dir / "config.yaml").read_bytes()
    assert cli.main(["fit", "asymoe", *OVERRIDES, f"output_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"asymoe: error: output_dir {run_dir} holds a finished run; continue it with resume=last, "
        "choose a fresh output_dir, or pass --overwrite to clear it first"
    )
    assert ((run_dir / "metrics.json").read_bytes(), (run_dir / "config.yaml").read_bytes()) == before
    assert not list((run_dir / "checkpoints").glob("*-v1*"))


class _StopAtFitStart(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        raise _Stopped


class _Stopped(Exception):
    pass


def _play_rank_1(monkeypatch) -> None:
    """This process plays rank 1: the rank a launcher sets (read by is_first_process) and the rank
    Lightning's rank-zero-only logging reads from it at import."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(rank_zero_only, "rank", 1)


def test_a_rank_started_with_rank_0_leaves_the_run_directory_to_it(tmp_path, monkeypatch):
    """Ranks a launcher starts together (torchrun, SLURM) reach `fit`'s writes before or after rank 0
    claims the directory. Rank 1 used to write config.yaml too: rank 0, arriving second, then found a
    "started run" in its own fresh directory, refused it and left rank 1 waiting (an FSDP2 fault test
    hung on it). Rank 1 goes up to training, then rank 0 claims the directory and trains."""
    run_dir = tmp_path / "run"
    overrides = TINY + [f"output_dir={run_dir}"]
    _play_rank_1(monkeypatch)  # up to training
    with pytest.raises(_Stopped):
        fit(config_lib.load("asymoe", overrides), callbacks=[_StopAtFitStart()])
    assert not holds_a_run(run_dir), sorted(p.name for p in run_dir.iterdir())
    monkeypatch.undo()
    metrics = fit(config_lib.load("asymoe", overrides))  # rank 0 after it: claims and trains
    assert (run_dir / "config.yaml").is_file() and math.isfinite(metrics["train/loss"])


def test_a_rank_overwriting_a_run_never_reads_the_old_runs_tokenizer(tmp_path, monkeypatch):
    """With --overwrite, a rank other than 0 may reach the data before rank 0 has cleared the
    directory: it builds the tokenizer from the data, as rank 0 does, not from the old run's file."""
    from asymoe.data.tokenizer import WordTokenizer

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"old")
    WordTokenizer([*WordTokenizer.SPECIALS, "stale"]).save(run_dir)  # the old run's, other data
    seen = {}

    class Vocabulary(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            seen["vocab"] = list(pl_module.tokenizer.vocab)
            raise _Stopped

    _play_rank_1(monkeypatch)
    cfg = config_lib.load("asymoe", TINY + [f"output_dir={run_dir}"])
    with pytest.raises(_Stopped):
        fit(cfg, callbacks=[Vocabulary()], overwrite=True)
    assert "stale" not in seen["vocab"] and len(seen["vocab"]) > len(WordTokenizer.SPECIALS) + 1
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"old"  # rank 1 cleared nothing


def test_overwrite_clears_a_started_run_and_refuses_with_resume(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"old")
    cfg = config_lib.load("asymoe", TINY + [f"output_dir={run_dir}"])
    with pytest.raises(ConfigError, match="holds a started run"):
        claim_run_directory(cfg, run_dir, overwrite=False)
    claim_run_directory(cfg, run_dir, overwrite=True)
    assert not run_dir.exists()
    cfg.trainer.resume = "last"
    with pytest.raises(ConfigError, match="--overwrite clears .* which trainer.resume=last would continue"):
        claim_run_directory(cfg, run_dir, overwrite=True)


# ---------------------------------------------------------------------------------------------
# NaN / Inf guard


class Inject(L.Callback):
    """NaN pixels in the batch of step `nan_pixels_at`; a NaN in one gradient at step `nan_grad_at`."""

    def __init__(self, nan_pixels_at: int | None = None, nan_grad_at: int | None = None, param: str = ""):
        self.nan_pixels_at, self.nan_grad_at, self.param = nan_pixels_at, nan_grad_at, param
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.nan_pixels_at:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step + 1 == self.nan_grad_at:
            dict(pl_module.named_parameters())[self.param].grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.weights[trainer.global_step] = state


def test_nonfinite_loss_stops_with_step_batch_term_and_layer(tmp_path):
    injected = Inject(nan_pixels_at=2)
    cfg = config_lib.load("asymoe", TINY + [f"output_dir={tmp_path / 'run'}", "trainer.max_steps=3"])
    with pytest.raises(NonFiniteError) as error:
        fit(cfg, callbacks=[injected])
    message = str(error.value)
    assert "\n" not in message
    assert re.match(
        r"non-finite loss at step 2 \(epoch 0, batch 1, rank 0: \d+ samples \[\d+, \d+, \d+, \.\.\.\]", message
    )
    assert re.search(r"\(easy-vqa train questions.json:\d+, easy-vqa train questions.json:\d+, ", message)
    # The NaN pixels reach the LM loss and the balance losses of the MoE layers through the tokens.
    assert "non-finite terms: lm_loss (nan), balance_vision (MoE layer 1)" in message
    # The encoder's first layer met the NaN pixels.
    assert "first non-finite output: model.vision.model.conv1.0;" in message
    assert re.search(
        r"; \d+ parameter\(s\) with non-finite gradients: model\.vision\.model\.conv1\.0\.weight, ", message
    )
    assert "trainer.nonfinite=skip" in message
    assert all(torch.isfinite(v).all() for v in injected.weights[1].values() if v.is_floating_point())


def test_nonfinite_gradient_and_loss_steps_are_skipped(tmp_path):
    param = "model.projector.0.weight"
    injected = Inject(nan_pixels_at=3, nan_grad_at=2, param=param)
    cfg = config_lib.load(
        "asymoe",
        TINY
        + [
            f"output_dir={tmp_path / 'run'}",
            "trainer.max_steps=4",
            "trainer.nonfinite=skip",
            "data.images_per_batch=1",
        ],
    )
    metrics = fit(cfg, callbacks=[injected])
    assert metrics["train/nonfinite_skipped"] == 2
    after_1, after_3, after_4 = injected.weights[1], injected.weights[3], injected.weights[4]
    for name, value in after_1.items():  # steps 2 and 3 moved nothing, BatchNorm statistics included
        if name.startswith("model.") and "num_batches_tracked" not in name:
            torch.testing.assert_close(after_3[name], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(after_4[k], v) for k, v in after_3.items() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in after_4.values() if v.is_floating_point())
    assert math.isfinite(metrics["test/lm_loss"])
