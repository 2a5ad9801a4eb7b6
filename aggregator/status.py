"""``fedaigc status``: what the aggregator's state store says, for people and scripts."""

from __future__ import annotations

from collections import Counter

from aggregator.rollout import REPORTS
from aggregator.rounds import RANKS
from aggregator.state import open_store
from aggregator.telemetry import merged_refusals


def read_status(state_url: str) -> dict:
    store = open_store(state_url, create=False)
    try:
        devices = store.devices()
        assignment = store.assignment()
        clusters = store.clusters()
        rounds = store.rounds()
        online = store.get("online", {})
        traffic = store.get("traffic", {})
        sizes = Counter(assignment.values())
        return {
            "current_round": store.get("current_round", 0),
            "finished": store.get("done", False),
            "devices": {"enrolled": len(devices), "revoked": sum(d.revoked for d in devices),
                        "online": sum(1 for v in online.values() if v)},
            "clusters": {str(c): {"devices": sizes.get(c, 0), "adapter_version": v} for c, (_, _, v) in clusters.items()},
            "rounds": [{"round": r, "cluster": c, "state": s, "deadline": d} for r, c, s, _, d in rounds[-20:]],
            "refusals": merged_refusals(store),
            "bytes": {
                "up": sum(v.get("up", 0) for per in traffic.values() for v in per.values()),
                "down": sum(v.get("down", 0) for per in traffic.values() for v in per.values()),
                "per_round": {r: {"up": sum(v.get("up", 0) for v in per.values()),
                                  "down": sum(v.get("down", 0) for v in per.values())} for r, per in traffic.items()},
            },
            "privacy": store.get("privacy", {}),
            "versions": store.get("versions", {}),
            "rollout": rollout_status(store.get("rollout"), store.get_prefixed(REPORTS)),
            "ranks": {str(r): n for r, n in sorted(Counter(store.get_prefixed(RANKS).values()).items())},
            "spectrum": latest_spectra(store.round_summaries()),
        }
    finally:
        store.close()


def render_status(s: dict) -> str:
    lines = [
        f"round {s['current_round']}{' (finished)' if s['finished'] else ''}",
        f"devices: {s['devices']['enrolled']} enrolled, {s['devices']['online']} online, {s['devices']['revoked']} revoked",
        "clusters: " + (", ".join(f"{c}: {v['devices']} devices (adapter v{v['adapter_version']})"
                                  for c, v in s["clusters"].items()) or "none yet"),
        "refusals: " + (", ".join(f"{k} {v}" for k, v in sorted(s["refusals"].items())) or "none"),
        f"bytes: up {s['bytes']['up']:,}  down {s['bytes']['down']:,}",
    ]
    open_rounds = [r for r in s["rounds"] if r["state"] == "open"]
    if open_rounds:
        lines.append("open: " + ", ".join(f"round {r['round']} cluster {r['cluster']}" for r in open_rounds))
    if s["ranks"]:
        lines.append("LoRA ranks: " + ", ".join(f"{n} device{'s' if n != 1 else ''} at rank {r}"
                                               for r, n in s["ranks"].items()) + " (others at the fleet's)")
    lines += [f"spectrum cluster {c} (round {v['round']}): " + " ".join(f"{x:.2f}" for x in v["shares"])
              for c, v in s["spectrum"].items()]
    lines += privacy_lines(s["privacy"])
    if s["versions"]:
        lines.append("versions: " + ", ".join(f"{k}: {v}" for k, v in sorted(s["versions"].items())))
    lines += rollout_lines(s["rollout"])
    return "\n".join(lines)


def latest_spectra(summaries: list) -> dict[str, dict]:
    """Per cluster, its last closed round's ΔW energy share per singular direction (``energy_spectrum``):
    shares piling into the first directions, the ranks every device shares, is rank collapse."""
    spectra = {}
    for rnd, cid, summary in summaries:
        if "spectrum" in summary and rnd >= spectra.get(str(cid), {}).get("round", 0):
            spectra[str(cid)] = {"round": rnd, "shares": summary["spectrum"]}
    return dict(sorted(spectra.items()))


def rollout_status(state: dict | None, reports: dict[str, dict]) -> dict:
    """Export versions across the fleet, from the devices' rollout reports (``aggregator/rollout.py``)."""
    installed = Counter(r["installed"] for r in reports.values())
    last = None if state is None else {k: state["last"][k] for k in ("version", "target", "stage", "outcome")}
    return {"last": last,
            "live": {} if state is None else {t: r["version"] for t, r in state["live"].items()},
            "installed": {str(v): n for v, n in sorted(installed.items())},
            "failed": {d: {"version": r["version"], "reason": r["reason"]} for d, r in sorted(reports.items())
                       if not r["ok"]},
            "devices": {d: r["installed"] for d, r in sorted(reports.items())}}


def rollout_lines(r: dict) -> list[str]:
    if r["last"] is None and not r["devices"]:
        return []
    lines = []
    if r["last"] is not None:
        last = r["last"]
        lines.append(f"rollout: version {last['version']} to {last['target']}, stage {last['stage']}"
                     + (f" ({last['outcome']})" if last["outcome"] else "")
                     + ("; live " + ", ".join(f"{t}: v{v}" for t, v in sorted(r["live"].items())) if r["live"] else ""))
    lines.append("export versions: " + (", ".join(f"v{v} on {n} device{'s' if n != 1 else ''}"
                                                 for v, n in r["installed"].items()) or "no reports yet"))
    lines += [f"  {d}: version {f['version']} refused: {f['reason']}" for d, f in r["failed"].items()]
    return lines


def privacy_lines(privacy: dict, last: int = 3) -> list[str]:
    """The DP budget devices report, for the last rounds: ``{round: {device: {"epsilon", "delta"}}}``.

    Epsilon is per device and cumulative (what the aggregator could learn about that device's
    data so far); -1 means the update came without DP, None that it has no finite bound.
    """
    lines = []
    for rnd in sorted(privacy, key=int)[-last:]:
        reports = privacy[rnd].values()
        off = sum(1 for r in reports if r["epsilon"] == -1)
        unbounded = sum(1 for r in reports if r["epsilon"] is None)
        finite = sorted(r["epsilon"] for r in reports if r["epsilon"] is not None and r["epsilon"] >= 0)
        parts = []
        if finite:
            deltas = sorted({r["delta"] for r in reports if r["epsilon"] is not None and r["epsilon"] >= 0})
            spread = f"{finite[0]:.2f}" if finite[0] == finite[-1] else f"{finite[0]:.2f}-{finite[-1]:.2f}"
            parts.append(f"epsilon {spread} at delta {'/'.join(f'{d:g}' for d in deltas)} "
                         f"({len(finite)} device{'s' if len(finite) != 1 else ''})")
        if unbounded:
            parts.append(f"epsilon inf ({unbounded} device{'s' if unbounded != 1 else ''}: no finite bound)")
        if off:
            parts.append(f"{off} without DP")
        lines.append(f"privacy round {rnd}: " + "; ".join(parts))
    return lines
