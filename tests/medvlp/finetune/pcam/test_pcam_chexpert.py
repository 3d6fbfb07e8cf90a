"""A CheXpert-format import (fabricated label CSV + images) trains PCAM under each uncertain-label policy."""
import csv

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medvlp.data_shards.config import DataConfig
from medvlp.data_shards.importers import import_dataset
from medvlp.data_shards.importers.chexpert import FINDINGS
from medvlp.finetune.runner import StageContext
from medvlp.finetune.pcam.config import PcamConfig, PcamEvalConfig, PcamHeadConfig, PcamLossConfig
from medvlp.finetune.pcam.loss import apply_uncertain
from medvlp.finetune.runner import RunnerConfig
from medvlp.pretrain.config import TrackingConfig

EDEMA = ["1.0", "0.0", "-1.0", "", "-1.0", "0.0"]  # cycles over the rows; blank = not mentioned (-> 0)


@pytest.fixture(scope="module")
def chexpert_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chexpert")
    rng = np.random.default_rng(0)
    rows = []
    for p in range(24):
        rel = f"CheXpert-v1.0-small/train/patient{p:05d}/study1/view1_frontal.jpg"
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        img = (60 + 40 * rng.random((80, 72))).astype(np.uint8)
        if p % 3 == 0:
            img[40:70, 20:52] = 200  # "enlarged heart"
        Image.fromarray(img).save(tmp / rel, quality=95)
        labels = ["" for _ in FINDINGS]
        labels[FINDINGS.index("Cardiomegaly")] = "1.0" if p % 3 == 0 else ("-1.0" if p % 3 == 1 else "0.0")
        labels[FINDINGS.index("Edema")] = EDEMA[p % len(EDEMA)]
        rows.append([rel, "Female", "60", "Frontal", "PA", *labels])
    with open(tmp / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS])
        w.writerows(rows)
    doc = import_dataset("chexpert", tmp / "train.csv", tmp / "shards", workers=1, image_size=64, progress=False,
                         val_frac=0.0, test_frac=0.25)
    assert doc["label_names"] == ["Cardiomegaly", "Edema"]
    return tmp


def _cfg(root, policy, steps=2):
    return PcamConfig(
        data=DataConfig(train_shards=str(root / "shards"), modality="cxr", image_size=64, shuffle_buffer=0,
                        resampled=False),
        head=PcamHeadConfig(model="debug", pooling="pcam", backbone="frozen"),
        loss=PcamLossConfig(uncertain="zeros", uncertain_by_finding={"Edema": policy}),
        eval=PcamEvalConfig(boxes=False, overlays=0),
        finetune=RunnerConfig(out_dir=str(root / f"run-{policy}"), steps=steps, batch_size=6, lr=1e-3,
                              progress=False, log_every=1),
        tracking=TrackingConfig(enabled=False))


@pytest.mark.parametrize("policy", ["ignore", "zeros", "ones"])
def test_chexpert_import_trains_with_each_uncertain_policy(chexpert_shards, policy):
    from medvlp.finetune.pcam.stage import PcamStage
    from medvlp.finetune.runner import run_stage

    cfg = _cfg(chexpert_shards, policy)
    stage = PcamStage()
    result = run_stage(stage, cfg)
    assert result.steps_done == 2 and all(np.isfinite(v) for _, v in result.losses)
    assert stage.names == ["Cardiomegaly", "Edema"] and stage.policies == ["zeros", policy]
    assert set(result.metrics) >= {"auc/Cardiomegaly", "auc/Edema", "auc_mean"}
    saved = yaml.safe_load((chexpert_shards / f"run-{policy}" / "config.yaml").read_text())
    assert saved["kind"] == "pcam" and saved["loss"]["uncertain_by_finding"] == {"Edema": policy}
    # What the policy does to a real batch of the imported layout.
    batch = next(iter(stage.batches(cfg, "train", StageContext())))
    labels = stage.columns(batch)
    assert (labels[:, 1] == -1).any() and (labels[:, 0] == -1).any()
    target, counted = apply_uncertain(labels, stage.policies)
    unc = labels[:, 1] == -1
    expect = {"ignore": (0.0, False), "zeros": (0.0, True), "ones": (1.0, True)}[policy]
    assert (target[unc, 1] == expect[0]).all() and (counted[unc, 1] == expect[1]).all()
    assert (target[labels[:, 0] == -1, 0] == 0).all()  # Cardiomegaly keeps the default "zeros"
    loss, metrics = stage.loss(stage_model(stage, cfg), batch)
    assert torch.isfinite(loss) and set(metrics) == {"bce/Cardiomegaly", "bce/Edema"}


def stage_model(stage, cfg):
    return stage.build(None, cfg)


def test_unknown_finding_in_policies_is_named(chexpert_shards):
    from medvlp.finetune.pcam.stage import PcamStage

    cfg = _cfg(chexpert_shards, "ones")
    cfg.loss.uncertain_by_finding = {"Edemaa": "ones"}
    with pytest.raises(ValueError, match=r"loss.uncertain_by_finding: \['Edemaa'\]"):
        PcamStage().build(None, cfg)
    cfg = _cfg(chexpert_shards, "ones")
    cfg.head.findings = ["Pneumonia"]
    with pytest.raises(ValueError, match=r"head.findings: \['Pneumonia'\] are not labels"):
        PcamStage().build(None, cfg)


def test_pretrained_backbone_is_loaded_and_stays_frozen(chexpert_shards, tmp_path):
    """finetune.checkpoint -> load_pretrained: the tower starts from the pretrained weights; `backbone: frozen`
    keeps them; only the head trains."""
    import json

    from safetensors.torch import load_file

    from medvlp.finetune.pcam.stage import PcamStage
    from medvlp.finetune.runner import run_stage
    from tests.conftest import saved_pretrained_run

    run = tmp_path / "pretrained"
    clip = saved_pretrained_run(run, "debug-rn", "cxr", seed=3)
    cfg = _cfg(chexpert_shards, "ignore")
    cfg.finetune.checkpoint, cfg.finetune.out_dir = str(run), str(tmp_path / "ft")
    cfg.head.model, cfg.head.feature_level = "debug", -2  # head.model is ignored when a checkpoint is given
    result = run_stage(PcamStage(), cfg)
    sd = load_file(result.weights)
    for name, v in clip.visual.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(sd[f"visual.{name}"], v, msg=name)
    assert all(n.startswith("head.") for n in result.trainable)
    meta = json.loads((tmp_path / "ft" / "pcam_model.json").read_text())
    assert meta["model"] == clip.name and meta["spec"]["vision"]["type"] == "resnet"
