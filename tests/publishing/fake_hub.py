"""A stand-in for ``huggingface_hub.HfApi`` that records calls and never touches the network."""

from __future__ import annotations

import threading
import time


class FakeHubApi:
    def __init__(self, fail_uploads: bool = False, upload_delay: float = 0.0):
        self.calls: list[tuple[str, dict]] = []
        self.fail_uploads = fail_uploads
        self.upload_delay = upload_delay
        self.lock = threading.Lock()

    def create_repo(self, repo_id, **kwargs):
        with self.lock:
            self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        time.sleep(self.upload_delay)
        with self.lock:
            self.calls.append(("upload_folder", {**kwargs, "thread": threading.current_thread().name}))
        if self.fail_uploads:
            raise ConnectionError("simulated network failure")
        return "commit"

    def of(self, name: str) -> list[dict]:
        return [kwargs for call, kwargs in self.calls if call == name]


def install(monkeypatch, api: FakeHubApi) -> FakeHubApi:
    """``HfApi()`` returns ``api``; HF_HUB_OFFLINE is switched off so the push rules let the run start."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *args, **kwargs: api)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return api
