#!/usr/bin/env python3
"""Merge `adt ablate` reports (report.json) into the colour-drift table.

Usage: colour_drift_table.py OUT.md REPORT.json...

One row per variant: the seeds it ran, and over them the mean ± sample sd of the
mean HSV saturation, the hue-histogram L1, FD and KID in each evaluation space; and,
for each variant other than ADT, the mean over its seeds of its saturation minus ADT's
on the same seed (paired). A (variant, seed) that occurs in several reports must have
the same figures in each (runs are deterministic given the seed); it is counted once.
"""
import json
import math
import sys


def mean_sd(v):
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def pm(v, d):
    m, sd = mean_sd(v)
    return f"{m:.{d}f}" if sd is None else f"{m:.{d}f} ± {sd:.{d}f}"


def main():
    out, paths = sys.argv[1], sys.argv[2:]
    if not paths:
        sys.exit("usage: colour_drift_table.py OUT.md REPORT.json...")
    reports = [json.load(open(p)) for p in paths]
    first = reports[0]
    for r in reports[1:]:
        for key in ("iterations", "eval_images", "spaces"):
            if r[key] != first[key]:
                sys.exit(f"reports differ in {key}: {first[key]} vs {r[key]}")
    runs, order, desc = {}, [], {}
    for r, p in zip(reports, paths):
        for v in r["variants"]:
            desc.setdefault(v["name"], v["description"])
            if v["name"] not in order:
                order.append(v["name"])
        for run in r["runs"]:
            key = (run["variant"], run["seed"])
            if key in runs:
                a, b = runs[key], run
                if a["fd"] != b["fd"] or a["mean_saturation"] != b["mean_saturation"]:
                    sys.exit(f"{key} differs between reports ({p})")
                continue
            runs[key] = run
    spaces = first["spaces"]
    head = "| variant | change | seeds | mean saturation | saturation − ADT's (same seed) | hue hist. L1 |"
    sep = "|---|---|---|---|---|---|"
    for s in spaces:
        head += f" FD {s.split(' ')[0]} | KID {s.split(' ')[0]} |"
        sep += "---|---|"
    lines = [
        f"Colour drift: {first['iterations']} iterations per run, n = {first['eval_images']} "
        f"held-out captions (one image each), mean ± sd over the seeds listed "
        f"(sample sd; one seed: no sd). Held-out Noto mean saturation "
        f"{first['reference_colour']['mean_saturation']:.3f}. "
        f"Sources: {', '.join(paths)}.",
        "",
        head,
        sep,
    ]
    b = first["base"]
    row = f"| base | before tuning | - | {b['mean_saturation']:.3f} | - | {b['hue_l1']:.3f} |"
    for i in range(len(spaces)):
        row += f" {b['fd'][i]:.1f} | {b['kid'][i]:.4f} |"
    lines.append(row)
    for name in order:
        rs = sorted((r for (v, _), r in runs.items() if v == name), key=lambda r: r["seed"])
        if not rs:
            continue
        seeds = ",".join(str(r["seed"]) for r in rs)
        if name == "adt":
            delta = "-"
        else:
            d = [
                r["mean_saturation"] - runs[("adt", r["seed"])]["mean_saturation"]
                for r in rs
                if ("adt", r["seed"]) in runs
            ]
            delta = f"{sum(d) / len(d):+.3f}" if d else "-"
        row = (
            f"| {name} | {desc[name]} | {seeds} | {pm([r['mean_saturation'] for r in rs], 3)} "
            f"| {delta} | {pm([r['hue_l1'] for r in rs], 3)} |"
        )
        for i in range(len(spaces)):
            row += f" {pm([r['fd'][i] for r in rs], 1)} | {pm([r['kid'][i] for r in rs], 4)} |"
        lines.append(row)
    open(out, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
