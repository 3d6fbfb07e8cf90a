"""`make demo`: the embedded corpus end to end on CPU.

synthetic radiographs -> shards (+ index, inspection sheet) -> pretrain the debug CLIP under DeepSpeed (one process)
-> zero-shot AUC, retrieval, linear probe -> one MLflow run -> a results table (printed and written to OUT/results.md).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path


@contextlib.contextmanager
def _timing_eval(spent: list[float]):
    """Adds the wall time of every held-out evaluation the trainer runs to `spent` (it is part of training's call)."""
    import medvlp.pretrain.eval as pe

    inner = pe.evaluate_for_training

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t)

    pe.evaluate_for_training = timed
    try:
        yield
    finally:
        pe.evaluate_for_training = inner


def wall_split(install_s: float | None, corpus_s: float, fit_s: float, eval_s: float) -> str:
    """One line: where the demo's wall time went (install only when `make` measured it)."""
    parts = ([f"install {install_s:.0f} s"] if install_s is not None else []) + [
        f"corpus {corpus_s:.0f} s", f"training {fit_s - eval_s:.0f} s", f"eval {eval_s:.0f} s"]
    total = (install_s or 0.0) + corpus_s + fit_s
    return f"wall time: {', '.join(parts)}; total {total:.0f} s"


# The corpus seed of the headline numbers. Corpus seed 0 was used to tune the demo (its prompts and the nodule radius
# were changed after looking at its test AUCs), so the demo reports on a corpus never used for tuning.
DEMO_CORPUS_SEED = 101
# How far one finding moves between training runs (measured on the 2-core box, README "make demo"); a single run's
# CI covers test sampling only. `medvlp eval --model-dir RUN0 RUN1 RUN2 --out DIR` measures it over training seeds.
SEED_SPREAD = ("Between training runs single findings move more than this CI: changing only the thread count / float "
               "rounding moved pneumothorax 0.919 <-> 0.999 and nodule 0.716 <-> 0.823 (macro 0.906-0.922); measure "
               "training seeds with `medvlp eval --model-dir RUN0 RUN1 RUN2 --out DIR`.")


def run_demo(out: str, n: int = 1024, steps: int | None = None, seed: int = DEMO_CORPUS_SEED,
             extra: list[str] | None = None, install_s: float | None = None) -> dict:
    from medvlp.data_shards.inspect import inspect_shards
    from medvlp.data_shards.synth import synth_to_shards
    from medvlp.launch.config import load_config
    from medvlp.pretrain.eval import format_table
    from medvlp.pretrain.train import Trainer

    t0 = time.perf_counter()
    out_p = Path(out)
    shards = out_p / "shards" / "cxr"
    print(f"[1/4] synthetic radiograph corpus: {n} samples -> {shards}", flush=True)
    synth_to_shards(shards, modality="cxr", n=n, seed=seed, shard_size=128, command=f"medvlp demo --n {n}")
    print(inspect_shards(shards, n_examples=2, sheet_path=str(out_p / "contact_sheet.png")), flush=True)
    corpus_s = time.perf_counter() - t0

    overrides = [f"data.train_shards={shards}", f"train.out_dir={out_p / 'runs' / 'debug'}",
                 f"tracking.uri=sqlite:///{(out_p / 'mlruns.db').resolve()}"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    cfg = load_config("demo", overrides + list(extra or []))
    print(f"[2/4] pretrain debug CLIP: {cfg.train.steps} steps x batch {cfg.data.batch_size} (DeepSpeed ZeRO-"
          f"{cfg.train.zero_stage}, loss backend {cfg.loss.backend})", flush=True)
    t_fit, eval_spent = time.perf_counter(), []
    with _timing_eval(eval_spent):
        res = Trainer(cfg, overwrite=True).fit()  # the demo owns OUT: a rerun replaces its previous run
    split = wall_split(install_s, corpus_s, time.perf_counter() - t_fit, sum(eval_spent))
    print("[3/4] evaluation on the held-out split", flush=True)
    table = format_table(res.metrics)
    first, last = res.losses[0][1], res.losses[-1][1]
    summary = (f"# medvlp demo results\n\ncorpus seed {seed}; loss {first:.3f} -> {last:.3f} over {res.steps_done} "
               f"steps; {res.samples_per_s:.1f} samples/s; {split}\n\n{table}\n\n"
               + (f"{SEED_SPREAD}\n\n" if SEED_SPREAD else "") +
               f"MLflow run `{res.run_id}` in `{cfg.tracking.uri}` (browse: `medvlp runs ui --uri {cfg.tracking.uri}`)\n")
    (out_p / "results.md").write_text(summary)
    print("[4/4] results\n" + summary, flush=True)
    return {"metrics": res.metrics, "losses": res.losses, "run_id": res.run_id}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="medvlp-demo", description=__doc__)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--n", type=int, default=1024, help="synthetic radiographs")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--seed", type=int, default=DEMO_CORPUS_SEED,
                   help="corpus seed (default: one never used for tuning the demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--started-at", type=float, default=None, metavar="EPOCH_S",
                   help="when `make demo` started (the install time is counted from it)")
    a = p.parse_args(argv)
    install_s = max(0.0, time.time() - a.started_at) if a.started_at else None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run_demo(a.out, n=a.n, steps=a.steps, seed=a.seed, extra=a.set, install_s=install_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
