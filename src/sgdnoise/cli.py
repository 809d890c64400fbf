"""The command line: the only module that parses arguments.

Every command takes `--params FILE` and repeatable `-P key=value`. Under `mlflow run`,
undeclared entry-point parameters arrive as `--key value`; those are overrides too.
Bad input prints one line `error: <key>: <problem>; allowed: <...>` and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from sgdnoise.config import Config, ConfigError, load_config, raw_params

# Exit statuses: 0 done (a diverged run is a result too), 1 failed, 2 bad input,
# 3 tracking store unreachable, 75 stopped by SIGTERM after a checkpoint (run again to resume).
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TRACKING = 3
_PASSTHROUGH = re.compile(r"^--((?:data|model|train|tracking|nqm)\.[A-Za-z0-9_.]+)(?:=(.*))?$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params", default=None, help="params file (default: params.yaml at the project root)"
    )
    p.add_argument(
        "-P", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key (value parsed as YAML); repeatable",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sgdnoise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare", help="write data/prepared/<dataset>/")
    _common(p)

    p = sub.add_parser("train", help="one tracked training run")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON (last line)")
    p.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")
    p.add_argument("--save-state", metavar="FILE", help="save the final state_dict (torch.save)")
    p.add_argument(
        "--quiet", action="store_true",
        help="no progress (default: a bar on a terminal, else a line per evaluation on stderr)",
    )  # fmt: skip

    p = sub.add_parser("sweep", help="run a study's grid, each point exactly once")
    _common(p)
    p.add_argument("study", help="a study name under `studies:` in params")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: local journal)")
    p.add_argument("--summary", metavar="FILE", help="write the finished sweep's counts as JSON")
    p.add_argument(
        "--restart", action="store_true",
        help="forget the study's Optuna trials (not its MLflow runs) and run every point again "
        "into the tracking store in use (a point with a finished run there is adopted, not "
        "trained again)",
    )  # fmt: skip
    p.add_argument(
        "--pack", type=int, default=None, metavar="K",
        help="train up to K grid points of a group as one packed model (= -P train.pack=K; "
        "1: off; default: by device and B)",
    )  # fmt: skip

    p = sub.add_parser("nqm", help="one noisy-quadratic-model configuration (exact, in seconds)")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON (last line)")
    p.add_argument("--track", action="store_true", help="also record it in MLflow")

    p = sub.add_parser("analyze", help="tables and figures of a study, from MLflow")
    _common(p)
    p.add_argument("study")
    p.add_argument("--selection", choices=("per_seed", "mean_curve"), default="per_seed")
    p.add_argument("--out", default=None, help="output folder (default: results/STUDY)")
    p.add_argument("--no-log", action="store_true", help="do not log the outputs to MLflow")

    p = sub.add_parser("report", help="results/REPORT.md and the README's study section")
    _common(p)
    p.add_argument("--no-readme", action="store_true", help="leave README.md alone")

    p = sub.add_parser("ui", help="the MLflow UI over the project's store, on 127.0.0.1")
    _common(p)
    p.add_argument("--port", type=int, default=5000)

    p = sub.add_parser("dashboard", help="optuna-dashboard over a study's Optuna storage")
    _common(p)
    p.add_argument("study")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: local journal)")
    p.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")

    p = sub.add_parser("status", help="progress of a study's sweep")
    _common(p)
    p.add_argument("study")
    p.add_argument("--storage", default=None)
    p.add_argument("--json", action="store_true")
    return parser


def _split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`--train.lr_eff 0.5` / `--train.lr_eff=0.5` (from `mlflow run`) -> overrides."""
    rest, extra = [], []
    i = 0
    while i < len(argv):
        m = _PASSTHROUGH.match(argv[i])
        if m:
            if m.group(2) is not None:
                extra.append(f"{m.group(1)}={m.group(2)}")
                i += 1
            elif i + 1 < len(argv):
                extra.append(f"{m.group(1)}={argv[i + 1]}")
                i += 2
            else:
                raise ConfigError(m.group(1), "no value given", f"--{m.group(1)} VALUE")
            continue
        rest.append(argv[i])
        i += 1
    return rest, extra


def _config(args: argparse.Namespace, extra: list[str]) -> Config:
    return load_config(args.params, [*args.overrides, *extra])


def cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = _config(args, extra)  # validate before importing torch: bad input fails fast
    from sgdnoise.data.prepare import prepare

    path = prepare(cfg.data)
    print(path)
    return 0


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = _config(args, extra)
    from sgdnoise.checkpoint import CheckpointError
    from sgdnoise.tracking import TrackingUnavailable
    from sgdnoise.train import EXIT_PREEMPTED, Preempted, train

    try:
        result = train(cfg, track=not args.no_track, keep_state=bool(args.save_state),
                       progress=not args.quiet)  # fmt: skip
    except Preempted as e:
        print(f"preempted: {e}; run the same command again to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    except CheckpointError as e:
        print(f"error: {e}; the previous checkpoint is intact", file=sys.stderr)
        return EXIT_FAILED
    except TrackingUnavailable as e:
        print(f"error: tracking.uri: {e}; allowed: a reachable MLflow store", file=sys.stderr)
        return EXIT_TRACKING
    if result.is_main and args.save_state:
        import torch

        torch.save(result.state, args.save_state)
    if result.is_main:
        m = result.metrics
        line = f"{result.status}: {int(m['steps'])} steps, train loss {m['final_train_loss']:.4g}"
        if "final_test_accuracy" in m:
            line += f", test accuracy {m['final_test_accuracy']:.4f}"
        print(line, file=sys.stderr)
        if args.json:
            print(json.dumps(result.summary()))
    return 0


def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from sgdnoise.sweep import run_sweep

    if args.workers < 1:
        raise ConfigError("--workers", f"{args.workers} is not >= 1", "an integer >= 1")
    pack = [f"train.pack={args.pack}"] if args.pack is not None else []
    raw = raw_params(args.params, [*args.overrides, *extra, *pack])
    code = run_sweep(
        raw, args.study, workers=args.workers, storage=args.storage, restart=args.restart
    )
    if code == 0 and args.summary:
        _write_sweep_summary(raw, args, args.summary)
    return code


# Counts that only change when the runs do: a DVC output that stays byte-identical when a
# rerun trains nothing, so the analysis downstream is not redone.
_STABLE = (
    "study", "optuna_study", "grid_hash", "metric", "grid_points", "points", "finished",
    "diverged", "skipped", "added_by_edges", "failed", "remaining", "done", "parent_run_id",
)  # fmt: skip


def _write_sweep_summary(raw: dict, args: argparse.Namespace, path: str) -> None:
    from pathlib import Path

    from sgdnoise.sweep import study_status

    status = study_status(raw, args.study, storage=args.storage)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    stable = {k: status[k] for k in _STABLE if k in status}
    out.write_text(json.dumps(stable, indent=2, sort_keys=True) + "\n")


def cmd_status(args: argparse.Namespace, extra: list[str]) -> int:
    from sgdnoise.sweep import format_status, study_status

    raw = raw_params(args.params, [*args.overrides, *extra])
    status = study_status(raw, args.study, storage=args.storage)
    print(json.dumps(status) if args.json else format_status(status))
    return 0


def cmd_dashboard(args: argparse.Namespace, extra: list[str]) -> int:
    from sgdnoise.sweep.dashboard import serve

    raw = raw_params(args.params, [*args.overrides, *extra])
    try:
        serve(raw, args.study, storage=args.storage, port=args.port)
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_nqm(args: argparse.Namespace, extra: list[str]) -> int:
    """`train` with data.name = model.name = nqm and a step budget filled in."""
    raw = raw_params(args.params, [*args.overrides, *extra])
    pinned = {"data.name": "nqm", "model.name": "nqm", "model.norm": "none"}
    for key, value in pinned.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    # The NQM has no epochs: an epoch budget from params becomes 1000 steps unless the
    # command line sets a value.
    given = {o.partition("=")[0].strip() for o in [*args.overrides, *extra]}
    budget = raw.setdefault("train", {}).setdefault("budget", {})
    if budget.get("unit", "epochs") == "epochs":
        budget["unit"] = "steps"
        if "train.budget.value" not in given:
            budget["value"] = 1000
    from sgdnoise.config import from_dict

    cfg = from_dict(raw)
    from sgdnoise.train import train

    result = train(cfg, track=args.track)
    m = result.metrics
    line = (
        f"{result.status}: expected loss {m['final_train_loss']:.6g} after {int(m['steps'])} steps"
    )
    if "steps_to_target" in m:
        line += f", target reached at step {m['steps_to_target']:g}"
    print(line, file=sys.stderr)
    if args.json:
        summary = result.summary()
        if "steps_to_target" in summary and summary["steps_to_target"] == float("inf"):
            summary["steps_to_target"] = None
        summary["final_loss"] = m["final_train_loss"]
        summary.setdefault("steps_to_target", None)
        print(json.dumps(summary))
    return 0


def cmd_analyze(args: argparse.Namespace, extra: list[str]) -> int:
    """sgdnoise.api.analyze (what a notebook calls too), then the files logged to MLflow."""
    from pathlib import Path

    from sgdnoise.api import analyze
    from sgdnoise.paths import project_root

    out = Path(args.out) if args.out else project_root() / "results" / args.study
    try:
        res = analyze(
            args.study, out=out, selection=args.selection, params=args.params,
            overrides=[*args.overrides, *extra],
        )  # fmt: skip
    except LookupError as e:
        print(f"error: {args.study}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.no_log:
        from sgdnoise.tracking import log_analysis, log_study_results

        parent, uri = res["summary"]["parent_run_id"], res["tracking_uri"]
        log_analysis(uri, parent, res["files"])
        log_study_results(uri, parent, res["summary"], res["table"])
    print(res["markdown"])
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from sgdnoise.paths import project_root

    cfg = _config(args, extra)
    root = project_root()
    m, t, d = cfg.model, cfg.train, cfg.data
    size = f"{m.depth}x{m.width}" if m.depth else ""
    data = f"{d.name} ({d.num_samples} examples)"
    if d.source_sha256:  # the user's data
        data = f"{d.name} ({d.path})" if d.path else d.name
    setting = (
        f"{data}, {m.name} {size} norm={m.norm}, "
        f"{t.schedule} schedule, weight decay {t.weight_decay:g}"
    )
    from analysis import write_report

    path = write_report(
        root / "results",
        list(cfg.studies),
        readme=None if args.no_readme else root / "README.md",
        setting=setting,
    )
    if not args.no_readme:
        _copy_theory_figures(root)
    print(path)
    return 0


# The README's "theory vs experiment" section shows the NQM study's figures.
_THEORY_FIGURES = ("optimal_lr_vs_batch.png", "best_metric_vs_batch.png")


def _copy_theory_figures(root) -> None:
    import shutil

    for name in _THEORY_FIGURES:
        src = root / "results" / "nqm" / name
        if src.is_file():
            (root / "docs" / "figures").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / "docs" / "figures" / f"nqm_{name}")


def cmd_ui(args: argparse.Namespace, extra: list[str]) -> int:
    """A light MLflow server over the project's store (see sgdnoise.server), and per study
    the links to its runs table and its parent run in the model-training view. Over a
    tracking server (an http URI) only the links are printed."""
    import signal

    from sgdnoise import server
    from sgdnoise.tracking import resolve_uri

    cfg = _config(args, extra)
    uri = resolve_uri(cfg)
    if uri.startswith(("http://", "https://")):
        _print_links(uri, uri.rstrip("/"), cfg.tracking.experiment)
        return 0
    proc = server.start(uri, args.port)
    # Ctrl-C and SIGTERM both end in stop(): the server's process group goes with us.
    # SIGINT too is set here: a process started in the background by a shell without job
    # control inherits SIGINT ignored, and Python then leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        base = server.wait_ready(proc, args.port)
        print(f"serving {base} (Ctrl-C stops it)")
        _print_links(uri, base, cfg.tracking.experiment)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:
        print(f"error: {e} (is port {args.port} taken? --port chooses another)", file=sys.stderr)
        return 1
    finally:
        server.stop(proc)


def _print_links(uri: str, base: str, experiment: str) -> None:
    from sgdnoise.server import TRAINING_VIEW, study_links
    from sgdnoise.tracking import client, redact

    links = study_links(uri, base, experiment)
    for s in links:
        print(f"{s.study}:\n  runs:   {s.runs}")
        if s.parent:
            print(f"  parent: {s.parent}")
    if not links:
        print("no studies recorded yet (make study, or sgdnoise sweep STUDY)")
    exp = client(uri).get_experiment_by_name(experiment)  # showing the store creates nothing
    if exp is not None:
        print(f"single runs: {base}/#/experiments/{exp.experiment_id}/runs?{TRAINING_VIEW}")
    print(f"store: {redact(uri)}", flush=True)


COMMANDS = {
    "analyze": cmd_analyze,
    "report": cmd_report,
    "nqm": cmd_nqm,
    "ui": cmd_ui,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "sweep": cmd_sweep,
    "status": cmd_status,
    "dashboard": cmd_dashboard,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, extra = _split_passthrough(argv)
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, extra)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
