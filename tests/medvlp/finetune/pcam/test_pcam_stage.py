"""The PCAM stage end to end on the runner (debug ViT, CPU): heatmap registration, overlays in MLflow, localize."""
import json

import numpy as np
import pytest

from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.schema import Sample
from medvlp.data_shards.writer import write_index, write_shards
from medvlp.finetune.pcam.config import PcamConfig, PcamEvalConfig, PcamHeadConfig
from medvlp.finetune.runner import RunnerConfig
from medvlp.pretrain.config import TrackingConfig

S, R = 64, 6  # image side, lesion radius


def lesion_image(rng, cx=None, cy=None):
    """Dark noisy 64x64 field; with a centre, a bright disc of radius R there. -> (uint8 image, box or None)."""
    img = 60 + 12 * rng.standard_normal((S, S))
    box = None
    if cx is not None:
        yy, xx = np.mgrid[0:S, 0:S] + 0.5
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) <= R ** 2
        img[disc] += 110
        box = [int(np.floor(cx - R)), int(np.floor(cy - R)), int(np.ceil(cx + R)), int(np.ceil(cy + R))]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), box


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory):
    from medvlp.finetune.pcam.stage import PcamStage
    from medvlp.finetune.runner import run_stage

    root = tmp_path_factory.mktemp("pcam")
    shards = root / "shards"
    rng = np.random.default_rng(0)
    samples = []
    for i in range(160):
        pos = i % 2 == 0
        c = rng.uniform(R + 2, S - R - 2, size=2) if pos else (None, None)
        img, box = lesion_image(rng, *c)
        samples.append(Sample(key=f"lesion/{i:04d}", text="lesion" if pos else "clear", image=img,
                              labels={"lesion": int(pos)},
                              extra={"boxes": [{"finding": "lesion", "box": box}] if pos else []},
                              meta={"dataset": "lesion", "modality": "cxr", "split": "test" if i >= 120 else "train",
                                    "patient_id": f"p{i}"}))
    infos = write_shards(iter(samples), shards, prefix="lesion", maxcount=64)
    write_index(shards, infos, "cxr", ["lesion"], command="test")
    uri = f"sqlite:///{root}/mlruns.db"
    cfg = PcamConfig(
        data=DataConfig(train_shards=str(shards), modality="cxr", image_size=S, shuffle_buffer=64, augment=False),
        head=PcamHeadConfig(model="debug-rn", pooling="pcam", feature_level=-3),
        eval=PcamEvalConfig(overlays=3, threshold=0.5),
        finetune=RunnerConfig(out_dir=str(root / "run"), steps=40, batch_size=16, lr=2e-3, warmup_steps=4,
                              log_every=10, progress=False, seed=0),
        tracking=TrackingConfig(uri=uri, experiment="pcam-test"))
    result = run_stage(PcamStage(), cfg)
    return root, result, uri


def test_heatmap_registration_after_short_training(lesion_run):
    """A bright lesion at a random place: after 40 steps the heatmap's peak falls on it and its box overlaps it."""
    root, result, _ = lesion_run
    m = result.metrics
    assert m["n_loc/lesion"] == 20
    assert m["auc/lesion"] > 0.95, m
    assert m["pointing/lesion"] >= 0.85, m
    assert m["acc@0.1/lesion"] >= 0.7, m
    meta = json.loads((root / "run" / "pcam_model.json").read_text())
    assert meta["findings"] == ["lesion"] and meta["spec"]["vision"]["type"] == "resnet"


def test_overlays_reach_mlflow(lesion_run):
    from mlflow import MlflowClient

    root, result, uri = lesion_run
    files = sorted((root / "run" / "overlays").rglob("*.png"))
    assert len(files) == 3
    client = MlflowClient(tracking_uri=uri)
    folders = [a.path for a in client.list_artifacts(result.run_id, "overlays")]
    assert folders, "no overlays artifact folder"
    pngs = [a.path for a in client.list_artifacts(result.run_id, folders[-1])]
    assert len(pngs) == 3 and all(p.endswith(".png") for p in pngs)


def test_localize_finds_a_lesion_at_a_known_place(lesion_run, tmp_path):
    from PIL import Image

    from medvlp.finetune.pcam.localize import LocalizeError, localize
    from medvlp.finetune.pcam.metrics import box_iou

    root, _, _ = lesion_run
    img, box = lesion_image(np.random.default_rng(7), cx=18.0, cy=44.0)
    big = np.asarray(Image.fromarray(img).resize((128, 128), Image.BILINEAR))  # localize maps back to 128 px
    Image.fromarray(big).save(tmp_path / "case.png")
    docs = localize(root / "run", [tmp_path / "case.png"], tmp_path / "out", threshold=0.5)
    f = docs[0]["findings"]["lesion"]
    assert docs[0]["size"] == [128, 128] and f["probability"] > 0.5
    pred = f["boxes"][0]["box"]
    assert box_iou(pred, [2 * v for v in box]) > 0.2, (pred, box)
    assert (tmp_path / "out" / "case_lesion.png").is_file()
    assert json.loads((tmp_path / "out" / "case.json").read_text())["findings"]["lesion"]["boxes"][0]["box"] == pred
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(LocalizeError, match="no pcam_model.json"):
        localize(tmp_path, [tmp_path / "case.png"], tmp_path / "x")
    with pytest.raises(LocalizeError, match="cannot read the image"):
        localize(root / "run", [tmp_path / "missing.png"], tmp_path / "y")


def _tiny(root, uri):
    return ["--set", f"data.train_shards={root / 'shards'}", "--set", "finetune.steps=2", "--set",
            "finetune.batch_size=8", "--set", "data.shuffle_buffer=16", "--set", "eval.overlays=1", "--set",
            f"tracking.uri={uri}", "--set", "finetune.progress=false"]


def test_cli_finetune_localize_and_table(lesion_run, tmp_path, capsys):
    """`medvlp finetune pcam RECIPE`, `medvlp localize` and `medvlp pcam-table` through the real CLI."""
    from PIL import Image

    from medvlp.launch.cli import main

    root, _, uri = lesion_run
    run = tmp_path / "ft"
    assert main(["finetune", "pcam", "pcam-synth", *_tiny(root, uri), "--set", f"finetune.out_dir={run}"]) == 0
    assert (run / "model.safetensors").is_file() and (run / "pcam_model.json").is_file()
    img, _ = lesion_image(np.random.default_rng(1), cx=40.0, cy=20.0)
    Image.fromarray(img).save(tmp_path / "a.png")
    assert main(["localize", "--checkpoint", str(run), str(tmp_path / "a.png"), "--out", str(tmp_path / "loc")]) == 0
    assert "a.png: lesion p=" in capsys.readouterr().out
    assert json.loads((tmp_path / "loc" / "boxes.json").read_text())[0]["findings"]["lesion"]["overlay"] == \
        "a_lesion.png"
    assert main(["localize", "--checkpoint", str(tmp_path), str(tmp_path / "a.png"), "--out", str(tmp_path / "x")]) == 2
    assert "no model.safetensors" in capsys.readouterr().err
    out = tmp_path / "table"
    assert main(["pcam-table", "pcam-synth", "--out", str(out), "--poolings", "avg,max,lse,pcam",
                 *_tiny(root, uri)]) == 0
    doc = json.loads((out / "poolings.json").read_text())
    assert list(doc["runs"]) == ["avg", "max", "lse", "pcam"] and doc["findings"] == ["lesion"]
    assert {r["comparison"] for r in doc["paired"]} == {"max - avg", "lse - avg", "pcam - avg"}
    md = (out / "poolings.md").read_text()
    assert "| avg |" in md and "| pcam |" in md and "command: `medvlp pcam-table" in md and "lse pooling r = 10" in md
    # tables only: nothing trained, the asked runs that do not exist are named
    assert main(["pcam-table", "pcam-synth", "--out", str(out), "--poolings", "avg,pcam", "--seeds", "0,7",
                 "--tables-only", *_tiny(root, uri)]) == 0
    doc = json.loads((out / "poolings.json").read_text())
    assert doc["missing"] == ["avg-s7", "pcam-s7"] and not (out / "avg-s7").exists()
    assert main(["pcam-table", "pcam-synth", "--out", str(tmp_path / "none"), "--poolings", "avg", "--tables-only",
                 *_tiny(root, uri)]) == 2
    assert "no finished run of the reference pooling 'avg'" in capsys.readouterr().err
    assert main(["pcam-table", "pcam-synth", "--out", str(out), "--poolings", "mean"]) == 2
    assert "--poolings: ['mean']" in capsys.readouterr().err


def test_pcam_recipes_load_and_round_trip():
    from medvlp.launch.cli import load_stage_config
    from medvlp.launch.config import build, list_recipes, load_recipe_dict, to_dict

    names = [n for n in list_recipes() if load_recipe_dict(n).get("kind") == "pcam"]
    assert "pcam-synth" in names
    for name in names:
        cfg, factory = load_stage_config("pcam", name, [])
        assert isinstance(cfg, PcamConfig) and cfg.head.pooling in ("avg", "max", "lse", "pcam")
        assert to_dict(build(PcamConfig, to_dict(cfg))) == to_dict(cfg)
    from medvlp.launch.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="head.pooling: 'mean' is not one of"):
        load_stage_config("pcam", "pcam-synth", ["head.pooling=mean"])
    assert isinstance(load_config("pcam-synth"), PcamConfig)  # kind: pcam selects the root (config show, docs)
