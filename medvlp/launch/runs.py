"""Tracked-experiment comparison on MLflow: `medvlp runs compare` and `medvlp runs ui`.

compare: a table of an experiment's runs (status, the params whose values differ between runs, then the final
metrics; a training run's `medvlp eval` child runs are joined to its row: metrics it did not log itself come from
its latest evaluation, and an "eval runs" column names them) and a PNG overlaying their loss curves, written to
`--out` or to `medvlp-outputs/compare-EXPERIMENT-TIMESTAMP.png` beside the store's database (never over an
earlier file). Runs are found with `mlflow.search_runs` (an optional MLflow
filter string, e.g. "params.`optim.lr` = '0.003'"); only the plotted metric's histories are fetched. With
`--ci`, each run's zero-shot scores (the eval_scores.npz artifact every evaluation logs) are paired with the
baseline's (the first run, or `--baseline`) on the samples both scored, and the macro-AUC difference gets a
paired bootstrap 95% CI (BCa) and p-value (`medvlp.pretrain.metrics.paired_bootstrap`).
ui: `mlflow ui` on 127.0.0.1 over the same store as training;
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
    from medvlp.pretrain.tracking import resolve_uri as tracking_uri

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
    with_evals = any(r.get("evals") for r in runs)
    head = ["run", "status", *(["eval runs"] if with_evals else []), *params, *metrics]
    rows = [head, ["---"] * len(head)]
    for r in runs:
        vals = [r.get("name") or r["run_id"][:8], r.get("status", "")]
        vals += [", ".join(r.get("evals") or [])] if with_evals else []
        vals += [str(r["params"].get(p, "")) for p in params]
        vals += [_fmt(r["metrics"].get(m)) for m in metrics]
        rows.append(vals)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def search_runs(experiment: str, uri: str, filter_string: str = "", curve: str | None = None,
                include_children: bool = False) -> list[dict]:
    """Runs of `experiment` oldest first (`mlflow.search_runs`, optional filter string), as dicts like
    `medvlp.pretrain.tracking.read_runs`; histories only of `curve`. Child runs (evaluations) are left out unless asked."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(experiment) is None:
        known = sorted(e.name for e in client.search_experiments())
        raise SystemExit(f"runs compare: experiment {experiment!r} not found in {uri}; known: "
                         f"{', '.join(known) or '(none)'}")
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string or "",
                                   order_by=["attributes.start_time ASC"], output_format="list")
    except Exception as e:  # noqa: BLE001 - a malformed filter string: say so in one line
        raise SystemExit(f"runs compare: MLflow rejected --filter {filter_string!r}: {str(e)[:300]}") from None
    out = []
    children: dict[str, list] = {}
    for r in found:  # oldest first: the last child of a run is its latest evaluation
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent:
            children.setdefault(parent, []).append(r)
    for r in found:
        if not include_children and "mlflow.parentRunId" in r.data.tags:
            continue
        hist = {}
        if curve and curve in r.data.metrics:
            ms = sorted(client.get_metric_history(r.info.run_id, curve), key=lambda m: (m.step, m.timestamp))
            hist[curve] = [(int(m.step), float(m.value)) for m in ms]
        row = {"run_id": r.info.run_id, "run_name": r.info.run_name, "name": r.info.run_name,
               "status": r.info.status, "params": dict(r.data.params), "metrics": dict(r.data.metrics),
               "tags": dict(r.data.tags), "history": hist, "evals": [], "score_runs": [r.info.run_id]}
        join_evals(row, children.get(r.info.run_id, []))
        out.append(row)
    return out


def join_evals(row: dict, evals: list) -> None:
    """Join a training run's evaluation child runs (`medvlp eval`, oldest first) into its row: each metric the
    training run did not log itself is taken from its latest evaluation; `evals` names them, `score_runs` lists
    where eval_scores.npz may live (the run itself, then its evaluations, latest first)."""
    for child in evals:
        row["evals"].append(child.info.run_name or child.info.run_id[:8])
    own = set(row["metrics"])
    for child in evals:  # later evaluations overwrite earlier ones
        row["metrics"].update({k: v for k, v in child.data.metrics.items() if k not in own})
    row["score_runs"] += [c.info.run_id for c in reversed(evals)]


def _load_scores(client, run: dict, tmp: str):
    """(keys, labels_NK, scores_NK, label_names, split) of a run's eval_scores.npz, or None when it has none."""
    import numpy as np

    for run_id, path in ((rid, p) for rid in run.get("score_runs") or [run["run_id"]]
                         for p in ("eval/eval_scores.npz", "eval_scores.npz")):
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # noqa: BLE001 - the run logged no scores
            continue
        with np.load(local) as z:
            return ([str(k) for k in z["keys"]], z["labels"], z["scores"], [str(n) for n in z["label_names"]],
                    str(z["split"]))
    return None


def ci_table(runs: list[dict], uri: str, baseline: str | None = None, n: int = 1000, seed: int = 0) -> str:
    """Markdown table: macro zero-shot AUC of each run vs the baseline on the same samples, paired bootstrap."""
    import tempfile

    import numpy as np
    from mlflow import MlflowClient

    from medvlp.pretrain import metrics as M

    client = MlflowClient(tracking_uri=uri)
    with tempfile.TemporaryDirectory() as tmp:
        scored = [(r, _load_scores(client, r, f"{tmp}/{i}")) for i, r in enumerate(runs)]
    have = [(r, s) for r, s in scored if s is not None]
    if len(have) < 2:
        raise SystemExit("runs compare --ci: fewer than two runs logged eval/eval_scores.npz (an evaluation "
                         "writes it); nothing to pair")
    if baseline:
        base = next(((r, s) for r, s in have if baseline in (r["run_id"], r["name"])), None)
        if base is None:
            raise SystemExit(f"runs compare --ci: baseline {baseline!r} is not a scored run; scored: "
                             f"{', '.join(r['name'] or r['run_id'][:8] for r, _ in have)}")
    else:
        base = have[0]
    bname = base[0]["name"] or base[0]["run_id"][:8]
    bkeys, blab, bsc, bnames, bsplit = base[1]
    rows = [f"Paired bootstrap vs `{bname}` ({n} resamples, 95% BCa CI), macro zero-shot AUC on the samples both "
            f"runs scored ({bsplit} split):", "",
            "| run | macro AUC | baseline | Δ | 95% CI | p | samples |", "| --- | --- | --- | --- | --- | --- | --- |"]
    pos = {k: i for i, k in enumerate(bkeys)}
    for r, (keys, lab, sc, names, split) in have:
        if r is base[0]:
            continue
        name = r["name"] or r["run_id"][:8]
        if names != bnames or split != bsplit:
            rows.append(f"| {name} | different labels or split ({split}) | | | | | 0 |")
            continue
        common = [(pos[k], i) for i, k in enumerate(keys) if k in pos]
        if len(common) < 2:
            rows.append(f"| {name} | no shared samples | | | | | 0 |")
            continue
        bi, ri = (np.array(x) for x in zip(*common))
        res = M.paired_bootstrap(M.macro_auc, blab[bi], sc[ri], bsc[bi], n=n, seed=seed)
        rows.append(f"| {name} | {res['metric_a']:.3f} | {res['metric_b']:.3f} | {res['delta']:+.3f} | "
                    f"[{res['ci_lo']:+.3f}, {res['ci_hi']:+.3f}] | {res['p_value']:.3f} | {len(common)} |")
    return "\n".join(rows)


def compare_runs(experiment: str, metrics: list[str] | None = None, uri: str | None = None,
                 out: str | None = None, curve: str = "train/loss", ci: bool = False, baseline: str | None = None,
                 filter_string: str = "", n_boot: int = 1000) -> str:
    """Markdown table of the experiment's runs + an overlay PNG of `curve` (path printed under the table); with
    `ci`, the paired-bootstrap table of each run against the baseline."""
    from medvlp.pretrain.plots import overlay_curves_png

    given_uri = bool(uri or os.environ.get("MLFLOW_TRACKING_URI"))
    uri = resolve_uri(uri)
    runs = search_runs(experiment, uri, filter_string, curve)
    if not runs:
        raise SystemExit(f"runs compare: experiment {experiment!r} has no runs in {uri}"
                         + (f" matching {filter_string!r}" if filter_string else ""))
    if metrics:
        unknown = [m for m in metrics if not any(m in r["metrics"] for r in runs)]
        if unknown:
            have = sorted({k for r in runs for k in r["metrics"]})
            raise SystemExit(f"runs compare: no run of {experiment!r} logged {unknown}; logged: {', '.join(have)}")
    metrics = list(metrics or [m for m in DEFAULT_METRICS if any(m in r["metrics"] for r in runs)])
    table = compare_table(runs, metrics)
    png = Path(out) if out else default_output(uri, f"compare-{experiment}", ".png")
    replaced = png.exists()
    png.parent.mkdir(parents=True, exist_ok=True)
    overlay_curves_png(runs, curve, png)
    text = (f"{table}\n\n{len(runs)} runs from {uri}{'' if given_uri else ' (the default store)'}; {curve} overlay "
            f"-> {png}" + (" (replaced the file that was there)" if replaced else ""))
    if ci:
        text += "\n\n" + ci_table(runs, uri, baseline, n=n_boot)
    return text


def default_output(uri: str, stem: str, suffix: str) -> Path:
    """Where a command's output file goes without `--out`: `medvlp-outputs/` beside a SQLite store's database
    (the current directory's for a server or file store), named STEM-YYYYmmdd-HHMMSS[-N]SUFFIX: never a file
    of the current directory, never overwriting an earlier one."""
    import time

    if uri.startswith("sqlite:///") and uri[len("sqlite:///"):] not in ("", ":memory:"):
        base = Path(uri[len("sqlite:///"):]).parent
    else:
        base = Path.cwd()
    folder = base / "medvlp-outputs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = folder / f"{stem}-{stamp}{suffix}", 1
    while path.exists():
        path, i = folder / f"{stem}-{stamp}-{i}{suffix}", i + 1
    return path


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
