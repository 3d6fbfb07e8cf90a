"""From a hospital's files to shards: DICOM radiographs, a DICOM CT series and NIfTI volumes with masks build into
shards with hand-computed pixels, their spacing in meta and no PHI; the set streams over HTTP."""
from __future__ import annotations

import functools
import http.server
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from medvlp.data_shards.build import build_shards
from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.inspect import iter_samples
from medvlp.data_shards.manifest import ManifestError
from medvlp.data_shards.readers import ReadOptions
from medvlp.data_shards.readers.fabricate import PHI, write_ct_series, write_nifti, write_radiograph
from medvlp.data_shards.stream import make_loader
from tests.conftest import write_csv

PX = np.array([[0, 10, 20], [30, 40, 4095]])
HU = (np.arange(3 * 2 * 4).reshape(3, 2, 4) * 25 - 200).astype(np.int16)  # (slice, row, col)
UIDS = ["1.2.826.0.1.3680043.10.543.101", "1.2.826.0.1.3680043.10.543.102", "1.2.826.0.1.3680043.10.543.103"]


def hospital(d: Path) -> tuple[Path, Path]:
    """A radiograph manifest (MONOCHROME1 and 2, rescaled) and a CT manifest (a DICOM series, NIfTI + masks).
    File and folder names are UIDs, patient ids are MRNs: what hospital exports look like."""
    d.mkdir(parents=True, exist_ok=True)
    write_radiograph(d / f"{UIDS[0]}.dcm", PX, photometric="MONOCHROME2", slope=2.0, intercept=5.0,
                     spacing=(0.14, 0.16), uid_root=UIDS[0])
    write_radiograph(d / f"{UIDS[1]}.dcm", PX, photometric="MONOCHROME1", slope=1.0, intercept=0.0,
                     uid_root=UIDS[1])
    cxr = write_csv(d / "cxr.csv", [
        {"image": f"{UIDS[0]}.dcm", "report": "No acute findings.", "patient_id": "MRN-8675309", "split": "train"},
        {"image": f"{UIDS[1]}.dcm", "report": "Small left effusion.", "patient_id": "MRN-1234567", "split": "train"}])
    write_ct_series(d / UIDS[2], HU, spacing=(3.0, 0.5, 0.6), intercept=-1024.0, uid_root=UIDS[2])
    aff = np.diag([-0.8, -0.8, 2.0, 1.0])  # LPS NIfTI, spacing (0.8, 0.8, 2)
    data = (np.arange(4 * 3 * 2).reshape(4, 3, 2) * 5 - 50).astype(np.int16)
    lab = (np.arange(4 * 3 * 2).reshape(4, 3, 2) % 3).astype(np.uint8)
    write_nifti(d / "nifti" / "vol_a.nii.gz", data, aff)
    write_nifti(d / "nifti" / "vol_a_seg.nii.gz", lab, aff)
    write_nifti(d / "nifti" / "vol_b.nii.gz", data[:, :, ::-1].copy(), aff)
    write_nifti(d / "nifti" / "b_seg" / "segmentations" / "liver.nii.gz", (lab == 1).astype(np.uint8), aff)
    write_nifti(d / "nifti" / "b_seg" / "segmentations" / "spleen.nii.gz", (lab == 2).astype(np.uint8), aff)
    ct = write_csv(d / "ct.csv", [
        {"volume": UIDS[2], "report": "Normal chest CT.", "patient_id": "MRN-8675309", "split": "train"},
        {"volume": "nifti/vol_a.nii.gz", "mask": "nifti/vol_a_seg.nii.gz", "report": "Liver lesion.",
         "patient_id": "MRN-555", "split": "train"},
        {"volume": "nifti/vol_b.nii.gz", "mask": "nifti/b_seg", "report": "Splenomegaly.", "patient_id": "MRN-556",
         "split": "train"}])
    return cxr, ct


def samples(out: Path) -> list:
    return sorted(iter_samples(out, "index.json"), key=lambda s: s.meta["source"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("hospital")
    cxr, ct = hospital(d / "files")
    build_shards(cxr, d / "cxr_shards", workers=1, progress=False)
    build_shards(ct, d / "ct_shards", workers=1, maxcount=2, progress=False)
    return d


def test_radiographs_match_hand_computed_pixels(built):
    s2, s1 = samples(built / "cxr_shards")  # sources sort as UIDS[0] (MONOCHROME2), UIDS[1] (MONOCHROME1)
    assert s2.meta["source"].startswith(UIDS[0]) and s2.image.dtype == np.uint16
    np.testing.assert_array_equal(s2.image, PX * 2 + 5)
    np.testing.assert_array_equal(s1.image, 4095 - PX)
    assert s2.meta["spacing"] == [0.14, 0.16] and s1.meta["spacing"] == [0.2, 0.2]
    assert s1.meta["dicom"]["PhotometricInterpretation"] == "MONOCHROME1"


def test_ct_series_and_nifti_volumes_with_masks(built):
    index = json.loads((built / "ct_shards" / "index.json").read_text())
    assert index["organ_names"] == ["liver", "spleen"]
    series, a, b = samples(built / "ct_shards")
    np.testing.assert_array_equal(series.volume, HU[:, ::-1, ::-1])
    assert series.meta["spacing"] == [3.0, 0.5, 0.6] and series.mask is None
    data = (np.arange(4 * 3 * 2).reshape(4, 3, 2) * 5 - 50).astype(np.int16)
    lab = (np.arange(4 * 3 * 2).reshape(4, 3, 2) % 3).astype(np.uint8)
    np.testing.assert_array_equal(a.volume, data[::-1, ::-1, :].transpose(2, 1, 0))
    np.testing.assert_array_equal(a.mask, lab[::-1, ::-1, :].transpose(2, 1, 0))
    assert a.meta["spacing"] == [2.0, 0.8, 0.8] and a.meta["orientation"] == "RAS"
    np.testing.assert_array_equal(b.volume, a.volume[::-1])  # its z axis was written reversed
    np.testing.assert_array_equal(b.mask, a.mask)  # merged organ folder: 1 = liver, 2 = spleen, as in lab
    assert b.meta["organs_present"] == ["liver", "spleen"]


def test_resampled_build(tmp_path):
    _, ct = hospital(tmp_path / "files")
    build_shards(ct, tmp_path / "out", workers=1, progress=False, read=ReadOptions(spacing=(1.0, 0.8, 0.8)))
    _, a, _ = samples(tmp_path / "out")
    assert a.volume.shape == (4, 3, 4) and a.meta["spacing"] == [1.0, 0.8, 0.8]
    assert set(np.unique(a.mask)) <= {0, 1, 2}


def test_bad_rows_are_named(tmp_path):
    from pydicom.uid import JPEG2000Lossless

    write_radiograph(tmp_path / "ok.dcm", PX)
    write_radiograph(tmp_path / "j2k.dcm", PX, syntax=JPEG2000Lossless)
    write_nifti(tmp_path / "v.nii.gz", np.zeros((3, 3, 3), np.int16))
    write_nifti(tmp_path / "m.nii.gz", np.zeros((3, 3, 2), np.uint8))
    cxr = write_csv(tmp_path / "cxr.csv", [{"image": "ok.dcm", "report": "a"}, {"image": "j2k.dcm", "report": "b"}])
    with pytest.raises(ManifestError, match=r"cxr.csv line 3: column 'image': cannot decode j2k.dcm: .*JPEG 2000"):
        build_shards(cxr, tmp_path / "o1", workers=1, progress=False)
    ct = write_csv(tmp_path / "ct.csv", [{"volume": "v.nii.gz", "mask": "m.nii.gz", "report": "a"}])
    with pytest.raises(ManifestError, match=r"ct.csv line 2: column 'mask': .*grid differs"):
        build_shards(ct, tmp_path / "o2", workers=1, progress=False)


def test_no_phi_in_shards_index_or_logs(tmp_path, capsys, caplog):
    from medvlp.launch.cli import main

    cxr, ct = hospital(tmp_path / "files")
    salt = tmp_path / "site.salt"
    salt.write_text("0123456789abcdef-not-a-real-secret")
    caplog.set_level(logging.DEBUG)
    for name, manifest in (("cxr", cxr), ("ct", ct)):
        rc = main(["shards", "build", "--manifest", str(manifest), "--out", str(tmp_path / name), "--workers", "1",
                   "--hash-ids", "--salt-file", str(salt)])
        assert rc == 0
    out = capsys.readouterr()
    blobs = {"stdout": out.out.encode(), "stderr": out.err.encode(), "logs": caplog.text.encode()}
    for name in ("cxr", "ct"):
        for p in (tmp_path / name).rglob("*"):
            if p.is_file():
                blobs[str(p.relative_to(tmp_path))] = p.read_bytes()
    assert any(k.endswith(".tar") for k in blobs) and any(k.endswith("index.json") for k in blobs)
    # whole values (a 4-byte fragment such as '1947' turns up by chance in compressed pixel data)
    secrets = [*PHI.values(), "Doe^Jane", "MRN-", "8675309", *UIDS, "1.2.826.0.1.3680043.10.543"]
    for where, blob in blobs.items():
        for secret in secrets:
            assert secret.encode() not in blob, f"{secret!r} found in {where}"
    got = list(iter_samples(tmp_path / "ct", "index.json"))
    assert len(got) == 3 and all("source" not in s.meta for s in got)
    assert all(len(s.patient_id) == 16 for s in got)  # salted hashes


def test_hash_ids_needs_a_salt(tmp_path, capsys):
    from medvlp.launch.cli import main

    cxr, _ = hospital(tmp_path / "files")
    with pytest.raises(SystemExit, match="--salt-file"):
        main(["shards", "build", "--manifest", str(cxr), "--out", str(tmp_path / "x"), "--hash-ids"])
    (tmp_path / "short.salt").write_text("abc")
    assert main(["shards", "build", "--manifest", str(cxr), "--out", str(tmp_path / "x"), "--hash-ids",
                 "--salt-file", str(tmp_path / "short.salt")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "at least 16" in err and "Traceback" not in err


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture()
def served(built):
    handler = functools.partial(_Quiet, directory=str(built))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _batches(cfg: DataConfig, **kw) -> list[dict]:
    return list(make_loader(cfg, train=False, **kw))


def test_shard_set_streams_over_http(built, served):
    cfg = DataConfig(modality="ct", batch_size=3, split="train", volume_size=[2, 2, 2], workers=0)
    local = _batches(cfg, shards=str(built / "ct_shards"))
    names = [sh["name"] for sh in json.loads((built / "ct_shards" / "index.json").read_text())["shards"]]
    assert len(names) == 2
    for spec, extra in ((f"{served}/ct_shards/", {}),  # a folder URL: index.json fetched from it
                        (f"{served}/ct_shards/shard-{{000000..000001}}.tar", {"verify": True}),  # index beside
                        (f"pipe:cat {built}/ct_shards/shard-{{000000..000001}}.tar",
                         {"index": f"pipe:cat {built}/ct_shards/index.json"})):
        got = _batches(DataConfig(**{**cfg.__dict__, **extra}), shards=spec)
        assert [b["key"] for b in got] == [b["key"] for b in local], spec
        for g, w in zip(got, local):
            torch.testing.assert_close(g["volume"], w["volume"])
            torch.testing.assert_close(g["mask"], w["mask"])


def test_http_errors_are_named(served):
    cfg = DataConfig(modality="ct", batch_size=1, split="train")
    with pytest.raises(OSError, match="HTTP 404"):
        make_loader(cfg, train=False, shards=f"{served}/nowhere/")
    with pytest.raises(ValueError, match="allow_pipe"):
        make_loader(DataConfig(modality="ct", allow_pipe=False, index="pipe:cat index.json"), train=False,
                    shards=f"{served}/ct_shards/shard-000000.tar")
