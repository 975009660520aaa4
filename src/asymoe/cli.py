"""`asymoe fit | test | params | grid | report`: parse, load the config, call. Nothing more.

User errors (config, data, paths) print one line `asymoe: error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from asymoe.config import ConfigError

USAGE_EXAMPLES = """examples:
  asymoe fit experiments/moiie.yaml trainer.max_epochs=1 output_dir=runs/try
  asymoe test experiments/moiie.yaml ckpt=runs/try/checkpoints/last.ckpt
  asymoe params experiments/asymoe.yaml
  asymoe grid ablations/baselines.yaml --quick
  asymoe grid ablations/baselines.yaml --jobs 4
  asymoe grid ablations/baselines.yaml --launcher slurm --slurm partition=gpu --slurm time=240
  asymoe report runs/grids/baselines
  asymoe export runs/try exported/try
  asymoe predict runs/try --image cat.png --question "What color is the cat?"
  asymoe evaluate pope coco_pope_random.jsonl answers.jsonl --out runs/try/eval
  asymoe analyze runs/try limit=2000
"""


def _split_ckpt(overrides: list[str]) -> tuple[str | None, list[str]]:
    ckpt, rest = None, []
    for item in overrides:
        if item.startswith("ckpt="):
            ckpt = item.split("=", 1)[1]
        else:
            rest.append(item)
    return ckpt, rest


def _print_metrics(metrics: dict) -> None:
    """Accuracy of every test split, then per question type / answer group as the metrics hold them."""
    splits = sorted(key.split("/")[0] for key in metrics if key.startswith("test") and key.endswith("/accuracy"))
    for split in splits:
        print(f"{split.replace('_', ' ')} accuracy: {100 * metrics[f'{split}/accuracy']:.1f}%")
        for key in sorted(k for k in metrics if k.startswith(f"{split}/accuracy_")):
            print(f"  {key.split('/accuracy_', 1)[1]}: {100 * metrics[key]:.1f}%")


def _fit(args) -> int:
    from asymoe import config as config_lib
    from asymoe.training.run import fit

    # `resume=last|PATH` is short for trainer.resume (issue text and README use the short form).
    overrides = [f"trainer.{item}" if item.startswith("resume=") else item for item in args.overrides]
    cfg = config_lib.load(args.config, overrides)
    if cfg.stages:
        from asymoe.training.stages import fit_stages

        if args.overwrite:
            # A multi-stage run skips its finished stages and resumes the unfinished one on a rerun.
            raise ConfigError("--overwrite does not apply to a multi-stage run; choose a fresh output_dir")
        metrics = fit_stages(cfg)
    else:
        metrics = fit(cfg, overwrite=args.overwrite)
    _print_metrics(metrics)
    print(f"train time: {metrics['time/train_s']:.0f} s, total: {metrics['time/total_s']:.0f} s")
    print(f"run directory: {cfg.output_dir}")
    print(f"tensorboard --logdir {cfg.output_dir}/tb")
    return 0


def _test(args) -> int:
    from asymoe import config as config_lib
    from asymoe.training.run import test

    ckpt, overrides = _split_ckpt(args.overrides)
    if ckpt is None:
        raise ConfigError("asymoe test needs ckpt=PATH")
    cfg = config_lib.load(args.config, overrides)
    metrics = test(cfg, ckpt)
    _print_metrics(metrics)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def _params(args) -> int:
    from asymoe import config as config_lib
    from asymoe.training.run import params

    cfg = config_lib.load(args.config, args.overrides)
    table = params(cfg)
    width = max(map(len, table))
    for name, value in table.items():
        print(f"{name:<{width}}  {value:>14,}")
    return 0


def _grid(args) -> int:
    from asymoe import grid

    return grid.run_cli(args)


def _report(args) -> int:
    from asymoe import grid

    return grid.report_cli(args)


def _export(args) -> int:
    from asymoe.export import export

    result = export(args.run_dir, args.out, args.ckpt)
    print(
        f"wrote {result['out']}: a transformers '{result['family']}' LM and tokenizer (reloaded, logits within "
        f"{result['max_logit_difference']:.1e}), encoder/projector weights, the asymoe state in asymoe/"
    )
    return 0


def _predict(args) -> int:
    from pathlib import Path

    from asymoe.export import load_run
    from asymoe.predict import format_routing, predict, predict_jsonl

    if (args.jsonl is None) == (args.question is None):
        raise ConfigError("asymoe predict needs --question TEXT (with optional --image PATH) or --jsonl FILE")
    run = load_run(args.run_dir, args.ckpt)
    if args.jsonl is not None:
        if not Path(args.jsonl).is_file():
            raise ConfigError(f"--jsonl: file not found: {args.jsonl}")
        image_root = Path(args.image_root) if args.image_root else None
        for result in predict_jsonl(run, Path(args.jsonl), args.max_new_tokens, image_root):
            print(json.dumps(result), flush=True)
        return 0
    prediction = predict(run, args.question, args.image, args.max_new_tokens)
    print(prediction.answer)
    if prediction.routing:
        print(f"routing (share of each router's assignments; KV cache {'on' if prediction.cached else 'off'}):")
        print("\n".join(f"  {line}" for line in format_routing(prediction.routing)))
    return 0


def _analyze(args) -> int:
    from asymoe.analysis.run import analyze

    result = analyze(args.run_dir, args.overrides)
    for key, value in sorted(result["scalars"].items()):
        print(f"{key}: {value:.4f}")
    print(
        f"{result['questions']} questions of split {result['split']} in {result['seconds']:.0f} s; "
        f"written to {args.run_dir}/analysis (analysis.json, analysis.md, *.png, tb/)"
    )
    return 0


def _evaluate(args) -> int:
    from pathlib import Path

    from asymoe.evaluation.formats import score
    from asymoe.evaluation.report import markdown_table, write_report

    results = {args.name or args.benchmark: score(args.benchmark, args.annotations, args.predictions)}
    out = Path(args.out) if args.out else Path(args.predictions).parent / "evaluation"
    print(markdown_table(write_report(results, out)), end="")
    print(f"written to {out}/evaluation.json, evaluation.md and tb/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asymoe",
        description="Mixture-of-experts vision-language models: train, evaluate, ablate.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (
        ("fit", _fit, "train, validate and test an experiment"),
        ("test", _test, "evaluate a checkpoint on the test split (ckpt=PATH)"),
        ("params", _params, "print the parameter table without training"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("config", help="experiment YAML, or a name in experiments/")
        command.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        command.set_defaults(func=func)
        if name == "fit":
            command.add_argument("--overwrite", action="store_true", help="clear output_dir if it holds a run")
    grid_cmd = sub.add_parser("grid", help="run an ablation grid (resumable)")
    grid_cmd.add_argument("grid_file")
    grid_cmd.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to every cell")
    grid_cmd.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    grid_cmd.add_argument("--only", default=None, help="run only cells whose name matches this glob")
    grid_cmd.add_argument("--quick", action="store_true", help="use the grid's CPU-minutes preset")
    grid_cmd.add_argument("--force", action="store_true", help="reuse a grid directory made by another grid file")
    grid_cmd.add_argument("--output", default=None, help="grid directory (default runs/grids/<grid name>)")
    grid_cmd.add_argument("--jobs", type=int, default=1, help="cells at once on this machine (GPU share / CPU threads)")
    grid_cmd.add_argument(
        "--launcher",
        choices=("local", "slurm", "submitit-local"),
        default="local",
        help="local: cells as child processes; slurm: one SLURM job per cell (submitit); "
        "submitit-local: the SLURM code path with local processes",
    )
    grid_cmd.add_argument(
        "--slurm", action="append", metavar="KEY=VALUE", help="a SLURM option over the grid file's launcher: block"
    )
    grid_cmd.add_argument("--wait", action="store_true", help="with a submitit launcher: wait until every job ended")
    grid_cmd.add_argument("--analyze", action="store_true", help="run `asymoe analyze` on every finished cell")
    grid_cmd.set_defaults(func=_grid)
    export_cmd = sub.add_parser("export", help="write a run as a transformers LM + encoder/projector weights")
    export_cmd.add_argument("run_dir")
    export_cmd.add_argument("out")
    export_cmd.add_argument("--ckpt", default=None, help="checkpoint (default: the run's best, else last)")
    export_cmd.set_defaults(func=_export)
    predict_cmd = sub.add_parser("predict", help="answer questions about images with a trained run")
    predict_cmd.add_argument("run_dir", help="a run directory or an export's asymoe/ folder")
    predict_cmd.add_argument("--image", default=None)
    predict_cmd.add_argument("--question", default=None)
    predict_cmd.add_argument("--jsonl", default=None, help="one {question|text, image, question_id} object per line")
    predict_cmd.add_argument("--image-root", default=None, help="folder of the JSONL's images (default: its folder)")
    predict_cmd.add_argument("--max-new-tokens", type=int, default=32)
    predict_cmd.add_argument("--ckpt", default=None)
    predict_cmd.set_defaults(func=_predict)
    evaluate_cmd = sub.add_parser("evaluate", help="score predictions on VQAv2, GQA, POPE or ScienceQA-IMG files")
    evaluate_cmd.add_argument("benchmark", help="vqav2 | gqa | pope | scienceqa")
    evaluate_cmd.add_argument("annotations", help="the benchmark's annotation / question file")
    evaluate_cmd.add_argument("predictions", help="results JSON or answer JSONL")
    evaluate_cmd.add_argument("--out", default=None, help="report folder (default: PREDICTIONS' folder/evaluation)")
    evaluate_cmd.add_argument("--name", default=None, help="row name in the table (default: the benchmark)")
    evaluate_cmd.set_defaults(func=_evaluate)
    analyze_cmd = sub.add_parser("analyze", help="grounding, entropy, specialisation and image-sensitivity analysis")
    analyze_cmd.add_argument("run_dir")
    analyze_cmd.add_argument(
        "overrides", nargs="*", help="ckpt=, split=, limit= (default 2000), batch_size=, device=, seed=, config keys"
    )
    analyze_cmd.set_defaults(func=_analyze)
    report_cmd = sub.add_parser("report", help="rebuild a grid's summary from its directory")
    report_cmd.add_argument("grid_dir")
    report_cmd.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`asymoe grid g.yaml --quick a=b`); argparse's subparsers
    # cannot intermix positionals, so leftover key=value items are taken as overrides.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from asymoe.data.records import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError) as error:
        print(f"asymoe: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asymoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
