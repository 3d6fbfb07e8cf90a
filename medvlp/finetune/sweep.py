"""The statistics every experiment table uses (seed summaries, ±, paired bootstrap, table files).

They live in `medvlp.pretrain.sweep` so that pretraining's multi-run evaluation can use them without importing
the fine-tuning floor; this module is their name for the fine-tuning drivers."""
from medvlp.pretrain.sweep import paired_bootstrap_diff, pm, seed_summary, write_table

__all__ = ["paired_bootstrap_diff", "pm", "seed_summary", "write_table"]
