"""The probe stage module beside these tests is imported by name (pytest runs with --import-mode=importlib)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def modality_shards(tmp_path_factory):
    """Tiny shard sets of three modalities, for the stages' shard checks: ROOT/cxr (32 px), ROOT/patho (16 px) and
    ROOT/ct (16³), 4 samples each."""
    from medvlp.data_shards.synth import synth_to_shards

    root = tmp_path_factory.mktemp("modality_shards")
    for modality, size in (("cxr", 32), ("patho", 16), ("ct", 16)):
        synth_to_shards(root / modality, modality=modality, n=4, seed=0, shard_size=4, size=size)
    return root
