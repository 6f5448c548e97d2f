"""A hub repository read without downloading its weights: the commit a revision resolves to, the file list,
`config.json` (and the shard index) into the hub cache, and each safetensors shard's header by ranged reads.

`gqa-convert inspect` and `convert --dry-run` need sizes, names and dtypes only: for Llama-2-7B that is about
60 KB of headers instead of 13 GB of weights. Each shard costs two ranged GETs, bytes 0-7 (the header length)
and then exactly the header; no byte of tensor data is requested, and a server that ignores `Range` is read only
as far as the header too (the response is streamed and closed there).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.errors import ConversionError
from convert.io.safetensors import TensorInfo, header_length, parse_header

HEADER_THREADS = 8  # shards whose headers are fetched at once (two small requests each)


@dataclass
class RemoteRepo:
    """A hub repository at one resolved commit: its files listed, config.json (and index) in the hub cache."""

    repo_id: str
    commit: str
    folder: Path  # the hub cache's snapshot folder of `commit`: config.json is there, the shards are not
    files: set[str]
    _headers: dict[str, tuple[dict[str, TensorInfo], dict]] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.files

    def prefetch(self, names: list[str]) -> None:
        """Fetch the headers of `names` on a few threads (a 70B checkpoint has 30 shards)."""
        todo = [n for n in names if n not in self._headers]
        with ThreadPoolExecutor(min(HEADER_THREADS, max(len(todo), 1))) as pool:
            for name, header in zip(todo, pool.map(self._fetch_header, todo)):
                self._headers[name] = header

    def read_header(self, path: Path) -> tuple[dict[str, TensorInfo], dict]:
        """`convert.io.safetensors.read_header` for the shard `path` names (in the snapshot folder, never created)."""
        if path.name not in self._headers:
            self._headers[path.name] = self._fetch_header(path.name)
        return self._headers[path.name]

    def _fetch_header(self, name: str) -> tuple[dict[str, TensorInfo], dict]:
        path = self.folder / name
        try:
            head, size = _read_range(self.repo_id, name, self.commit, 0, 8)
            hlen = header_length(path, head, size)
            raw, _ = _read_range(self.repo_id, name, self.commit, 8, hlen)
        except ConversionError:
            raise
        except Exception as e:  # huggingface_hub's HTTP errors, a dropped connection, a timeout
            raise hub_error(f"{self.repo_id}/{name}", e) from e
        return parse_header(path, raw, size)


def open_remote(repo_id: str, revision: str | None) -> RemoteRepo | None:
    """The repository at `revision`, resolved to its commit, with config.json (and the safetensors index) fetched;
    None where headers cannot be read remotely: offline (the hub cache answers), or no safetensors weights (only
    pickles, which have no header to read by range)."""
    from huggingface_hub import HfApi, constants, hf_hub_download

    if constants.is_offline_mode():
        return None
    try:
        info = HfApi().model_info(repo_id, revision=revision)
        files = {s.rfilename for s in info.siblings or []}
        if "model.safetensors" not in files and "model.safetensors.index.json" not in files:
            return None
        if "config.json" not in files:
            raise ConversionError(f"{repo_id} has no config.json: SOURCE must be a transformers model repository")
        config = Path(hf_hub_download(repo_id, "config.json", revision=info.sha))
        if "model.safetensors.index.json" in files:
            hf_hub_download(repo_id, "model.safetensors.index.json", revision=info.sha)
    except ConversionError:
        raise
    except Exception as e:  # huggingface_hub's errors: missing repo or revision, gated, network
        raise hub_error(repo_id, e) from e
    return RemoteRepo(repo_id, info.sha, config.parent, files)


def hub_error(repo_id: str, e: Exception) -> ConversionError:
    """One line for a failed hub request, with the fix its kind suggests."""
    from huggingface_hub import constants

    kind = type(e).__name__
    if constants.is_offline_mode():
        hint = "it is not in the local hub cache"
    elif kind == "GatedRepoError":
        hint = "the repository is gated: accept its terms on the hub, then log in (`hf auth login` or HF_TOKEN)"
    elif kind == "RevisionNotFoundError":
        hint = "check --revision (a branch, tag or commit of the repository)"
    elif kind == "RepositoryNotFoundError":
        hint = "check the id; a private repository also needs a login (`hf auth login` or HF_TOKEN)"
    else:
        hint = "check the id and the connection"
    first = str(e).strip().splitlines()[0] if str(e).strip() else kind
    return ConversionError(f"could not fetch {repo_id} from the hub ({kind}: {first}); {hint}")


def _read_range(repo_id: str, name: str, commit: str, start: int, length: int) -> tuple[bytes, int]:
    """Bytes [start, start + length) of a file of the repository at `commit`, and the file's size."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, name, revision=commit)
    headers = {**build_hf_headers(), "Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
    with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
        hf_raise_for_status(r)
        size = _file_size(r.headers, name)
        skip = start if r.status_code == 200 else 0  # Range ignored: the body starts at byte 0
        data = bytearray()
        for chunk in r.iter_bytes():
            data += chunk
            if len(data) >= skip + length:
                break  # closing the stream here: nothing past the header is read
    data = bytes(data[skip : skip + length])
    if len(data) != length:
        raise ConversionError(
            f"{repo_id}/{name}: the hub sent {len(data)} of the {length} header bytes asked for: retry, or download "
            "the checkpoint and pass its folder"
        )
    return data, size


def _file_size(headers: Any, name: str) -> int:
    """The whole file's size: after the slash of `Content-Range: bytes a-b/SIZE`, or the length of a 200 reply."""
    content_range = headers.get("Content-Range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    if headers.get("Content-Length", "").isdigit() and not content_range:
        return int(headers["Content-Length"])
    raise ConversionError(f"{name}: the hub's reply gives no file size (Content-Range {content_range!r})")
