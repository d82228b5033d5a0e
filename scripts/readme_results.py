"""Write the README's result tables from the committed metrics, so the two cannot drift apart.

Each table sits between ``<!-- results:NAME:start -->`` and ``<!-- results:NAME:end -->``:

    python scripts/readme_results.py           # rewrite the tables in README.md
    python scripts/readme_results.py --check   # exit 1 if README.md differs from metrics/*.json

Tables: ``eval`` (metrics/eval.json), ``robustness-same``, ``robustness-<domain>`` and
``dynamics`` (metrics/robustness.json), ``locate`` (metrics/locate.json), ``grid`` (metrics/grid.json).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    ("agent", "**agent** (PPO + map memory, clean photos)"),
    ("agent_randomized", "agent_randomized (domain randomization)"),
    ("agent_nomemory", "agent_nomemory (no map memory)"),
    ("agent_original", "agent_original (the original design)"),
    ("agent_search", "agent_search (candidate actions + STOP, decoys)"),
    ("random_walk", "random walk"),
    ("lawnmower", "lawnmower sweep"),
    ("greedy", "greedy hill-climbing"),
    ("retrieve_then_fly", "retrieve-then-fly (no learning)"),
    ("retrieve_then_search", "retrieve-then-search (scripted)"),
    ("template_oracle", "template-matching oracle (sees the whole map)"),
]


def _cell(split: dict[str, Any] | None) -> str:
    return "-" if split is None else f"{split['success_rate']:.3f} / {split['spl']:.3f}"


def eval_table(e: dict[str, Any]) -> str:
    splits = [s for s in e["agent"] if s not in ("train",)] + ["train"]
    head = ["method (success / SPL)", *splits]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in ROWS:
        res = e["agent"] if key == "agent" else e["baselines"].get(key)
        if res is not None:
            lines.append(f"| {label} | " + " | ".join(_cell(res.get(s)) for s in splits) + " |")
    return "\n".join(lines)


def robustness_table(r: dict[str, Any], domain: str) -> str:
    cells = r["cells"][domain]
    methods = list(cells["none"])
    kinds = sorted({k.split("@")[0] for k in cells if k != "none"})
    strengths = r["strengths"]
    lines = ["| perturbation | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    lines.append("| none | " + " | ".join(f"{cells['none'][m]['success_rate']:.2f}" for m in methods) + " |")
    for k in kinds:
        row = [" / ".join(f"{cells[f'{k}@{s:g}'][m]['success_rate']:.2f}" for s in strengths) for m in methods]
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def dynamics_table(r: dict[str, Any]) -> str:
    dyn = r["dynamics"]
    methods = list(next(iter(dyn.values())))
    lines = ["| dynamics | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    for name in sorted(dyn):
        lines.append(f"| {name} | " + " | ".join(f"{dyn[name][m]:.2f}" for m in methods) + " |")
    return "\n".join(lines)


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def locate_table(loc: dict[str, Any]) -> str:
    head = ["method", "split", "queries", "right (within radius)", "ECE", "answers with confidence >= 0.9",
            "right among them", "abstained", "right among located", "abstained on foreign photos",
            "median heading error, rotated (deg)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, by_split in loc["methods"].items():
        for split, s in by_split.items():
            foreign = s["by_kind"].get("foreign", {}).get("abstention_rate")
            row = [method, split, str(s["n"]), _num(s["success_rate"]), _num(s["ece"]),
                   str(s["n_confidence_ge_0.9"]), _num(s["precision_confidence_ge_0.9"]), _num(s["abstention_rate"]),
                   _num(s["precision_located"]), _num(foreign),
                   _num(s["rotated_heading_error_median_deg"], ".1f")]  # fmt: skip
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def locate_kinds_table(loc: dict[str, Any]) -> str:
    kinds = list(next(iter(loc["methods"].values()))["test"]["by_kind"])
    lines = ["| method | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for method, by_split in loc["methods"].items():
        bk = by_split["test"]["by_kind"]
        cells = [f"{bk[k]['success_rate']:.2f} / {bk[k]['mean_confidence']:.2f} / {bk[k]['abstention_rate']:.2f}"
                 for k in kinds]  # fmt: skip
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


GRID_ROWS = [
    ("random_walk", "random walk", "expected on the test episodes"),
    ("self_avoiding_walk", "self-avoiding random walk", "expected on the test episodes"),
    ("blind_route", "best image-blind route", "on the test episodes"),
]


def grid_table(g: dict[str, Any]) -> str:
    """Per setting of metrics/grid.json: success per distance C and the average, every method."""
    parts = []
    for name in g["settings_order"]:
        s = g["settings"][name]
        cs = [str(c) for c in range(s["c_min"], s["c_max"] + 1)]
        a, im = s["agent"], s["images"]
        parts.append(
            f"**{name}**: {s['size']}x{s['size']} patches of {s['patch']} px, budget {s['budget']}, "
            f"C = {s['c_min']}..{s['c_max']}; {im['train']} train / {im['test']} test images, "
            f"{s['test_episodes']} test episodes. The closer of two neighbours is the more similar to the goal "
            f"in {s['directional_signal_test']:.2f} of cases (0.5: the patches do not point the way)."
        )
        lines = ["| method | " + " | ".join(f"C={c}" for c in cs) + " | average |", "|" + "---|" * (len(cs) + 2)]
        cells = [f"{a['success'][k]:.3f} [{a['ci95'][k][0]:.2f}, {a['ci95'][k][1]:.2f}]" for k in [*cs, "average"]]
        warm = " after cloning the blind route" if a.get("warm_start", "none") != "none" else ""
        label = f"**agent** (PPO{warm}, {a['seeds']} seeds x {a['timesteps']:,} steps; mean [95 % CI])"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for key, text, on_test in GRID_ROWS:
            b = s[key]
            exact = "Monte Carlo" not in b["method"] and "lower bound" not in b["method"]
            for part, where in (("test", on_test), ("all_pairs", "expected over all pairs")):
                tag = "" if exact else " (estimate)"
                row = [f"{b[part][k]:.3f}" for k in [*cs, "average"]]
                lines.append(f"| {text}, {where}{tag} | " + " | ".join(row) + " |")
        if (s["size"], s["budget"], s["c_min"], s["c_max"]) == (5, 10, 4, 8):
            for who, v in g["published"]["average_success"].items():
                lines.append(f"| *{who}; Massachusetts Buildings, not our maps* | " + "- | " * len(cs) + f"*{v}* |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def tables(root: Path) -> dict[str, str]:
    read = lambda name: json.loads((root / "metrics" / name).read_text())  # noqa: E731
    out = {"eval": eval_table(read("eval.json"))}
    r = read("robustness.json")
    for domain in r["cells"]:
        out[f"robustness-{domain}"] = robustness_table(r, domain)
    out["dynamics"] = dynamics_table(r)
    if (root / "metrics" / "locate.json").exists():
        loc = read("locate.json")
        out["locate"] = locate_table(loc)
        out["locate-kinds"] = locate_kinds_table(loc)
    if (root / "metrics" / "grid.json").exists():
        out["grid"] = grid_table(read("grid.json"))
    return out


def render(readme: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        pattern = re.compile(  # an empty block (start and end marks on adjacent lines) is filled too
            rf"(<!-- results:{re.escape(name)}:start -->\n)(?:.*?\n)?(<!-- results:{re.escape(name)}:end -->)", re.S
        )
        readme = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), readme)
    return readme


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is not what the metrics give")
    args = ap.parse_args()
    path = ROOT / "README.md"
    old = path.read_text()
    new = render(old, tables(ROOT))
    if args.check:
        if new != old:
            print("README.md result tables differ from metrics/*.json: run python scripts/readme_results.py")
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
