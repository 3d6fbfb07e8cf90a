"""The MLflow pyfunc wrapper of an exported model (MLflow "models from code": nothing is pickled).

    model = mlflow.pyfunc.load_model(uri)
    model.predict(pd.DataFrame({"text": ["No effusion.", None], "image": [None, png_bytes]}))
    # -> DataFrame: text_embedding [E floats] for rows with a text, image_embedding for rows with an image

Input (the model's signature): a DataFrame with an optional string column "text" and an optional binary column
"image" (an encoded PNG or JPEG, 8- or 16-bit, grey or RGB; over MLflow's REST API: base64); a row may have either
or both; output: a DataFrame with the L2-normalised embeddings as float lists, "text_embedding" and
"image_embedding" (None where the row had no such input). A list of strings (or one string) means texts, and its
output is the (N, E) float32 array of their embeddings. MLflow's schema enforcement turns a plain list into an
empty DataFrame, so the list form works on the model logged at the end of training (no input schema) and not on
`medvlp export --to mlflow`'s model, whose signature declares the DataFrame columns. Images go through
medvlp's own preprocessing (`medvlp.pretrain.export.image_preprocess`), so 16-bit input is scaled as in training.
The export itself is the artifact "export" (load it with `medvlp.pretrain.load_pretrained(local_path)`, or with
open_clip / transformers per its format).
"""
from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

BATCH = 32  # inputs per forward pass


def _missing(v) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN from a DataFrame column with gaps
    except (TypeError, ValueError):
        return False


class MedVLPEmbedder(PythonModel):
    def load_context(self, context) -> None:
        from medvlp.pretrain import load_pretrained
        from medvlp.pretrain.export import image_preprocess

        self.pre = load_pretrained(context.artifacts["export"])
        self.preprocess = image_preprocess(self.pre)

    def predict(self, context, model_input, params=None):  # noqa: ARG002
        import pandas as pd
        import torch

        if isinstance(model_input, str):
            model_input = [model_input]
        texts_only = isinstance(model_input, (list, tuple))
        if texts_only:
            model_input = pd.DataFrame({"text": [str(t) for t in model_input]})
        elif isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        n = len(model_input)
        texts = list(model_input["text"]) if "text" in model_input else [None] * n
        images = list(model_input["image"]) if "image" in model_input else [None] * n
        out_txt: list = [None] * n
        out_img: list = [None] * n
        model = self.pre.model
        with torch.no_grad():
            rows = [i for i, t in enumerate(texts) if not _missing(t)]
            for j in range(0, len(rows), BATCH):
                part = rows[j:j + BATCH]
                emb = model.encode_text(self.pre.tokenizer([str(texts[i]) for i in part])).float()
                for i, e in zip(part, emb):
                    out_txt[i] = e.tolist()
            rows = [i for i, x in enumerate(images) if not _missing(x)]
            for j in range(0, len(rows), BATCH):
                part = rows[j:j + BATCH]
                x = torch.stack([self.preprocess(images[i]) for i in part])
                emb = model.encode_image(x).float()
                for i, e in zip(part, emb):
                    out_img[i] = e.tolist()
        if texts_only:
            import numpy as np

            return np.asarray(out_txt, dtype=np.float32).reshape(n, -1)
        return pd.DataFrame({"text_embedding": out_txt, "image_embedding": out_img})


mlflow.models.set_model(MedVLPEmbedder())
