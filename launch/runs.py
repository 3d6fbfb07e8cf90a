"""Tracked-experiment comparison on MLflow: `medvlp runs compare` and `medvlp runs ui`.

compare: a table of an experiment's runs (the params whose values differ between runs, then the final metrics)
and a PNG overlaying their loss curves. ui: `mlflow ui` on 127.0.0.1 over the same store as training.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

DEFAULT_METRICS = ("train/loss", "zeroshot/auc_macro", "retrieval/i2t_r1", "probe/auc_macro")


def resolve_uri(uri: str | None) -> str:
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path('mlruns.db').resolve()}"


def differing_params(runs: list[dict]) -> list[str]:
    keys = sorted({k for r in runs for k in r["params"]})
    return [k for k in keys if len({r["params"].get(k) for r in runs}) > 1]


def compare_table(runs: list[dict], metrics: list[str]) -> str:
    params = differing_params(runs)
    head = ["run", *params, *metrics]
    rows = [head, ["---"] * len(head)]
    for r in runs:
        vals = [r["name"] or r["run_id"][:8], *(str(r["params"].get(p, "")) for p in params)]
        for m in metrics:
            v = r["metrics"].get(m)
            vals.append("" if v is None else f"{v:.4g}")
        rows.append(vals)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def compare_runs(experiment: str, metrics: list[str] | None = None, uri: str | None = None,
                 out: str | None = None, curve: str = "train/loss") -> str:
    """Markdown table of the experiment's runs + an overlay PNG of `curve` (path printed under the table)."""
    from pretrain.plots import overlay_curves_png
    from pretrain.tracking import read_runs

    uri = resolve_uri(uri)
    runs = read_runs(experiment, uri)
    if not runs:
        raise SystemExit(f"experiment {experiment!r}: no runs in {uri}")
    metrics = list(metrics or [m for m in DEFAULT_METRICS if any(m in r["metrics"] for r in runs)])
    table = compare_table(runs, metrics)
    png = Path(out or f"compare-{experiment}.png")
    overlay_curves_png(runs, curve, png)
    return f"{table}\n\n{len(runs)} runs from {uri}; {curve} overlay -> {png}"


def ui_command(port: int, uri: str | None = None) -> list[str]:
    uri = resolve_uri(uri)
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
            "--port", str(port)]


def runs_ui(port: int = 5000, uri: str | None = None) -> int:
    cmd = ui_command(port, uri)
    print(f"MLflow UI on http://127.0.0.1:{port} ({shlex.join(cmd)})", flush=True)
    return subprocess.call(cmd)
