"""Malformed manifests through `medvlp shards build`: each is refused with every bad row named by its line (no
traceback, nothing written in fail mode), or the good rows build and every bad one is listed (skip mode)."""
import codecs

import numpy as np
import pytest
from PIL import Image

from tests.faults.conftest import cli_here as cli, one_line_error

HEADER = "image,report,patient_id,label:effusion\n"


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8), mode="L").save(tmp_path / f"i{i}.png")
    for name in ("broken.png", "broken2.png"):
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def _build(images, name, data: bytes, *extra):
    man = images / name
    man.write_bytes(data)
    return cli("shards", "build", "--manifest", man, "--out", images / "out", "--workers", 1, "--image-size", 16,
               "--maxcount", 2, *extra)


GOOD = [f"i{i}.png,report {i},p{i},{i % 2}\n" for i in range(6)]

CASES = {
    # an unclosed quote used to swallow the following rows into one sample (with another row's patient id)
    "unclosed quote": (HEADER + GOOD[0] + 'i1.png,"Heart normal,p1,0\n' + GOOD[2] + 'i3.png,"Effusion",p3,1\n'
                       + GOOD[4], ["line 3: CSV syntax (lines 3-5)", "unclosed quote"]),
    "quote swallows a whole row": (HEADER + 'i1.png,"Heart normal,p1,0\n' + GOOD[2] + 'i3.png,Effusion",p3,1\n',
                                   ["line 2: a quoted cell spans lines 2-4 and swallows line 3"]),
    "line break in an id column": (HEADER + GOOD[0] + 'i1.png,fine,"p\n1",0\n',
                                   ["line 3: column 'patient_id' spans lines 3-4"]),
    "short and long rows": (HEADER + GOOD[0] + "i1.png,r,p1\n" + "i2.png,r,p2,1,extra\n",
                            ["line 3: 3 cells but the header has 4", "line 4: 5 cells but the header has 4"]),
    "latin-1 bytes": ((HEADER + GOOD[0]).encode() + "i1.png,épanchement,p1,1\n".encode("latin-1")
                      + "i2.png,ok,p\xe9,1\n".encode("latin-1"),
                      ["line 3: column 'report': not valid UTF-8 (byte 0xe9)",
                       "line 4: column 'patient_id': not valid UTF-8 (byte 0xe9)"]),
    "UTF-16 without BOM": ((HEADER + GOOD[0]).encode("utf-16-le"), ["line 1: NUL bytes"]),
    "bad label and missing file": (HEADER + GOOD[0] + "i1.png,r,p1,2\n" + "nope.png,r,p2,1\n",
                                   ["line 3: column 'label:effusion'", "line 4: column 'image': file not found"]),
    "undecodable images": (HEADER + GOOD[0] + "broken.png,r,pb,1\n" + GOOD[1] + GOOD[5] + "broken2.png,r,pd,0\n",
                           ["line 3: column 'image': cannot decode broken.png",
                            "line 6: column 'image': cannot decode broken2.png"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_manifest_is_refused_naming_every_bad_line(images, case):
    text, wants = CASES[case]
    data = text if isinstance(text, bytes) else text.encode()
    proc = _build(images, "m.csv", data)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = one_line_error(proc)
    for want in wants:
        assert want in err, f"{case}: {want!r} not in\n{err}"
    assert not list((images / "out").glob("index*.json"))  # nothing half-built is presented as a data set


def test_skip_mode_builds_good_rows_and_lists_every_bad_one(images):
    text = (HEADER + GOOD[0] + 'i1.png,"Heart normal,p1,0\n' + GOOD[2] + 'i3.png,"Effusion",p3,1\n' + GOOD[4]
            + "broken.png,r,pb,1\n")
    proc = _build(images, "m.csv", text.encode("latin-1") + "i5.png,é,p5,1\n".encode("latin-1"),
                  "--on-error", "skip")
    assert proc.returncode == 0, proc.stderr
    listed = (images / "out" / "build_errors.txt").read_text()
    for want in ("line 3: CSV syntax", "line 7: column 'image': cannot decode broken.png",
                 "line 8: column 'report': not valid UTF-8"):
        assert want in listed, listed
    from medvlp.data_shards.writer import read_index
    assert read_index(images / "out")["num_samples"] == 2  # rows 2 and 6 (i0, i4)


def test_utf16_with_bom_and_utf8_bom_are_read(images):
    text = HEADER + "".join(GOOD[:3])
    for enc, data in (("utf-16", text.encode("utf-16")), ("utf-8-sig", codecs.BOM_UTF8 + text.encode())):
        proc = _build(images, f"m-{enc}.csv", data)
        assert proc.returncode == 0, (enc, proc.stderr)
        assert "3 samples" in proc.stdout


def test_jsonl_bad_lines_are_named(images):
    lines = ['{"image": "i0.png", "report": "r", "patient_id": "p0"}', "{not json",
             '["a list"]', '{"image": "i1.png", "report": "r\xe9", "patient_id": "p1"}']
    data = ("\n".join(lines[:3]) + "\n").encode() + (lines[3] + "\n").encode("latin-1")
    proc = _build(images, "m.jsonl", data)
    assert proc.returncode == 2
    err = one_line_error(proc)
    for want in ("m.jsonl line 2: not valid JSON", "m.jsonl line 3: expected a JSON object",
                 "m.jsonl line 4: column 'report': not valid UTF-8 (byte 0xe9)"):
        assert want in err, err
