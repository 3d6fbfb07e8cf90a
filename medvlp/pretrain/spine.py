"""The run spine: what pretraining (`medvlp.pretrain.train`) and fine-tuning (`medvlp.finetune.runner`) share.

One run folder, written the same way by both loops:

    OUT/
      run.json                      the run's identity: {"uid", "loop", "created"} (written when the run starts)
      .lock                         held while a process trains here: {"pid", "host", "since"}
      config.yaml                   the resolved config
      checkpoints/step_XXXXXXXX/    one checkpoint (`tag_for`: 8 digits; 6-digit folders of older fine-tune runs
                                    are still read, ordered by their step number)
          ...                       the loop's own files (DeepSpeed's or accelerate's)
          COMPLETE                  written last, atomically: JSON {"step", "run_uid", ...}
      model.safetensors             final weights (a run that ended normally)
      replaced/<UTC stamp>/         a previous run moved aside by an explicit overwrite (never deleted)

The rules, the same in both loops:

* A folder that already holds a run (`RUN_FILES`) is refused unless resuming; an explicit overwrite moves the old
  run's files into `OUT/replaced/<stamp>/` (`move_aside`) instead of deleting them.
* Retention (`prune_checkpoints`) deletes only checkpoints whose COMPLETE marker names this run (or carries no run
  at all: a checkpoint written before run identities existed, in a folder this run resumed); a resume loads only
  from those (`own_checkpoints`), never from a checkpoint another run left in the folder.
* `RunLock`: one training process per folder. A second run on a folder in use stops with a one-line `RunDirError`;
  a lock left by a process that no longer exists (same host) is taken over.
* `StopFlag`: SIGTERM/SIGINT finish the current step, write a checkpoint and end the run cleanly (exit status 0 from
  the CLI); before the first step, or on a second signal, `TrainingInterrupted` ends it at once.
* A data stream that fails mid-run (`DataStreamError`, e.g. a remote outage): the half-done step is dropped and, with
  one process, the last completed step is checkpointed; the error's line names that checkpoint
  (`with_checkpoint_note`).
* An interrupted run says so on its MLflow run (`mark_interrupted`: tags `medvlp.interrupted` = `interruption_reason`,
  `medvlp.step_reached`, `medvlp.last_checkpoint`, `medvlp.model`), ended KILLED (FAILED for a non-finite loss).
* Learning-rate settings are checked once for both loops (`check_optim_values`, `check_lr`); a warmup longer than
  the run is said in one line (`warn_long_warmup`).
* Non-finite loss (`NONFINITE`): "skip" drops the step (no update) and stops after `max_bad_steps` in a row;
  "raise" stops at the first one. Both raise `NonFiniteLossError`.
* One schedule (`lr_multiplier`: linear warmup, then cosine to a floor) and one AdamW builder (`build_adamw`: weight
  decay on matrices and kernels only).
* One batch iteration: `EpochBatches` (endless batches, epoch after epoch, with the (epoch, step) position a
  checkpoint saves) and `micro_batches` (one optimizer step's `grad_accum` micro batches; a step whose data fails
  half way is abandoned without a trace: its gradients, its batch position and its RNG draws).
* One MLflow glue: `start_tracker` (a resumed run continues its MLflow run and loses its interrupted tag) and
  `report_interrupted` (the metrics not yet logged, the loop's artifacts, then the `mark_interrupted` tags).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger("medvlp.spine")

CKPT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
RUN_ID_FILE = "run.json"
LOCK_FILE = ".lock"
REPLACED_DIR = "replaced"
# What a run writes into its folder (a folder holding any of these holds a run).
RUN_FILES = (RUN_ID_FILE, "config.yaml", "config.json", CKPT_DIR, "train_log.jsonl", "model.pt", "model.safetensors",
             "loss_curve.png", "eval", "result.json")
# Left in place by an overwrite: the lock, earlier replaced runs, and tracking stores (an MLflow database may hold
# many runs, and an open connection must keep finding it).
_STAYS = (LOCK_FILE, REPLACED_DIR, "mlruns")
NONFINITE = ("skip", "raise")


class RunDirError(ValueError):
    """The run folder cannot be used: it holds another run, it is in use, or a resume does not match its run."""


class NonFiniteLossError(FloatingPointError, RuntimeError):
    """A NaN/inf loss: at once (policy "raise") or after too many consecutive skipped steps (policy "skip")."""


class TrainingInterrupted(KeyboardInterrupt):
    """A signal before the first step, a second signal, or (several ranks) a signal while waiting for data: the run
    exits at once without a new checkpoint. A KeyboardInterrupt, so `except Exception` in data code cannot swallow it."""

    def __init__(self, signum: int, why: str) -> None:
        super().__init__(f"signal {signum} {why}: exiting without a new checkpoint")
        self.signum = signum


class DataWaitInterrupt(KeyboardInterrupt):
    """Raised by the signal handler into a wait for data (which may never end); the step is abandoned."""


# ----------------------------------------------------------------------------------------------- checkpoints
def tag_for(step: int) -> str:
    """The checkpoint folder name of optimizer step `step`."""
    return f"step_{step:08d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step of a checkpoint folder name (`step_00000042` or an older `step_000042`); None for anything else."""
    name = Path(path).name
    if not name.startswith("step_") or not name[5:].isdigit():
        return None
    return int(name[5:])


def complete_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The COMPLETE checkpoint folders under OUT/checkpoints, oldest step first."""
    root = Path(out_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if step_of(p) is not None and (p / COMPLETE).is_file()]
    return sorted(done, key=lambda p: (step_of(p), p.name))


def latest_complete(out_dir: str | os.PathLike) -> Path | None:
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def write_complete(tag_dir: Path, step: int, run_uid: str | None, extra: dict | None = None) -> None:
    """The COMPLETE marker (JSON, written atomically; the last file of a checkpoint)."""
    doc = {"step": int(step), "run_uid": run_uid, **(extra or {})}
    tmp = tag_dir / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps(doc, default=str) + "\n")
    os.replace(tmp, tag_dir / COMPLETE)


def read_complete(tag_dir: Path) -> dict:
    """A COMPLETE marker as a dict (an older plain-number marker reads as {"step": N})."""
    text = (Path(tag_dir) / COMPLETE).read_text().strip()
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        doc = {}
    if isinstance(doc, (int, float)):
        doc = {"step": int(doc)}
    return doc if isinstance(doc, dict) else {}


def own_checkpoints(out_dir: str | os.PathLike, run_uid: str | None) -> list[Path]:
    """The COMPLETE checkpoints of run `run_uid`, oldest first: their marker names it, or names no run (written
    before run identities existed). What a resume loads from and what retention may delete."""
    return [p for p in complete_checkpoints(out_dir) if read_complete(p).get("run_uid") in (run_uid, None)]


def prune_checkpoints(out_dir: str | os.PathLike, keep: int, run_uid: str | None) -> list[Path]:
    """Delete all but the `keep` newest COMPLETE checkpoints of run `run_uid` (`own_checkpoints`). Another run's
    checkpoints are never touched. Returns what was deleted."""
    import shutil

    if keep <= 0:
        return []
    gone = own_checkpoints(out_dir, run_uid)[:-keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# ----------------------------------------------------------------------------------------------- the folder
def run_files(out_dir: str | os.PathLike) -> list[str]:
    """The entries of OUT_DIR that a run wrote (`RUN_FILES` present)."""
    return sorted(n for n in RUN_FILES if (Path(out_dir) / n).exists())


def refuse_if_taken(out_dir: str | os.PathLike, resume: bool, overwrite: bool, key: str = "train.out_dir",
                    found: list[str] | None = None) -> None:
    """RunDirError unless OUT_DIR is free for a new run: empty of run files, or resuming, or overwriting."""
    if resume and overwrite:
        raise RunDirError("resume and overwrite: choose one (continue the run, or replace it)")
    found = run_files(out_dir) if found is None else found
    if found and not resume and not overwrite:
        raise RunDirError(f"{key} {out_dir} already holds a run ({', '.join(found)}): pass --resume to continue "
                          f"it, --overwrite to move it aside and start afresh, or choose another {key}")


def move_aside(out_dir: str | os.PathLike) -> Path | None:
    """Move everything a previous run left in OUT_DIR (all but the lock, earlier replaced runs and tracking stores)
    into OUT_DIR/replaced/<UTC stamp>/, a run folder of its own. Nothing is deleted. Returns that folder (None when
    there was nothing to move)."""
    out = Path(out_dir)
    names = [p.name for p in sorted(out.iterdir())
             if p.name not in _STAYS and not p.name.endswith((".db", ".db-journal", ".db-wal", ".db-shm"))]
    if not names:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = out / REPLACED_DIR / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = out / REPLACED_DIR / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for name in names:
        os.replace(out / name, dest / name)
    log.warning("overwrite: the previous run in %s was moved to %s (%s)", out, dest, ", ".join(names))
    return dest


def _read_doc(path: Path, parse: Callable[[str], Any]) -> dict:
    """The mapping in a run's JSON/YAML record; {} when it is absent, unreadable or not a mapping."""
    try:
        doc = parse(path.read_text())
    except Exception:  # noqa: BLE001 - absent or unreadable: nothing recorded
        return {}
    return doc if isinstance(doc, dict) else {}


def read_run_uid(out_dir: str | os.PathLike) -> str | None:
    """The identity recorded in OUT/run.json (None when the folder has none)."""
    uid = _read_doc(Path(out_dir) / RUN_ID_FILE, json.loads).get("uid")
    return str(uid) if uid else None


def foreign_run(out_dir: str | os.PathLike, loop: str, kind: str, key: str) -> str:
    """Why `--resume` must not continue OUT_DIR as a run of `loop` ("pretrain" | "finetune") and recipe `kind`: it
    holds a run of the other loop (run.json `loop`) or of another kind (config.yaml `kind`); "" when it does not (or
    records neither). `key`: the config key naming the folder, for the message."""
    import yaml

    out = Path(out_dir)
    theirs = _read_doc(out / RUN_ID_FILE, json.loads).get("loop")
    if theirs and theirs != loop:
        what = f"a {theirs} run (run.json loop), not a {loop} run"
    else:
        their_kind = _read_doc(out / "config.yaml", yaml.safe_load).get("kind")
        if not (their_kind and kind and their_kind != kind):
            return ""
        what = f"a {their_kind} run (config.yaml kind), not a {kind} run"
    return (f"{key} {out}: --resume: it holds {what}; resume that run with its own command, or choose another "
            f"{key}")


def start_run(out_dir: str | os.PathLike, loop: str, resume: bool) -> str:
    """This run's identity: on resume the folder's own (adopted when an older run has none yet), else a new one,
    written to OUT/run.json. The COMPLETE markers carry it so that retention knows its own checkpoints."""
    path = Path(out_dir) / RUN_ID_FILE
    uid = read_run_uid(out_dir) if resume else None
    if uid:
        return uid
    uid = uuid.uuid4().hex
    tmp = path.with_name(RUN_ID_FILE + ".tmp")
    tmp.write_text(json.dumps({"uid": uid, "loop": loop, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                  time.gmtime())}) + "\n")
    os.replace(tmp, path)
    return uid


# ----------------------------------------------------------------------------------------------- the lock
def _alive(pid: int) -> bool:
    """Whether process `pid` of this host is running (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[0] != "Z"
    except (OSError, ValueError, IndexError):  # no /proc (not Linux): trust kill(pid, 0)
        return True


class RunLock:
    """OUT/.lock: one training process per run folder.

    `acquire()` creates the lock file exclusively. When it exists: held by a live process (or by one on another
    host, which cannot be checked) -> RunDirError naming it; left by a process of this host that no longer exists
    -> taken over with a warning. `release()` removes it (only if it is still ours)."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.held = False

    @staticmethod
    def holder(out_dir: str | os.PathLike) -> dict | None:
        """The live holder of OUT/.lock ({"pid", "host", "since"}), or None when free or stale."""
        path = Path(out_dir) / LOCK_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        pid, host = doc.get("pid"), doc.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            return None
        if not isinstance(pid, int):  # half-written by a process that died while writing it
            return None if time.time() - path.stat().st_mtime > 10 else {"pid": "?", "host": host, "since": "?"}
        return doc

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"pid": os.getpid(), "host": socket.gethostname(),
               "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self.holder(self.path.parent)
                if other is not None:
                    raise RunDirError(
                        f"{self.path.parent} is in use by another run (pid {other.get('pid')} on "
                        f"{other.get('host')}, since {other.get('since')}): wait for it to end or choose another "
                        f"out_dir (remove {self.path} only if that process is gone)") from None
                log.warning("%s: taking over the lock of a process that no longer exists", self.path)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(doc) + "\n")
            self.held = True
            return
        raise RunDirError(f"{self.path}: could not take the run folder's lock (another process keeps taking it)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError, AttributeError):
            pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------- signals
class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits. Before the first step
    (`armed` false) or on a second signal the handler raises `TrainingInterrupted` at once; while the loop waits for
    data (`waiting`) it raises `DataWaitInterrupt` into the wait."""

    def __init__(self) -> None:
        self.stop = False
        self.signum = 0
        self.armed = False
        self.waiting = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.stop:
            raise TrainingInterrupted(signum, "received twice")
        if not self.armed:
            raise TrainingInterrupted(signum, "before the first step")
        self.stop, self.signum = True, signum
        if self.waiting:
            log.warning("signal %s while waiting for data: stopping", signum)
            raise DataWaitInterrupt()
        log.warning("signal %s: will checkpoint and stop after this step (a second signal exits at once)", signum)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------- interruptions
INTERRUPTED_TAG = "medvlp.interrupted"


def interruption_reason(e: BaseException | None, signum: int = 0) -> str:
    """The value of the run's `medvlp.interrupted` tag: signal_15, remote_outage, data_stream, nonfinite_loss,
    keyboard_interrupt, or the exception's type name."""
    from medvlp.data_shards.guard import DataStreamError
    from medvlp.data_shards.remote import RemoteOutage

    if e is None or isinstance(e, (TrainingInterrupted, DataWaitInterrupt)):
        return f"signal_{int(getattr(e, 'signum', 0) or signum or 0)}"
    if isinstance(e, RemoteOutage):
        return "remote_outage"
    if isinstance(e, DataStreamError):
        return "data_stream"
    if isinstance(e, NonFiniteLossError):
        return "nonfinite_loss"
    if isinstance(e, KeyboardInterrupt):
        return "keyboard_interrupt"
    return type(e).__name__


def mark_interrupted(tracker: Any, reason: str, step: int, checkpoint: str | os.PathLike | None,
                     model_uri: str = "") -> None:
    """Say on the MLflow run that it was interrupted: tags `medvlp.interrupted` (the reason), `medvlp.step_reached`,
    `medvlp.last_checkpoint` (the folder a `--resume` continues from; "" when none was written) and
    `medvlp.model` (the model logged from that checkpoint, when one was). The caller ends the run (KILLED, or
    FAILED for a non-finite loss). Never raises: the interruption being reported matters more."""
    if tracker is None:
        return
    tags = {INTERRUPTED_TAG: reason, "medvlp.step_reached": int(step),
            "medvlp.last_checkpoint": str(Path(checkpoint).resolve()) if checkpoint else ""}
    if model_uri:
        tags["medvlp.model"] = model_uri
    try:
        tracker.set_tags(tags)
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow: could not tag the interrupted run (%s)", e)


def clear_interrupted(tracker: Any) -> None:
    """A resumed run is no longer interrupted: its `medvlp.interrupted` tag becomes `medvlp.resumed_after` ("<reason>
    at step <n>"), so a run that then finishes does not read as interrupted. Never raises."""
    client, run_id = getattr(tracker, "client", None), getattr(tracker, "run_id", None)
    if client is None or not run_id:
        return
    try:
        tags = client.get_run(run_id).data.tags
        if INTERRUPTED_TAG in tags:
            tracker.set_tags({"medvlp.resumed_after": f"{tags[INTERRUPTED_TAG]} at step "
                                                      f"{tags.get('medvlp.step_reached', '?')}"})
            client.delete_tag(run_id, INTERRUPTED_TAG)
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow: could not clear the interrupted tag of the resumed run (%s)", e)


def with_checkpoint_note(e: Exception, step: int, checkpoint: str | os.PathLike | None, key: str) -> Exception:
    """`e` (same type) with what a resume continues from appended to its one line."""
    if checkpoint:
        note = f"; checkpoint of step {step} written to {checkpoint}: rerun with --resume ({key}) to continue"
    else:
        note = "; no step was completed, so there is no checkpoint to resume from"
    try:
        out = type(e)(f"{e}{note}")
    except Exception:  # noqa: BLE001 - an exception type with another constructor: keep it as it is
        return e
    return out


def rng_snapshot() -> dict:
    """The global RNG states (python, numpy, torch, CUDA): what a step draws from."""
    import random

    import numpy as np
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def rng_restore(st: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st:
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------------------- batches
_END = object()


class EpochBatches:
    """Endless training batches, epoch after epoch, from `open_epoch(epoch, start_step)`: the iterable of one epoch's
    batches from its batch `start_step` on (the shard stream in pretraining, a stage's `batches` in fine-tuning).

    `next()` counts the batches taken from the current epoch (`step`); an exhausted epoch opens the next one from its
    first batch; an epoch that yields nothing is an error naming `what`. `position()` is what a checkpoint saves and
    a resume passes back as (epoch, step); `rewind(pos)` goes back to an earlier position (a step abandoned half way):
    the stream reopens there at the next `next()`. `lazy`: open the first epoch at the first `next()`, not now."""

    def __init__(self, open_epoch: Callable[[int, int], Iterable], epoch: int = 0, step: int = 0, *,
                 what: str = "the training stream", lazy: bool = False) -> None:
        self._open = open_epoch
        self.epoch, self.step, self.what = int(epoch), int(step), what
        self.source: Iterable | None = None  # the current epoch's iterable (e.g. a loader with its stats)
        self._it: Iterator | None = None
        if not lazy:
            self._start()

    def _start(self) -> None:
        self.source = self._open(self.epoch, self.step)
        self._it = iter(self.source)

    def next(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self._start()
            batch = next(self._it, _END)
            if batch is not _END:
                self.step += 1
                return batch
            self._it, self.epoch, self.step = None, self.epoch + 1, 0
        raise RuntimeError(f"{self.what} yielded no batch for a whole epoch: is the split empty?")

    def position(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def rewind(self, pos: dict) -> None:
        """Go back to `pos` (an earlier `position()`); the live iterator is dropped."""
        self.epoch, self.step, self._it = int(pos["epoch"]), int(pos["step"]), None


def micro_batches(next_batch: Callable[[], Any], batches: Any, n: int,
                  abandon: Callable[[], None]) -> Iterator[tuple[int, Any]]:
    """The `n` micro batches of one optimizer step, as (i, batch), from `next_batch()`. A batch that cannot be had
    (`DataStreamError`: a failed stream; `DataWaitInterrupt`: a signal while waiting for it) abandons the step
    without a trace: `abandon()` drops the gradients of its earlier micro batches (each loop's engine has its own
    way), `batches` (when it has a `position`) goes back to where the step began, and the RNG draws of those micro
    batches are undone; then the error goes on."""
    from medvlp.data_shards.guard import DataStreamError

    start = batches.position() if hasattr(batches, "position") else None
    rng = rng_snapshot() if n > 1 else None
    for i in range(n):
        try:
            batch = next_batch()
        except (DataWaitInterrupt, DataStreamError):
            abandon()
            if start is not None:
                batches.rewind(start)
            if rng is not None and i > 0:
                rng_restore(rng)
            raise
        yield i, batch


# ----------------------------------------------------------------------------------------------- MLflow
def start_tracker(tracking: Any, rank: int, config_flat: dict | None, resume_run_id: str | None = None,
                  resumed: bool = False):
    """The MLflow run of a training (`medvlp.pretrain.tracking.Tracker`, started; a no-op off rank 0 or with
    tracking off): a resumed run (`resumed`) continues its MLflow run `resume_run_id` and is no longer marked
    interrupted (`clear_interrupted`). The caller ends it."""
    from medvlp.pretrain.tracking import Tracker

    tracker = Tracker(tracking, rank, config_flat, resume_run_id=resume_run_id or None).start()
    if resumed and rank == 0:
        clear_interrupted(tracker)
    return tracker


def report_interrupted(tracker: Any, reason: str, step: int, checkpoint: str | os.PathLike | None,
                       pending: dict | None = None, artifacts: Callable[[], str] | None = None) -> None:
    """An interrupted run's MLflow record (main process): the metrics not yet logged (`pending`, at `step`: the
    curves end where training did), the loop's own artifacts (`artifacts()`, which returns the URI of a model it
    logged, or ""), then the tags of `mark_interrupted`. The caller ends the run. Never raises: the interruption is
    what must be reported."""
    if tracker is None:
        return
    try:
        if pending:
            tracker.log_metrics(pending, step)
        uri = artifacts() if artifacts is not None else ""
        mark_interrupted(tracker, reason, step, checkpoint or None, uri)
    except Exception as e:  # noqa: BLE001 - the interruption is what must be reported
        log.warning("MLflow: the interrupted run was not fully recorded (%s: %s)", type(e).__name__, e)


# ----------------------------------------------------------------------------------------------- non-finite loss
def check_nonfinite_policy(policy: str, key: str) -> None:
    if policy not in NONFINITE:
        raise ValueError(f"{key}: {policy!r} is not one of {', '.join(NONFINITE)}")


def on_nonfinite(policy: str, step: int, bad_in_a_row: int, max_bad: int) -> None:
    """Called for a NaN/inf loss at optimizer step `step` (1-based), the `bad_in_a_row`-th in a row: raises
    `NonFiniteLossError` under "raise", or under "skip" once `max_bad` steps in a row were skipped; else warns."""
    if policy == "raise":
        raise NonFiniteLossError(f"step {step}: the loss is NaN/inf (nonfinite_loss=raise; 'skip' drops such steps)")
    if bad_in_a_row >= max_bad:
        raise NonFiniteLossError(f"loss was NaN/inf for {bad_in_a_row} consecutive steps (max_bad_steps)")
    log.warning("step %d: non-finite loss on some rank; step skipped (%d in a row)", step, bad_in_a_row)


# ----------------------------------------------------------------------------------------------- optimization
def check_lr(name: str, lr: Any) -> None:
    """ValueError("name: ...") unless `lr` is a finite number > 0 (a learning rate)."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise ValueError(f"{name}: must be a finite number, got {lr!r}")
    if not lr > 0:
        raise ValueError(f"{name}: must be > 0, got {lr}")


def check_optim_values(lr: float, weight_decay: float, betas: Iterable[float], min_lr_ratio: float,
                       grad_clip: float) -> None:
    """ValueError("field: ...") for an optimizer setting that cannot train: lr not a finite number > 0, weight decay
    or gradient clip negative or not finite, betas not two numbers in [0, 1), the cosine floor outside [0, 1]. The
    config tree prefixes the section (`optim.lr: must be > 0, got -1.0`), so the message names the key path."""
    check_lr("lr", lr)
    for name, v in (("weight_decay", weight_decay), ("grad_clip", grad_clip)):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: must be a finite number >= 0, got {v}")
    betas = list(betas)
    if len(betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas: must be a pair of numbers in [0, 1), got {betas}")
    if not 0 <= min_lr_ratio <= 1:  # NaN fails this too
        raise ValueError(f"min_lr_ratio: must be in [0, 1], got {min_lr_ratio}")


def warn_long_warmup(warmup_steps: int, steps: int, warmup_key: str, steps_key: str) -> bool:
    """A warmup longer than the run never reaches the peak lr. Not refused (a 1-step smoke run of a recipe with a
    warmup is fine, and a resume may lengthen the run), but said in one line naming both keys. True if warned."""
    if warmup_steps <= steps:
        return False
    log.warning("%s=%d is more than %s=%d: the lr rises for the whole run and never reaches its peak (it ends at "
                "%.0f%% of it)", warmup_key, warmup_steps, steps_key, steps, 100.0 * steps / warmup_steps)
    return True


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


_NO_DECAY_WORDS = ("logit_scale", "logit_bias", "positional_embedding", "position_embeddings", "class_embedding",
                   "token_type_embeddings")


def decay_param_names(model) -> set[str]:
    """Names of the parameters that get weight decay (matrices / conv kernels that are not norms or positions)."""
    import torch.nn as nn

    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    norm_params = {f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules() if isinstance(m, norm_types)
                   for pn, _ in m.named_parameters(recurse=False)}
    out = set()
    for n, p in model.named_parameters():
        if p.ndim < 2 or n in norm_params or n.endswith(".bias") or any(w in n for w in _NO_DECAY_WORDS):
            continue
        out.add(n)
    return out


def build_adamw(model, lr: float, betas: Iterable[float], weight_decay: float, eps: float = 1e-8,
                fused: bool = False):
    """AdamW over the trainable parameters in two groups: weight decay on matrices and kernels only (no biases,
    norms, positions, logit scale: `decay_param_names`). ValueError when nothing is trainable."""
    import torch

    with_decay = decay_param_names(model)
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if name in with_decay else rest).append(p)
    if not decay and not rest:
        raise ValueError("every parameter is frozen: nothing to train")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = dict(lr=lr, betas=tuple(betas), eps=eps)
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW([g for g in groups if g["params"]], **kwargs)
