"""medvlp: distributed pretraining and fine-tuning of medical vision-language models.

Components: `medvlp.data_shards` (WebDataset shards), `medvlp.pretrain` (the contrastive core and the library's
front door, `load_pretrained`), `medvlp.kernels` (fused contrastive loss kernels), `medvlp.finetune` (the
fine-tuning stages) and `medvlp.launch` (the `medvlp` command). Importing this package imports nothing heavy.
"""

__version__ = "0.1.0"
