"""Progress off a terminal: plain lines at most every N seconds (rate, ETA, loss), never carriage returns; a tqdm
bar on a terminal; library INFO chatter and warnings as one line on the console."""
import io
import logging
import warnings

import pytest

from medvlp.pretrain.progress import LineProgress, NullProgress, progress_bar, setup_logging

pytestmark = pytest.mark.timeout(60)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_lines_every_n_seconds_with_rate_eta_and_loss():
    clock, out = _Clock(), io.StringIO()
    bar = LineProgress(total=100, initial=20, desc="pretrain", every_s=30, stream=out, clock=clock)
    for i in range(60):  # 1 step per second
        clock.t += 1.0
        bar.update(1)
        bar.set_postfix(loss=f"{1.0 / (i + 1):.4f}")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the first update, t=31 (30 s later), and the end state at t=60, each with its step's loss
    assert len(lines) == 3, lines
    assert lines[0] == "pretrain 21/100 (21%) | 1 it/s | elapsed 0:01 | ETA 1:19 | loss=1.0000"
    assert lines[1] == "pretrain 51/100 (51%) | 1 it/s | elapsed 0:31 | ETA 0:49 | loss=0.0323"
    assert lines[-1] == "pretrain 80/100 (80%) | 1 it/s | elapsed 1:00 | ETA 0:20 | loss=0.0167"


def test_progress_bar_picks_lines_off_a_tty_and_tqdm_on_one(monkeypatch):
    monkeypatch.delenv("MEDVLP_PROGRESS", raising=False)
    monkeypatch.setenv("MEDVLP_PROGRESS_EVERY_S", "5")
    plain = progress_bar(total=3, desc="x", stream=io.StringIO())
    assert isinstance(plain, LineProgress) and plain.every_s == 5
    tty = _Tty()
    bar = progress_bar(total=3, desc="x", stream=tty)
    assert not isinstance(bar, (LineProgress, NullProgress))  # tqdm
    bar.update(3)
    bar.close()
    assert "\r" in tty.getvalue()
    assert isinstance(progress_bar(total=3, disable=True), NullProgress)
    monkeypatch.setenv("MEDVLP_PROGRESS", "off")
    assert isinstance(progress_bar(total=3, stream=tty), NullProgress)


def test_short_phase_prints_one_line_and_nothing_when_never_updated():
    out = io.StringIO()
    LineProgress(total=5, desc="embed test", stream=out).close()
    assert out.getvalue() == ""
    bar = LineProgress(total=None, desc="embed test", unit="sample", stream=out)
    bar.update(64)
    bar.update(64)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("embed test 64 sample") and lines[1].startswith("embed test 128")


@pytest.mark.timeout(420)
def test_training_loop_off_a_tty_writes_plain_lines(cxr_shards, tmp_path, capsys, monkeypatch):
    """The pretraining loop through the helper: stderr is not a terminal under pytest, so lines, not a bar."""
    from medvlp.launch.config import load_config
    from medvlp.pretrain.train import Trainer
    from tests.conftest import tiny_overrides

    monkeypatch.delenv("MEDVLP_PROGRESS", raising=False)
    monkeypatch.setenv("MEDVLP_PROGRESS_EVERY_S", "0")
    cfg = load_config("debug", tiny_overrides(cxr_shards, tmp_path, steps=3, **{
        "train.ckpt_every": 0, "train.final_eval": "false", "tracking.enabled": "false"}))
    Trainer(cfg).fit()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("pretrain ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["pretrain 1/3 (33%)", "pretrain 2/3 (67%)", "pretrain 3/3 (100%)"]
    assert all("loss=" in ln and "/s" in ln for ln in lines)


def test_console_logging_quiets_libraries_and_warnings_fit_one_line(capsys):
    before = warnings.showwarning
    levels = {n: logging.getLogger(n).level for n in ("accelerate", "mlflow")}
    try:
        setup_logging(False)
        assert logging.getLogger("accelerate.checkpointing").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("mlflow.store").getEffectiveLevel() == logging.WARNING
        warnings.showwarning("skipped 3 bad rows (listed in x.csv); first: line 2", UserWarning, "/a/b.py", 494)
        err = capsys.readouterr().err
        assert err == "warning: skipped 3 bad rows (listed in x.csv); first: line 2\n"
        setup_logging(True)
        assert logging.getLogger("accelerate").level == logging.INFO
    finally:
        warnings.showwarning = before
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


def test_mlflow_imported_after_setup_stays_at_warning():
    """MLflow sets its own loggers' level when imported; the console set-up must hold through that."""
    import os
    import subprocess
    import sys

    code = ("from medvlp.pretrain.progress import setup_logging; setup_logging(False); import logging, mlflow; "
            "print(logging.getLogger('mlflow').getEffectiveLevel(), logging.getLogger('mlflow.store').getEffectiveLevel())")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["30", "30"]
