"""Drives a real coordinator with distillery_client and prints what it saw as JSON, for
tests/tests/python_client.rs to check against the coordinator and the Rust CLI.

usage: client_e2e.py campaign CONFIG_JSON   (addr, client_token, worker_token, spec, out)
       client_e2e.py tls HTTPS_ADDR PLAIN_ADDR CA_PEM
       client_e2e.py watch ADDR TOKEN CAMPAIGN_ID MARKER_FILE
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distillery_client import Client, DistilleryError, RpcError, campaign_dict, state_name


def code_of(f: Callable[[], object]) -> dict[str, str]:
    """The gRPC code (and details) a call fails with, or OK."""
    try:
        f()
        return {"code": "OK", "details": ""}
    except RpcError as e:
        return {"code": e.code.name, "details": e.details}


def files_of(root: Path) -> dict[str, dict[str, Any]]:
    """Every file under root: its sha256 and size, computed here (not by the client)."""
    return {
        p.relative_to(root).as_posix(): {
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            "size": p.stat().st_size,
        }
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def campaign(cfg: dict[str, Any]) -> dict[str, Any]:
    addr, spec, out = cfg["addr"], Path(cfg["spec"]), Path(cfg["out"])
    report: dict[str, Any] = {}

    # Auth through the client: no token, an unknown token, a worker's token, then the right one.
    report["auth"] = {
        "none": code_of(lambda: Client(addr).list()),
        "wrong": code_of(lambda: Client(addr, token="wrong-token-0123456789abcdef").list()),
        "wrong_submit": code_of(
            lambda: Client(addr, token="wrong-token-0123456789abcdef").submit(spec)
        ),
        "worker": code_of(lambda: Client(addr, token=cfg["worker_token"]).list()),
        "client": code_of(lambda: Client(addr, token=cfg["client_token"]).list()),
    }

    c = Client(addr, token=cfg["client_token"])
    text = spec.read_text()
    # The coordinator validates TOML with the CLI's rules: field paths in the errors.
    report["bad_specs"] = {
        "unknown_key": code_of(lambda: c.submit(text.replace("seed = 5", "seed = 5\ncolour = 1"))),
        "missing_file": code_of(
            lambda: c.submit(text.replace('"calib.jsonl"', '"no-such.jsonl"'), spec_dir=spec.parent)
        ),
        "relative_to_cwd": code_of(lambda: c.submit(text, spec_dir="/")),
    }

    cid = c.submit(spec)
    report["id"] = cid
    report["paused"] = state_name(c.pause(cid).state)
    report["resumed"] = state_name(c.resume(cid).state)

    started = time.monotonic()
    events = list(c.watch(cid))
    report["watch_seconds"] = time.monotonic() - started
    report["events"] = [
        {"seq": e.seq, "kind": e.kind, "state": state_name(e.state) if e.state else None}
        for e in events
    ]
    # Resuming from any sequence number gives exactly the rest of the log.
    k = len(events) // 2
    tail = list(c.watch(cid, from_seq=events[k].seq))
    # (Compared as messages: the server's map fields have no fixed wire order.)
    report["resume_matches"] = tail == events[k:]
    report["resume_past_end"] = len(list(c.watch(cid, from_seq=events[-1].seq + 1)))

    status = c.status(cid)
    report["status"] = campaign_dict(status)

    by_id = c.download_artifact(cid, out / "student")
    report["download"] = {
        "digest": by_id.digest,
        "directory": by_id.directory,
        "files": sorted(p.relative_to(out / "student").as_posix() for p in by_id.files),
        "on_disk": files_of(out / "student"),
    }
    by_digest = c.download_artifact(
        report["status"]["rounds"][0]["artifacts"]["student"], out / "again"
    )
    report["download_by_digest_same"] = by_digest.digest == by_id.digest and files_of(
        out / "again"
    ) == files_of(out / "student")
    c.download_artifact(report["status"]["rounds"][0]["artifacts"]["pruned"], out / "pruned")
    report["pruned_files"] = sorted(files_of(out / "pruned"))

    # A second campaign, submitted as TOML text, cancelled: its watch ends on the cancellation.
    cid2 = c.submit(
        text.replace('name = "py-client"', 'name = "py-client-cancelled"'), spec_dir=spec.parent
    )
    report["cancelled"] = state_name(c.cancel(cid2).state)
    last = list(c.watch(cid2))[-1]
    report["cancelled_watch_last"] = {"kind": last.kind, "state": state_name(last.state)}
    report["cancelled_name"] = c.status(cid2).name
    report["listed"] = sorted(x.id for x in c.list())
    report["both"] = sorted([cid, cid2])
    try:
        c.download_artifact(cid2, out / "none")
        report["no_student"] = "downloaded"
    except RpcError as e:
        report["no_student"] = e.code.name
    except DistilleryError as e:
        report["no_student"] = str(e)
    report["unknown_campaign"] = code_of(lambda: c.download_artifact("c-no-such", out / "x"))
    report["unknown_watch"] = code_of(lambda: list(c.watch("c-no-such")))
    report["unknown_digest"] = code_of(lambda: c.download_artifact("ab" * 32, out / "y"))
    return report


def tls(https_addr: str, plain_addr: str, ca: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        r = code_of(lambda: Client(https_addr, ca_cert=ca, timeout=5).list())
        if r["code"] == "OK" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    with open(ca, "rb") as f:
        pem = f.read()
    return {
        "with_ca": r,
        "with_ca_bytes": code_of(lambda: Client(https_addr, ca_cert=pem, timeout=5).list()),
        "without_ca": code_of(lambda: Client(https_addr, timeout=5).list()),
        "plaintext": code_of(lambda: Client(plain_addr, timeout=5).list()),
        "campaigns": len(Client(https_addr, ca_cert=ca).list()),
    }


def watch(addr: str, token: str, cid: str, marker: str) -> dict[str, Any]:
    """Follows a campaign to its end, writing MARKER after the first event (so the test knows
    the stream is open before it restarts the coordinator)."""
    events = []
    for e in Client(addr, token=token).watch(cid):
        events.append({"seq": e.seq, "kind": e.kind, "state": state_name(e.state)})
        Path(marker).touch()
    return {"events": events}


def main() -> None:
    if sys.argv[1] == "campaign":
        out = campaign(json.loads(sys.argv[2]))
    elif sys.argv[1] == "tls":
        out = tls(*sys.argv[2:5])
    elif sys.argv[1] == "watch":
        out = watch(*sys.argv[2:6])
    else:
        raise SystemExit(__doc__)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    # A hung coordinator fails the test instead of stalling the suite (SIGALRM ends the process).
    signal.alarm(240)
    main()
