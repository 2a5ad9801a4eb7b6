"""``fedaigc status``: what the aggregator's state store says, for people and scripts."""

from __future__ import annotations

from collections import Counter

from aggregator.state import open_store


def read_status(state_url: str) -> dict:
    store = open_store(state_url)
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
            "refusals": store.get("refusals", {}),
            "bytes": {
                "up": sum(v.get("up", 0) for per in traffic.values() for v in per.values()),
                "down": sum(v.get("down", 0) for per in traffic.values() for v in per.values()),
                "per_round": {r: {"up": sum(v.get("up", 0) for v in per.values()),
                                  "down": sum(v.get("down", 0) for v in per.values())} for r, per in traffic.items()},
            },
            "privacy": store.get("privacy", {}),
            "versions": store.get("versions", {}),
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
    if s["privacy"]:
        lines.append("privacy: " + ", ".join(f"{k} {v}" for k, v in s["privacy"].items()))
    if s["versions"]:
        lines.append("versions: " + ", ".join(f"{k}: {v}" for k, v in sorted(s["versions"].items())))
    return "\n".join(lines)
