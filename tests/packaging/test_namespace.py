"""The project lives under one import name, `medvlp`, beside whatever owns the generic names.

Hugging Face's `kernels` distribution (a transformers dependency) is imported by transformers when a model is
built; a top-level `kernels` of ours would shadow it. These tests run in fresh interpreters so that nothing this
test session imported earlier can hide the problem.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GENERIC = ("kernels", "launch", "pretrain", "finetune", "data_shards")

pytestmark = pytest.mark.timeout(300)


def _py(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("cwd", [REPO, REPO / "tests", REPO / "benchmarks", REPO / "docs", REPO.parent], ids=lambda p: p.name)
def test_no_generic_top_level_name_comes_from_the_repository(cwd):
    code = f"""
    import importlib.util, json
    out = {{}}
    for name in {GENERIC!r}:
        spec = importlib.util.find_spec(name)
        out[name] = None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or [])))
    print(json.dumps(out))
    """
    proc = _py(code, cwd)
    assert proc.returncode == 0, proc.stderr
    import json

    found = json.loads(proc.stdout)
    for name, origin in found.items():
        assert origin is None or str(REPO) not in origin or "/site-packages/" in origin, (
            f"`import {name}` from {cwd} resolves to the repository: {origin}")


def test_import_kernels_from_the_repository_root_is_hugging_faces():
    if not _hf_kernels_installed():
        pytest.fail("Hugging Face's `kernels` distribution is not installed; the lock installs it with transformers")
    proc = _py("import kernels; print(kernels.__file__); from kernels import CUDAProperties", REPO)
    assert proc.returncode == 0, proc.stderr
    assert "site-packages" in proc.stdout and str(REPO / "medvlp") not in proc.stdout


def test_our_loss_and_transformers_models_in_one_process():
    """medvlp.kernels' loss runs, then transformers builds BERT and BioGPT (which import HF `kernels`)."""
    code = """
    import torch
    from medvlp.kernels.contrastive import clip_loss, clip_loss_reference
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    a, b = clip_loss(img, txt, scale), clip_loss_reference(img, txt, scale)
    assert torch.allclose(a, b, atol=1e-5), (a, b)
    from transformers import BertConfig, BertModel, BioGptConfig, BioGptForCausalLM
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    bio = BioGptForCausalLM(BioGptConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    ids = torch.tensor([[1, 2, 3]])
    print(bert(ids).last_hidden_state.shape[-1], bio(ids).logits.shape[-1])
    """
    proc = _py(code, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[:2] == ["16", "50"]


def test_importing_medvlp_and_pretrain_stays_light():
    proc = _py("""
    import sys, medvlp, medvlp.pretrain
    print(",".join(m for m in ("deepspeed", "mlflow", "accelerate", "transformers") if m in sys.modules) or "-")
    """, REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "-"
