"""The report language model: a causal LM from `transformers` (BioGPT architecture) with Flamingo-style gated
cross-attention (XATTN) blocks that read the resampled slide latents.

    lm = build_lm(vocab_size=..., hidden=64, layers=2, heads=4, ...)        # tiny BioGPT from a local config
    lm = load_lm("path/to/local/biogpt")                                     # or a pretrained one on disk
    add_xattn(lm, latent_dim=64, every=1, heads=4)                           # XATTN before every k-th layer
    out = lm(input_ids, attention_mask=..., latents=lat_BMO)                 # logits conditioned on the slide

A block inserted before decoder layer i computes, on the hidden states h (B, L, H):

    h = h + tanh(g_attn) * Attn(LN(h), latents)      # queries = text, keys/values = latents
    h = h + tanh(g_ff)   * FF(LN(h))
    h = decoder_layer_i(h)

with both gates 0 at initialisation, so the untrained model is exactly the bare LM (bit for bit). The latents are
a keyword argument of the LM's forward, so `lm.generate(..., latents=lat_BMO)` hands the same latents (computed
once per slide, repeated for beams by the generation API) to every decoding step. Under gradient checkpointing the
XATTN blocks run (and are checkpointed) like the decoder layers.

Nothing is downloaded: the LM is built from a local `BioGptConfig`, or read with `local_files_only=True`.

Shape legend: B batch, L text tokens, H LM width, M latents, O latent width.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class GatedXAttn(nn.Module):
    """Text hidden states attend to slide latents; tanh-gated residuals (gates start at 0)."""

    def __init__(self, hidden: int, latent_dim: int, heads: int, ff_mult: int = 4) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"xattn: LM width {hidden} is not divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.kv = nn.Linear(latent_dim, 2 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.ff = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden * ff_mult, bias=False), nn.GELU(),
                                nn.Linear(hidden * ff_mult, hidden, bias=False))
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ff = nn.Parameter(torch.zeros(1))

    def forward(self, h_BLH: torch.Tensor, lat_BMO: torch.Tensor) -> torch.Tensor:
        b, seq, hid = h_BLH.shape
        nh = self.heads
        if lat_BMO.shape[0] != b:
            raise ValueError(f"xattn: {lat_BMO.shape[0]} latent sets for a text batch of {b}")
        lat_BMO = lat_BMO.to(h_BLH.dtype)
        q = self.q(self.norm(h_BLH)).view(b, seq, nh, hid // nh).transpose(1, 2)
        k, v = self.kv(lat_BMO).view(b, -1, 2, nh, hid // nh).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, seq, hid)
        h_BLH = h_BLH + torch.tanh(self.gate_attn) * self.out(a)
        return h_BLH + torch.tanh(self.gate_ff) * self.ff(h_BLH)


class XAttnDecoderLayer(nn.Module):
    """A decoder layer of the LM with a gated XATTN block in front; reads the latents from the shared context."""

    def __init__(self, xattn: GatedXAttn, layer: nn.Module, ctx: "_LatentContext") -> None:
        super().__init__()
        self.xattn, self.layer = xattn, layer
        self._ctx = [ctx]  # a list: not a submodule, not in the state dict

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        lat = self._ctx[0].latents
        if lat is not None:
            if self._ctx[0].checkpointing and self.training and torch.is_grad_enabled():
                hidden_states = checkpoint(self.xattn, hidden_states, lat, use_reentrant=False)
            else:
                hidden_states = self.xattn(hidden_states, lat)
        return self.layer(hidden_states, *args, **kwargs)


class _LatentContext:
    latents: torch.Tensor | None = None
    checkpointing: bool = False


def build_lm(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, ffn: int = 256,
             max_positions: int = 160, pad_id: int = 0, bos_id: int = 2, eos_id: int = 3, dropout: float = 0.1):
    """A BioGPT-architecture causal LM from a local config (random init; untied input/output embeddings so the
    weights save as safetensors without shared storage)."""
    from transformers import BioGptConfig, BioGptForCausalLM

    cfg = BioGptConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=max_positions,
                       hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, activation_dropout=0.0,
                       layerdrop=0.0, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                       tie_word_embeddings=False, scale_embedding=True)
    return BioGptForCausalLM(cfg)


def load_lm(path: str):
    """A pretrained causal LM from a local folder (nothing is downloaded)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"model.lm: cannot load a causal LM from {path!r} ({type(e).__name__}: {e})") \
            from None


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of a causal LM (BioGPT `biogpt.layers`; GPT-2 `transformer.h`; ...)."""
    base = getattr(lm, lm.base_model_prefix, lm)
    for name in ("layers", "h", "decoder.layers"):
        node = base
        for part in name.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return node
    raise TypeError(f"{type(lm).__name__}: cannot find its decoder layers to insert XATTN blocks")


class ReportLM(nn.Module):
    """A causal LM with gated XATTN blocks before every `every`-th decoder layer (see the module doc)."""

    def __init__(self, lm: nn.Module, latent_dim: int, every: int = 1, heads: int = 4, ff_mult: int = 4) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"xattn_every: must be >= 1, got {every}")
        self.lm = lm
        self._ctx = _LatentContext()
        layers = decoder_layers(lm)
        hidden = lm.config.hidden_size
        for i in range(0, len(layers), every):
            layers[i] = XAttnDecoderLayer(GatedXAttn(hidden, latent_dim, heads, ff_mult), layers[i], self._ctx)
        attach_latent_kwarg(self)

    @property
    def config(self):
        return self.lm.config

    def xattn_blocks(self) -> list[GatedXAttn]:
        return [m.xattn for m in decoder_layers(self.lm) if isinstance(m, XAttnDecoderLayer)]

    def set_gradient_checkpointing(self, on: bool) -> None:
        self._ctx.checkpointing = bool(on)
        kw = {"use_reentrant": False}
        if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers >= 5
            if on:
                self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                self.lm.activation_checkpointing_disable()
        elif on:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        else:
            self.lm.gradient_checkpointing_disable()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                latents: torch.Tensor | None = None, **kwargs):
        """The LM's forward (logits, loss with `labels=`) with `latents` (B, M, O) fed to every XATTN block."""
        self._ctx.latents = latents
        if self.training:
            kwargs.setdefault("use_cache", False)  # no KV cache to build while training
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, latents: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **gen_kwargs) -> torch.Tensor:
        """`transformers` generation (greedy / beam / sampling per `gen_kwargs`) conditioned on `latents`, computed
        once by the caller; for beam search the generation API repeats them per beam, like the prompt."""
        return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, latents=latents,
                                **gen_kwargs)


def attach_latent_kwarg(report_lm: ReportLM) -> None:
    """Give the LM's forward a `latents=` keyword that stores the latents in the XATTN context, so that
    `lm.generate(..., latents=X)` works: the generation API checks model kwargs against the forward's signature,
    passes them to every step and repeats tensors per beam. Done by a subclass of the LM's own class."""
    lm, ctx = report_lm.lm, report_lm._ctx
    base = type(lm)
    if getattr(base, "_medvlp_latents", False):
        lm._latent_ctx = [ctx]
        return

    def forward(self, *args, latents=None, **kwargs):
        if latents is not None:
            self._latent_ctx[0].latents = latents
        return base.forward(self, *args, **kwargs)

    lm.__class__ = type(base.__name__, (base,), {"forward": forward, "_medvlp_latents": True,
                                                 "__module__": base.__module__})
    lm._latent_ctx = [ctx]
