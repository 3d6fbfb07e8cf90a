"""Tracked-experiment comparison on MLflow: `medvlp runs compare` and `medvlp runs ui`.

compare: a table of an experiment's runs (status, the params whose values differ between runs, then the final
metrics) and a PNG overlaying their loss curves. ui: `mlflow ui` on 127.0.0.1 over the same store as training;
it is a full tracking server, so `MLFLOW_TRACKING_URI=http://127.0.0.1:PORT` sends new runs to it, and with a
SQLite store their artifacts go to `mlartifacts/` beside the database file (not into the current directory).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

DEFAULT_METRICS = ("train/loss", "zeroshot/auc_macro", "retrieval/i2t_r1", "probe/auc_macro")


def resolve_uri(uri: str | None) -> str:
    """--uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the current directory: the training default."""
    from pretrain.tracking import resolve_uri as tracking_uri

    return tracking_uri(uri or "")


def differing_params(runs: list[dict]) -> list[str]:
    """Param keys whose value is not the same in every run (a key missing from a run counts as a difference)."""
    keys = sorted({k for r in runs for k in r["params"]})
    return [k for k in keys if len({r["params"].get(k) for r in runs}) > 1]


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def compare_table(runs: list[dict], metrics: list[str]) -> str:
    """Markdown table: one row per run; columns run, status, differing params, then `metrics` (last values)."""
    params = differing_params(runs)
    head = ["run", "status", *params, *metrics]
    rows = [head, ["---"] * len(head)]
    for r in runs:
        vals = [r.get("name") or r["run_id"][:8], r.get("status", ""), *(str(r["params"].get(p, "")) for p in params)]
        vals += [_fmt(r["metrics"].get(m)) for m in metrics]
        rows.append(vals)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def compare_runs(experiment: str, metrics: list[str] | None = None, uri: str | None = None,
                 out: str | None = None, curve: str = "train/loss") -> str:
    """Markdown table of the experiment's runs + an overlay PNG of `curve` (path printed under the table)."""
    from pretrain.plots import overlay_curves_png
    from pretrain.tracking import read_runs

    uri = resolve_uri(uri)
    try:
        runs = read_runs(experiment, uri)
    except ValueError as e:  # unknown experiment: the message lists the known ones
        raise SystemExit(f"runs compare: {e}") from None
    if not runs:
        raise SystemExit(f"runs compare: experiment {experiment!r} has no runs in {uri}")
    if metrics:
        unknown = [m for m in metrics if not any(m in r["metrics"] for r in runs)]
        if unknown:
            have = sorted({k for r in runs for k in r["metrics"]})
            raise SystemExit(f"runs compare: no run of {experiment!r} logged {unknown}; logged: {', '.join(have)}")
    metrics = list(metrics or [m for m in DEFAULT_METRICS if any(m in r["metrics"] for r in runs)])
    table = compare_table(runs, metrics)
    png = Path(out or f"compare-{experiment}.png")
    overlay_curves_png(runs, curve, png)
    return f"{table}\n\n{len(runs)} runs from {uri}; {curve} overlay -> {png}"


def ui_command(port: int, uri: str | None = None, workers: int = 1) -> list[str]:
    """The `mlflow ui` command line over the training store; loopback only. One server worker: a personal UI
    needs no more, and mlflow's default of 4 makes start-up take a minute on a small machine."""
    uri = resolve_uri(uri)
    if uri.startswith(("http://", "https://")):
        raise SystemExit(f"runs ui: {uri} is already a tracking server; open it in a browser")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", str(workers)]
    if uri.startswith("sqlite:///"):  # artifacts of runs logged through this server: beside the database
        db = Path(uri[len("sqlite:///"):])
        cmd += ["--artifacts-destination", str(db.parent / "mlartifacts")]
    return cmd


def runs_ui(port: int = 5000, uri: str | None = None) -> int:
    """Serve the UI until interrupted; returns mlflow's exit code (0 after Ctrl-C)."""
    cmd = ui_command(port, uri)
    print(f"MLflow UI on http://127.0.0.1:{port} ({shlex.join(cmd)})", flush=True)
    # mlflow's background job runner (GenAI evaluation jobs) is not needed to browse runs; it costs processes
    env = {**os.environ}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0
