"""--upload: push a merged model directory to the Hugging Face Hub (create_repo + upload_folder)."""

from __future__ import annotations

from pathlib import Path


class UploadError(RuntimeError):
    """The model was written locally but could not be pushed."""


def check_upload_target(repo_id: str) -> None:
    """Before any work: a malformed repo id or an offline hub client fails now, not after the merge."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UploadError(f"--upload {repo_id!r}: not a Hub repo id ({str(e).splitlines()[0]}); use "
                          "`owner/name`") from None
    if "/" not in repo_id:
        raise UploadError(f"--upload {repo_id!r}: give the owner too, as `owner/name` (your user or organization)")
    if constants.HF_HUB_OFFLINE:
        raise UploadError(f"--upload {repo_id}: HF_HUB_OFFLINE is set, so nothing can be pushed; unset it, or "
                          "merge without --upload and push later with `hf upload`")


def upload_model(folder: str | Path, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Create `repo_id` (kept if it exists) and upload every file of `folder` in one commit. The token and
    endpoint are huggingface_hub's own (HF_TOKEN or `hf auth login`, HF_ENDPOINT). Returns the commit URL."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise UploadError(f"--upload {repo_id}: HF_HUB_OFFLINE is set, so nothing can be pushed; the model is in "
                          f"{folder}: unset HF_HUB_OFFLINE and run `hf upload {repo_id} {folder}`")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message or f"Upload merged model ({Path(folder).name})")
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UploadError(f"--upload {repo_id}: pushing to {constants.ENDPOINT} failed ({first}); the model is "
                          f"kept in {folder}: check HF_TOKEN / `hf auth login` and retry with "
                          f"`hf upload {repo_id} {folder}`") from None
    return str(info.commit_url)
