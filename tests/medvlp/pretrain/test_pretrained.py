"""load_pretrained / export: ZeRO checkpoints consolidate to the trained weights, open_clip and HF exports reproduce
our embeddings, nothing unpickles a crafted file."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[3]


def _clean_env():
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": ""}


def _saved_model(tmp_path, name, modality="cxr", tokenizer="", seed=0):
    """A freshly initialised model written as model.safetensors with config.json beside it (a finished run's layout)."""
    from medvlp.pretrain.checkpoint import model_metadata, save_state_dict
    from medvlp.pretrain.config import ModelConfig
    from medvlp.pretrain.model import build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=name, tokenizer=tokenizer)).eval()
    with torch.no_grad():  # a non-default scale, so a dropped or mis-shaped logit_scale shows
        model.logit_scale.fill_(3.1)
    run = tmp_path / f"run-{name}"
    run.mkdir()
    save_state_dict(model.state_dict(), run / "model.safetensors", model_metadata(model))
    (run / "config.json").write_text(json.dumps({"model.name": name, "model.tokenizer": tokenizer,
                                                 "data.modality": modality}))
    return model, run


def _images(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, model.image_size, model.image_size, generator=g)


TEXTS = ["No effusion.", "Small left pleural effusion.", "Cardiomegaly with a nodule in the right upper lobe."]


# ----------------------------------------------------------------------------------------------- ZeRO checkpoints
@pytest.mark.dist
@pytest.mark.parametrize("stage", [0, 3])
def test_zero_checkpoint_consolidates_to_trained_weights(cxr_shards, tmp_path, stage):
    """2 gloo ranks train under ZeRO-`stage`; the checkpoint consolidated by DeepSpeed's own utility equals the
    weights gathered from the trained module (model.safetensors), tensor for tensor and embedding for embedding."""
    from medvlp.pretrain import load_pretrained

    sets = tiny_overrides(cxr_shards, tmp_path, steps=2, **{
        "train.zero_stage": stage, "train.ckpt_every": 0, "tracking.enabled": "false", "train.final_eval": "false"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medvlp.launch.cli", "pretrain", "debug"] + [x for s in sets for x in ("--set", s)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_clean_env(), timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "model.pt").exists()
    tag = tmp_path / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in tag.glob("rng_rank*")) == ["rng_rank0.json", "rng_rank1.json"]
    final = load_pretrained(tmp_path)
    ckpt = load_pretrained(tmp_path, step=2)
    assert final.source.endswith("model.safetensors") and ckpt.step == 2 and ckpt.source == str(tag)
    sa, sb = final.model.state_dict(), ckpt.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = _images(final.model)
    tok = final.tokenizer(TEXTS)
    with torch.no_grad():
        assert torch.equal(final.model.encode_image(x), ckpt.model.encode_image(x))
        assert torch.equal(final.model.encode_text(tok), ckpt.model.encode_text(tok))
    # the trained weights moved away from the seed's initialisation (the comparison is not init vs init)
    from medvlp.pretrain.config import ModelConfig
    from medvlp.pretrain.model import build_model
    torch.manual_seed(0)
    init = build_model(ModelConfig(name="debug")).state_dict()
    assert any(not torch.equal(init[k], sb[k]) for k in sb if k != "logit_scale")
    # without the final weights the run folder resolves to the latest COMPLETE checkpoint
    (tmp_path / "model.safetensors").unlink()
    again = load_pretrained(tmp_path)
    assert again.source == str(tag) and torch.equal(again.model.visual.net.conv1.weight,
                                                     ckpt.model.visual.net.conv1.weight)


# ----------------------------------------------------------------------------------------------- open_clip
@pytest.mark.parametrize("name", ["debug", "debug-rn"])
def test_open_clip_export_reproduces_embeddings(tmp_path, name):
    import open_clip

    from medvlp.pretrain import load_pretrained
    from medvlp.pretrain.export import export

    model, run = _saved_model(tmp_path, name, modality="patho")
    out = export(run, "open_clip", tmp_path / "oc")
    doc = json.loads((out / "open_clip_config.json").read_text())
    assert doc["preprocess_cfg"]["mean"] == [0.485, 0.456, 0.406] and doc["preprocess_cfg"]["size"] == 64
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    x, tok = _images(model), model.tokenizer(TEXTS)
    with torch.no_grad():
        d_img = (oc.encode_image(x, normalize=True) - model.encode_image(x)).abs().max().item()
        d_txt = (oc.encode_text(tok, normalize=True) - model.encode_text(tok)).abs().max().item()
        assert float(oc.logit_scale) == pytest.approx(3.1)
    assert d_img <= 1e-5 and d_txt <= 1e-5, (d_img, d_txt)
    back = load_pretrained(out)  # the export reads back into our model
    with torch.no_grad():
        assert torch.equal(back.model.encode_image(x), model.encode_image(x))
    assert back.modality == "patho"


def test_export_refuses_what_a_format_cannot_express(tmp_path, capsys):
    from medvlp.launch.cli import main
    from medvlp.pretrain.export import ExportError, export

    _, run3d = _saved_model(tmp_path, "debug-3d", modality="ct")
    with pytest.raises(ExportError, match="resnet3d.*no open_clip equivalent"):
        export(run3d, "open_clip", tmp_path / "o1")
    _, run_rn = _saved_model(tmp_path, "debug-rn")
    assert main(["export", "--model-dir", str(run_rn), "--to", "hf", "--out", str(tmp_path / "o2")]) == 2
    assert "vision tower 'resnet' has no transformers class" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def _bert_model(tmp_path):
    from medvlp.pretrain.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS * 20 + ["left right upper lower lobe nodule effusion"] * 5, tmp_path / "tok",
                          vocab_size=200, min_frequency=1)
    return _saved_model(tmp_path, "debug-bert", tokenizer=str(tok))


def test_open_clip_export_refuses_bert(tmp_path):
    from medvlp.pretrain.export import ExportError, export

    _, run = _bert_model(tmp_path)
    with pytest.raises(ExportError, match="text tower 'bert'.*use --to hf"):
        export(run, "open_clip", tmp_path / "o")


def test_hf_export_reproduces_embeddings(tmp_path):
    from transformers import AutoTokenizer, VisionTextDualEncoderModel

    from medvlp.pretrain import load_pretrained
    from medvlp.pretrain.export import export, hf_text_embedding

    model, run = _bert_model(tmp_path)
    out = export(run, "hf", tmp_path / "hf")
    hf = VisionTextDualEncoderModel.from_pretrained(str(out)).eval()
    tok = model.tokenizer(TEXTS)
    hf_tok = AutoTokenizer.from_pretrained(str(out))(TEXTS, padding="max_length", max_length=tok.shape[1],
                                                     truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(hf_tok, tok)  # the folder's tokenizer gives our ids
    x = _images(model)
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=x).pooler_output
        d_img = (img - model.encode_image(x, normalize=False)).abs().max().item()
        d_txt = (hf_text_embedding(hf, tok, model.text.pad_id) - model.encode_text(tok, normalize=False)
                 ).abs().max().item()
        assert float(hf.logit_scale) == pytest.approx(3.1)
    assert d_img <= 1e-5 and d_txt <= 1e-5, (d_img, d_txt)
    back = load_pretrained(out)
    with torch.no_grad():
        assert (back.model.encode_text(tok) - model.encode_text(tok)).abs().max() <= 1e-6
        assert torch.equal(back.model.encode_image(x), model.encode_image(x))


# ----------------------------------------------------------------------------------------------- security
class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_not_executed(tmp_path, capsys):
    from medvlp.launch.cli import main
    from medvlp.pretrain import LoadError, load_pretrained
    from medvlp.pretrain.checkpoint import load_rng

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"weight": torch.zeros(1), "x": _Boom(marker)}, run / "model.pt")
    (run / "config.json").write_text(json.dumps({"model.name": "debug", "data.train_shards": str(tmp_path)}))
    with pytest.raises(LoadError, match="refused.*run code"):
        load_pretrained(run)
    assert main(["eval", "--model-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err
    # a legacy pickled RNG state on resume: skipped with a warning, never executed
    tag = tmp_path / "tag"
    tag.mkdir()
    torch.save({"python": _Boom(marker)}, tag / "rng_rank0.pt")
    assert load_rng(tag, 0) is False
    assert not marker.exists()


def test_rng_state_round_trips_through_json(tmp_path):
    from medvlp.pretrain.checkpoint import load_rng, save_rng

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_rng(tmp_path / "rng_rank0.json")
    want = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert load_rng(tmp_path, 0)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])


def test_bad_paths_give_clear_errors(tmp_path):
    from medvlp.pretrain import LoadError, load_pretrained

    with pytest.raises(LoadError, match="no such file"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(LoadError, match="not a run folder"):
        load_pretrained(tmp_path)
    _, run = _saved_model(tmp_path, "debug")
    with pytest.raises(LoadError, match="no COMPLETE checkpoint at step 7"):
        load_pretrained(run, step=7)
    (run / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LoadError, match="not a readable safetensors file"):
        load_pretrained(run / "model.safetensors")


def test_no_unsafe_torch_load_in_the_code():
    """No unsafe torch.load call (weights_only off) anywhere in the project's code (DeepSpeed's loaders excepted)."""
    import re

    call = re.compile(r"torch\.load\([^)]*weights_only\s*=\s*" + "False")
    hits = []
    for d in ("medvlp", "benchmarks", "tests"):
        assert (REPO / d).is_dir(), d
        for f in (REPO / d).rglob("*.py"):
            if call.search(f.read_text()):
                hits.append(str(f.relative_to(REPO)))
    assert not hits, hits


def test_mlflow_model_artifact_registers_and_predicts(tmp_path):
    """The export logged as an MLflow pyfunc model directory: registerable, and it embeds texts like our model."""
    import mlflow
    import pandas as pd

    from medvlp.pretrain.export import log_model_artifact

    model, run = _saved_model(tmp_path, "debug")
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("models", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    art = log_model_artifact(run, run_id=run_id, tracking_uri=uri)
    assert art == f"runs:/{run_id}/model"
    assert {a.path for a in client.list_artifacts(run_id, "model")} >= {"model/MLmodel", "model/artifacts"}
    mlflow.set_tracking_uri(uri)
    try:
        version = mlflow.register_model(art, "medvlp-debug")
        loaded = mlflow.pyfunc.load_model(f"models:/medvlp-debug/{version.version}")
        got = np.stack(loaded.predict(pd.DataFrame({"text": TEXTS}))["text_embedding"])
    finally:
        mlflow.set_tracking_uri(None)
    with torch.no_grad():
        want = model.encode_text(model.tokenizer(TEXTS)).numpy()
    assert np.abs(got - want).max() <= 1e-6


def test_transform_is_the_streams_eval_view_and_checkpoint_reads_safetensors(tmp_path):
    from medvlp.data_shards.schema import Sample
    from medvlp.data_shards.transforms import SampleTransform
    from medvlp.pretrain import load_pretrained
    from medvlp.pretrain.config import ModelConfig
    from medvlp.pretrain.model import build_model

    model, run = _saved_model(tmp_path, "debug", modality="patho")
    p = load_pretrained(run)
    img = (np.random.default_rng(0).random((96, 80, 3)) * 255).astype(np.uint8)
    want = SampleTransform("patho", 64, train=False)(Sample(key="k", text="", image=img), np.random.default_rng(0))
    got = p.transform()(img)
    assert got.shape == (3, 64, 64) and torch.equal(got, want["image"])
    assert not torch.equal(p.transform("cxr")(img), got)  # another modality's normalisation
    # model.checkpoint accepts the safetensors weights a run writes
    other = build_model(ModelConfig(name="debug", checkpoint=str(run / "model.safetensors")))
    assert torch.equal(other.visual.net.conv1.weight, model.visual.net.conv1.weight)
