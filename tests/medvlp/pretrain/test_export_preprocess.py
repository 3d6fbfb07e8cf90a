"""Exports carry their preprocessing: open_clip's own transform matches ours on 8-bit input, 16-bit input has an
exact documented path (and open_clip's transform is shown to be wrong for it), the HF folder loads with
AutoProcessor and `get_text_features` is our text embedding, files follow the umask, `--to mlflow` embeds texts
and images with a signature."""
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import saved_pretrained_run

pytestmark = pytest.mark.timeout(300)

TEXTS = ["No effusion.", "Small left pleural effusion.", "Cardiomegaly with a nodule in the right upper lobe."]


def _radiograph16(seed=0, h=96, w=80):
    """A smooth 16-bit image using the whole range (what a DICOM-derived PNG in the shards looks like)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = 0.5 + 0.3 * np.sin(6 * xx + seed) * np.cos(4 * yy) + 0.05 * rng.standard_normal((h, w))
    return (np.clip(img, 0, 1) * 65535).astype(np.uint16)


def _cos(a, b):
    a, b = torch.as_tensor(a).flatten().double(), torch.as_tensor(b).flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture()
def oc_export(tmp_path):
    from medvlp.pretrain.export import export

    model = saved_pretrained_run(tmp_path / "run", "debug", "cxr")
    return model, export(tmp_path / "run", "open_clip", tmp_path / "oc")


def test_open_clip_transform_matches_ours_on_8bit_and_16bit_has_an_exact_path(oc_export, tmp_path):
    import open_clip

    from medvlp.pretrain import load_pretrained
    from medvlp.pretrain.export import image_preprocess

    model, out = oc_export
    oc, _, oc_pre = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    ours = image_preprocess(out)
    a16 = [_radiograph16(s) for s in range(3)]
    a8 = [(a >> 8).astype(np.uint8) for a in a16]
    for i, (x16, x8) in enumerate(zip(a16, a8)):
        Image.fromarray(x16).save(tmp_path / f"i16_{i}.png")
        Image.fromarray(x8).save(tmp_path / f"i8_{i}.png")
    with torch.no_grad():
        # 8-bit: open_clip's own transform (from preprocess_cfg) gives our embedding
        e_oc8 = oc.encode_image(torch.stack([oc_pre(Image.open(tmp_path / f"i8_{i}.png")) for i in range(3)]),
                                normalize=True)
        e_us8 = model.encode_image(torch.stack([ours(tmp_path / f"i8_{i}.png") for i in range(3)]))
        # 16-bit: our callable reads the PNG as 16-bit and equals the stream's transform on the array
        x_us16 = torch.stack([ours(tmp_path / f"i16_{i}.png") for i in range(3)])
        want = torch.stack([load_pretrained(out).transform()(a) for a in a16])
        assert torch.equal(x_us16, want)
        e_us16 = model.encode_image(x_us16)
        # open_clip's transform on the same 16-bit file: clipped to 8 bits, not scaled (what PREPROCESSING.md says)
        e_oc16 = oc.encode_image(torch.stack([oc_pre(Image.open(tmp_path / f"i16_{i}.png")) for i in range(3)]),
                                 normalize=True)
    x_oc16 = oc_pre(Image.open(tmp_path / "i16_0.png"))
    assert float(x_oc16.std()) < 1e-6 < float(x_us16[0].std())  # every pixel >= 255 clips to one value
    for i in range(3):
        assert _cos(e_oc8[i], e_us8[i]) > 0.999, i
        assert _cos(e_us16[i], e_us8[i]) > 0.999, i  # 16-bit and its 8-bit rounding: the same picture
        assert (e_oc16[i] - e_us16[i]).norm() > 10 * (e_oc8[i] - e_us8[i]).norm(), i
    note = (out / "PREPROCESSING.md").read_text()
    assert "16-bit" in note and "image_preprocess" in note and "local-dir:" in note
    doc = json.loads((out / "medvlp_export.json").read_text())["preprocess"]
    assert doc["16-bit or DICOM-derived images"] == "medvlp.pretrain.export.image_preprocess(folder)"


def test_export_files_follow_the_umask(tmp_path):
    from medvlp.pretrain.export import export

    saved_pretrained_run(tmp_path / "run", "debug", "cxr")
    old = os.umask(0o022)
    try:
        out = export(tmp_path / "run", "open_clip", tmp_path / "oc")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert modes["open_clip_model.safetensors"] == 0o644, modes
    assert all(m in (0o644, 0o755) for m in modes.values()), modes


def test_hf_export_has_a_processor_and_get_text_features_is_our_embedding(tmp_path):
    from transformers import AutoProcessor, VisionTextDualEncoderModel

    from medvlp.pretrain import load_pretrained
    from medvlp.pretrain.checkpoint import model_metadata, save_state_dict
    from medvlp.pretrain.config import ModelConfig
    from medvlp.pretrain.export import export, hf_text_embedding, image_preprocess
    from medvlp.pretrain.model import build_model
    from medvlp.pretrain.tokenizer import train_tokenizer

    tok_dir = train_tokenizer(TEXTS * 20 + ["left right upper lower lobe nodule effusion"] * 5, tmp_path / "tok",
                              vocab_size=200, min_frequency=1)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="debug-bert", tokenizer=str(tok_dir))).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_state_dict(model.state_dict(), run / "model.safetensors", model_metadata(model))
    (run / "config.json").write_text(json.dumps({"model.name": "debug-bert", "model.tokenizer": str(tok_dir),
                                                 "data.modality": "cxr"}))
    out = export(run, "hf", tmp_path / "hf")
    assert (out / "preprocessor_config.json").is_file() and (out / "processor_config.json").is_file()
    proc = AutoProcessor.from_pretrained(str(out))
    hf = VisionTextDualEncoderModel.from_pretrained(str(out)).eval()
    enc = proc(text=TEXTS, padding=True, return_tensors="pt")
    img8 = [(_radiograph16(s) >> 8).astype(np.uint8) for s in range(2)]
    ours = image_preprocess(out)
    with torch.no_grad():
        got = hf.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        want = model.encode_text(model.tokenizer(TEXTS), normalize=False)
        rel = ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()
        exact = hf_text_embedding(hf, model.tokenizer(TEXTS), model.text.pad_id)
        px = proc(images=[Image.fromarray(a) for a in img8], return_tensors="pt")["pixel_values"]
        e_hf = hf.get_image_features(pixel_values=px).pooler_output
        e_us = model.encode_image(torch.stack([ours(a) for a in img8]), normalize=False)
        # HF's processor on a 16-bit image clips it to 8 bits: a blank image (PREPROCESSING.md says so)
        blank = proc(images=[Image.fromarray(_radiograph16(0))], return_tensors="pt")["pixel_values"]
        assert float(blank.std()) < 1e-6 < float(ours(_radiograph16(0)).std())
    assert rel < 1e-5, rel
    assert (exact - want).abs().max().item() <= 1e-5
    assert all(_cos(e_hf[i], e_us[i]) > 0.999 for i in range(2))
    back = load_pretrained(out)  # the pooler scaling is undone on the way back
    with torch.no_grad():
        assert (back.model.encode_text(model.tokenizer(TEXTS)) - model.encode_text(model.tokenizer(TEXTS))
                ).abs().max() <= 1e-6


def test_export_to_mlflow_has_a_signature_and_embeds_text_and_images(tmp_path, capsys):
    import io

    import mlflow
    import pandas as pd

    from medvlp.launch.cli import main
    from medvlp.pretrain.export import image_preprocess

    model = saved_pretrained_run(tmp_path / "run", "debug", "cxr")
    out = tmp_path / "mlf"
    assert main(["export", "--model-dir", str(tmp_path / "run"), "--to", "mlflow", "--out", str(out)]) == 0
    assert main(["export", "--model-dir", str(tmp_path / "run"), "--to", "mlflow", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    loaded = mlflow.pyfunc.load_model(str(out))
    sig = loaded.metadata.signature
    assert sig is not None and set(sig.inputs.input_names()) == {"text", "image"}
    assert set(sig.outputs.input_names()) == {"text_embedding", "image_embedding"}
    a16 = _radiograph16(1)
    buf = io.BytesIO()
    Image.fromarray(a16).save(buf, format="PNG")
    got = loaded.predict(pd.DataFrame({"text": [TEXTS[0], None], "image": [None, buf.getvalue()]}))
    with torch.no_grad():
        t = model.encode_text(model.tokenizer(TEXTS[:1]))[0].numpy()
        i = model.encode_image(image_preprocess(tmp_path / "run")(a16)[None])[0].numpy()
    assert np.abs(np.array(got["text_embedding"][0]) - t).max() <= 1e-6 and got["image_embedding"][0] is None
    assert np.abs(np.array(got["image_embedding"][1]) - i).max() <= 1e-6 and got["text_embedding"][1] is None
    texts_only = loaded.predict(pd.DataFrame({"text": TEXTS}))  # one kind of input only
    assert len(texts_only) == 3 and np.abs(np.array(texts_only["text_embedding"][0]) - t).max() <= 1e-6
