"""A local hub on 127.0.0.1 for tests: the endpoints huggingface_hub 2.x calls to read a model repository and to
publish one, with byte counts of what it sent.

Reading: `GET /api/models/{repo}[/revision/{rev}]` (info: sha, siblings), `GET /api/models/{repo}/tree/{rev}`
(the file list `snapshot_download` reads), `HEAD|GET /{repo}/resolve/{rev}/{path}` with `X-Repo-Commit`, `ETag`,
`X-Linked-Etag`/`X-Linked-Size` for LFS files and `Range` honoured (206 + `Content-Range`).
Publishing: `GET /api/whoami-v2`, `POST /api/repos/create`, `POST /api/validate-yaml`,
`POST /api/models/{repo}/preupload/{rev}` (safetensors go by LFS, as .gitattributes has them on the hub),
`POST /{repo}.git/info/lfs/objects/batch` and `PUT /lfs-upload/{oid}` (basic transfer),
`POST /api/models/{repo}/commit/{rev}` (ndjson). Writes need `Authorization: Bearer <token>`.

`weight_bytes_sent` counts every byte sent from inside the tensor data of a `.safetensors` file (past its header):
what `inspect` and `--dry-run` must never ask for. The server stops by itself after `lifetime` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

TOKEN = "hf_local_test_token"
USER = "me"  # the token's user: a repository name without a namespace goes there
LFS_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass
class Repo:
    files: dict[str, bytes]
    private: bool = False
    commits: list[str] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)

    def commit(self, summary: str) -> str:
        digest = hashlib.sha1(summary.encode() + str(len(self.commits)).encode())
        for name in sorted(self.files):
            digest.update(name.encode() + _tree_entry(name, self.files[name])["oid"].encode())
        sha = digest.hexdigest()
        self.commits.append(sha)
        self.refs["main"] = sha
        return sha


class OnDisk:
    """A file served from disk, never read whole: len() and slices like bytes (a benchmark's sparse 10 GB shard)."""

    def __init__(self, path: Path) -> None:
        self.path, self.size = path, path.stat().st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, part: slice) -> bytes:
        start, stop, _ = part.indices(self.size)
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(max(0, stop - start))


def header_end(data: bytes | OnDisk) -> int:
    """Where a safetensors file's tensor data starts (8 + the header length)."""
    return 8 + struct.unpack("<Q", data[:8])[0]


class FakeHub:
    """The server and what it holds: `repos` (repo id -> Repo), `sent` (bytes per file path), `requests`."""

    def __init__(self, lifetime: float = 300.0) -> None:
        self.repos: dict[str, Repo] = {}
        self.sent: Counter[str] = Counter()
        self.weight_bytes_sent = 0
        self.requests: list[tuple[str, str]] = []
        self.lfs: dict[str, bytes] = {}
        self.broken: set[str] = set()  # file names whose reads fail (500), as a hub having a bad moment
        self.refuse_commits = False  # set: every commit is refused (403), as a repository without write access
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.timer = threading.Timer(lifetime, self.stop)  # bounded: never outlives a hung test
        self.timer.daemon = True

    def __enter__(self) -> FakeHub:
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, folder: Path, extra: dict[str, bytes] | None = None, on_disk: bool = False) -> str:
        """Publish every file of `folder` (plus `extra`) as one commit of `repo_id`; its sha. `on_disk`: serve the
        files from disk instead of memory (their hashes then stand in for content hashes)."""
        files = {p.name: OnDisk(p) if on_disk else p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        repo = self.repos[repo_id] = Repo({**files, **(extra or {})})
        return repo.commit("initial commit")

    def reset_counts(self) -> None:
        with self.lock:
            self.sent.clear()
            self.weight_bytes_sent = 0
            self.requests.clear()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: tests read hub.requests
            pass

        # --- plumbing
        def reply(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            if "Content-Length" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def json(self, status: int, obj, headers: dict | None = None) -> None:
            self.reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def error(self, status: int, code: str, message: str) -> None:
            self.json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

        def body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {TOKEN}":
                return True
            self.error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return False

        def repo(self, repo_id: str, rev: str | None) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and self.headers.get("Authorization") != f"Bearer {TOKEN}"):
                self.error(401, "RepoNotFound", "Repository not found")
                return None
            sha = rev if rev in repo.commits else repo.refs.get(rev or "main")
            if sha is None:
                self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            return repo, sha

        # --- reading
        def do_HEAD(self) -> None:
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:
            path = unquote(urlparse(self.path).path)
            with hub.lock:
                hub.requests.append(("HEAD" if head else "GET", path))
            if path == "/api/whoami-v2":
                if self.authorized():
                    self.json(200, {"type": "user", "name": USER, "auth": {"type": "access_token"}})
                return
            m = re.fullmatch(r"/api/models/([\w.-]+/[\w.-]+)(?:/revision/([^/]+))?", path)
            if m:
                found = self.repo(m.group(1), m.group(2))
                if found:
                    repo, sha = found
                    siblings = [{"rfilename": n} for n in sorted(repo.files)]
                    self.json(200, {"id": m.group(1), "sha": sha, "private": repo.private, "siblings": siblings})
                return
            m = re.fullmatch(r"/api/models/([\w.-]+/[\w.-]+)/tree/([^/]+)(/.*)?", path)
            if m:
                found = self.repo(m.group(1), m.group(2))
                if found:
                    self.json(200, [_tree_entry(n, d) for n, d in sorted(found[0].files.items())])
                return
            m = re.fullmatch(r"/([\w.-]+/[\w.-]+)/resolve/([^/]+)/(.+)", path)
            if m:
                self.resolve(m.group(1), m.group(2), m.group(3), head)
                return
            self.error(404, "NotFound", f"no route {path}")

        def resolve(self, repo_id: str, rev: str, name: str, head: bool) -> None:
            found = self.repo(repo_id, rev)
            if not found:
                return
            repo, sha = found
            if name not in repo.files:
                self.error(404, "EntryNotFound", f"{name} does not exist at {sha}")
                return
            if name in hub.broken:
                self.error(500, "InternalError", "Internal Error - We're working hard to fix this as soon as possible!")
                return
            data = repo.files[name]
            entry = _tree_entry(name, data)
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            if "lfs" in entry:
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": len(data)})
            start, stop, status = 0, len(data), 200
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged:
                start = int(ranged.group(1))
                stop = min(int(ranged.group(2)) + 1, len(data)) if ranged.group(2) else len(data)
                if start >= len(data):
                    self.reply(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            headers["Content-Length"] = stop - start
            if not head:
                with hub.lock:
                    hub.sent[name] += stop - start
                    if name.endswith(".safetensors"):
                        hub.weight_bytes_sent += max(0, stop - max(start, header_end(data)))
            self.reply(status, data[start:stop], headers, head)

        # --- publishing
        def do_POST(self) -> None:
            path = unquote(urlparse(self.path).path)
            body = self.body()
            with hub.lock:
                hub.requests.append(("POST", path))
            if path == "/api/validate-yaml":
                self.json(200, {"errors": [], "warnings": []})
                return
            if not self.authorized():
                return
            if path == "/api/repos/create":
                self.create(json.loads(body))
                return
            m = re.fullmatch(r"/api/models/([\w.-]+/[\w.-]+)/preupload/([^/]+)", path)
            if m:
                if self.repo(m.group(1), m.group(2)):
                    self.preupload(json.loads(body))
                return
            m = re.fullmatch(r"/([\w.-]+/[\w.-]+)\.git/info/lfs/objects/batch", path)
            if m:
                self.lfs_batch(json.loads(body))
                return
            m = re.fullmatch(r"/api/models/([\w.-]+/[\w.-]+)/commit/([^/]+)", path)
            if m:
                if self.repo(m.group(1), m.group(2)):
                    self.commit(m.group(1), body)
                return
            self.error(404, "NotFound", f"no route {path}")

        def preupload(self, payload: dict) -> None:
            modes = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                    "shouldIgnore": False,
                }
                for f in payload["files"]
            ]
            self.json(200, {"files": modes})

        def lfs_batch(self, payload: dict) -> None:
            objects = []
            for o in payload["objects"]:
                action = {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}", "header": {}}}
                objects.append({**o, "authenticated": True, **({} if o["oid"] in hub.lfs else {"actions": action})})
            self.json(200, {"transfer": "basic", "objects": objects})

        def do_PUT(self) -> None:
            path = unquote(urlparse(self.path).path)
            body = self.body()
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
            if not m or hashlib.sha256(body).hexdigest() != m.group(1):
                self.error(400, "BadRequest", "LFS object does not match its oid")
                return
            with hub.lock:
                hub.lfs[m.group(1)] = body
                hub.requests.append(("PUT", path))
            self.reply(200)

        def create(self, payload: dict) -> None:
            repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
            url = f"{hub.url}/{repo_id}"
            if repo_id in hub.repos:
                self.json(409, {"error": "You already created this model repo", "url": url})
                return
            private = payload.get("private", payload.get("visibility") == "private")
            repo = hub.repos[repo_id] = Repo({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            repo.private = bool(private)
            repo.commit("initial commit")
            self.json(200, {"url": url, "name": repo_id})

        def commit(self, repo_id: str, body: bytes) -> None:
            if hub.refuse_commits:
                self.error(403, "Forbidden", "You don't have the rights to create a commit on this repository")
                return
            repo, files, summary = hub.repos[repo_id], dict(hub.repos[repo_id].files), ""
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                elif key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        self.error(400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                        return
                    files[value["path"]] = hub.lfs[value["oid"]]
                elif key == "deletedFile":
                    files.pop(value["path"], None)
            repo.files = files
            sha = repo.commit(summary)
            self.json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})

    return Handler


def _tree_entry(name: str, data: bytes | OnDisk) -> dict:
    """A file as the tree listing gives it: git blob oid and size, and the LFS pointer for weight files."""
    entry = {"type": "file", "path": name, "size": len(data)}
    content = f"{data.path}:{data.size}".encode() if isinstance(data, OnDisk) else data  # never hash GBs
    entry["oid"] = hashlib.sha1(b"blob %d\0" % len(data) + content).hexdigest()
    if name.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry
