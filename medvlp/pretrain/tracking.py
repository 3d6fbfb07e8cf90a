"""MLflow tracking: a thin, failure-tolerant layer over `mlflow.MlflowClient`; only rank 0 logs.

    with Tracker(cfg.tracking, rank, flat_config) as tr:     # starts a run, logs the config as params
        tr.log_metrics({"train/loss": 0.7}, step=10)
        tr.log_artifact("runs/x/loss_curve.png")
    runs = read_runs("medvlp-debug", uri)                    # params, final metrics and histories

Lineage: every run carries MLflow's own context tags (mlflow.user, mlflow.source.name / type,
mlflow.source.git.commit), the tag `medvlp.out_dir` (the run folder, how `medvlp eval` finds the training run),
the shard sets it read as MLflow dataset inputs (name, digest = index.json sha256, profile = counts per split,
label spec, build command; context "train" / "eval"), and, with `tracking.system_metrics`, MLflow's system
metrics (system/cpu_utilization_percentage, ...). `log_eval_run` records an evaluation as a child run
(mlflow.parentRunId) of the training run it evaluated.

Run names: `cfg.run_name`, else RECIPE-SUFFIX (`default_run_name`: the run folder's name and 6 hex digits from the
OS's entropy; MLflow's own generated names come from `random`, which a seeded run fixes). An evaluation's child
run is `eval-<training run name>-<split>` (`eval_run_name`).

Where runs go: `cfg.uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///mlruns.db` in the current directory (made
absolute, so a later `chdir` does not split the store). An http(s) server is probed first (`cfg.probe_timeout_s`);
if it does not answer, a warning is printed and the run goes to the local fallback store instead. Training must
never die because tracking did: any logging error is warned about once, the call is buffered, and the buffer is
retried (at most every `cfg.retry_every_s`) on later calls and at `end()`; what is still unsent at the end is
written to a JSON file beside the fallback store.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from medvlp.pretrain.configtree import flatten  # noqa: F401 - one flatten ({"a": {"b": 1}} -> {"a.b": 1}), re-exported here

log = logging.getLogger("medvlp.tracking")

DEFAULT_URI = "sqlite:///mlruns.db"
MAX_PARAM_CHARS = 6000  # MLflow 3 limit for a param value
MAX_KEY_CHARS = 250  # MLflow limit for a param/metric/tag key
# MLflow errors about the data itself (retrying cannot help: drop the item, warn)
_DATA_ERRORS = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"}


# ----------------------------------------------------------------------------------------------- helpers
def sanitize_key(key: str) -> str:
    """MLflow keys allow letters, digits, `_ - . / ` and space; anything else becomes `_`; capped at 250 chars."""
    return re.sub(r"[^\w\-./ ]", "_", str(key))[:MAX_KEY_CHARS] or "_"


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."


def absolute_uri(uri: str) -> str:
    """sqlite/file URIs and plain paths with a relative path become absolute (relative to the current directory)."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path.startswith("/") or path == ":memory:" or not path:
            return uri
        return "sqlite:///" + str(Path(path).resolve())
    if uri.startswith("file:"):
        p = urlparse(uri).path
        return Path(p).resolve().as_uri() if p else uri
    if "://" not in uri:  # a plain directory path = file store
        return Path(uri).resolve().as_uri()
    return uri


def resolve_uri(cfg_uri: str = "") -> str:
    """cfg.uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db; always absolute."""
    return absolute_uri(cfg_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_URI)


def server_reachable(uri: str, timeout_s: float = 2.0) -> bool:
    """True unless `uri` is http(s) and GET <uri>/health gets no HTTP answer within the timeout."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return True
    except urllib.error.HTTPError:  # it answered (auth, 404 behind a proxy...): a server is there
        return True
    except Exception:  # noqa: BLE001 - refused, timeout, DNS: all mean "not reachable"
        return False


def run_suffix(n_bytes: int = 3) -> str:
    """A short random suffix from the OS's entropy (`secrets`), never from the seeded `random` / numpy / torch
    generators: MLflow's own random names come from `random`, which a seeded run fixes (every run of one seed got
    the same name)."""
    import secrets

    return secrets.token_hex(n_bytes)


def default_run_name(config_flat: dict | None, kind: str = "") -> str:
    """`RECIPE-SUFFIX`: RECIPE is the run folder's name (train.out_dir, finetune.out_dir, protocol.out_dir; the
    recipes name their folder after themselves), else the config kind; SUFFIX is `run_suffix()`."""
    flat = flatten(config_flat) if config_flat and any(isinstance(v, dict) for v in config_flat.values()) \
        else dict(config_flat or {})
    base = ""
    for key in ("train.out_dir", "finetune.out_dir", "protocol.out_dir"):
        if flat.get(key):
            base = Path(str(flat[key])).name
            break
    base = re.sub(r"[^\w\-.]+", "-", base or str(flat.get("kind") or kind or "run")).strip("-") or "run"
    return f"{base[:60]}-{run_suffix()}"


# ----------------------------------------------------------------------------------------------- the store
class TrackingStoreError(ValueError):
    """The configured MLflow store cannot be written (read-only, or cannot be created): a training run refuses to
    start rather than train without the record it was asked to keep (one line, exit 2 from the CLI)."""

    user_facing = True


def _writable(path: Path) -> bool:
    """Whether this process may write `path` (with its effective ids, as the file system will judge it)."""
    if os.access in os.supports_effective_ids:
        return os.access(path, os.W_OK | os.X_OK if path.is_dir() else os.W_OK, effective_ids=True)
    return os.access(path, os.W_OK | os.X_OK if path.is_dir() else os.W_OK)


def _creatable(path: Path) -> str | None:
    """Why `path` (absent) cannot be created, or None: its nearest existing ancestor must be a writable folder."""
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return f"{anc} is a file, so {path} cannot be created"
    if not _writable(anc):
        return f"{anc} is read-only, so {path} cannot be created"
    return None


def store_problem(uri: str) -> str | None:
    """Why the local MLflow store at `uri` (sqlite:/// or file: / a folder) cannot be written, or None. Servers and
    other schemes are not checked here (a server that does not answer has its own fallback)."""
    try:
        return _store_problem(uri)
    except OSError as e:  # a folder on the way that cannot even be looked into
        return f"{e.filename or uri}: {e.strerror or e}"


def _store_problem(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        raw = uri[len("sqlite:///"):].split("?", 1)[0]
        if raw in ("", ":memory:"):
            return None
        db = Path(raw)
        if not db.exists():
            return _creatable(db)
        if db.is_dir():
            return f"{db} is a folder, not an SQLite file"
        if not _writable(db):
            return f"{db} is read-only"
        if not _writable(db.parent):  # SQLite writes its journal beside the database, artifacts go there too
            return f"its folder {db.parent} is read-only (SQLite writes its journal there)"
        return None
    if uri.startswith("file:"):
        folder = Path(urlparse(uri).path)
        if not folder.exists():
            return _creatable(folder)
        if not folder.is_dir():
            return f"{folder} is a file, not a store folder"
        return None if _writable(folder) else f"{folder} is read-only"
    return None


def store_refusal(cfg, rank: int = 0) -> str:
    """The one-line refusal of a training run whose configured local MLflow store cannot be written, or "" (tracking
    off, not rank 0, or a writable / remote store): `tracking.enabled=false` trains without MLflow."""
    if rank != 0 or not bool(getattr(cfg, "enabled", True)):
        return ""
    uri = resolve_uri(getattr(cfg, "uri", ""))
    problem = store_problem(uri)
    if not problem:
        return ""
    return (f"MLflow store {uri} cannot be written: {problem}; point tracking.uri at a writable store, or set "
            f"tracking.enabled=false to train without MLflow")


def check_store(cfg, rank: int = 0) -> None:
    """TrackingStoreError with `store_refusal`'s line when it has one. The training loops check before claiming
    their run folder, so a refused run leaves nothing behind."""
    refusal = store_refusal(cfg, rank)
    if refusal:
        raise TrackingStoreError(refusal)


def error_line(e: BaseException | None, limit: int = 300) -> str:
    """One line saying what an MLflow / SQLAlchemy error was: SQLAlchemy's text opens with notes ("raised as a
    result of ...") and ends with the SQL; the line naming the driver's error says what happened."""
    lines = [ln.strip() for ln in str(e or "").splitlines() if ln.strip()]
    why = next((ln for ln in lines if re.match(r"\([\w.]+\) ", ln)), lines[0] if lines else "")
    return why[:limit]


class _OneLineStoreErrors(logging.Filter):
    """MLflow's SQL store logs every database error with its whole SQLAlchemy traceback (~85 lines) before raising;
    the Tracker says what failed in one warning line, so the record keeps its first line only (all of it with
    `-v`, when the medvlp logger is at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not log.isEnabledFor(logging.DEBUG):
            first = record.getMessage().splitlines()[0] if record.getMessage() else ""
            cause = record.exc_info[1]
            record.msg, record.args = f"{first} {type(cause).__name__}: {error_line(cause)}", None
            record.exc_info, record.exc_text = None, None
        return True


_STORE_FILTER = _OneLineStoreErrors()


def _quiet_store_tracebacks() -> None:
    lg = logging.getLogger("mlflow.store.db.utils")
    if _STORE_FILTER not in lg.filters:
        lg.addFilter(_STORE_FILTER)


# ----------------------------------------------------------------------------------------------- tracker
class Tracker:
    """One MLflow run for rank 0; every method is a no-op on other ranks or when tracking is disabled."""

    def __init__(self, cfg, rank: int = 0, config_dict: dict | None = None, resume_run_id: str | None = None, *,
                 parent_run_id: str | None = None, tags: dict | None = None,
                 datasets: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.resume_run_id = resume_run_id  # a resumed training continues its MLflow run (same store)
        self.parent_run_id = parent_run_id  # makes this a child run (e.g. an evaluation of a training run)
        self.extra_tags = dict(tags or {})
        self.datasets = dict(datasets) if datasets is not None else None  # {context: shard dir}; None = config's
        self._monitor = None
        self._new_run = False
        self.active = bool(getattr(cfg, "enabled", True)) and rank == 0
        self.config_dict = config_dict
        self.run_id: str | None = None
        self.run_name: str | None = None
        self.uri: str | None = None
        self.client = None
        self._ended = False
        self._pending: list[tuple[str, Any]] = []  # ("batch", (metrics, params, tags)) | ("artifact", (path, dir))
        self._dropped = 0
        self._warned = False
        self._next_retry = 0.0
        self._stage = None  # temp dir for text/figure artifacts (kept until they are sent)

    # -- lifecycle
    def __enter__(self) -> "Tracker":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def start(self) -> "Tracker":
        """Pick the store (probing servers), create the experiment if needed, start the run, log the config.

        If the run cannot be created there, the local fallback store is tried; if that fails too, tracking is
        switched off with a warning (training never stops for it)."""
        if not self.active or self.run_id is not None:
            return self
        uri = resolve_uri(getattr(self.cfg, "uri", ""))
        fallback = absolute_uri(getattr(self.cfg, "fallback_uri", "") or DEFAULT_URI)
        if uri.startswith(("http://", "https://")):
            self._bound_http_retries()
            timeout = float(getattr(self.cfg, "probe_timeout_s", 2.0))
            if not server_reachable(uri, timeout):
                warnings.warn(f"MLflow server {uri} did not answer within {timeout:g} s; logging to {fallback} "
                              f"instead (training goes on)", RuntimeWarning, stacklevel=2)
                uri = fallback
        _quiet_store_tracebacks()
        for candidate in dict.fromkeys([uri, fallback]):  # the chosen store, then the local one
            problem = store_problem(candidate)
            if problem:  # read-only or impossible: say so in one line instead of MLflow's SQL traceback
                warnings.warn(f"MLflow: cannot write the store {candidate}: {problem}", RuntimeWarning, stacklevel=2)
                continue
            try:
                self._open_run(candidate)
                break
            except Exception as e:  # noqa: BLE001 - tracking must never stop training
                warnings.warn(f"MLflow: could not start a run in {candidate} ({type(e).__name__}: {error_line(e)})",
                              RuntimeWarning, stacklevel=2)
        if self.run_id is None:
            warnings.warn("MLflow tracking is off for this run", RuntimeWarning, stacklevel=2)
            self.active = False
            return self
        if self.config_dict:
            self.log_params(self.config_dict)
        if self._new_run:
            self._log_lineage()
        self._start_system_metrics()
        return self

    def _log_lineage(self) -> None:
        """Out-dir tag and the shard sets as dataset inputs (once, when the run is created)."""
        flat = flatten(self.config_dict) if self.config_dict else {}
        tags = dict(self.extra_tags)
        out_dir = flat.get("train.out_dir")
        if out_dir:
            tags.setdefault("medvlp.out_dir", str(Path(str(out_dir)).resolve()))
        if tags:
            self.set_tags(tags)
        sets = self.datasets
        if sets is None:
            sets = {"train": flat.get("data.train_shards") or ""}
            if flat.get("data.val_shards"):
                sets["eval"] = flat["data.val_shards"]
        for context, spec in sets.items():
            ds = shard_dataset(str(spec)) if spec else None
            if ds is not None:
                self._call(lambda ds=ds, c=context: self._log_input(ds, c), buffer=None)

    def _log_input(self, ds, context: str) -> None:
        from mlflow.entities import DatasetInput, InputTag

        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context",
                                                                                         context)])])

    def _start_system_metrics(self) -> None:
        if not getattr(self.cfg, "system_metrics", True) or self._monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            every = float(getattr(self.cfg, "system_metrics_every_s", 10.0))
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=every, samples_before_logging=1,
                                                 resume_logging=self.resume_run_id is not None and not self._new_run,
                                                 tracking_uri=self.uri)
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - psutil missing, store refusing: the run goes on without them
            self._monitor = None
            warnings.warn(f"MLflow system metrics are off ({type(e).__name__}: {str(e)[:200]})", RuntimeWarning,
                          stacklevel=3)

    def _open_run(self, uri: str) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        name = getattr(self.cfg, "experiment", "medvlp") or "medvlp"
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            exp_id = exp.experiment_id
        else:  # artifacts of a SQLite store live beside the database, not in ./mlruns of whatever the CWD is
            loc = None
            if uri.startswith("sqlite:///"):
                loc = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / name).as_uri()
            exp_id = client.create_experiment(name, artifact_location=loc)
        run = None
        self._new_run = False
        if self.resume_run_id:
            try:
                run = client.get_run(self.resume_run_id)
                client.update_run(run.info.run_id, status="RUNNING")
                self.config_dict = None  # params are already there (and immutable in MLflow)
            except Exception:  # noqa: BLE001 - another store, or the run was deleted: start a new one
                run = None
        if run is None:
            tags = context_tags()
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            self.run_name = getattr(self.cfg, "run_name", "") or default_run_name(self.config_dict)
            run = client.create_run(exp_id, run_name=self.run_name, tags=tags)
            self._new_run = True
        self.uri, self.client, self.run_id = uri, client, run.info.run_id
        self.run_name = run.info.run_name or self.run_id
        log.info("MLflow run %s (%s) in %s (experiment %s)", self.run_name, self.run_id, uri, name)

    def _bound_http_retries(self) -> None:
        """MLflow retries a dead server 7 times with backoff and 120 s timeouts: minutes per call. Bound it
        (only where the user has not set these variables) so a dead server costs seconds, not the run."""
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(int(getattr(self.cfg, "http_retries", 1))))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(getattr(self.cfg, "http_timeout_s", 10))))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

    def end(self, status: str = "FINISHED") -> None:
        """Flush what is buffered and mark the run FINISHED / FAILED / KILLED (idempotent)."""
        if not self.active or self._ended or self.run_id is None:
            return
        self._ended = True
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001 - tracking must never stop training
                pass
            self._monitor = None
        self._flush(force=True)
        self._call(lambda: self.client.set_terminated(self.run_id, status=status), buffer=None)
        if self._pending:
            self._spill()
        if self._stage is not None and not self._pending:
            shutil.rmtree(self._stage, ignore_errors=True)

    # -- logging
    def log_params(self, params: dict) -> None:
        """Log a (possibly nested) dict as params: flattened, keys sanitised, values stringified (<= 6000 chars)."""
        if not self._ready():
            return
        from mlflow.entities import Param

        flat = flatten(params) if any(isinstance(v, dict) and v for v in params.values()) else params
        items = [Param(sanitize_key(k), _param_value(v)) for k, v in sorted(flat.items(), key=lambda kv: str(kv[0]))]
        for i in range(0, len(items), 100):  # MLflow: at most 100 params per batch
            self._batch([], items[i:i + 100], [])

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log numeric metrics at `step` (non-numeric values are skipped; NaN/inf are kept, MLflow stores them)."""
        if not self._ready():
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            try:
                val = float(v)
            except (TypeError, ValueError):
                continue
            items.append(Metric(sanitize_key(k), val, ts, int(step or 0)))
        for i in range(0, len(items), 1000):
            self._batch(items[i:i + 1000], [], [])

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self._ready():
            return
        from mlflow.entities import RunTag

        self._batch([], [], [RunTag(sanitize_key(k), _param_value(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a local file (or directory) into the run's artifacts."""
        if not self._ready():
            return
        item = (str(path), artifact_path)
        self._flush()
        if self._pending:  # still failing: queue behind the rest
            self._pending.append(("artifact", item))
            return
        self._call(lambda: self._send_artifact(*item), buffer=("artifact", item))

    def log_text(self, text: str, name: str) -> None:
        """Store `text` as the artifact file `name` (e.g. "eval/eval_table.md")."""
        if not self._ready():
            return
        local = self._staged(name)
        local.write_text(text)
        self.log_artifact(local, str(Path(name).parent) if Path(name).parent != Path(".") else None)

    # -- internals
    def _ready(self) -> bool:
        if not self.active or self._ended:
            return False
        if self.run_id is None:
            self.start()
        return self.run_id is not None

    def _staged(self, name: str) -> Path:
        if self._stage is None:
            self._stage = Path(tempfile.mkdtemp(prefix="medvlp-artifacts-"))
        local = self._stage / f"{len(list(self._stage.rglob('*')))}" / Path(name).name
        local.parent.mkdir(parents=True, exist_ok=True)
        return local

    def _send_artifact(self, path: str, artifact_path: str | None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, path, artifact_path)
        else:
            self.client.log_artifact(self.run_id, path, artifact_path)

    def _batch(self, metrics: list, params: list, tags: list) -> None:
        item = (metrics, params, tags)
        self._flush()
        if self._pending:  # still failing: keep order, do not hammer a dead server on every step
            self._pending.append(("batch", item))
            return
        self._call(lambda: self.client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags),
                   buffer=("batch", item))

    def _call(self, fn, buffer: tuple | None) -> bool:
        """Run one MLflow call; on a transport error warn (once), buffer the item and schedule a retry."""
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            code = getattr(e, "error_code", "")
            if code in _DATA_ERRORS:
                warnings.warn(f"MLflow rejected an item ({code}): {str(e)[:300]}; dropped", RuntimeWarning,
                              stacklevel=3)
                return True
            if not self._warned:
                self._warned = True
                warnings.warn(f"MLflow logging to {self.uri} failed ({type(e).__name__}: {error_line(e)}); buffering "
                              f"and retrying every {self._retry_s():g} s, training goes on", RuntimeWarning,
                              stacklevel=3)
            if buffer is not None:
                self._pending.append(buffer)
                limit = int(getattr(self.cfg, "max_buffered", 100_000))
                if len(self._pending) > limit:  # bounded memory: oldest go first
                    self._pending.pop(0)
                    self._dropped += 1
            self._next_retry = time.monotonic() + self._retry_s()
            return False

    def _retry_s(self) -> float:
        return float(getattr(self.cfg, "retry_every_s", 30.0))

    def _flush(self, force: bool = False) -> None:
        """Resend buffered items in order; stop at the first failure (the rest waits for the next retry)."""
        if not self._pending or (not force and time.monotonic() < self._next_retry):
            return
        while self._pending:
            kind, item = self._pending[0]
            if kind == "batch":
                ok = self._call(lambda: self.client.log_batch(self.run_id, metrics=item[0], params=item[1],
                                                              tags=item[2]), buffer=None)
            else:
                ok = self._call(lambda: self._send_artifact(*item), buffer=None)
            if not ok:
                return
            self._pending.pop(0)
        log.info("MLflow: buffered items sent to %s", self.uri)

    def _spill(self) -> None:
        """Write what could not be sent to JSON beside the local store, so nothing is lost silently."""
        fallback = absolute_uri(getattr(self.cfg, "fallback_uri", "") or DEFAULT_URI)
        base = Path(fallback[len("sqlite:///"):]).parent if fallback.startswith("sqlite:///") else Path.cwd()
        out = base / f"mlflow_unsent_{self.run_id}.json"
        doc = {"uri": self.uri, "run_id": self.run_id, "dropped_oldest": self._dropped, "items": []}
        for kind, item in self._pending:
            if kind == "batch":
                doc["items"].append({"metrics": [[m.key, _json_num(m.value), m.step, m.timestamp] for m in item[0]],
                                     "params": {p.key: p.value for p in item[1]},
                                     "tags": {t.key: t.value for t in item[2]}})
            else:
                doc["items"].append({"artifact": item[0], "artifact_path": item[1]})
        out.write_text(json.dumps(doc, indent=1))
        warnings.warn(f"MLflow: {len(self._pending)} items could not be sent to {self.uri}; written to {out}",
                      RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------- lineage
def _git_commit(where: Path) -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def context_tags() -> dict[str, str]:
    """MLflow's own run-context tags (mlflow.user, mlflow.source.name / type / git.commit, ...). When MLflow's git
    context finds no repository from the entry point (e.g. `python -c`), the commit of the code's checkout is used."""
    tags: dict[str, str] = {}
    try:
        from mlflow.tracking.context.registry import resolve_tags

        tags = {k: str(v) for k, v in resolve_tags().items()}
    except Exception:  # noqa: BLE001 - context providers probe the environment; none may stop a run
        pass
    if "mlflow.source.git.commit" not in tags:
        commit = _git_commit(Path(__file__).resolve().parent)
        if commit:
            tags["mlflow.source.git.commit"] = commit
    return tags


def shard_dataset(spec: str):
    """An MLflow `Dataset` describing a local shard set (its index.json): digest = index sha256 (first 32 hex),
    profile = counts, splits, label spec, build command. None when `spec` has no readable index.json."""
    import hashlib

    from mlflow.entities import Dataset

    d = Path(spec)
    index = d / "index.json" if d.is_dir() else (d if d.name.endswith(".json") else d.parent / "index.json")
    try:
        raw = index.read_bytes()
        doc = json.loads(raw)
    except (OSError, ValueError):
        return None
    sha = hashlib.sha256(raw).hexdigest()
    profile = {"index_sha256": sha, "num_samples": doc.get("num_samples"), "splits": doc.get("splits"),
               "num_shards": len(doc.get("shards") or []), "modality": doc.get("modality"),
               "label_names": doc.get("label_names"), "label_kind": (doc.get("labels") or {}).get("kind"),
               "build_command": doc.get("command")}
    schema = {"labels": doc.get("labels")} if doc.get("labels") else None
    name = str(doc.get("dataset") or ((doc.get("source") or {}).get("kind")) or index.parent.name)
    return Dataset(name=name, digest=sha[:32], source_type="local",
                   source=json.dumps({"uri": str(index.parent.resolve())}),
                   schema=json.dumps(schema) if schema else None, profile=json.dumps(profile, default=str))


def find_training_run(out_dir: str | os.PathLike, uri: str | None = None, experiment: str | None = None):
    """The latest MLflow run whose tag medvlp.out_dir is `out_dir` (`mlflow.search_runs` with a filter string),
    or None."""
    import mlflow

    uri = resolve_uri(uri or "")
    mlflow.set_tracking_uri(uri)
    path = str(Path(out_dir).resolve()).replace("'", "\\'")
    kw = {"experiment_names": [experiment]} if experiment else {"search_all_experiments": True}
    try:
        runs = mlflow.search_runs(filter_string=f"tags.`medvlp.out_dir` = '{path}'", max_results=1,
                                  order_by=["attributes.start_time DESC"], output_format="list", **kw)
    except Exception as e:  # noqa: BLE001 - an unreachable or empty store: there is no run to attach to
        log.warning("MLflow: cannot search %s for the training run of %s (%s)", uri, out_dir, e)
        return None
    return runs[0] if runs else None


def eval_run_name(parent, model_dir: str | os.PathLike, split: str = "") -> str:
    """`eval-<training run name>[-<split>]`: an evaluation is named after the run it evaluates (without a training
    run in the store: after the model folder, with a unique suffix)."""
    base = getattr(getattr(parent, "info", None), "run_name", "") or ""
    if not base:
        base = f"{Path(model_dir).resolve().name}-{run_suffix()}"
    return f"eval-{base}" + (f"-{split}" if split else "")


def log_eval_run(tracking_cfg, model_dir: str | os.PathLike, out_dir: str | os.PathLike, metrics: dict,
                 shards: str = "", tags: dict | None = None) -> str | None:
    """Log an evaluation of the training run in `model_dir` as its child run (same store and experiment):
    metrics, the files in `out_dir` as artifacts under "eval", the evaluated shard set as an "eval" dataset
    input. Without a training run in the store, a top-level run is logged (with a warning). Returns the run id."""
    if not getattr(tracking_cfg, "enabled", True):
        return None
    parent = find_training_run(model_dir, getattr(tracking_cfg, "uri", ""))
    import dataclasses

    cfg = tracking_cfg
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.replace(cfg, run_name=eval_run_name(parent, model_dir, (tags or {}).get("eval.split", "")),
                                  system_metrics=False)
    if parent is None:
        warnings.warn(f"MLflow: no training run tagged medvlp.out_dir={Path(model_dir).resolve()} in "
                      f"{resolve_uri(getattr(tracking_cfg, 'uri', ''))}; logging the evaluation as its own run",
                      RuntimeWarning, stacklevel=2)
    else:
        from mlflow import MlflowClient

        exp = MlflowClient(tracking_uri=resolve_uri(getattr(tracking_cfg, "uri", ""))).get_experiment(
            parent.info.experiment_id)
        if dataclasses.is_dataclass(cfg):
            cfg = dataclasses.replace(cfg, experiment=exp.name)
    all_tags = {"medvlp.eval_of": str(Path(model_dir).resolve()), **(tags or {})}
    tr = Tracker(cfg, 0, None, parent_run_id=parent.info.run_id if parent else None, tags=all_tags,
                 datasets={"eval": shards} if shards else {})
    with tr:
        tr.log_metrics(metrics)
        for p in sorted(Path(out_dir).glob("*")):
            if p.is_file():
                tr.log_artifact(str(p), "eval")
    return tr.run_id


def _json_num(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


# ----------------------------------------------------------------------------------------------- reading back
def read_runs(experiment: str, uri: str | None = None, histories: bool = True) -> list[dict]:
    """Runs of `experiment`, oldest first: {run_id, run_name (also as name), status, start_time, end_time, params, metrics (last
    values), tags, history {key: [(step, value), ...] sorted by step}}. Unknown experiment -> ValueError listing
    the known ones."""
    from mlflow import MlflowClient

    uri = resolve_uri(uri or "")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"experiment {experiment!r} not found in {uri}; known: {', '.join(known) or '(none)'}")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            break
    out = []
    for r in runs:
        hist = {}
        if histories:
            for key in sorted(r.data.metrics):
                ms = sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: (m.step, m.timestamp))
                hist[key] = [(int(m.step), float(m.value)) for m in ms]
        out.append({"run_id": r.info.run_id, "run_name": r.info.run_name, "name": r.info.run_name,
                    "status": r.info.status,
                    "start_time": r.info.start_time, "end_time": r.info.end_time, "params": dict(r.data.params),
                    "metrics": dict(r.data.metrics), "tags": {k: v for k, v in r.data.tags.items()
                                                             if not k.startswith("mlflow.")},
                    "history": hist})
    return out
