"""Uploading a finished run's model/ to the hub (`push_to_hub:`), from the main process once it is complete.

The token is checked in `Uptraining.check`, before any compute. A complete run started again with the same
settings (`resume: auto`) trains nothing and uploads again: the way to retry a failed upload.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from convert.errors import PublishError, SettingsError
from convert.hub.publish import check_push, push_folder
from convert.uptrain.settings import Settings

__all__ = ["PublishError", "check", "publish"]


def check(s: Settings) -> str:
    """The token the push will use; a settings error (exit 2, nothing computed) when there is none."""
    try:
        return check_push(s.push_to_hub)
    except PublishError as e:
        raise SettingsError(f"push_to_hub: {e}") from None


def publish(s: Settings, token: str | None, summary: dict, say: Callable[[str], None], main: bool) -> dict:
    """Upload output_dir/model (on the main process, `main`) and note the commit in the returned summary as
    `pushed`; a failed upload raises PublishError (exit 1) with model/ kept."""
    if not s.push_to_hub or not main:
        return summary
    model = Path(s.output_dir) / "model"
    url = push_folder(model, s.push_to_hub, token, private=s.hub_private, message="Upload uptrained model")
    say(f"uploaded {model} to {url}")
    return {**summary, "pushed": url}
