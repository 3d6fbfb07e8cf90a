"""`medvlp eval few-shot` checks its shard sets as `medvlp finetune path-clip` does, before the checkpoint is loaded
or the output folder made: the task's shards (data.shards) and the forgetting set (protocol.source_shards) must be
2D images; a CT or slide set is one line naming the key and the modality. It used to fail later, on the first
sample ("no 2D image") or with an unrelated class message, after creating protocol.out_dir."""
import dataclasses

import pytest

from medvlp.data_shards.require import ShardRequirementError
from medvlp.finetune.path_clip.config import FewShotData, PathCLIPConfig, ProtocolConfig
from medvlp.finetune.path_clip.protocol import run_protocol
from medvlp.pretrain.config import TrackingConfig

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sets(modality_shards):
    return modality_shards


@pytest.mark.parametrize("key", ["data.shards", "protocol.source_shards"])
def test_eval_few_shot_refuses_ct_shards_before_anything(sets, tmp_path, key):
    out = tmp_path / "fs"
    task, source = (sets / "ct", "") if key == "data.shards" else (sets / "patho", str(sets / "ct"))
    cfg = PathCLIPConfig(data=FewShotData(shards=str(task)), tracking=TrackingConfig(enabled=False),
                         protocol=ProtocolConfig(source_shards=source, out_dir=str(out)))
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, checkpoint=str(tmp_path / "none")))
    with pytest.raises(ShardRequirementError) as e:
        run_protocol(cfg)
    what = "2D images of the labelled task" if key == "data.shards" else "2D images of the source domain"
    assert str(e.value) == (f"{key}: {sets / 'ct'} holds 'ct' samples (index.json modality); the path-clip stage "
                            f"needs 'patho' or 'cxr' shards ({what})")
    assert not out.exists()
