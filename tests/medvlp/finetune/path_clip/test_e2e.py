"""End to end: the debug model pretrained briefly on the synthetic H&E patches, adapted with 8 labels per class to
new patients' patches (another corpus seed) through `medvlp finetune path-clip`: it keeps the zero-shot accuracy
(already near 1 in-domain) and beats chance.
(The lab2 target domain is the protocol's testbed: its tumour evidence is local and a 60-step debug tower does
not see it; docs/path_clip.md.)"""
import json

import numpy as np
import pytest

from medvlp.data_shards.synth import synth_to_shards
from medvlp.launch.cli import main


@pytest.fixture(scope="module")
def patho_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pathclip")
    synth_to_shards(root / "he", modality="patho", n=192, seed=0, shard_size=64)
    synth_to_shards(root / "task", modality="patho", n=320, seed=1, shard_size=64)
    rc = main(["pretrain", "debug", "--set", f"data.train_shards={root / 'he'}", "--set", "data.modality=patho",
               "--set", f"train.out_dir={root / 'run'}", "--set", "train.steps=60", "--set", "train.ckpt_every=0",
               "--set", "train.final_eval=false", "--set", "tracking.enabled=false", "--set", "train.log_every=30"])
    assert rc == 0
    return root


def test_few_shot_keeps_zero_shot_and_beats_chance(patho_run, capsys):
    from medvlp.finetune.path_clip.protocol import zero_shot_logits
    from medvlp.finetune.path_clip.metrics import classification_metrics
    from medvlp.finetune.path_clip.stage import TaskContext
    from medvlp.launch.cli import load_stage_config
    from medvlp.pretrain import load_pretrained

    root = patho_run
    sets = [f"finetune.checkpoint={root / 'run'}", "finetune.shots=8", f"data.shards={root / 'task'}",
            f"finetune.out_dir={root / 'ft'}", "finetune.steps=80", "finetune.progress=false",
            "tracking.enabled=false"]
    rc = main(["finetune", "path-clip", "path-clip-patho"] + [a for s in sets for a in ("--set", s)])
    assert rc == 0
    res = json.loads((root / "ft" / "result.json").read_text())
    acc = res["metrics"]["acc"]
    cfg, _ = load_stage_config("path-clip", "path-clip-patho", sets)
    ctx = TaskContext(load_pretrained(str(root / "run")), cfg)
    zs = classification_metrics(ctx.eval_split.y_N, zero_shot_logits(ctx))["acc"]
    chance = np.bincount(ctx.eval_split.y_N).max() / len(ctx.eval_split)
    print(f"8-shot Path-CLIP acc {acc:.3f}, zero-shot {zs:.3f}, majority class {chance:.3f}")
    assert acc >= zs - 0.02 and acc > chance + 0.1
    assert res["n_trainable"] == 64 * 32 + 32 * 16 + 16 * 32 + 32 * 64 + 1  # RFR + theta, nothing else
