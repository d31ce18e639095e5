"""BuiltinModel.from a Hugging Face Llama: the same weights run by the
built-in model's lean, batched forward (DESIGN §3 targets), so a Llama-family
checkpoint gets BuiltinTarget's ragged batches and in-place KV compaction.
Only what BuiltinModel computes exactly is accepted: plain RoPE, no biases,
SiLU-gated MLP, head_dim = hidden / heads; anything else raises."""
from __future__ import annotations

import torch

from .model import BuiltinModel, ModelConfig


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if params else scaling.get("rope_type", "default")
    if kind not in (None, "default"):
        raise ValueError(f"builtin_from_hf: rope_type '{kind}' is not supported (plain RoPE only)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise ValueError("builtin_from_hf: the config names no rope_theta")
    return float(theta)


def builtin_from_hf(model) -> BuiltinModel:
    """A BuiltinModel holding a loaded Hugging Face Llama-style causal LM's
    weights (copied; same dtype and device), e.g. ``BuiltinTarget(
    builtin_from_hf(AutoModelForCausalLM.from_pretrained(path)))``.
    Accepted: model_type llama or mistral without sliding window, no
    attention/MLP biases, hidden_act silu, head_dim = hidden_size /
    num_attention_heads, default RoPE. Raises ValueError naming the first
    setting it cannot reproduce."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in ("llama", "mistral"):
        raise ValueError(f"builtin_from_hf: model_type '{kind}' is not supported (llama, mistral)")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(cfg, name, False):
            raise ValueError(f"builtin_from_hf: {name}=True is not supported")
    if getattr(cfg, "sliding_window", None):
        raise ValueError("builtin_from_hf: sliding-window attention is not supported")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"builtin_from_hf: hidden_act '{cfg.hidden_act}' is not supported (silu)")
    heads, dim = cfg.num_attention_heads, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or dim // heads
    if head_dim * heads != dim:
        raise ValueError(f"builtin_from_hf: head_dim {head_dim} x {heads} heads != hidden_size {dim}")
    ours = ModelConfig(vocab_size=cfg.vocab_size, dim=dim, n_layers=cfg.num_hidden_layers, n_heads=heads,
                       n_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                       hidden=cfg.intermediate_size, max_seq_len=getattr(cfg, "max_position_embeddings", 4096),
                       rope_theta=_rope_theta(cfg), norm_eps=float(cfg.rms_norm_eps))
    hf = dict(model.state_dict())
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj", "attn_norm": "input_layernorm",
             "mlp_norm": "post_attention_layernorm"}
    try:
        state = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
                 "head.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
        for layer in range(ours.n_layers):
            for mine, theirs in names.items():
                state[f"blocks.{layer}.{mine}.weight"] = hf[f"model.layers.{layer}.{theirs}.weight"]
    except KeyError as e:
        raise ValueError(f"builtin_from_hf: no weight {e} in the model's state dict (a composite model? pass its "
                         f"Llama language model)") from None
    with torch.device("meta"):  # no random initialisation of a model about to be overwritten
        out = BuiltinModel(ours)
    with torch.no_grad():  # one copy of each weight (assign: the copies become the parameters)
        out.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    return out.eval()
