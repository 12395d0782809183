"""A small local Hugging Face Hub: the parts of its HTTP API that huggingface_hub uses to pull a model.

Point HF_ENDPOINT at `HubServer.url` and huggingface_hub talks to it as to huggingface.co:

    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]   model info: commit sha, siblings with size/blobId/lfs
    GET  /api/models/{repo}/tree/{rev}[?recursive=...]      tree listing (what snapshot_download caches)
    POST /api/models/{repo}/paths-info/{rev}                per-path info (get_paths_info)
    HEAD /{repo}/resolve/{rev}/{path}                       X-Repo-Commit, ETag (git oid, or sha256 for LFS files),
                                                            X-Linked-Etag / X-Linked-Size for LFS files
    GET  /{repo}/resolve/{rev}/{path}                       the bytes, with Range (206 + Content-Range)

Errors as the Hub sends them: 404 with X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound, 401 GatedRepo
for a gated repo without an accepted token. No Xet headers are ever sent, so downloads take the plain HTTP path.

Fault knobs (set on the instance while it runs): `drop_at[path] = offset` cuts every response of that file at that
absolute offset (a link that keeps dying at the same place); `corrupt[path] = offset` flips one byte there;
`fake_size[path] = n` reports n bytes in the metadata; `bytes_served[(repo, path)]` counts body bytes sent.

It binds 127.0.0.1 on an ephemeral port and shuts itself down after `lifetime` seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# extensions the Hub's default .gitattributes stores in LFS
LFS_SUFFIXES = (".safetensors", ".gguf", ".model", ".bin", ".npz", ".pt", ".h5", ".onnx")


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubFile:
    path: str
    source: Path
    size: int
    oid: str
    sha256: str | None  # set for LFS files

    @classmethod
    def from_path(cls, path: str, source: Path) -> "HubFile":
        data = source.read_bytes()
        lfs = path.endswith(LFS_SUFFIXES)
        return cls(path, source, len(data), git_oid(data), hashlib.sha256(data).hexdigest() if lfs else None)

    @property
    def etag(self) -> str:
        return self.sha256 or self.oid


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    commit: str
    branches: dict[str, str] = field(default_factory=dict)
    gated: bool = False

    @classmethod
    def from_dir(
        cls,
        repo_id: str,
        directory: Path,
        commit: str | None = None,
        gated: bool = False,
        extra: dict[str, Path] | None = None,
    ) -> "HubRepo":
        """A repo holding the top-level files of `directory` (plus `extra` name -> path), at one commit on main."""
        sources = {p.name: p for p in sorted(Path(directory).iterdir()) if p.is_file()} if directory else {}
        sources.update(extra or {})
        files = {name: HubFile.from_path(name, p) for name, p in sources.items()}
        commit = commit or hashlib.sha1("".join(f.oid for f in files.values()).encode() + repo_id.encode()).hexdigest()
        return cls(repo_id, files, commit, {"main": commit}, gated)


class HubServer:
    def __init__(self, repos: list[HubRepo], tokens: tuple[str, ...] = ("hf_accepted",), lifetime: float = 600):
        self.repos = {r.repo_id: r for r in repos}
        self.tokens = set(tokens)
        self.drop_at: dict[str, int] = {}
        self.corrupt: dict[str, int] = {}
        self.fake_size: dict[str, int] = {}
        self.gone: set[str] = set()  # files listed in model info whose download answers 404 EntryNotFound
        self.bytes_served: Counter = Counter()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def __enter__(self) -> "HubServer":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    def content_bytes(self, path: str | None = None) -> int:
        """Body bytes of resolve GETs served so far, for one file name or all."""
        return sum(n for (_, p), n in self.bytes_served.items() if path is None or p == path)

    def size_of(self, f: HubFile) -> int:
        return self.fake_size.get(f.path, f.size)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: pytest shows failures, not access logs
        pass

    # ---- plumbing ----

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        self._send(
            status,
            json.dumps({"error": message}).encode(),
            {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message},
            head,
        )

    def _lookup(self, repo_id: str, rev: str | None, head: bool = False):
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None, None
        rev = unquote(rev) if rev else "main"
        commit = repo.branches.get(rev) or (rev if rev == repo.commit else None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            return repo, None
        return repo, commit

    def _authorized(self, repo: HubRepo) -> bool:
        auth = self.headers.get("Authorization", "")
        return not repo.gated or auth.removeprefix("Bearer ").strip() in self.hub.tokens

    def _file_json(self, f: HubFile, tree: bool) -> dict:
        size = self.hub.size_of(f)
        if tree:
            out = {"type": "file", "oid": f.oid, "size": size, "path": f.path}
            if f.sha256:
                out["lfs"] = {"oid": f.sha256, "size": size, "pointerSize": 134}
            return out
        out = {"rfilename": f.path, "size": size, "blobId": f.oid}
        if f.sha256:
            out["lfs"] = {"sha256": f.sha256, "size": size, "pointerSize": 134}
        return out

    # ---- routes ----

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/([^/]+)", url.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        if not m:
            return self._error(404, "EntryNotFound", "no such route")
        repo, commit = self._lookup(m[1], m[2])
        if commit is None:
            return
        form = parse_qs(body) if "json" not in (self.headers.get("Content-Type") or "") else json.loads(body)
        paths = form.get("paths", [])
        self._json([self._file_json(repo.files[p], tree=True) for p in paths if p in repo.files])

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        with self.hub._lock:
            self.hub.requests.append((self.command, path))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", url.path):
            repo, commit = self._lookup(m[1], m[2])
            if commit is None:
                return
            return self._json(
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": commit,
                    "private": False,
                    "gated": "auto" if repo.gated else False,
                    "disabled": False,
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                    "library_name": "transformers",
                    "siblings": [self._file_json(f, tree=False) for f in repo.files.values()],
                }
            )
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", url.path):
            repo, commit = self._lookup(m[1], m[2])
            if commit is None:
                return
            return self._json([self._file_json(f, tree=True) for f in repo.files.values()])
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path):
            return self._resolve(m[1], m[2], unquote(m[3]), head)
        self._error(404, "EntryNotFound", "no such route", head)

    def _resolve(self, repo_id: str, rev: str, name: str, head: bool) -> None:
        repo, commit = self._lookup(repo_id, rev, head)
        if commit is None:
            return
        if not self._authorized(repo):
            return self._error(401, "GatedRepo", "Access to this model is restricted; accept its terms first", head)
        f = repo.files.get(name)
        if f is None or name in self.hub.gone:
            return self._error(404, "EntryNotFound", f"{name} does not exist at {commit}", head)
        size = self.hub.size_of(f)
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if f.sha256:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": size}
        if head:
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(size))
            self.end_headers()
            return
        data = f.source.read_bytes()
        start, end, status = 0, len(data) - 1, 200
        if rng := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
            start = int(rng[1])
            end = min(int(rng[2]), end) if rng[2] else end
            if start > end:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = bytearray(data[start : end + 1])
        if (at := self.hub.corrupt.get(name)) is not None and start <= at <= end:
            body[at - start] ^= 0xFF
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        stop = len(body)
        if (at := self.hub.drop_at.get(name)) is not None:
            stop = max(0, min(stop, at - start))
        sent = 0
        try:
            while sent < stop:
                chunk = bytes(body[sent : min(stop, sent + (1 << 16))])
                self.wfile.write(chunk)
                sent += len(chunk)
                with self.hub._lock:
                    self.hub.bytes_served[(repo.repo_id, name)] += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if stop < len(body):  # the fault: a link that dies mid-file
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
