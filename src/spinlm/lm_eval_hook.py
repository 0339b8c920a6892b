"""Benchmark hook: lm-evaluation-harness tasks on every iteration's checkpoint (optional extra `spinlm[lmeval]`).

What: `run_lm_eval(model_dir, tasks, include_path, limit, batch_size)` runs `lm_eval.simple_evaluate` with the
Hugging Face backend on one checkpoint and returns its numbers flattened to one level,

    {"lm_eval/<task>/<metric>": value, ...}    e.g. "lm_eval/arc_easy/acc", "lm_eval/arc_easy/acc_stderr"

(a metric computed under a filter other than lm-eval's default `none` keeps the filter name:
"lm_eval/gsm8k/exact_match/strict-match"). `spinlm.loop.run` calls it after each iteration's evaluation when
`eval.lm_eval_tasks` is set and merges the numbers into that iteration's metrics, so they reach
metrics.json, summary.json, the logs and the report like every other metric.

    eval:
      lm_eval_tasks: [arc_easy, my_local_task]
      lm_eval_include_path: tasks/     # folder of extra task YAMLs, e.g. over a local JSON file
      lm_eval_limit: 200               # examples per task; unset for all

How it departs from the paper: the paper reports the Open LLM Leaderboard tasks (ARC, HellaSwag, MMLU, ...)
with few-shot prompts; here any task list is accepted and nothing is few-shot unless the task's YAML says so.
Built-in lm-eval tasks download their datasets from the Hub; for offline runs point `lm_eval_include_path`
at YAMLs over local files (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from spinlm.errors import SpinError

log = logging.getLogger("spinlm")

PREFIX = "lm_eval"


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SpinError(
            "eval.lm_eval_tasks is set but lm-evaluation-harness is not installed",
            hint="pip install 'spinlm[lmeval]' (or: pip install lm-eval), or leave eval.lm_eval_tasks empty",
        ) from e
    return lm_eval, TaskManager


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's `results["results"]` ({task: {"acc,none": 0.5, "alias": ...}}) as {"lm_eval/task/acc": 0.5}.

    Non-numeric entries (aliases, "N/A" standard errors) and NaNs are dropped.
    """
    flat: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(float(value)):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}/{filt}"
            flat[f"{PREFIX}/{task}/{name}"] = float(value)
    return flat


def run_lm_eval(
    model_dir: str | Path,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    model: Any = None,
    tokenizer: Any = None,
    device: str | None = None,
) -> dict[str, float]:
    """Run lm-eval `tasks` on the checkpoint in `model_dir`; {"lm_eval/<task>/<metric>": value}.

    With `model` (and `tokenizer`), that in-memory model is evaluated instead of loading `model_dir` a
    second time (`model_dir` is then only a label). `device` defaults to cuda when available, else cpu.
    """
    if not tasks:
        return {}
    lm_eval, task_manager_cls = _import_lm_eval()
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    task_manager = None
    if include_path is not None:  # indexing lm-eval's ~15k built-in tasks takes ~10 s: skip it if we can
        task_manager = task_manager_cls(include_path=str(include_path), include_defaults=False)
        if not set(tasks) <= set(task_manager.all_tasks):
            task_manager = None
    if task_manager is None:
        task_manager = task_manager_cls(include_path=str(include_path) if include_path is not None else None)
    missing = [t for t in tasks if t not in task_manager.all_tasks]
    if missing:
        raise SpinError(
            f"unknown lm-eval task(s): {', '.join(missing)}",
            hint="check the names with `lm-eval ls tasks`, or set eval.lm_eval_include_path to your YAML folder",
        )
    if model is not None:
        from lm_eval.models.huggingface import HFLM

        lm: Any = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        model_args = None
    else:
        lm, model_args = "hf", f"pretrained={model_dir}"
    log.info("lm-eval: %s on %s (limit %s)", ", ".join(tasks), model_dir, limit)
    out = lm_eval.simple_evaluate(
        model=lm,
        model_args=model_args,
        tasks=list(tasks),
        limit=limit,
        batch_size=batch_size,
        device=device,
        task_manager=task_manager,
        log_samples=False,
        bootstrap_iters=1000,  # only for non-mean aggregations; acc and the like use closed-form stderr
    )
    if out is None:  # a non-zero rank in a distributed lm-eval run
        return {}
    return flatten_results(out.get("results", {}))


__all__ = ["run_lm_eval", "flatten_results"]
