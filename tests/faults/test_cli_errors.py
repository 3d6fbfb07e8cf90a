"""The CLI's one error boundary (medvlp.launch.errors): errors in what the user gave (bad values, missing or
unreadable files, refused paths, HTTP errors) are one `error:` line and exit 2; a bug keeps its traceback;
`medvlp -v` shows the traceback of a user error too."""
import argparse
import gzip
import io
import contextlib

import pytest

from tests.conftest import saved_pretrained_run
from tests.faults.conftest import cli_here as cli, one_line_error

pytestmark = pytest.mark.timeout(120)


def _boundary(exc, verbose=False):
    from medvlp.launch.errors import run_command

    def fn(_):
        raise exc

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = run_command(fn, argparse.Namespace(), verbose=verbose)
    return rc, err.getvalue()


@pytest.mark.parametrize("exc, want", [
    (ValueError("manifest.csv line 3: column 'x': bad"), "error: manifest.csv line 3: column 'x': bad"),
    (FileNotFoundError(2, "No such file or directory", "/data/missing.csv"),
     "error: /data/missing.csv: No such file or directory"),
    (IsADirectoryError(21, "Is a directory", "/tmp"), "error: /tmp: Is a directory"),
    (PermissionError(13, "Permission denied", "/ro/mlruns.db"), "error: /ro/mlruns.db: Permission denied"),
    (OSError("http://h/index.json: HTTP 404 Not Found"), "error: http://h/index.json: HTTP 404 Not Found"),
    (UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte"), "error: 'utf-8' codec"),
])
def test_user_errors_are_one_line_exit_2(exc, want):
    rc, err = _boundary(exc)
    assert rc == 2 and err.startswith(want) and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_config_error_and_user_facing_errors():
    from medvlp.data_shards.paths import PathError
    from medvlp.pretrain.configtree import ConfigError

    rc, err = _boundary(ConfigError("optim.lr: must be > 0, got -1"))
    assert rc == 2 and err == "config error: optim.lr: must be > 0, got -1\n"

    class Refused(RuntimeError):
        user_facing = True

    assert _boundary(Refused("x refused"))[0] == 2
    assert _boundary(PathError("index.json: shard name '../x' is not a plain file name"))[0] == 2


def test_bugs_keep_their_traceback_and_verbose_shows_user_errors():
    with pytest.raises(KeyError):
        _boundary(KeyError("image"))
    with pytest.raises(TypeError):
        _boundary(TypeError("unsupported operand"))
    with pytest.raises(ValueError):
        _boundary(ValueError("bad"), verbose=True)


def test_importer_missing_columns_are_one_line(tmp_path):
    (tmp_path / "ct_reports.csv").write_text("Name,Findings_EN\nx,y\n")
    proc = cli("shards", "import", "ct_reports", tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 2 and "missing column" in one_line_error(proc)
    (tmp_path / "mimic" / "files").mkdir(parents=True)
    (tmp_path / "mimic" / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(b"study_id,split\n1,train\n"))
    proc = cli("shards", "import", "mimic_cxr", tmp_path / "mimic", "--out", tmp_path / "out2")
    assert proc.returncode == 2 and "missing column(s) ['dicom_id']" in one_line_error(proc)


def test_missing_manifest_and_http_404_index_are_one_line(tmp_path):
    proc = cli("shards", "build", "--manifest", tmp_path / "nope.csv", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "nope.csv: manifest not found" in one_line_error(proc)
    proc = cli("shards", "inspect", tmp_path)
    assert proc.returncode == 2 and "no index.json" in one_line_error(proc)


def test_export_out_naming_an_existing_file_is_one_line(tmp_path):
    run = tmp_path / "run"
    saved_pretrained_run(run, "debug", "cxr")
    (tmp_path / "taken").write_text("x")
    proc = cli("export", "--model-dir", run, "--to", "open_clip", "--out", tmp_path / "taken")
    assert proc.returncode == 2 and "taken" in one_line_error(proc)
