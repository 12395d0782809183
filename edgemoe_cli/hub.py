"""`edgemoe pull`: fetch a registry model from the Hugging Face Hub into its cache, resumably, and verify it.

Why not a bare `snapshot_download`: huggingface_hub (2.x) retries a dropped connection with a Range request while the
process lives, but it downloads into a per-process `*.<uuid>.incomplete` file that it deletes on failure, so a pull
killed by a flaky board link starts again from zero. Here every file streams through huggingface_hub's `http_get`
into `blobs/<sha256>.incomplete` in the standard cache, which survives the process: a re-run sends `Range:` and
continues. Once a file is complete its sha256 (LFS files) or git blob id (small files) is checked against the Hub's
metadata before it is renamed to its blob name; `snapshot_download` then links the snapshot exactly as it always
does, and records the tree listing that offline runs (`HF_HUB_OFFLINE=1`) resolve from.

Environment, as huggingface_hub reads it: HF_ENDPOINT, HF_TOKEN, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE; plus
EDGEMOE_DISK_RESERVE (bytes, or 512M / 2G) kept free on the download disk.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, registry, store
from .errors import EdgeMoEError
from .units import human_bytes as human
from .units import parse_size

DEFAULT_RESERVE = 512 << 20
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class RemoteFile:
    name: str
    size: int
    git_oid: str
    sha256: str | None  # LFS files only: what the Hub says the content hashes to

    @property
    def blob(self) -> str:
        # the name huggingface_hub gives the cached blob: the LFS sha256, else the git blob id (the Hub's ETag)
        return self.sha256 or self.git_oid


@dataclass
class PulledFile:
    name: str
    size: int
    sha256: str
    lfs: bool
    status: str  # downloaded | resumed | cached


@dataclass
class PullResult:
    name: str
    repo: str
    revision: str
    commit: str
    format: str
    quant: str | None
    path: str
    manifest: str
    files: list[PulledFile] = field(default_factory=list)
    total_bytes: int = 0
    downloaded_bytes: int = 0
    offline: bool = False


class PullProgress:
    """What `pull` reports while it works; cli/hub.py renders it with rich. All methods are optional no-ops."""

    def begin(self, files: list[RemoteFile], total: int, done: int) -> None: ...
    def file_begin(self, name: str, size: int, initial: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def file_end(self, name: str) -> None: ...


# ---- where things are ----


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def hf_cache_dir() -> Path:
    """huggingface_hub's cache, read from the environment now (its constants are frozen at import)."""
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env).expanduser()
    if env := os.environ.get("HF_HOME"):
        return Path(env).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def disk_reserve() -> int:
    raw = os.environ.get("EDGEMOE_DISK_RESERVE", "").strip()
    if not raw:
        return DEFAULT_RESERVE
    return parse_size(raw, "EDGEMOE_DISK_RESERVE")


def _storage_folder(cache_dir: Path, repo: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir / repo_folder_name(repo_id=repo, repo_type="model")


def _free_bytes(path: Path) -> int:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return shutil.disk_usage("/").free


# ---- what to fetch ----


@dataclass
class Target:
    name: str
    repo: str
    revision: str
    format: str
    quant: str | None
    patterns: list[str]


def target(name: str, fmt: str = "safetensors", quant: str | None = None, revision: str | None = None) -> Target:
    entry = registry.get(name)
    if entry.source != "hub":
        raise EdgeMoEError(
            f"'{entry.name}' is a local checkpoint at {entry.path}, nothing to pull",
            f"use it directly: `edgemoe convert {entry.name}`",
        )
    if fmt not in registry.FORMATS:
        raise EdgeMoEError(f"unknown format '{fmt}'", "use --format safetensors or --format gguf")
    if fmt == "safetensors":
        if quant:
            raise EdgeMoEError("--quant applies to --format gguf only", "drop --quant, or add --format gguf")
        return Target(entry.name, entry.repo, revision or entry.revision, fmt, None, list(entry.allow_patterns))
    if entry.gguf is None:
        raise EdgeMoEError(f"'{entry.name}' has no GGUF repo in the registry", "pull safetensors and convert them")
    quant = quant or entry.gguf.default_quant
    return Target(
        entry.name, entry.gguf.repo, revision or entry.gguf.revision, fmt, quant, entry.gguf.allow_patterns(quant)
    )


def _hub_error(e: Exception, t: Target, endpoint: str) -> EdgeMoEError:
    """huggingface_hub's exceptions -> one line naming the repo/revision and what to do."""
    import httpx2
    from huggingface_hub import errors

    where = f"{t.repo}@{t.revision}"
    if isinstance(e, errors.GatedRepoError):
        return EdgeMoEError(
            f"{t.repo} is gated and this token may not download it",
            f"accept its terms on {endpoint}/{t.repo} and pass --token or set HF_TOKEN",
        )
    if isinstance(e, errors.RevisionNotFoundError):
        return EdgeMoEError(
            f"revision '{t.revision}' does not exist in {t.repo}",
            "pass --revision with a branch, tag or commit of that repo",
        )
    if isinstance(e, errors.RepositoryNotFoundError):
        return EdgeMoEError(
            f"repository {t.repo} not found on {endpoint} (or it is private)",
            "check the repo in configs/models.toml, or pass --token for a private repo",
        )
    if isinstance(e, errors.HfHubHTTPError) and e.response is not None and e.response.status_code == 401:
        return EdgeMoEError(f"{endpoint} refused the token for {where}", "check --token / HF_TOKEN")
    if isinstance(e, errors.OfflineModeIsEnabled):
        return EdgeMoEError(f"HF_HUB_OFFLINE is set and {where} is not fully cached", "unset HF_HUB_OFFLINE")
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return EdgeMoEError(
            f"{endpoint} lists a file of {where} that it then does not serve ({str(e).splitlines()[0]})",
            "try again later; if it repeats, the repo or mirror is broken",
        )
    if isinstance(e, errors.HfHubHTTPError) and e.response is not None:
        return EdgeMoEError(
            f"{endpoint} answered HTTP {e.response.status_code} for {where}: {str(e).splitlines()[0]}",
            "try again later; check HF_ENDPOINT if it repeats",
        )
    if isinstance(e, (httpx2.TransportError, OSError)):
        return EdgeMoEError(
            f"cannot reach {endpoint} for {where}: {e.__class__.__name__}: {str(e).splitlines()[0]}",
            "check the network (or set HF_HUB_OFFLINE=1 to use the cache)",
        )
    return EdgeMoEError(f"the Hub answered an error for {where}: {str(e).splitlines()[0]}", "try again later")


def remote_files(t: Target, token: str | None = None) -> tuple[str, list[RemoteFile]]:
    """Ask the Hub (one model-info call) for the commit `t.revision` is at and the matching files with sizes/hashes."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    endpoint = hub_endpoint()
    try:
        info = HfApi(endpoint=endpoint, token=token, library_name="edgemoe", library_version=__version__).model_info(
            t.repo, revision=t.revision, files_metadata=True
        )
    except Exception as e:
        raise _hub_error(e, t, endpoint) from e
    siblings = {s.rfilename: s for s in info.siblings or []}
    wanted = sorted(filter_repo_objects(list(siblings), allow_patterns=t.patterns))
    if not wanted:
        hint = f"patterns {t.patterns} match nothing in {t.repo}"
        if t.format == "gguf":
            quants = sorted(
                {m[1] for f in siblings if (m := re.search(r"-((?:UD-)?[A-Z0-9_]+?)(?:-\d+-of-\d+)?\.gguf$", f))}
            )
            raise EdgeMoEError(f"{t.repo} has no {t.quant} GGUF", f"available quants: {', '.join(quants) or 'none'}")
        raise EdgeMoEError(f"nothing to pull from {t.repo}@{t.revision}", hint)
    files = [
        RemoteFile(
            n,
            siblings[n].lfs.size if siblings[n].lfs else (siblings[n].size or 0),
            siblings[n].blob_id,
            siblings[n].lfs.sha256 if siblings[n].lfs else None,
        )
        for n in wanted
    ]
    return _checked_commit(info.sha, t, endpoint), [_checked_file(f, t, endpoint) for f in files]


# What the endpoint says becomes cache paths (blobs/<sha256 or git id>, snapshots/<commit>/<name>) and byte counts:
# HF_ENDPOINT may be any mirror or proxy, so each value is checked for its shape before it is used at all.
_FILE_NAME_PART = re.compile(r"[A-Za-z0-9._+=@,-]+")


def _untrusted(t: Target, endpoint: str, what: str) -> EdgeMoEError:
    return EdgeMoEError(
        f"{endpoint} sent an invalid {what} for {t.repo}@{t.revision}",
        "HF_ENDPOINT points at a broken or hostile mirror: unset it or use another",
    )


def _checked_commit(commit, t: Target, endpoint: str) -> str:
    if not (isinstance(commit, str) and _HEX40.match(commit)):
        raise _untrusted(t, endpoint, f"commit id {str(commit)[:80]!r}")
    return commit


def _checked_file(f: RemoteFile, t: Target, endpoint: str) -> RemoteFile:
    parts = f.name.split("/") if isinstance(f.name, str) else [""]
    if any(p in ("", ".", "..") or not _FILE_NAME_PART.fullmatch(p) for p in parts):
        raise _untrusted(t, endpoint, f"file name {str(f.name)[:80]!r}")
    if not (isinstance(f.git_oid, str) and _HEX40.match(f.git_oid)):
        raise _untrusted(t, endpoint, f"git id {str(f.git_oid)[:80]!r} of {f.name}")
    if f.sha256 is not None and not (isinstance(f.sha256, str) and _SHA256.match(f.sha256)):
        raise _untrusted(t, endpoint, f"sha256 {str(f.sha256)[:80]!r} of {f.name}")
    if type(f.size) is not int or not 0 <= f.size < 1 << 50:
        raise _untrusted(t, endpoint, f"size {str(f.size)[:40]!r} of {f.name}")
    return f


# ---- download, resume, verify ----


def _partial(storage: Path, f: RemoteFile) -> Path:
    return storage / "blobs" / f"{f.blob}.incomplete"


def _local_state(storage: Path, f: RemoteFile) -> tuple[Path | None, int]:
    """(complete blob or None, bytes of a partial download already on disk).

    A cached blob of the wrong size (truncated, or grown) is not complete: it goes back to being a partial
    download, resumed when shorter and fetched again when longer, and verified either way."""
    blob = storage / "blobs" / f.blob
    if blob.is_file():
        have = blob.stat().st_size
        if have == f.size:
            return blob, f.size
        part = _partial(storage, f)
        if not part.exists() or part.stat().st_size < have <= f.size:
            os.replace(blob, part)
        else:
            blob.unlink()
    part = _partial(storage, f)
    return None, part.stat().st_size if part.is_file() else 0


def _verify(path: Path, f: RemoteFile) -> tuple[bool, str]:
    """Check content against the Hub's metadata. Returns (ok, sha256 of the content)."""
    sha = store.sha256_file(path)
    if f.sha256:
        return sha == f.sha256, sha
    return _git_blob_id(path) == f.git_oid, sha


def _git_blob_id(path: Path, chunk: int = 1 << 22) -> str:
    """git's id of a file's content (sha1 of "blob <size>\\0" + content), streamed: the size is the mirror's word."""
    import hashlib

    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class _Bar:
    """The tqdm-shaped object huggingface_hub's http_get reports bytes to; forwards them to a PullProgress."""

    def __init__(self, progress: PullProgress, counter: list[int], **_):
        self.progress, self.counter = progress, counter

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        n = int(n or 0)
        self.counter[0] += n
        self.progress.advance(n)


def _download(url: str, headers: dict, part: Path, f: RemoteFile, progress: PullProgress, counter: list[int]) -> None:
    from huggingface_hub.file_download import http_get

    resume = part.stat().st_size if part.is_file() else 0
    if resume > f.size:  # not ours or from a different upload: start over
        part.unlink()
        resume = 0
    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "r+b" if resume else "wb") as out:
        out.seek(resume)
        http_get(
            url,
            out,
            resume_size=resume,
            headers=headers,
            expected_size=f.size,
            displayed_filename=f.name,
            tqdm_class=lambda **kw: _Bar(progress, counter, **kw),
        )


def preflight(storage: Path, files: list[RemoteFile]) -> tuple[int, int, int]:
    """(bytes still to download, free bytes, reserve). Raises before any byte is fetched when the disk is short."""
    need = sum(f.size - _local_state(storage, f)[1] for f in files)
    free, reserve = _free_bytes(storage), disk_reserve()
    if need + reserve > free:
        raise EdgeMoEError(
            f"not enough disk space under {storage}: the pull needs {human(need)} more "
            f"({len(files)} files), {human(free)} is free and {human(reserve)} is kept in reserve",
            "free some space, pull to a bigger disk with --dest DIR, or lower EDGEMOE_DISK_RESERVE",
        )
    return need, free, reserve


def _fetch_file(
    t: Target,
    storage: Path,
    f: RemoteFile,
    url: str,
    headers: dict,
    progress: PullProgress,
    counter: list[int],
    trusted: set,
) -> PulledFile | str:
    """Download (or resume) one file into its blob and verify it: the PulledFile, or why it was deleted."""
    blob, have = _local_state(storage, f)
    if blob is not None:
        status, path = "cached", blob
    else:
        status, path = ("resumed" if have else "downloaded"), _partial(storage, f)
        progress.file_begin(f.name, f.size, have)
        try:
            _download(url, headers, path, f, progress, counter)
        except EdgeMoEError:
            raise
        except Exception as e:
            got = path.stat().st_size if path.is_file() else 0
            if 0 < got < f.size:
                raise EdgeMoEError(
                    f"download of {f.name} from {t.repo} broke off at {human(got)} of {human(f.size)} "
                    f"({e.__class__.__name__})",
                    f"re-run the same command to resume from there (the partial file is kept in {path.parent})",
                ) from e
            raise _hub_error(e, t, hub_endpoint()) from e
        finally:
            progress.file_end(f.name)
    if status == "cached" and f.sha256 and (f.name, f.sha256) in trusted:
        sha = f.sha256  # verified by the pull that wrote the manifest; rehashing 40 GB on a board takes minutes
    else:
        ok, sha = _verify(path, f)
        if not ok:
            path.unlink()
            return f"{f.name} (sha256 {sha[:12]}…, the Hub says {(f.sha256 or f.git_oid)[:12]}…)"
    if path != storage / "blobs" / f.blob:
        os.replace(path, storage / "blobs" / f.blob)
    return PulledFile(f.name, f.size, sha, f.sha256 is not None, status)


def pull(
    name: str,
    fmt: str = "safetensors",
    quant: str | None = None,
    revision: str | None = None,
    dest: str | Path | None = None,
    token: str | None = None,
    progress: PullProgress | None = None,
) -> PullResult:
    """Fetch registry model `name` (all its files, or one GGUF quant) and record it in the store."""
    from huggingface_hub.utils import logging as hf_logging

    # huggingface_hub logs each retry on stderr; the outcome reaches the user as our result or one EdgeMoEError
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return _pull(name, fmt, quant, revision, dest, token, progress)
    finally:
        hf_logging.set_verbosity(level)


def _pull(name, fmt, quant, revision, dest, token, progress) -> PullResult:
    progress = progress or PullProgress()
    t = target(name, fmt, quant, revision)
    cache_dir = Path(dest).expanduser().resolve() if dest else hf_cache_dir()
    storage = _storage_folder(cache_dir, t.repo)
    if _env_true("HF_HUB_OFFLINE"):
        return _pull_offline(t, cache_dir, storage)

    commit, files = remote_files(t, token)
    from huggingface_hub import hf_hub_url, snapshot_download
    from huggingface_hub.utils import WeakFileLock, build_hf_headers, disable_progress_bars

    preflight(storage, files)
    endpoint = hub_endpoint()
    headers = build_hf_headers(token=token, library_name="edgemoe", library_version=__version__)
    headers["Accept-Encoding"] = "identity"  # byte counts and Range offsets must be of the stored file

    previous = registry.read_manifest(registry.store_entry(t.name, t.format, t.quant)) or {}
    trusted = {(x["name"], x.get("sha256")) for x in previous.get("files", []) if previous.get("commit") == commit}
    progress.begin(files, sum(f.size for f in files), sum(_local_state(storage, f)[1] for f in files))

    counter, pulled, bad = [0], [], []
    url = lambda f: hf_hub_url(t.repo, f.name, revision=commit, endpoint=endpoint)  # noqa: E731
    # small files first: a dropped link then costs a resume of one big file, not a re-fetch of the small ones
    for f in sorted(files, key=lambda f: f.size):
        # huggingface_hub's own lock for this blob: a concurrent pull or hf_hub_download waits instead of
        # appending to the same partial file
        with WeakFileLock(cache_dir / ".locks" / storage.name / f"{f.blob}.lock"):
            done = _fetch_file(t, storage, f, url(f), headers, progress, counter, trusted)
        if isinstance(done, PulledFile):
            pulled.append(done)
        else:
            bad.append(done)
    if bad:
        raise EdgeMoEError(
            f"checksum mismatch, deleted: {'; '.join(bad)}",
            "re-run the pull to fetch them again; if it repeats, a proxy or mirror is corrupting data",
        )

    # Let huggingface_hub link snapshots/<commit>/ to the blobs and record the tree listing and refs for offline use.
    try:
        with disable_progress_bars():
            snapshot = snapshot_download(
                t.repo,
                revision=t.revision,
                cache_dir=str(cache_dir),
                token=token,
                endpoint=endpoint,
                allow_patterns=[f.name for f in files],
                library_name="edgemoe",
                library_version=__version__,
            )
    except Exception as e:
        raise _hub_error(e, t, endpoint) from e
    if Path(snapshot).name != commit:
        raise EdgeMoEError(
            f"{t.repo}@{t.revision} moved to {Path(snapshot).name} during the pull",
            "re-run the pull, or pin a commit with --revision",
        )
    return _record(t, commit, Path(snapshot), sorted(pulled, key=lambda p: p.name), counter[0], offline=False)


def _record(
    t: Target, commit: str, snapshot: Path, files: list[PulledFile], downloaded: int, offline: bool
) -> PullResult:
    entry_dir = registry.store_entry(t.name, t.format, t.quant)
    entry_dir.mkdir(parents=True, exist_ok=True)
    from huggingface_hub import __version__ as hf_version

    result = PullResult(
        name=t.name,
        repo=t.repo,
        revision=t.revision,
        commit=commit,
        format=t.format,
        quant=t.quant,
        path=str(snapshot),
        manifest=str(entry_dir / "manifest.json"),
        files=files,
        total_bytes=sum(f.size for f in files),
        downloaded_bytes=downloaded,
        offline=offline,
    )
    store.write_manifest(
        entry_dir,
        kind="pull",
        name=t.name,
        repo=t.repo,
        revision=t.revision,
        commit=commit,
        format=t.format,
        quant=t.quant,
        path=str(snapshot),
        total_bytes=result.total_bytes,
        files=[{"name": f.name, "size": f.size, "sha256": f.sha256, "lfs": f.lfs} for f in files],
        pulled_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        tools={"edgemoe": __version__, "huggingface_hub": hf_version},
        endpoint=hub_endpoint(),
    )
    return result


def _pull_offline(t: Target, cache_dir: Path, storage: Path) -> PullResult:
    """HF_HUB_OFFLINE=1: use what the cache holds for this revision, or say exactly what is missing."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    hint = f"connect and run `edgemoe pull {t.name}` (unset HF_HUB_OFFLINE); interrupted files resume"
    commit = t.revision if _HEX40.match(t.revision) else None
    ref = storage / "refs" / t.revision
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
        commit = commit if _HEX40.match(commit) else None  # a damaged ref names no snapshot
    try:
        tree = get_cached_repo_tree(t.repo, revision=commit or t.revision, cache_dir=str(cache_dir)) if commit else None
    except CachedRepoTreeNotFoundError:
        tree = None
    if tree is None:
        raise EdgeMoEError(
            f"offline (HF_HUB_OFFLINE) and {t.repo}@{t.revision} is not in the cache {cache_dir}: "
            f"missing every file matching {', '.join(t.patterns)}",
            hint,
        )
    by_name = {e.path: e for e in tree}
    wanted = sorted(filter_repo_objects(list(by_name), allow_patterns=t.patterns))
    snapshot = storage / "snapshots" / commit
    missing = [n for n in wanted if not (snapshot / n).is_file()]
    if missing or not wanted:
        raise EdgeMoEError(
            f"offline (HF_HUB_OFFLINE) and {len(missing)} of {len(wanted)} files of "
            f"{t.repo}@{commit[:12]} are not in {cache_dir}: {', '.join(missing[:6])}"
            f"{' …' if len(missing) > 6 else ''}",
            hint,
        )
    files = []
    for n in wanted:
        # the cached tree keeps git ids only; an LFS file's blob is named by its sha256, which is what we check
        blob_name = Path(os.path.realpath(snapshot / n)).name
        f = RemoteFile(n, by_name[n].size, by_name[n].blob_id, blob_name if _SHA256.match(blob_name) else None)
        ok, sha = _verify(snapshot / n, f)
        if not ok:
            raise EdgeMoEError(
                f"cached {n} of {t.repo}@{commit[:12]} does not match its checksum",
                f"delete it from {storage} and pull again online",
            )
        files.append(PulledFile(n, f.size, sha, f.sha256 is not None, "cached"))
    return _record(t, commit, snapshot, files, 0, offline=True)
