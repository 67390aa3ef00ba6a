"""Draws talaria attack-report's PNG: token reconstruction accuracy (95 % interval) of every
attack against every ReMO setting, the prior's interval shaded.

usage: plot_attacks.py attack-report.json attack-report.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    with open(src) as f:
        report = json.load(f)
    settings = report["settings"]
    names = [s["name"] for s in settings]
    attacks = [a["attack"] for a in settings[0]["attacks"]] if settings else []
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names) + 3), 5.5))
    width = 0.8 / max(1, len(attacks))
    for k, attack in enumerate(attacks):
        xs, ys, lo, hi = [], [], [], []
        for i, s in enumerate(settings):
            a = next((a for a in s["attacks"] if a["attack"] == attack), None)
            if a is None:
                continue
            xs.append(i - 0.4 + width * (k + 0.5))
            ys.append(100 * a["accuracy"])
            lo.append(max(0.0, 100 * (a["accuracy"] - a["ci95"][0])))
            hi.append(max(0.0, 100 * (a["ci95"][1] - a["accuracy"])))
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=4, capsize=2, label=attack)
    for i, s in enumerate(settings):
        prior = next((a for a in s["attacks"] if a["attack"] == "prior"), None)
        if prior:
            ax.fill_between(
                [i - 0.45, i + 0.45],
                100 * prior["ci95"][0],
                100 * prior["ci95"][1],
                color="grey",
                alpha=0.25,
                lw=0,
            )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("prompt tokens reconstructed (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(
        f"What the cloud reconstructs: {report['victims']} prompts, "
        f"{report['victim_tokens']} tokens (grey: the prior's 95 % interval)"
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
