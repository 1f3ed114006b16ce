"""Submit a campaign, follow it to the end, and download the student.

    python examples/run_campaign.py SPEC.toml --out student/ [--addr URL] [--token T] [--ca-cert PEM]

The connection settings default to the CLI's environment variables (DISTILLERY_ADDR,
DISTILLERY_TOKEN, DISTILLERY_CA_CERT). The spec is parsed and validated by the coordinator, so its
paths must exist where the coordinator runs (relative paths start at the spec's folder). Exit code:
0 if the campaign succeeded, 1 if it failed or was cancelled, 2 if the coordinator refused the spec.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from distillery_client import Client, RpcError, campaign_dict


def progress_line(event) -> str:  # type: ignore[no-untyped-def]
    m = event.metrics
    step, total = m.get("progress.distill.step"), m.get("progress.distill.total_steps")
    clock = time.strftime("%H:%M:%S", time.localtime(event.time_ms / 1000))
    if event.kind == "task_progress" and step is not None and total:
        loss = m.get("progress.distill.loss")
        extra = f" loss {loss:.4f}" if loss is not None else ""
        return f"{clock} round {event.round} {event.phase} step {step:.0f}/{total:.0f}{extra}"
    return f"{clock} {event.message}"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("spec", help="campaign spec (TOML)")
    p.add_argument("--out", required=True, help="folder for the final student")
    p.add_argument(
        "--addr", help="coordinator URL (default $DISTILLERY_ADDR or http://127.0.0.1:7070)"
    )
    p.add_argument("--token", help="client token (default $DISTILLERY_TOKEN)")
    p.add_argument(
        "--ca-cert", help="CA certificate for an https coordinator (default $DISTILLERY_CA_CERT)"
    )
    args = p.parse_args()

    overrides = {
        k: v
        for k, v in {"addr": args.addr, "token": args.token, "ca_cert": args.ca_cert}.items()
        if v
    }
    with Client.from_env(**overrides) as client:
        try:
            cid = client.submit(args.spec)
        except RpcError as e:
            print(f"run_campaign: {e}", file=sys.stderr)
            return 2 if e.code == grpc.StatusCode.INVALID_ARGUMENT else 1
        print(f"submitted {cid}", file=sys.stderr)
        # Events come from the coordinator's durable log; if this script stops, a later
        # `client.watch(cid, from_seq=last_seq + 1)` continues where it left off.
        for event in client.watch(cid):
            print(progress_line(event), file=sys.stderr)
        status = campaign_dict(client.status(cid))
        for r in status["rounds"]:
            m = r["metrics"]
            print(
                f"round {r['index']}: {r['state']}, params {r['params']}, "
                f"perplexity {m['perplexity']} (teacher {m['teacher_perplexity']}), "
                f"win rate {m['judge']['win_rate']}",
                file=sys.stderr,
            )
        if status["state"] != "succeeded":
            print(f"campaign {cid} {status['state']}: {status['error']}", file=sys.stderr)
            return 1
        got = client.download_artifact(cid, args.out)
        print(f"student {got.digest}: {len(got.files)} files in {args.out}", file=sys.stderr)
        print(cid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
