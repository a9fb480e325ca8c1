"""GPT-2 configuration: one dataclass, the family's presets, and the Hugging Face config.json mapping."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# Fields of a Hugging Face GPT-2 config.json that must hold for the weights to mean what this model computes.
_HF_REQUIRED = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
                "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,),
                "add_cross_attention": (False,)}


# Types of the config.json fields that are read (an absent field takes GPT-2's value).
_HF_TYPES = {"n_positions": int, "vocab_size": int, "n_layer": int, "n_head": int, "n_embd": int,
             "layer_norm_epsilon": (int, float), "embd_pdrop": (int, float), "attn_pdrop": (int, float),
             "resid_pdrop": (int, float)}
_HF_NAMES = {"block_size": "n_positions", "layer_norm_eps": "layer_norm_epsilon"}
DROPOUTS = ("embd_pdrop", "attn_pdrop", "resid_pdrop")  # GPTConfig's names are config.json's
GPT2_PDROP = 0.1  # what every published GPT-2 config.json says, and transformers' GPT2Config default


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _hf_names(message: str) -> str:
    """GPTConfig's complaint in config.json's words (n_positions for block_size, ...)."""
    message = message.removeprefix("GPTConfig: ")
    for ours, theirs in _HF_NAMES.items():
        message = message.replace(ours, theirs)
    return message


@dataclass
class GPTConfig:
    """A GPT-2 model's shape and its dropout. The four published sizes are `GPTConfig.preset(name)`.

    The three dropout probabilities are GPT-2's (config.json's names), applied in training mode only, where
    transformers' GPT2LMHeadModel applies them: embd_pdrop on the token + position embeddings, attn_pdrop on the
    attention probabilities (inside the attention kernel, or SDPA's dropout_p), resid_pdrop on each attention and
    MLP output before it joins the residual stream. A model built here defaults to none; one read from a
    config.json takes its values (GPT-2's 0.1 where the file has none, as transformers does).
    """

    block_size: int = 1024        # context length (n_positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_eps: float = 1e-5
    embd_pdrop: float = 0.0       # on the embeddings (token + position)
    attn_pdrop: float = 0.0       # on the attention probabilities
    resid_pdrop: float = 0.0      # on each attention and MLP output, before the residual add

    PRESETS = {
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768),           # 124M
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),   # 350M
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),    # 774M
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),       # 1558M
    }

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not _is_number(self.layer_norm_eps) or not 0.0 < self.layer_norm_eps < 1.0:
            raise ValueError(f"GPTConfig: layer_norm_eps must be a number in (0, 1), got {self.layer_norm_eps!r}")
        for name in DROPOUTS:
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"GPTConfig: {name} must be in [0, 1), got {value!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_hf(self) -> dict:
        """The config.json that transformers' GPT2LMHeadModel reads."""
        eos = min(50256, self.vocab_size - 1)
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": self.vocab_size, "n_positions": self.block_size, "n_ctx": self.block_size,
            "n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": self.layer_norm_eps,
            "resid_pdrop": self.resid_pdrop, "embd_pdrop": self.embd_pdrop, "attn_pdrop": self.attn_pdrop,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "bos_token_id": eos, "eos_token_id": eos,
        }

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "GPTConfig":
        """Read a Hugging Face GPT-2 config.json; anything this model cannot compute, a value of the wrong type or
        out of range, is an error naming `source` and the key."""
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: not a config (a JSON {type(hf).__name__}, not an object)")
        if hf.get("model_type") != "gpt2":
            raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}, not 'gpt2': not a GPT-2 checkpoint")
        for key, allowed in _HF_REQUIRED.items():
            if key in hf and hf[key] not in allowed:
                raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (expected {allowed[0]!r})")
        for key, kind in _HF_TYPES.items():
            value = hf.get(key)
            if key in hf and (isinstance(value, bool) or not isinstance(value, kind)):
                expected = "an integer" if kind is int else "a number"
                raise ValueError(f"{source}: {key} must be {expected}, got {value!r}")
        n_embd = hf.get("n_embd", 768)
        if hf.get("n_inner") not in (None, 4 * n_embd):
            raise ValueError(f"{source}: n_inner={hf['n_inner']} is not supported (GPT-2's MLP is 4 x n_embd = {4 * n_embd})")
        if hf.get("tie_word_embeddings", True) is False:
            raise ValueError(f"{source}: tie_word_embeddings=false is not supported (GPT-2 ties its LM head)")
        fields = dict(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                      n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                      layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                      **{name: hf.get(name, GPT2_PDROP) for name in DROPOUTS})
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"{source}: {_hf_names(str(e))}") from None

    @classmethod
    def from_dict(cls, fields: dict) -> "GPTConfig":
        """A config from dataclasses.asdict's dict (checkpoint.pt's model_config); older checkpoints had one
        `dropout` for embeddings and residuals and none on attention."""
        fields = dict(fields)
        if "dropout" in fields:
            legacy = fields.pop("dropout")
            fields = {"embd_pdrop": legacy, "resid_pdrop": legacy, "attn_pdrop": 0.0, **fields}
        return cls(**fields)

    @property
    def dropouts(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in DROPOUTS}

    def with_dropout(self, p: float) -> "GPTConfig":
        """The same model with all three dropout probabilities set to p."""
        return self.replace(**{name: p for name in DROPOUTS})

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)
