"""A thin client of the coordinator's ``CampaignService``, doing what ``coordinator submit``,
``status``, ``watch``, ``cancel``/``pause``/``resume`` and ``artifact get`` do."""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from ._proto import campaign_pb2, campaign_pb2_grpc, spec_pb2
from .artifacts import is_digest, parse_digest, parse_manifest, receive_to_file, safe_join
from .errors import ArtifactError, DistilleryError, RpcError
from .status import is_terminal

DEFAULT_ADDR = "http://127.0.0.1:7070"
# The coordinator's message bound (proto/src/client.rs MAX_MESSAGE_BYTES); artifacts move in
# chunks of at most 1 MiB.
MAX_MESSAGE_BYTES = 16 << 20
# A manifest lists a model's files; anything this large is a file artifact, not a manifest.
_MAX_MANIFEST_BYTES = 64 << 20

SpecInput = str | os.PathLike[str] | spec_pb2.CampaignSpec


@dataclass
class Download:
    """What :meth:`Client.download_artifact` wrote."""

    digest: str
    """The artifact's digest (64 hex characters): a directory's manifest, or the file."""
    directory: bool
    """True when the artifact was a directory manifest, unpacked into ``out_dir``."""
    files: list[Path] = field(default_factory=list)
    """Every file written, each checked against its sha256."""


def _target(addr: str) -> tuple[str, bool]:
    """``host:port`` for gRPC and whether to use TLS, from ``http(s)://HOST:PORT``."""
    u = urllib.parse.urlsplit(addr)
    if (
        u.scheme not in ("http", "https")
        or not u.hostname
        or "@" in u.netloc
        or u.path not in ("", "/")
        or u.query
        or u.fragment
    ):
        raise ValueError(
            f"{addr!r} is not a coordinator URL: use http://HOST:PORT or https://HOST:PORT"
        )
    tls = u.scheme == "https"
    netloc = u.netloc if u.port is not None else f"{u.netloc}:{443 if tls else 80}"
    return netloc, tls


def _token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    if not token:
        return ()
    if any(not (0x20 <= ord(ch) < 0x7F) for ch in token):
        raise ValueError("the token has characters a gRPC header cannot carry")
    return (("authorization", f"Bearer {token}"),)


class Client:
    """Talks to a coordinator.

    ``addr`` is ``http://HOST:PORT`` or ``https://HOST:PORT``; ``token`` is sent as
    ``authorization: Bearer <token>`` on every call (a ``client`` token of the coordinator's
    ``--tokens`` file); ``ca_cert`` is the CA certificate (a PEM path, or the PEM bytes) that
    signed an ``https`` coordinator's certificate (without it the system's roots are used).
    ``timeout`` bounds each unary call, in seconds. Failures raise :class:`RpcError` with the gRPC
    status code, or :class:`ArtifactError` for downloads that fail their checks.
    """

    def __init__(
        self,
        addr: str = DEFAULT_ADDR,
        token: str | None = None,
        ca_cert: str | os.PathLike[str] | bytes | None = None,
        *,
        timeout: float | None = 60.0,
    ) -> None:
        target, tls = _target(addr)
        self.addr = addr
        self.timeout = timeout
        self._metadata = _token_metadata(token)
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Reconnect to a restarted coordinator within seconds, not grpc's default 2 minutes.
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        if tls:
            root: bytes | None
            if ca_cert is None:
                root = None
            elif isinstance(ca_cert, bytes):
                root = ca_cert
            else:
                try:
                    root = Path(ca_cert).read_bytes()
                except OSError as e:
                    raise ValueError(f"cannot read CA certificate {ca_cert}: {e}") from e
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            if ca_cert is not None:
                raise ValueError(f"ca_cert is given but {addr!r} is not an https:// URL")
            self._channel = grpc.insecure_channel(target, options=options)
        # The grpc plugin writes no type stubs for the service classes.
        self._stub = campaign_pb2_grpc.CampaignServiceStub(self._channel)  # type: ignore[no-untyped-call]

    @classmethod
    def from_env(cls, **overrides: object) -> Client:
        """A client configured like the CLI: ``DISTILLERY_ADDR`` (default
        ``http://127.0.0.1:7070``), ``DISTILLERY_TOKEN``, ``DISTILLERY_CA_CERT``; keyword
        arguments win."""
        kw: dict[str, object] = {
            "addr": os.environ.get("DISTILLERY_ADDR") or DEFAULT_ADDR,
            "token": os.environ.get("DISTILLERY_TOKEN") or None,
            "ca_cert": os.environ.get("DISTILLERY_CA_CERT") or None,
        }
        kw.update(overrides)
        return cls(**kw)  # type: ignore[arg-type]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:  # noqa: PYI034 (3.10 has no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- campaigns ------------------------------------------------------------------------

    def submit(self, spec: SpecInput, *, spec_dir: str | os.PathLike[str] | None = None) -> str:
        """Submits a campaign; returns its id.

        ``spec`` is a spec file's path (``os.PathLike``, or a ``str`` without a newline), TOML
        text (a ``str`` with a newline), or a ready ``CampaignSpec`` message. TOML is parsed and
        validated by the coordinator with the same code as ``coordinator submit`` (which parses
        on the client's machine): the spec's files are checked, and the teacher's shape read, on
        the coordinator's filesystem, and relative paths resolve against ``spec_dir`` (default:
        the spec file's folder, or the current directory for text). So the coordinator must see
        the same paths as the workers, which read them. A refused spec raises :class:`RpcError`
        with ``INVALID_ARGUMENT`` and the field path in its details.
        """
        if isinstance(spec, spec_pb2.CampaignSpec):
            req = campaign_pb2.SubmitRequest(spec=spec)
        else:
            if isinstance(spec, str) and "\n" in spec:
                text, base = spec, Path.cwd()
            else:
                path = Path(spec)
                try:
                    text = path.read_text(encoding="utf-8")
                except OSError as e:
                    raise DistilleryError(f"{path}: cannot read the spec: {e}") from e
                base = path.resolve().parent
            if spec_dir is not None:
                base = Path(spec_dir)
            req = campaign_pb2.SubmitRequest(spec_toml=text, spec_dir=str(base.resolve()))
        campaign_id: str = self._unary("submit", self._stub.Submit, req).campaign_id
        return campaign_id

    def status(self, campaign_id: str) -> campaign_pb2.Campaign:
        """One campaign: state, error, rounds with their phase, metrics and artifacts, task
        counts. :func:`distillery_client.campaign_dict` turns it into ``status --json``'s object."""
        c: campaign_pb2.Campaign = self._unary(
            "status", self._stub.Get, campaign_pb2.GetCampaignRequest(campaign_id=campaign_id)
        )
        return c

    def list(self) -> list[campaign_pb2.Campaign]:
        """Every campaign the coordinator holds."""
        r: campaign_pb2.ListCampaignsResponse = self._unary(
            "list", self._stub.List, campaign_pb2.ListCampaignsRequest()
        )
        return list(r.campaigns)

    def cancel(self, campaign_id: str) -> campaign_pb2.Campaign:
        """Cancels a campaign; its running tasks stop within one heartbeat."""
        return self._control("cancel", self._stub.Cancel, campaign_id)

    def pause(self, campaign_id: str) -> campaign_pb2.Campaign:
        """Pauses a campaign: running tasks stop and are re-leased, from their last checkpoint,
        on resume."""
        return self._control("pause", self._stub.Pause, campaign_id)

    def resume(self, campaign_id: str) -> campaign_pb2.Campaign:
        """Resumes a paused campaign."""
        return self._control("resume", self._stub.Resume, campaign_id)

    def retry(self, campaign_id: str) -> campaign_pb2.Campaign:
        """Continues a failed campaign from its failed phase (``coordinator retry``)."""
        return self._control("retry", self._stub.Retry, campaign_id)

    def watch(
        self,
        campaign_id: str,
        from_seq: int = 0,
        *,
        reconnect: bool = True,
        max_failures: int = 60,
    ) -> Iterator[campaign_pb2.Event]:
        """The campaign's events from sequence number ``from_seq`` on (0 or 1: from the start),
        live, ending after its terminal ``campaign_state`` event. Events come from the
        coordinator's durable log and carry ``seq``: to resume later, pass the last ``seq`` + 1.
        With ``reconnect`` a lost coordinator is retried every second (``max_failures`` times in
        a row) and the stream resumes where it stopped, as ``coordinator watch`` does."""
        next_seq = max(from_seq, 1)
        failures = 0
        # Failed events seen: one that a later ``retry`` continued is not the end.
        failed_seen = 0
        while True:
            stream = self._stub.Watch(
                campaign_pb2.WatchRequest(campaign_id=campaign_id, from_seq=next_seq),
                metadata=self._metadata,
            )
            try:
                for e in stream:
                    failures = 0
                    next_seq = e.seq + 1
                    yield e
                    if e.kind == "campaign_state" and is_terminal(e.state):
                        if e.state != campaign_pb2.CAMPAIGN_STATE_FAILED:
                            return
                        failed_seen += 1
                        if failed_seen > self.status(campaign_id).retries:
                            return
                # The stream ended without a terminal event: either we asked past the end of a
                # finished campaign, or the coordinator went away.
                try:
                    if is_terminal(self.status(campaign_id).state):
                        return
                except RpcError as err:
                    if err.code != grpc.StatusCode.UNAVAILABLE:
                        raise
            except grpc.RpcError as err:
                wrapped = RpcError.wrap(f"watch {campaign_id}", err)
                if not reconnect or wrapped.code != grpc.StatusCode.UNAVAILABLE:
                    raise wrapped from None
            finally:
                stream.cancel()
            failures += 1
            if not reconnect or failures > max_failures:
                raise DistilleryError(f"watch {campaign_id}: lost the coordinator at {self.addr}")
            time.sleep(1.0)

    def wait(self, campaign_id: str) -> campaign_pb2.Campaign:
        """Follows the campaign until it ends; returns its final status."""
        for _ in self.watch(campaign_id):
            pass
        return self.status(campaign_id)

    # -- artifacts ------------------------------------------------------------------------

    def download_artifact(self, what: str, out_dir: str | os.PathLike[str]) -> Download:
        """Downloads an artifact into ``out_dir``, as ``coordinator artifact get WHAT --out DIR``:
        ``what`` is a digest (``sha256:<hex>`` or the hex) or a campaign id (its latest round's
        student). A directory artifact becomes its files under ``out_dir`` (every manifest path
        is checked before anything is written), a file artifact a file named by its digest.
        Every blob is written through a temporary file and checked against its sha256."""
        out = Path(out_dir)
        if is_digest(what):
            digest = parse_digest(what)
        else:
            try:
                camp = self.status(what)
            except RpcError as e:
                raise RpcError(
                    f"artifact get {what}: neither a digest nor a campaign id", e.code, e.details
                ) from None
            student = next(
                (r.artifacts["student"] for r in reversed(camp.rounds) if "student" in r.artifacts),
                None,
            )
            if student is None:
                raise DistilleryError(f"campaign {what} has no student yet")
            digest = parse_digest(student)
        out.mkdir(parents=True, exist_ok=True)
        blob = out / f".{digest}.download"
        self._download(digest, blob)
        entries = None
        if blob.stat().st_size <= _MAX_MANIFEST_BYTES:
            entries = parse_manifest(blob.read_bytes())
        if entries is None:
            dest = out / digest
            os.replace(blob, dest)
            return Download(digest=digest, directory=False, files=[dest])
        dests = [safe_join(out, f.path) for f in entries]
        for f in entries:
            parse_digest(f.digest)
        for f, dest in zip(entries, dests):
            _, size = self._download(f.digest, dest)
            if size != f.size:
                raise ArtifactError(f"{f.path}: manifest says {f.size} bytes, received {size}")
        blob.unlink()
        return Download(digest=digest, directory=True, files=dests)

    def _download(self, digest: str, dest: Path) -> tuple[str, int]:
        stream = self._stub.GetArtifact(
            campaign_pb2.GetArtifactRequest(digest=digest), metadata=self._metadata
        )
        try:
            return receive_to_file(stream, dest, digest)
        except grpc.RpcError as e:
            raise RpcError.wrap(f"artifact {digest}", e) from None
        finally:
            stream.cancel()

    def _control(self, what: str, method: Any, campaign_id: str) -> campaign_pb2.Campaign:
        c: campaign_pb2.Campaign = self._unary(
            what, method, campaign_pb2.CampaignRef(campaign_id=campaign_id)
        )
        return c

    def _unary(self, what: str, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise RpcError.wrap(what, e) from None
