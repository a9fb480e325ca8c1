"""The settings of `python -m fastlm.finetune`: FinetuneConfig (one field per flag, the single source of truth for
the command line) and their checks. No torch import: the command parses and checks its flags before loading it,
and fastlm.training (the loop) reads them from here."""
from __future__ import annotations

from dataclasses import dataclass, field

from fastlm.cli import AUTOCAST_CHOICES, BACKEND_CHOICES


@dataclass
class FinetuneConfig:
    """Fine-tune GPT-2 on text (or train a small GPT-2 from scratch when no --weights is given)."""

    weights: str | None = field(default=None, metadata={"help": "GPT-2 .safetensors file or directory; absent: a small model from scratch"})
    data: str | None = field(default=None, metadata={"help": ".txt file, directory of .txt files, or .jsonl with a 'text' field; absent: Python's own documentation (pydoc_data)"})
    out: str = field(default="out-finetune", metadata={"help": "output directory"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps in all (a resumed run continues to this step)"})
    batch_size: int | None = field(default=None, metadata={"help": "sequences per micro-batch (default: 8; 4 on a CPU with --weights)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    seq_len: int | None = field(default=None, metadata={"help": "tokens per sequence (default: the model's context, at most 1024; at most 256 on a CPU with --weights)"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    min_lr: float | None = field(default=None, metadata={"help": "learning rate at the end of the cosine (default: lr / 10)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps (at most a tenth of max-steps)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices and embeddings"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    eval_every: int = field(default=50, metadata={"help": "validation loss every N steps (and at the end)"})
    eval_batches: int = field(default=4, metadata={"help": "micro-batches of validation windows per evaluation"})
    save_every: int = field(default=100, metadata={"help": "checkpoint for --resume every N steps (and at the end)"})
    save_minutes: float = field(default=10.0, metadata={"help": "also checkpoint when this many minutes have passed since the last checkpoint (0: off)"})
    log_every: int = field(default=10, metadata={"help": "read losses back from the device every N steps"})
    seed: int = field(default=1337, metadata={"help": "random seed (model init, data order, sampling)"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu, ... (auto: cuda when available)"})
    autocast: str = field(default="auto", metadata={"help": "compute in this dtype under autocast, weights kept fp32 (auto: bfloat16 on CUDA, off elsewhere)", "choices": AUTOCAST_CHOICES})
    backend: str = field(default="auto", metadata={"help": "kernels: triton, torch, or auto", "choices": BACKEND_CHOICES})
    compile: bool | None = field(default=None, metadata={"help": "torch.compile the model (default: on for CUDA)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.pt"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier run's files in --out instead of refusing"})
    val_fraction: float = field(default=0.1, metadata={"help": "fraction of the tokens held out for validation"})
    sample_tokens: int = field(default=64, metadata={"help": "tokens of the sample printed at the end (0: none)"})
    cache_dir: str | None = field(default=None, metadata={"help": "token cache (default: ~/.cache/fastlm/tokens)"})
    train_layers: int | None = field(default=None, metadata={"help": "train only the last N transformer blocks and the final norm"})
    trainable: str | None = field(default=None, metadata={"help": "train only parameters whose name contains one of these comma-separated patterns (e.g. h.11.,ln_f)"})
    lora_rank: int = field(default=0, metadata={"help": "train rank-r LoRA adapters on a frozen base (0: off)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scaling alpha (the update is alpha/r * B @ A; default: r)"})
    lora_targets: str = field(default="c_attn,c_proj,c_fc", metadata={"help": "comma-separated projections that get adapters"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    prompt_tokens: int = field(default=0, metadata={"help": "prompt tuning: learn N virtual-token embeddings put before every window, every model weight frozen; saved in PEFT's layout in OUT/prompt (0: off)"})
    prompt_init_text: str | None = field(default=None, metadata={"help": "start the virtual tokens from this text's token embeddings, cut or repeated to --prompt-tokens (PEFT's TEXT init; default: random)"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard weights, gradients and optimizer state across the processes (FSDP2) instead of replicating them (DDP)"})
    dropout: float | None = field(default=None, metadata={"help": "dropout probability on the embeddings, the attention probabilities and the residual branches, all three (default: the checkpoint's config.json values, GPT-2's 0.1, as transformers trains with; none from scratch)"})
    pack: bool = field(default=False, metadata={"help": "attend only within each document: positions restart at each document and nothing is attended or predicted across a boundary (windows over the stream otherwise; see fastlm.packing)"})

    RENAMED_FLAGS = {"--dtype": "--autocast"}



# -----------------------------------------------------------------------------
def validate(cfg: FinetuneConfig) -> None:
    positive = dict(max_steps=cfg.max_steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seq_len=cfg.seq_len,
                    lr=cfg.lr, eval_every=cfg.eval_every, eval_batches=cfg.eval_batches, save_every=cfg.save_every,
                    log_every=cfg.log_every)
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.min_lr is not None and not 0 <= cfg.min_lr <= cfg.lr:
        raise ValueError(f"--min-lr must be in [0, lr={cfg.lr}], got {cfg.min_lr}")
    for name, value in dict(warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                            sample_tokens=cfg.sample_tokens, save_minutes=cfg.save_minutes).items():
        if value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {cfg.val_fraction}")
    if cfg.train_layers is not None and cfg.train_layers < 1:
        raise ValueError(f"--train-layers must be at least 1, got {cfg.train_layers}")
    if cfg.lora_rank < 0:
        raise ValueError(f"--lora-rank must not be negative, got {cfg.lora_rank}")
    if cfg.lora_rank and (cfg.train_layers is not None or cfg.trainable):
        raise ValueError("--lora-rank trains adapters on a frozen base: it cannot be combined with --train-layers or --trainable")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ValueError(f"--lora-alpha must be positive, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.prompt_tokens < 0:
        raise ValueError(f"--prompt-tokens must not be negative, got {cfg.prompt_tokens}")
    if cfg.prompt_tokens and (cfg.lora_rank or cfg.train_layers is not None or cfg.trainable):
        raise ValueError("--prompt-tokens trains a soft prompt on a frozen model: it cannot be combined with --lora-rank, "
                         "--train-layers or --trainable")
    if cfg.prompt_tokens and cfg.pack:
        raise ValueError("--prompt-tokens puts one soft prompt before each window: it cannot be combined with --pack")
    if cfg.prompt_init_text is not None and not cfg.prompt_tokens:
        raise ValueError("--prompt-init-text starts a soft prompt: it needs --prompt-tokens N")
