"""Campaigns as plain data: the object ``coordinator status ID --json`` prints (DESIGN.md §4),
built the way ``campaign_json`` in ``coordinator/src/cli.rs`` builds it."""

from __future__ import annotations

from typing import Any

from ._proto import campaign_pb2

JSON = dict[str, Any]


def state_name(state: int) -> str:
    """``pending``, ``running``, ``paused``, ``succeeded``, ``failed``, ``cancelled`` (or
    ``unknown``)."""
    try:
        name = campaign_pb2.CampaignState.Name(state)
    except ValueError:
        return "unknown"
    short = name.removeprefix("CAMPAIGN_STATE_").lower()
    return "unknown" if short == "unspecified" else short


def is_terminal(state: int) -> bool:
    return state_name(state) in ("succeeded", "failed", "cancelled")


def _nest(flat: dict[str, float]) -> JSON:
    """Dotted metric names as nested objects (``judge.win_rate`` -> ``{"judge": {"win_rate"}}``)."""
    root: JSON = {}
    for key in sorted(flat):
        parts = key.split(".")
        cur = root
        for p in parts[:-1]:
            if not isinstance(cur.get(p), dict):
                cur[p] = {}
            cur = cur[p]
        cur[parts[-1]] = flat[key]
    return root


def comparability(mode: str) -> str:
    """The label beside a judge mode's figures (as ``comparability`` in ``coordinator/src/cli.rs``)."""
    if mode == "mtbench":
        return "MT-Bench (FastChat's prompts and grading, comparable with published MT-Bench)"
    return "not comparable with published MT-Bench"


def _judge_mode(c: campaign_pb2.Campaign) -> str | None:
    if not c.HasField("spec") or not c.spec.HasField("evaluation"):
        return None
    if not c.spec.evaluation.HasField("judge"):
        return None
    return c.spec.evaluation.judge.mode


def _round(r: campaign_pb2.Round, judge_mode: str | None = None) -> JSON:
    flat = dict(r.metrics)
    metrics = _nest(flat)
    for k in ("perplexity", "teacher_perplexity"):
        metrics.setdefault(k, None)
    judge = metrics.setdefault("judge", {})
    if isinstance(judge, dict):
        for k in (
            "wins",
            "ties",
            "losses",
            "win_rate",
            "ci_low",
            "ci_high",
            "position_consistency",
            "unparsed",
        ):
            judge.setdefault(k, None)
        if judge_mode is not None:
            judge["mode"] = judge_mode
            judge["mtbench_comparable"] = judge_mode == "mtbench"
            judge["comparability"] = comparability(judge_mode)
    distill = metrics.setdefault("distill", {})
    if isinstance(distill, dict):
        for k in ("steps", "tokens", "final_loss", "world_size"):
            distill.setdefault(k, None)
    target = None
    if r.HasField("target"):
        t = r.target

        def opt(field: str) -> Any:
            return getattr(t, field) if t.HasField(field) else None

        target = {
            "hidden_size": opt("hidden_size"),
            "intermediate_size": opt("intermediate_size"),
            "num_attention_heads": opt("num_attention_heads"),
            "num_layers": opt("num_layers"),
            "params": opt("params"),
        }
    artifacts: JSON = dict(r.artifacts)
    artifacts.setdefault("student", None)
    params = flat.get("params")
    return {
        "index": r.index,
        "state": r.state,
        "phase": r.phase,
        "params": int(params) if params is not None else None,
        "target": target,
        "artifacts": artifacts,
        "metrics": metrics,
        "extensions": r.extensions,
        "candidates": [_candidate(x) for x in r.candidates],
        "gate": [
            {
                "time_ms": g.time_ms,
                "decision": g.decision,
                "reason": g.reason,
                "metrics": dict(g.metrics),
            }
            for g in r.gate
        ],
    }


def _candidate(x: Any) -> JSON:
    """One shape of a round's candidate search, as ``status --json`` shows it."""
    return {
        "index": x.index,
        "shape": {
            "hidden_size": x.hidden_size,
            "intermediate_size": x.intermediate_size,
            "num_attention_heads": x.num_attention_heads,
            "num_layers": x.num_layers,
        },
        "params": x.params,
        "tokens": x.tokens,
        "score": x.score if x.HasField("score") else None,
        "winner": x.winner,
        "pruned": x.pruned or None,
        "checkpoint": x.checkpoint or None,
        "task_id": x.task_id or None,
    }


def campaign_dict(c: campaign_pb2.Campaign) -> JSON:
    """``id``, ``name``, ``state``, ``error``, ``created_ms``, ``updated_ms``, ``tasks`` and
    ``rounds[]`` with ``index``, ``state``, ``phase``, ``params``, ``target``,
    ``artifacts{student, ...}``, ``metrics{perplexity, teacher_perplexity, judge{...},
    distill{...}, ...}``, ``extensions``, ``candidates[]``, ``gate[]`` and
    ``tasks[]{id, kind, state, attempts, lost, failed, ..., progress[], attempt_log[]}``,
    and ``retries``: equal to ``coordinator status ID --json``."""
    t = c.tasks
    return {
        "id": c.id,
        "name": c.name,
        "state": state_name(c.state),
        "error": c.error or None,
        "created_ms": c.created_ms,
        "updated_ms": c.updated_ms,
        "tasks": {
            "pending": t.pending,
            "leased": t.leased,
            "succeeded": t.succeeded,
            "failed": t.failed,
            "cancelled": t.cancelled,
        },
        "retries": c.retries,
        "rounds": [_with_tasks(_round(r, _judge_mode(c)), c) for r in c.rounds],
    }


def _task(t: Any) -> JSON:
    return {
        "id": t.id,
        "kind": t.kind,
        "state": t.state,
        "round": t.round,
        "phase": t.phase,
        "world_size": t.world_size,
        "attempts": t.attempts,
        "lost": t.lost,
        "failed": t.failed,
        "revoked": t.revoked,
        "checkpoint": t.checkpoint or None,
        "error": t.error or None,
        "progress": [
            {"time_ms": p.time_ms, "metrics": dict(p.metrics)} for p in t.progress
        ],
        "attempt_log": [
            {
                "lease_id": a.lease_id,
                "workers": list(a.workers),
                "hosts": list(a.hosts),
                "start_ms": a.start_ms,
                "end_ms": a.end_ms or None,
                "outcome": a.outcome or None,
            }
            for a in t.attempt_log
        ],
    }


def _with_tasks(r: JSON, c: campaign_pb2.Campaign) -> JSON:
    """``rounds[i].tasks[]``: the round's tasks with how their attempts ended."""
    r["tasks"] = [_task(t) for t in c.task_records if t.round == r["index"]]
    return r
