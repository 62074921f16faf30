"""A stand-in for the Hugging Face Hub: `HfApi`'s repo and upload calls are intercepted (no network) and every
uploaded folder is copied as it was at upload time, so tests can assert on exactly what would have reached the Hub.

Use: `hub = FakeHub.install(monkeypatch, tmp_path)`; then `hub.uploads` (one dict per upload_folder call, with the
call's arguments and `files`: the copy), `hub.repos`, `hub.branches`. Every other HfApi call that would write or
read the Hub fails the test.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, RepoUrl


class FakeHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.uploads: list[dict] = []
        self.repos: list[dict] = []
        self.branches: list[dict] = []

    @classmethod
    def install(cls, monkeypatch, root: Path) -> "FakeHub":
        hub = cls(root)

        def create_repo(api, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
            hub.repos.append({"repo_id": repo_id, "token": token, "private": private, "exist_ok": exist_ok})
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, *, branch, token=None, exist_ok=False, **kwargs):
            hub.branches.append({"repo_id": repo_id, "branch": branch, "token": token})

        def upload_folder(api, *, repo_id, folder_path, run_as_future=False, **kwargs):
            copy = hub.root / f"upload-{len(hub.uploads)}"
            shutil.copytree(folder_path, copy)
            hub.uploads.append({"repo_id": repo_id, "folder_path": str(folder_path), "files": copy,
                                "run_as_future": run_as_future, **kwargs})
            info = CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                              commit_message=kwargs.get("commit_message") or "", commit_description="",
                              oid="0" * 40)
            if not run_as_future:
                return info
            future = Future()
            future.set_result(info)
            return future

        def forbidden(name):
            def call(api, *args, **kwargs):
                raise AssertionError(f"HfApi.{name} was called: only create_repo/create_branch/upload_folder are "
                                     "expected, and those are intercepted")
            return call

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        for name in ("create_commit", "upload_file", "upload_large_folder", "model_info", "delete_file"):
            if hasattr(HfApi, name):
                monkeypatch.setattr(HfApi, name, forbidden(name))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return hub

    def files(self, index: int = -1) -> dict[str, Path]:
        """Relative path -> file of one upload (default: the last)."""
        root = self.uploads[index]["files"]
        return {str(path.relative_to(root)): path for path in sorted(root.rglob("*")) if path.is_file()}
