"""Scale-out: FSDP2 / DDP on 2 CPU processes (gloo), a text-only rank, resume, sharded checkpoints.

Multi-process runs go through `asymoe.training.run.fit` in a child script (Lightning re-launches
the script for rank 1), bounded by a timeout so that a collective hang fails the test instead of
stalling the suite. Each rank writes its losses and a parameter checksum to rank<N>.json. The FSDP2
and DDP runs are two `fit` calls of one launch: a 2-process start (imports, process group) costs
more than either run's training on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from asymoe import config as config_lib
from asymoe.config import ConfigError
from asymoe.training import run as run_lib
from asymoe.training.checkpoints import is_sharded_checkpoint, load_full_checkpoint
from asymoe.training.distributed import block_classes
from asymoe.training.run import fit
from conftest import REPO, TINY

# One image per batch: the TINY split gives ~10 training batches, so each of 2 ranks gets several.
DISTRIBUTED = TINY + ["data.images_per_batch=1", "trainer.max_steps=3", "trainer.val_check_interval=3"]
RUN_TIMEOUT_S = 240

WORKER = '''
"""fit() of each run on every rank; rank `text_only_rank` gets its batches stripped of images."""
import json, sys
from pathlib import Path

import lightning as L
import torch

from asymoe import config as config_lib
from asymoe.training.run import fit

spec = json.loads(Path(sys.argv[1]).read_text())


class Probe(L.Callback):
    def __init__(self, out):
        self.out = out
        self.local, self.reduced, self.text_only = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == spec["text_only_rank"]:
            image = pl_module.model.image_token_id
            batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == image, 0)
            batch["image_index"] = torch.full_like(batch["image_index"], -1)
            batch["pixel_values"] = None
        self.text_only.append(batch["pixel_values"] is None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().float()
        self.local.append(loss.item())
        self.reduced.append(trainer.strategy.reduce(loss.clone(), reduce_op="mean").item())

    def on_train_end(self, trainer, pl_module):
        total = torch.zeros((), dtype=torch.float64)
        for param in pl_module.model.parameters():  # full_tensor() is a collective: every rank calls it
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            total += full.detach().double().abs().sum()
        record = {"local": self.local, "reduced": self.reduced, "text_only": self.text_only,
                  "param_abs_sum": total.item(), "world_size": trainer.world_size}
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


for run in spec["runs"]:  # one after another in the same ranks; the process group is set up once
    fit(config_lib.load(spec["config"], run["overrides"]), callbacks=[Probe(run["out"])])
'''


def run_two_processes(
    folder: Path,
    strategies: list[str],
    text_only_rank: int = 1,
) -> dict[str, tuple[list[dict], Path]]:
    """One 2-process launch that trains once per strategy, in order; per strategy its ranks' records and run dir."""
    folder.mkdir(parents=True)
    runs = [
        {
            "out": str(folder / strategy),
            "overrides": DISTRIBUTED
            + [f"trainer.strategy={strategy}", "trainer.devices=2", f"output_dir={folder / strategy / 'run'}"],
        }
        for strategy in strategies
    ]
    for run in runs:
        Path(run["out"]).mkdir()
    spec = {"config": "asymoe", "text_only_rank": text_only_rank, "runs": runs}
    (folder / "spec.json").write_text(json.dumps(spec))
    (folder / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(
        [sys.executable, str(folder / "worker.py"), str(folder / "spec.json")],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # rank 1 joins this session, so one killpg ends both on a hang
    )
    timeout = RUN_TIMEOUT_S * len(strategies)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{'+'.join(strategies)} runs hung for {timeout} s:\n{output.decode()[-3000:]}")
    assert process.returncode == 0, output.decode()[-3000:]
    results = {}
    for strategy in strategies:
        ranks = [json.loads((folder / strategy / f"rank{rank}.json").read_text()) for rank in range(2)]
        results[strategy] = ranks, folder / strategy / "run"
    return results


@pytest.fixture(scope="module")
def two_process_runs(request, tmp_path_factory):
    """FSDP2, and DDP too unless its (slow) comparison test is deselected, in one 2-process launch."""
    selected = {item.originalname for item in request.session.items}
    strategies = ["fsdp2"] + (["ddp"] if "test_ddp_matches_fsdp2" in selected else [])
    return run_two_processes(tmp_path_factory.mktemp("two-process") / "job", strategies)


@pytest.fixture(scope="module")
def fsdp2_run(two_process_runs):
    return two_process_runs["fsdp2"]


def test_fsdp2_two_cpu_processes_with_a_text_only_rank(fsdp2_run):
    ranks, run_dir = fsdp2_run
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["text_only"] == [False] * 3 and ranks[1]["text_only"] == [True] * 3
    for rank in ranks:
        assert len(rank["local"]) == 3 and all(math.isfinite(x) for x in rank["local"])
    # Each rank saw its own batches; the all-reduced loss and the gathered weights agree exactly.
    assert ranks[0]["local"] != ranks[1]["local"]
    assert ranks[0]["reduced"] == ranks[1]["reduced"]
    assert ranks[0]["reduced"] == pytest.approx(
        [(a + b) / 2 for a, b in zip(ranks[0]["local"], ranks[1]["local"])], rel=1e-6
    )
    assert ranks[0]["param_abs_sum"] == ranks[1]["param_abs_sum"]
    assert is_sharded_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert sorted(p.name for p in (run_dir / "checkpoints" / "last.ckpt").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["test/lm_loss"])


def test_sharded_checkpoint_loads_into_one_process(fsdp2_run):
    ranks, run_dir = fsdp2_run
    checkpoint = load_full_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3
    weights = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    cfg = config_lib.load(run_dir / "config.yaml")
    from asymoe.data.tokenizer import WordTokenizer
    from asymoe.training.module import VLMModule

    module = VLMModule(cfg, WordTokenizer(checkpoint["asymoe_vocab"]))
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    parameter_names = {name for name, _ in module.named_parameters()}
    assert parameter_names <= set(weights)
    loaded = sum(p.detach().double().abs().sum().item() for p in module.model.parameters())
    assert loaded == pytest.approx(ranks[0]["param_abs_sum"], rel=1e-9)
    single = config_lib.load(run_dir / "config.yaml", ["trainer.devices=1", "trainer.strategy=auto"])
    metrics = run_lib.test(single, str(run_dir / "checkpoints" / "last.ckpt"))
    assert math.isfinite(metrics["test/lm_loss"]) and 0.0 <= metrics["test/accuracy"] <= 1.0


@pytest.mark.slow
def test_ddp_matches_fsdp2(two_process_runs):
    fsdp2_ranks, _ = two_process_runs["fsdp2"]
    ranks, _ = two_process_runs["ddp"]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["reduced"] == ranks[1]["reduced"]
    assert ranks[0]["reduced"] == pytest.approx(fsdp2_ranks[0]["reduced"], rel=1e-5)
    assert ranks[0]["param_abs_sum"] == pytest.approx(fsdp2_ranks[0]["param_abs_sum"], rel=1e-7)


# ---------------------------------------------------------------------------------------------
# Resume


class StopAfter(L.Callback):
    """Ends training after `steps` optimizer steps, as a pre-empted job would."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class FinalWeights(L.Callback):
    """The module's weights when training ends (before `fit` tests the best checkpoint)."""

    def on_train_end(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.step = trainer.global_step


RESUME = DISTRIBUTED + ["trainer.max_steps=4", "trainer.val_check_interval=2"]


@pytest.mark.slow
def test_resume_reaches_the_uninterrupted_weights(tmp_path):
    whole, resumed = FinalWeights(), FinalWeights()
    fit(config_lib.load("asymoe", RESUME + [f"output_dir={tmp_path / 'whole'}"]), callbacks=[whole])
    interrupted = RESUME + [f"output_dir={tmp_path / 'parts'}"]
    fit(config_lib.load("asymoe", interrupted), callbacks=[StopAfter(2)])
    saved = load_full_checkpoint(tmp_path / "parts" / "checkpoints" / "last.ckpt")
    # Mid-epoch (the epoch has ~10 batches): model, optimiser, scheduler and data position restored.
    assert saved["global_step"] == 2 and saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"batches_consumed": 2}
    ]
    fit(config_lib.load("asymoe", interrupted + ["trainer.resume=last"]), callbacks=[resumed])
    assert whole.step == resumed.step == 4
    assert whole.weights.keys() == resumed.weights.keys()
    for name, expected in whole.weights.items():
        # Same ops in the same order on one CPU process: equal up to float32 reduction-order noise.
        torch.testing.assert_close(resumed.weights[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    changed = sum(not torch.equal(saved["state_dict"][k], v) for k, v in whole.weights.items() if v.is_floating_point())
    assert changed > 0  # steps 3-4 really trained after the resume


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    from asymoe.training.module import MODEL_CONFIG_KEY

    saved_model = config_lib.to_dict(config_lib.load("asymoe", TINY))["model"]
    torch.save({MODEL_CONFIG_KEY: saved_model, "state_dict": {}}, tmp_path / "asymoe.ckpt")
    other = config_lib.load(
        "moiie", TINY + [f"output_dir={tmp_path / 'run'}", f"trainer.resume={tmp_path / 'asymoe.ckpt'}"]
    )
    with pytest.raises(ConfigError, match=r"holds a different model \(config differs at model\.moe\.") as error:
        fit(other)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


# Resuming an fsdp2 run from its sharded checkpoint (killed at a step or inside the folder swap)
# to the uninterrupted run's weights: tests/test_faults.py::test_fsdp2_killed_run_resumes_to_the_uninterrupted_weights.


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.strategy=fsdp", "trainer.accelerator=cpu"], "use trainer.strategy=fsdp2 or ddp"),
        (["trainer.strategy=zero3"], "trainer.strategy='zero3' is not valid"),
        (["trainer.state_dict_type=local"], "trainer.state_dict_type='local' is not valid"),
        (["trainer.resume=/nonexistent/last.ckpt"], "trainer.resume: checkpoint not found"),
        (["trainer.resume=last"], "trainer.resume='last' needs output_dir"),
        (["trainer.devices=2"], "multi-process run"),
        (["trainer.activation_checkpointing=true"], "activation_checkpointing needs"),
    ],
)
def test_bad_trainer_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        config_lib.load("asymoe", TINY + overrides)
    assert "\n" not in str(error.value)


def test_resume_last_without_a_checkpoint(tmp_path):
    cfg = config_lib.load("asymoe", TINY + [f"output_dir={tmp_path}", "trainer.resume=last"])
    with pytest.raises(ConfigError, match="trainer.resume=last: checkpoint not found"):
        fit(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fsdp_with_auto_accelerator_on_a_cpu_machine_is_refused(tmp_path):
    # Refused by config validation, before a run directory or a model exists.
    with pytest.raises(ConfigError, match="needs a GPU"):
        fit(
            config_lib.load(
                "asymoe", TINY + ["trainer.strategy=fsdp", "trainer.accelerator=auto", f"output_dir={tmp_path}"]
            )
        )
    assert not any(tmp_path.iterdir())


def test_wrap_units_are_decoder_layers_and_timm_blocks():
    from asymoe.models.vlm import VisionLanguageModel

    cfg = config_lib.load("asymoe", TINY)
    model = VisionLanguageModel(cfg.model, vocab_size=40, image_token_id=4)
    names = {cls.__name__ for cls in block_classes(model)}
    assert names == {"LlamaDecoderLayer", "BasicBlock"}


def test_text_only_training_batch_gives_the_vision_encoder_exact_zero_gradients():
    from asymoe.models.vlm import VisionLanguageModel

    cfg = config_lib.load("asymoe", TINY)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg.model, vocab_size=40, image_token_id=4).train()
    ids = torch.randint(5, 40, (2, 9))
    mask = torch.ones_like(ids, dtype=torch.bool)
    statistics = [m.running_var.clone() for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    out = model(ids, mask, mask, torch.zeros_like(mask), torch.tensor([-1, -1]), labels=ids)
    (out.lm_loss + out.aux_loss).backward()
    encoder = list(model.vision.parameters()) + list(model.projector.parameters())
    assert all(p.grad is not None and not p.grad.any() for p in encoder)
    assert any(p.grad.any() for p in model.lm.parameters())
    after = [m.running_var for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert statistics and all(
        torch.equal(a, b) for a, b in zip(statistics, after)
    )  # an empty batch leaves BN statistics alone


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP (FSDPStrategy) needs CUDA")
def test_fsdp_bf16_activation_checkpointing_on_gpu(tmp_path):
    cfg = config_lib.load(
        "asymoe",
        TINY
        + [
            "trainer.accelerator=gpu",
            "trainer.devices=1",
            "trainer.strategy=fsdp",
            "trainer.precision=bf16-mixed",
            "trainer.activation_checkpointing=true",
            "trainer.max_steps=10",
            "trainer.val_check_interval=5",
            "data.images_per_batch=1",
            f"output_dir={tmp_path}",
        ],
    )
    metrics = fit(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["test/lm_loss"])
    assert load_full_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 10
