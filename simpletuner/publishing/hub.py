"""Uploads to a Hugging Face Hub repository: ``--push_to_hub``, ``--push_checkpoints_to_hub``,
``--push_to_hub_background``.

The repository is created (or found) before the first upload. Checkpoint uploads go to
``checkpoints/<folder name>`` and only warn when they fail; the final upload (the LoRA file or the
``pipeline/`` folder, EMA copies, ``README.md`` and the last validation images) raises
:class:`HubUploadError` that says how to upload the untouched local files by hand. In background mode
one worker thread does the uploads in order and :meth:`HubPublisher.wait` waits for all of them.
Credentials come from huggingface_hub's own login (``huggingface-cli login`` or ``HF_TOKEN``); they
are never read or logged here.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

#: Never uploaded with the final artefacts: checkpoints, caches, hidden/temporary files.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/*", "*cache*/*", ".*", "*/.*", "*.tmp"]


class HubUploadError(RuntimeError):
    """The final upload failed; the message says what to do."""


def final_allow_patterns(output_dir: Path, result: Path, step: int) -> list[str]:
    """What the final upload sends, relative to ``output_dir``."""
    output_dir, result = Path(output_dir), Path(result)
    relative = result.relative_to(output_dir).as_posix()
    product = [relative + "/*"] if result.is_dir() else [relative]
    patterns = [*product, *("ema/" + pattern for pattern in product), "README.md"]
    for label in (f"step_{step}", f"step_{step}_ema"):
        patterns += [f"validation/{label}/*.png", f"validation/{label}/validation.json"]
    return patterns


class HubPublisher:
    def __init__(self, repo_id: str, private: bool = False, background: bool = False,
                 checkpoints: bool = False, api=None):
        self.repo_id = repo_id
        self.private = private
        self.checkpoints = checkpoints
        self._api = api
        self._repo_ready = False
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload") if background else None
        self._pending: list[Future] = []

    @classmethod
    def from_config(cls, config) -> HubPublisher | None:
        if not config.push_to_hub:
            return None
        return cls(config.hub_model_id, private=bool(config.model_card_private),
                   background=bool(config.push_to_hub_background), checkpoints=bool(config.push_checkpoints_to_hub))

    @property
    def api(self):
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi()
        return self._api

    def _ensure_repo(self) -> None:
        with self._lock:
            if not self._repo_ready:
                self.api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
                self._repo_ready = True

    def _submit(self, task: Callable[[], None]) -> None:
        if self._executor is None:
            task()
        else:
            self._pending.append(self._executor.submit(task))

    # --- checkpoints -------------------------------------------------------------------------------

    def push_checkpoint(self, folder: Path, step: int) -> None:
        """With ``--push_checkpoints_to_hub``: upload ``folder`` to ``checkpoints/<name>``; failures warn."""
        if not self.checkpoints or folder is None:
            return
        folder = Path(folder)

        def upload() -> None:
            try:
                self._ensure_repo()
                self.api.upload_folder(repo_id=self.repo_id, folder_path=str(folder),
                                       path_in_repo=f"checkpoints/{folder.name}", repo_type="model",
                                       commit_message=f"checkpoint at step {step}")
                logger.info("uploaded %s to %s/checkpoints/%s", folder.name, self.repo_id, folder.name)
            except Exception as error:  # a lost checkpoint upload must not stop training
                logger.warning("could not upload %s to the Hub repository %s (%s: %s); training goes on and the "
                               "checkpoint stays in %s", folder.name, self.repo_id, type(error).__name__, error, folder)

        self._submit(upload)

    # --- the end of the run ------------------------------------------------------------------------

    def push_final(self, output_dir: Path, result: Path, step: int) -> None:
        """Upload the run's product, model card and final validation images; waits for earlier uploads."""
        self.wait()
        output_dir = Path(output_dir)
        allow = final_allow_patterns(output_dir, result, step)
        try:
            self._ensure_repo()
            self.api.upload_folder(repo_id=self.repo_id, folder_path=str(output_dir), repo_type="model",
                                   allow_patterns=allow, ignore_patterns=IGNORE_PATTERNS,
                                   commit_message=f"final model at step {step}")
        except Exception as error:
            includes = " ".join(f'--include "{pattern}"' for pattern in allow)
            raise HubUploadError(
                f"--push_to_hub: uploading the final model to the Hub repository {self.repo_id} failed "
                f"({type(error).__name__}: {error}). Training finished and nothing was deleted: the model, its "
                f"README.md and the validation images are in {output_dir}. Upload them by hand with:\n"
                f"  huggingface-cli upload {self.repo_id} {output_dir} . {includes}"
            ) from error
        logger.info("uploaded the final model to https://huggingface.co/%s", self.repo_id)

    def wait(self) -> None:
        """Block until every background upload is done (their failures were already logged)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
