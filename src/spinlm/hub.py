"""Pushing each iteration to the Hugging Face Hub (optional: `push_to_hub: OWNER/NAME`).

Iteration t's model goes to the model repo `OWNER/NAME-iter{t}` and its pairs to the dataset repo
`OWNER/NAME-pairs` under `iteration_{t}/`. `api` is a `huggingface_hub.HfApi` by default; tests pass an
object with the same two methods that writes to a local folder, since this machine cannot reach the Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spinlm.errors import SpinError


def push_iteration(run_dir: Path, iteration: int, repo_prefix: str, api: Any = None) -> list[str]:
    """Upload iteration `iteration`'s model folder and pairs; returns the repo ids written."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    it_dir = Path(run_dir) / f"iteration_{iteration}"
    model_repo, pairs_repo = f"{repo_prefix}-iter{iteration}", f"{repo_prefix}-pairs"
    try:
        api.create_repo(model_repo, repo_type="model", exist_ok=True)
        api.upload_folder(
            folder_path=str(it_dir / "model"),
            repo_id=model_repo,
            repo_type="model",
            commit_message=f"SPIN iteration {iteration}",
        )
        api.create_repo(pairs_repo, repo_type="dataset", exist_ok=True)
        api.upload_file(
            path_or_fileobj=str(it_dir / "pairs.jsonl"),
            path_in_repo=f"iteration_{iteration}/pairs.jsonl",
            repo_id=pairs_repo,
            repo_type="dataset",
            commit_message=f"SPIN pairs, iteration {iteration}",
        )
    except Exception as e:  # noqa: BLE001 - network / auth problems are the user's to fix
        raise SpinError(
            f"push_to_hub failed for iteration {iteration}: {type(e).__name__}: {e}",
            hint="check `huggingface-cli login` and the repo name; rerun resumes",
        ) from e
    return [model_repo, pairs_repo]
