"""Publishing a finished output folder to the hub (`convert --push-to-hub REPO`, uptraining's `push_to_hub:`).

The token is checked before any work (`check_push`: a token is there and the hub accepts it), so that a missing
login never costs a conversion or a training run. The upload runs only once the output is complete in its final
place; when it fails, the output stays where it is and the error says how to upload it again.
"""

from __future__ import annotations

from pathlib import Path

from convert.errors import PublishError
from convert.hub import HUB_ID, hub_progress

__all__ = ["PublishError", "check_push", "push_folder"]


def check_push(repo_id: str) -> str:
    """The hub token to push `repo_id` with; refuses a malformed name, a missing token and one the hub rejects."""
    from huggingface_hub import HfApi, get_token

    if not (HUB_ID.fullmatch(repo_id) or HUB_ID.fullmatch(f"user/{repo_id}")):
        raise PublishError(f"push to hub: {repo_id!r} is not a repository name like 'org/model' or 'model'")
    token = get_token()
    if token is None:
        raise PublishError(
            f"push to hub {repo_id}: no hub token. Log in with `hf auth login` or set HF_TOKEN (a token with write "
            "access), then run again"
        )
    try:
        HfApi(token=token).whoami()
    except Exception as e:  # 401 (invalid token) or the hub unreachable: either way nothing can be uploaded
        raise PublishError(
            f"push to hub {repo_id}: the hub did not accept the token ({_first_line(e)}); fix HF_TOKEN or log in again"
        )
    return token


def push_folder(
    folder: Path, repo_id: str, token: str, private: bool = True, message: str | None = None, progress: bool = True
) -> str:
    """Upload every file of `folder` to `repo_id` as one commit, creating the repository (private unless `private`
    is False; an existing repository keeps its visibility); the commit's URL. `progress`: huggingface_hub's bars."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        with hub_progress(progress):
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=url.repo_id,
                folder_path=folder,
                commit_message=message or f"Upload {Path(folder).name} with gqa-convert",
            )
    except Exception as e:  # network, permissions, quota, a rejected card: the folder is complete either way
        raise PublishError(
            f"could not upload {folder} to the hub repository {repo_id} ({type(e).__name__}: {_first_line(e)}). "
            f"The output is complete and kept in {folder}: upload it again with `hf upload {repo_id} {folder}`"
        ) from e
    return info.commit_url


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
