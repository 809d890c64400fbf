"""`sgdnoise status STUDY`: where a sweep stands, read from Optuna only (never written).

Also the sweep's live progress: on a terminal a bar for the sweep and one for each
current run (elapsed against the mean run time so far), redrawn in place with `\\r`.
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TextIO

from optuna.trial import TrialState

from sgdnoise.paths import project_root
from sgdnoise.sweep.spec import StudySpec, load_spec
from sgdnoise.sweep.state import GridState, age_s, duration_s
from sgdnoise.sweep.storage import SweepStorage, open_storage
from sgdnoise.sweep.study import counts, load_study


def study_status(raw: Mapping[str, Any], study: str, *, storage: str | None = None) -> dict:
    """Grid size, finished, diverged, running (worker, age), remaining, ETA, as JSON-able."""
    spec = load_spec(raw, study)
    store = open_storage(storage, project_root(), spec.optuna_name, spec.heartbeat)
    return collect(spec, store)


def collect(spec: StudySpec, store: SweepStorage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "study": spec.name,
        "optuna_study": spec.optuna_name,
        "grid_hash": spec.grid_hash,
        "storage": store.display,
        "metric": spec.metric.as_dict(),
    }
    if not store.exists(spec.optuna_name):
        n = len(spec.points)
        return {
            **out, "started": False, "done": False, "grid_points": n, "points": n,
            "finished": 0, "diverged": 0, "skipped": 0, "added_by_edges": 0, "failed": 0,
            "failed_attempts": 0, "remaining": n, "running": [], "mean_run_s": None,
            "eta_s": None, "parent_run_id": None,
        }  # fmt: skip
    st = load_study(spec, store)
    state = GridState(spec, st.get_trials(deepcopy=False))
    c = counts(state)
    now = datetime.now()
    times = [
        d
        for t in state.trials
        if t.state == TrialState.COMPLETE
        and not t.user_attrs.get("adopted")
        and (d := duration_s(t)) is not None
    ]
    mean = sum(times) / len(times) if times else None
    running = [
        {
            "trial": t.number,
            "run": t.user_attrs.get("run_name", ""),
            "worker": t.user_attrs.get("worker", "?"),
            "age_s": round(age_s(t, now), 1),
        }
        for t in state.running()
    ]
    eta = None
    if mean is not None:
        left = c["remaining"] * mean - sum(min(r["age_s"], mean) for r in running)
        eta = round(max(0.0, left) / max(1, len(running)), 1)
    return {
        **out,
        "started": True,
        "done": state.complete,
        **c,
        "running": running,
        "mean_run_s": round(mean, 2) if mean is not None else None,
        "eta_s": eta,
        "parent_run_id": st.user_attrs.get("mlflow_parent_run_id"),
    }


def format_status(status: Mapping[str, Any]) -> str:
    s = status
    lines = [f"study {s['study']} (optuna study {s['optuna_study']} in {s['storage']})"]
    if not s["started"]:
        lines.append(f"not started: {s['grid_points']} grid points to run")
        return "\n".join(lines)
    done = s["points"] - s["remaining"]
    state = "complete" if s["done"] else f"{s['remaining']} remaining, ETA {fmt_s(s['eta_s'])}"
    lines.append(f"{bar(done, s['points'], 30)} {done}/{s['points']} points · {state}")
    lines.append(
        f"grid {s['grid_points']} · finished {s['finished']} · diverged {s['diverged']} · "
        f"skipped {s['skipped']} (saved) · added by edges {s['added_by_edges']} · "
        f"failed {s['failed']} ({s['failed_attempts']} failed attempts in all)"
    )
    for r in s["running"]:
        lines.append(
            f"running: trial {r['trial']} {r['run']} on {r['worker']} for {fmt_s(r['age_s'])}"
        )
    if s.get("parent_run_id"):
        lines.append(f"mlflow parent run {s['parent_run_id']}")
    return "\n".join(lines)


def bar(done: float, total: float, width: int) -> str:
    frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
    full = int(round(frac * width))
    return "[" + "#" * full + "." * (width - full) + "]"


def fmt_s(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    m, sec = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class Progress:
    """The live view of a running sweep: a redrawn bar on a terminal, else nothing (the
    workers print one plain line per run)."""

    def __init__(self, spec: StudySpec, store: SweepStorage, stream: TextIO = sys.stderr):
        self.spec, self.store, self.stream = spec, store, stream
        self.tty = stream.isatty()
        self._drawn = False

    def draw(self) -> None:
        if not self.tty:
            return
        try:
            s = collect(self.spec, self.store)
        except Exception:  # a journal being written or a database blip: skip a frame
            return
        if not s["started"]:
            return
        width = shutil.get_terminal_size((100, 20)).columns
        done = s["points"] - s["remaining"]
        line = f"{self.spec.name} {bar(done, s['points'], 20)} {done}/{s['points']}"
        line += f" · {len(s['running'])} running · ETA {fmt_s(s['eta_s'])}"
        mean = s["mean_run_s"]
        for r in s["running"][:2]:
            run = r["run"] or f"trial {r['trial']}"
            if mean:
                line += f" | {run} {bar(r['age_s'], mean, 8)} {fmt_s(r['age_s'])}/~{fmt_s(mean)}"
            else:
                line += f" | {run} {fmt_s(r['age_s'])}"
        self.stream.write("\r\033[K" + line[: max(10, width - 1)])
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()


def tty_log(stream: TextIO = sys.stderr):
    """A log function that prints above a progress bar (clears the bar's line first)."""

    def log(line: str) -> None:
        prefix = "\r\033[K" if stream.isatty() else ""
        stream.write(f"{prefix}{line}\n")
        stream.flush()

    return log
