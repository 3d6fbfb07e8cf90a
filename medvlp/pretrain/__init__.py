"""Contrastive pretraining of medical vision-language models; `load_pretrained` turns a run into a library object."""


def __getattr__(name: str):  # lazy: `import medvlp.pretrain` stays light (no torch/DeepSpeed import until used)
    if name in ("load_pretrained", "Pretrained", "LoadError"):
        from medvlp.pretrain import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'medvlp.pretrain' has no attribute {name!r}")
