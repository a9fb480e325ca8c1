"""The fine-tuning run behind `python -m fastlm.finetune` (whose flags, FinetuneConfig, are in fastlm.finetune):
set-up, the lean training loop, the final save and the summary.

One step: `batch_size x grad_accum` random windows of `seq_len` tokens, the loss normalised over the step's
whole token count (so accumulation 4 x batch 4 is batch 16), gradient clipping, AdamW (fused on CUDA; weight
decay on matrices and embeddings only) on a warmup + cosine schedule. The loop syncs with the GPU only after the
first step and then every `--log-every` steps (and at evaluations and checkpoints); metrics.jsonl still records
every step. Unset --batch-size and --seq-len are chosen for the device and model (resolve_sizes). Output (in --out): model.safetensors + config.json
(transformers loads them), metrics.jsonl, loss.png when matplotlib is installed, and checkpoint.pt for
--resume (fastlm.checkpoint); every file is written to a temporary name and renamed.

A run never loses more than --save-every steps or --save-minutes of work, and never leaves --out unusable:
SIGINT or SIGTERM makes the loop finish its step, save a checkpoint and exit with 128 + the signal's number
(130, 143), a second one stops at once with the previous checkpoint intact; a nan or infinite loss stops the run
at the log point that reads it, before anything non-finite is saved (exit 2); the final model is published
after the final checkpoint, model.safetensors last, so a run killed at any moment either is complete or
resumes to completion (--resume of a run killed in its final save finishes that save). One run per --out (a
lock, fastlm.checkpoint).

Dropout: the model's config (a checkpoint's config.json: GPT-2's 0.1 on embeddings, attention probabilities and
residuals, as transformers trains with; none from scratch), or --dropout P for all three; the start line says
which. torch's generators, which draw the masks, are seeded per rank (checkpoint.rank_seed), so every rank draws
its own masks, and every rank's generator states go into checkpoint.pt, so a resumed run draws the masks the
uninterrupted run would have (same processes, batch size and accumulation).

--pack: the same windows, but each token attends only to its own document and positions restart at each
document's first token (fastlm.packing says where documents begin and how a cut one continues); validation
too. Without it, windows over the stream attend across documents, as GPT-2's pretraining did.

What trains (fastlm.trainable): everything, or only the last --train-layers blocks and/or the parameters named by
--trainable, or low-rank adapters (--lora-rank) on a frozen base. A LoRA run also writes its adapters in Hugging
Face PEFT's layout (adapter/); model.safetensors is always the whole (merged) model.

Several GPUs or machines: `torchrun --nproc_per_node N -m fastlm.finetune ...` runs the same loop data-parallel
(DistributedDataParallel, or FSDP2 with --fsdp; see fastlm.distributed). Every rank draws the same global step of
`batch_size x grad_accum x N` windows and takes its own disjoint share, so N processes with batch b compute the
same step as one process with batch N x b; under DDP only the last micro-batch of a step communicates (no_sync),
the logged loss is the global mean, and only rank 0 prints and writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from fastlm import checkpoint as ckpt
from fastlm import distributed, lora, packing, prompt_tuning, weights
from fastlm.config import GPTConfig
from fastlm.data import Splits, eval_windows, random_windows, read_documents, split, tokenize
from fastlm.distributed import Parallel, World
from fastlm.finetune_config import FinetuneConfig, validate
from fastlm.model import GPT
from fastlm.progress import Progress, plot_losses, read_metrics, write_metrics
from fastlm.runtime import StopSignals, autocast_dtype, check_backend, resolve_device, sequence_length
from fastlm.tokenizer import Tokenizer, get_tokenizer
from fastlm.trainable import choose_trainable

GPT2_DOWNLOAD = "hf download openai-community/gpt2 model.safetensors config.json --local-dir gpt2"
VAL_SPLIT = "documents"  # checkpoint.pt's record of how validation was held out (none: the last tokens)
SCRATCH_MODEL = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64)  # no --weights: small and quick on a CPU


# -----------------------------------------------------------------------------
def learning_rate(step: int, cfg: FinetuneConfig) -> float:
    """Linear warmup (scaled down for short runs), then cosine decay to min_lr at max_steps."""
    warmup = min(cfg.warmup_steps, cfg.max_steps // 10)
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - min_lr)


def make_optimizer(model: GPT, cfg: FinetuneConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    prompt = prompt_tuning.prompt_of(model)  # not decayed: decay pulls the virtual tokens to 0, off the embeddings' scale
    decayed = lambda p: p.dim() >= 2 and p is not prompt
    groups = [{"params": [p for p in params if decayed(p)], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if not decayed(p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def windows_per_step(cfg: FinetuneConfig, world: World) -> int:
    return cfg.batch_size * cfg.grad_accum * world.size


class Stopped(Exception):
    """The run stopped on SIGINT/SIGTERM after its step and a checkpoint; main exits with 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


# -----------------------------------------------------------------------------
@dataclass
class Setup:
    """What a rank needs to start training, made by `prepare` (which may fail on one rank only)."""

    cfg: FinetuneConfig      # with --batch-size and --seq-len as this run uses them (resolve_sizes)
    model: GPT
    trains: str              # what trains, in words
    tokenizer: Tokenizer
    splits: Splits
    source: str              # the data, in words
    out: Path
    checkpoint: dict | None  # when resuming
    metrics: list[dict]      # the earlier records of a resumed run (rank 0)
    base_weights: str | None  # the --weights the run started from, for the adapters' config


def run(cfg: FinetuneConfig) -> dict:
    """Train as configured; returns the summary (also printed). Under torchrun, one rank of a data-parallel job."""
    validate(cfg)
    world = distributed.world_from_env()
    device = distributed.place(world, resolve_device(cfg.device))
    check_backend(cfg.backend, device)
    distributed.init(world, device)
    run_dir = None  # rank 0's lock on --out
    try:
        run_dir = distributed.agree(world, lambda: ckpt.open_out(cfg.out, cfg.resume, cfg.overwrite) if world.is_main else None)
        setup = distributed.agree(world, lambda: prepare(cfg, world, device))
        distributed.same_everywhere(world, setup.splits.key, f"--data ({setup.source})")
    except BaseException:
        if run_dir is not None:
            run_dir.abandon()  # --out as it was found
        distributed.close(world)  # every rank stops here together: a clean teardown
        raise
    try:
        if run_dir is not None:
            removed = run_dir.begin(overwrite=cfg.overwrite and not cfg.resume)
            if removed:
                print(f"removed {len(removed)} temporary file(s) an interrupted run left in {run_dir.path}")
        summary = train(setup.cfg, world, device, setup)
    finally:
        if run_dir is not None:
            run_dir.release()
    # Not in a `finally`: after a failure in training other ranks may be waiting in a collective, and tearing the
    # group down under them hangs (NCCL); the failing process exits instead and torchrun stops the others.
    distributed.close(world)
    return summary


def prepare(cfg: FinetuneConfig, world: World, device: torch.device) -> Setup:
    """The model (what trains frozen or not, resumed or not) and the data; on every rank."""
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    tokenizer = get_tokenizer()
    checkpoint = None
    if cfg.resume and ckpt.killed_before_first_save(out):
        world.print(f"--resume: {out} holds no checkpoint.pt, only what its run wrote before it was killed, before "
                    f"its first checkpoint: starting that run again from step 0")
    elif cfg.resume:
        checkpoint = ckpt.load_checkpoint(out / "checkpoint.pt", world)
    if checkpoint is not None:
        model = GPT(GPTConfig.from_dict(checkpoint["model_config"]), backend=cfg.backend)
        base_weights = checkpoint["base_weights"]
    elif cfg.weights is not None:
        if not Path(cfg.weights).exists():
            raise ValueError(f"--weights {cfg.weights}: no such file or directory. GPT-2's weights: `{GPT2_DOWNLOAD}`, then "
                             f"--weights gpt2; or leave --weights out to train a small GPT-2 from scratch")
        # fp32 master weights whatever the file holds: low precision comes from autocast, and AdamW updates stay exact
        model = GPT.from_pretrained(cfg.weights, backend=cfg.backend, dtype=torch.float32)
        world.print(f"fine-tuning {cfg.weights}: {model.num_parameters() / 1e6:.1f}M parameters")
        base_weights = cfg.weights
    else:
        model = GPT(SCRATCH_MODEL, backend=cfg.backend)
        world.print(f"no --weights given: training a small GPT-2 from scratch ({SCRATCH_MODEL.n_layer} layers, "
                    f"{SCRATCH_MODEL.n_embd} wide, {model.num_parameters() / 1e6:.1f}M parameters)")
        base_weights = None
    prompt_tuning.check_prompt_room(model, cfg.prompt_tokens)  # before any size is derived from what it leaves
    cfg, note = resolve_sizes(cfg, model, base_weights, checkpoint, device)
    if note:
        world.print(note)
    world.print(choose_dropout(model, cfg, checkpoint))
    if checkpoint is not None:
        ckpt.check_resumable(checkpoint, cfg, windows_per_step(cfg, world), world.size,
                             complete=ckpt.final_save_done(out, checkpoint["step"]))
    trains = choose_trainable(model, cfg, tokenizer)
    prompt_tuning.check_window(model, cfg.seq_len)  # the virtual tokens and a window share the context
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
        except Exception as e:
            raise ValueError(f"{out / 'checkpoint.pt'}: its state does not fit this model ({str(e).splitlines()[0]})") from None
        world.print(f"resuming from {out / 'checkpoint.pt'} at step {checkpoint['step']}" +
                    (": the run was stopped in its final save, which is done now" if checkpoint["step"] == cfg.max_steps else ""))
    sequence_length(model, tokenizer, cfg.seq_len)  # fits the context, reads GPT-2's tokens

    source = cfg.data or "pydoc_data.topics (Python's documentation)"
    tokens, data_key = tokenize(read_documents(cfg.data), tokenizer, cfg.cache_dir)
    by_documents = checkpoint is None or checkpoint.get("val_split") == VAL_SPLIT  # older runs held out the tail
    splits = split(tokens, data_key, cfg.seq_len, cfg.val_fraction, source,
                   eot=tokenizer.eot_token if by_documents else None, seed=cfg.seed)
    metrics = []
    if checkpoint is not None:
        if checkpoint["data_key"] != data_key:
            raise ValueError(f"--resume: the data differs from the checkpoint's ({source})")
        if world.is_main:
            metrics = [m for m in read_metrics(out / "metrics.jsonl") if m["step"] <= checkpoint["step"]]
    return Setup(cfg, model, trains, tokenizer, splits, source, out, checkpoint, metrics, base_weights)


def choose_dropout(model: GPT, cfg: FinetuneConfig, checkpoint: dict | None) -> str:
    """Set the model's dropout for this run: --dropout P (all three), else the model's own config (a checkpoint's
    config.json, or none from scratch); a resumed run keeps its own. Returns the start line that says which."""
    if checkpoint is not None:
        trained = tuple(model.config.dropouts.values())
        if cfg.dropout is not None and trained != (cfg.dropout,) * 3:
            raise ValueError(f"--resume: --dropout is {cfg.dropout} but the checkpoint was trained with "
                             f"{_dropout_words(model)}; resume with the same value, or leave --dropout out")
        source = "as the run being resumed"
    elif cfg.dropout is not None:
        model.set_dropout(cfg.dropout, cfg.dropout, cfg.dropout)
        source = "--dropout"
    elif cfg.weights is not None:
        source = "the checkpoint's config.json; --dropout P to change"
    else:
        source = "from scratch; --dropout P to add it"
    return f"dropout: {_dropout_words(model)} ({source})"


def _dropout_words(model: GPT) -> str:
    c = model.config
    if c.embd_pdrop == c.attn_pdrop == c.resid_pdrop:
        return "none" if c.embd_pdrop == 0 else f"{c.embd_pdrop:g} on the embeddings, attention probabilities and residuals"
    return f"embeddings {c.embd_pdrop:g}, attention probabilities {c.attn_pdrop:g}, residuals {c.resid_pdrop:g}"


def resolve_sizes(cfg: FinetuneConfig, model: GPT, base_weights: str | None, checkpoint: dict | None,
                  device: torch.device) -> tuple[FinetuneConfig, str | None]:
    """--batch-size and --seq-len as this run uses them: as given, else a resumed run's own, else the defaults for
    the device and model: 8 sequences of the model's context (at most 1024), except on a CPU with pretrained
    weights, where such a step of GPT-2 124M takes minutes: 4 of at most 256 there, said in the returned note."""
    saved = dict(checkpoint["finetune_config"]) if checkpoint is not None else {}
    context = min(model.config.block_size - cfg.prompt_tokens, 1024)  # what a window may take beside a soft prompt
    if checkpoint is not None and saved.get("seq_len") is None:
        saved["seq_len"] = context  # an older checkpoint: the default it resolved to then
        checkpoint["finetune_config"] = saved
    small = device.type == "cpu" and base_weights is not None
    defaults = dict(batch_size=4 if small else 8, seq_len=min(context, 256) if small else context)
    sizes = {name: getattr(cfg, name) or saved.get(name) or default for name, default in defaults.items()}
    chosen = [f"--{name.replace('_', '-')} {sizes[name]}" for name in defaults if getattr(cfg, name) is None and not saved]
    note = None
    if small and chosen:
        note = (f"on a CPU: {' '.join(chosen)} (a GPU run's default is 8 x {context}), so that a step takes seconds "
                f"rather than minutes; pass them to choose")
    return dataclasses.replace(cfg, **sizes), note


# -----------------------------------------------------------------------------
def validation_loss(parallel: Parallel, world: World, val_x: torch.Tensor, val_y: torch.Tensor, batch_size: int,
                    autocast, eot: int | None = None) -> float:
    """Mean validation loss over every rank's share (equal-sized batches, so the mean of batch means); with eot
    (--pack), each document on its own (fastlm.packing)."""
    parallel.model.eval()
    device = next(parallel.model.parameters()).device
    total = torch.zeros((), device=device)
    with torch.no_grad(), autocast():
        for x, y in zip(val_x.split(batch_size), val_y.split(batch_size)):
            total += parallel.forward(x.to(device), y.to(device), **packed(x, eot, device)).float()
    parallel.model.train()
    batches = len(val_x.split(batch_size)) * world.size
    return (distributed.all_reduce_sum(world, total) / batches).item()


def packed(x: torch.Tensor, eot: int | None, device: torch.device) -> dict:
    """The model's packing arguments for CPU rows x (B, T) (none without --pack: eot None), on the device."""
    if eot is None:
        return {}
    cu_seqlens, position_ids = packing.document_boundaries(x, eot)
    cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)  # a new document count is no reason to compile again
    return dict(cu_seqlens=cu_seqlens, position_ids=position_ids.to(device, non_blocking=True))


def train_step(parallel: Parallel, world: World, x: torch.Tensor, y: torch.Tensor, count: torch.Tensor, autocast,
               docs: list[dict] | None = None) -> torch.Tensor:
    """Forward and backward of one step's micro-batches x, y (A, B, T) on this rank; returns its share of the
    step's loss. count: the whole step's target tokens over all ranks, so each micro-batch weighs its share.
    docs: per micro-batch, the packing arguments (packed()), with --pack."""
    step_loss = torch.zeros((), device=x.device)
    for micro, (xm, ym) in enumerate(zip(x, y)):
        with parallel.micro_step(last=micro == len(x) - 1):
            with autocast():
                loss = parallel.train(xm, ym, **(docs[micro] if docs else {})).float() * ((ym != -100).sum() / count)
            (loss * world.size).backward()  # DDP and FSDP average over ranks: the sum of the shares is the step's mean
        step_loss += loss.detach()
    return step_loss


def train(cfg: FinetuneConfig, world: World, device: torch.device, setup: Setup) -> dict:
    model, splits, out, seq_len = setup.model, setup.splits, setup.out, cfg.seq_len
    trainable = model.num_parameters(trainable_only=True)
    world.print(f"data: {setup.source}: {len(splits.train):,} training and {len(splits.val):,} validation tokens "
                f"(validation: {splits.how})")
    world.print(f"training {setup.trains}: {trainable:,} of {model.num_parameters():,} parameters"
                + (f" on {world.size} processes" if world.distributed else ""))
    dtype = autocast_dtype(cfg.autocast, device)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    use_compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    if cfg.fsdp and not world.distributed:
        world.print("--fsdp: a single process has nothing to shard; training as usual")
    parallel = distributed.parallelize(model, world, device, shard=cfg.fsdp, compile=use_compile)
    if world.distributed:
        world.print("FSDP: weights, gradients and optimizer state sharded" if parallel.sharded
                    else "DDP: the model replicated on every process")
    optimizer = make_optimizer(model, cfg, device)
    data_rng = torch.Generator().manual_seed(cfg.seed)
    step, metrics, saved_step = 0, setup.metrics, None
    # Each rank's own stream for torch's generators (its dropout masks), not the one that initialised the model.
    torch.manual_seed(ckpt.rank_seed(cfg.seed, world.rank))
    if setup.checkpoint is not None:
        ckpt.load_optimizer_state(model, optimizer, setup.checkpoint["optimizer"])
        step = saved_step = setup.checkpoint["step"]
        exact = ckpt.restore_rng_states(setup.checkpoint["rng"], data_rng, device, world, cfg.seed, step)
        if not exact and any(model.config.dropouts.values()):
            world.print(f"--resume: the checkpoint holds no generator states for {world.size} process(es): the dropout "
                        f"masks from here on are drawn afresh (the data and everything else continue exactly)")
        setup.checkpoint = None  # the weights and optimizer state are in place: free the host copy
    eot = setup.tokenizer.eot_token if cfg.pack else None
    if cfg.pack:
        world.print(f"--pack: each token attends only to its own document, positions from 0 in each (rows of "
                    f"{seq_len} tokens cut from the stream; a document cut by a row's edge continues as a new one); "
                    f"padding each of the {len(packing.document_lengths(splits.train, eot)):,} training documents to "
                    f"rows of its own would waste {packing.padding_waste(splits.train, eot, seq_len):.1%} of the tokens")

    B, A, W = cfg.batch_size, cfg.grad_accum, world.size
    tokens_per_step = windows_per_step(cfg, world) * seq_len  # the whole job's
    val_x, val_y = eval_windows(splits.val, cfg.eval_batches * B * W, seq_len)
    val_x, val_y = val_x.view(W, -1, seq_len)[world.rank], val_y.view(W, -1, seq_len)[world.rank]  # this rank's share
    plotting = True  # until loss.png cannot be drawn
    progress = Progress(cfg.max_steps) if world.is_main else None
    pending, first_step = [], step
    start_time = last_time = last_save_time = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def save(step: int) -> None:
        rng = ckpt.rng_states(data_rng, device, world)  # every rank's generators (a collective)
        if not (world.is_main or parallel.sharded):
            return
        try:
            ckpt.save_checkpoint(out / "checkpoint.pt", model, optimizer, world, dict(
                step=step, rng=rng, model_config=dataclasses.asdict(model.config),
                data_key=splits.key, finetune_config=dataclasses.asdict(cfg), windows_per_step=windows_per_step(cfg, world),
                base_weights=setup.base_weights, val_split=VAL_SPLIT))
        except ckpt.NotFinite as e:  # the update of this step, after a finite loss, overflowed
            raise ckpt.NotFinite(_diverged(step, f"after its update, {e}", metrics, saved_step, out, cfg)) from None

    model.train()
    with StopSignals(world.distributed, saved_step) as signals, progress or contextlib.nullcontext():
        while step < cfg.max_steps:
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Every rank draws the whole step's windows (the same generator everywhere) and keeps its share:
            # micro-batch a of rank r is windows [(a * W + r) * B, (a * W + r + 1) * B).
            x, y = random_windows(splits.train, B * A * W, seq_len, data_rng)
            count = (y != -100).sum().clamp(min=1)
            x, y = x.view(A, W, B, seq_len)[:, world.rank], y.view(A, W, B, seq_len)[:, world.rank]
            docs = [packed(xm, eot, device) for xm in x] if cfg.pack else None
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            step_loss = train_step(parallel, world, x, y, count.to(device, non_blocking=True), autocast, docs)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending.append((step, step_loss, lr))

            # decided together (host-side values, all-reduced on the CPU under torchrun; nothing waits on the GPU)
            stop_signal, overdue = distributed.max_over_ranks(
                world, signals.received or 0,
                cfg.save_minutes > 0 and time.perf_counter() - last_save_time >= cfg.save_minutes * 60)
            stopping = stop_signal > 0
            evaluating = step % cfg.eval_every == 0 or step == cfg.max_steps
            saving = step % cfg.save_every == 0 or step == cfg.max_steps or overdue or stopping
            if step % cfg.log_every == 0 or step == first_step + 1 or evaluating or saving:
                # the only host sync (and loss all-reduce) of the interval
                losses = distributed.all_reduce_sum(world, torch.stack([loss for _, loss, _ in pending])).tolist()
                now = time.perf_counter()
                tokens_per_s = tokens_per_step * len(pending) / (now - last_time)
                for (s, _, step_lr), value in zip(pending, losses):
                    metrics.append(dict(step=s, loss=value, lr=step_lr, tokens_per_s=round(tokens_per_s, 1)))
                pending, last_time = [], now
                _stop_if_diverged(metrics, "loss", len(losses), world, out, saved_step, cfg)
                if evaluating:
                    metrics[-1]["val_loss"] = validation_loss(parallel, world, val_x, val_y, B, autocast, eot)
                    last_time = time.perf_counter()  # evaluation time is not training throughput
                    _stop_if_diverged(metrics, "val_loss", 1, world, out, saved_step, cfg)
                if world.is_main:
                    elapsed = now - start_time
                    seconds_left = elapsed / (step - first_step) * (cfg.max_steps - step)
                    progress.update(step, metrics[-1]["loss"], lr, tokens_per_s, elapsed, seconds_left, metrics[-1].get("val_loss"))
                    write_metrics(out / "metrics.jsonl", metrics)
                    if evaluating and plotting:
                        plotting = plot_losses(metrics, out / "loss.png", progress)
            if saving:
                save(step)
                saved_step = signals.saved_step = step
                last_save_time = time.perf_counter()
            if stopping:
                raise Stopped(stop_signal, step, out / "checkpoint.pt")
        if parallel.sharded:  # rank 0 goes on with a whole copy: saving, merging adapters and sampling need every weight
            model = _whole_model_on_main(model, cfg, world, device)
        if world.is_main:
            progress.close()  # the bar's line ends before the summary
            publish(model, cfg, setup, step)
    if not world.is_main:
        return {}
    elapsed = time.perf_counter() - start_time
    summary = _summary(metrics, device, tokens_per_step * (step - first_step) / elapsed, trainable)
    _print_summary(summary, cfg, out)
    print(f"losses: train = the mean over the last {summary['train_steps']} steps of each step's loss on its own batch "
          f"(before that step's update); val = the mean over {len(val_x) * W} fixed windows of {seq_len} tokens "
          f"from the validation split ({splits.how}), at step {summary['val_step']}"
          + ("; with --pack, each token within its own document, as in training" if cfg.pack else ""))
    if cfg.sample_tokens > 0:
        _print_sample(model, setup.tokenizer, cfg, device)
    return summary


def publish(model: GPT, cfg: FinetuneConfig, setup: Setup, step: int) -> None:
    """The final model into --out: (LoRA) adapter/, then config.json, then model.safetensors, which records the
    step and so marks the run complete (fastlm.checkpoint.final_save_done)."""
    out = setup.out
    base = None if setup.base_weights is None else Path(setup.base_weights).resolve()
    base_name = None if base is None else str(base if base.is_dir() else base.parent)
    if cfg.lora_rank:  # in a folder of their own: beside model.safetensors, transformers would apply them a second time
        lora.save_adapters(model, out / "adapter", base_model_name_or_path=base_name)
        lora.merge_lora(model)
    if cfg.prompt_tokens:  # PEFT's layout, in a folder of its own for the same reason; model.safetensors is the base
        prompt_tuning.save_prompt(model, out / "prompt", base_model_name_or_path=base_name)
        with prompt_tuning.detached(model):
            weights.save(model, out, metadata={"fastlm_step": str(step)})
        return
    weights.save(model, out, metadata={"fastlm_step": str(step)})


def _stop_if_diverged(metrics: list[dict], key: str, recent: int, world: World, out: Path, saved_step: int | None,
                      cfg: FinetuneConfig) -> None:
    """Raise NotFinite (keeping metrics.jsonl up to that step) if one of the last `recent` records' `key` is nan
    or infinite. Every rank reads the same all-reduced losses, so every rank stops here together."""
    first = len(metrics) - recent
    bad = next((i for i in range(first, len(metrics)) if not math.isfinite(metrics[i][key])), None)
    if bad is None:
        return
    del metrics[bad + 1:]
    if world.is_main:
        write_metrics(out / "metrics.jsonl", metrics)
    what = "validation loss" if key == "val_loss" else "training loss"
    raise ckpt.NotFinite(_diverged(metrics[bad]["step"], f"the {what} is {metrics[bad][key]}", metrics[:bad], saved_step, out, cfg))


def _diverged(step: int, what: str, metrics: list[dict], saved_step: int | None, out: Path, cfg: FinetuneConfig) -> str:
    """The one line that says where a run diverged, what it last had that was finite, and what --out keeps."""
    finite = [m for m in metrics if m["loss"] is not None and math.isfinite(m["loss"])]
    last = (f"the last finite loss was {finite[-1]['loss']:.6g} at step {finite[-1]['step']}" if finite
            else "no earlier step of this run has a finite loss")
    kept = f"{out / 'checkpoint.pt'} is still step {saved_step}'s" if saved_step is not None else "no checkpoint was saved"
    return (f"step {step}: {what} ({last}); stopped without saving anything non-finite ({kept}); "
            f"try a lower --lr than {cfg.lr:g}")


def _whole_model_on_main(model: GPT, cfg: FinetuneConfig, world: World, device: torch.device) -> GPT | None:
    """A sharded model gathered into a plain one on rank 0 (None on the others); every rank must call this."""
    whole = get_model_state_dict(model, options=ckpt.WHOLE)  # a collective: every rank gathers
    if not world.is_main:
        return None
    with torch.device("meta"):
        plain = GPT(model.config, backend=cfg.backend)
    choose_trainable(plain, cfg)
    plain.load_state_dict(whole, assign=True)
    plain.lm_head.weight = plain.transformer.wte.weight
    return plain.to(device)


# -----------------------------------------------------------------------------
def _summary(metrics: list[dict], device: torch.device, tokens_per_s: float, trainable: int) -> dict:
    evaluated = [m for m in metrics if m.get("val_loss") is not None]
    recent = [m["loss"] for m in metrics[-10:]]
    train_loss = sum(recent) / len(recent)
    val_loss = evaluated[-1]["val_loss"] if evaluated else math.nan
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return dict(steps=metrics[-1]["step"], train_loss=train_loss, train_ppl=_perplexity(train_loss), train_steps=len(recent),
                val_loss=val_loss, val_ppl=_perplexity(val_loss), val_step=evaluated[-1]["step"] if evaluated else None,
                tokens_per_s=tokens_per_s,
                peak_memory_gib=peak, peak_memory_kind="GPU" if device.type == "cuda" else "process",
                trainable_parameters=trainable)


def _perplexity(loss: float) -> float:
    return math.inf if loss > 709 else math.exp(loss)  # math.exp overflows past 709


def _print_summary(summary: dict, cfg: FinetuneConfig, out: Path) -> None:
    print(f"done: {summary['steps']} steps; train loss {summary['train_loss']:.4f} (ppl {summary['train_ppl']:.1f}), "
          f"val loss {summary['val_loss']:.4f} (ppl {summary['val_ppl']:.1f}); {summary['tokens_per_s']:,.0f} tokens/s "
          f"overall; {summary['peak_memory_gib']:.2f} GiB peak {summary['peak_memory_kind']} memory; "
          f"{summary['trainable_parameters']:,} parameters trained; saved to {out}/model.safetensors"
          + (f" and the LoRA adapters in {out}/adapter (PEFT's layout)" if cfg.lora_rank else "")
          + (f" (the base model, unchanged) and the soft prompt of {cfg.prompt_tokens} virtual tokens in {out}/prompt "
             f"(PEFT's layout)" if cfg.prompt_tokens else ""))


def _print_sample(model: GPT, tokenizer: Tokenizer, cfg: FinetuneConfig, device: torch.device) -> None:
    torch.manual_seed(cfg.seed)
    n = min(cfg.sample_tokens, prompt_tuning.text_room(model) - 1)  # a soft prompt, if any, comes first
    start = torch.tensor([[tokenizer.eot_token % model.config.vocab_size]], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        sample = model.generate(start, n, temperature=0.8, top_k=200)
    print("sample:", tokenizer.decode(sample[0, 1:].tolist()).strip()[:1000])
