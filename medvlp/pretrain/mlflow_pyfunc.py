"""The MLflow pyfunc wrapper of an exported model (MLflow "models from code": nothing is pickled).

`mlflow.pyfunc.load_model(uri).predict(df)`: a DataFrame with a "text" column (or a list of strings) gives the L2-normalised text
embeddings (N, E) as a float32 array; the model folder itself is the artifact "export" (load it with
`pretrain.load_pretrained(local_path)` for images, or with open_clip / transformers per its format).
"""
from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class MedVLPTextEmbedder(PythonModel):
    def load_context(self, context) -> None:
        from medvlp.pretrain import load_pretrained

        self.pre = load_pretrained(context.artifacts["export"])

    def predict(self, context, model_input, params=None):  # noqa: ARG002
        import torch

        if isinstance(model_input, str):
            model_input = [model_input]
        elif not isinstance(model_input, (list, tuple)):  # a DataFrame or a dict with a "text" column
            model_input = model_input["text"]
        texts = [str(t) for t in model_input]
        with torch.no_grad():
            return self.pre.model.encode_text(self.pre.tokenizer(texts)).float().numpy()


mlflow.models.set_model(MedVLPTextEmbedder())
