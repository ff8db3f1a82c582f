"""The PNG beside the JSON: headline ratios against their goals, and decode speed-up per case."""

from __future__ import annotations

from pathlib import Path


def chart(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("decode_speedup_long", "decode_speedup_short", "decode_speedup_short_min", "preprocess_speedup", "e2e_speedup_tiny",
                        "e2e_speedup_small", "cpu_scaling_2_vs_1", "rss_ratio_1000_vs_100", "model_busy_fraction_small",
                        "model_flops_fraction_small", "plan_rss_new_vs_old", "plan_s_new_vs_old",
                        "plan_rss_ratio_10m_vs_1m") if k in result]
    keys += [k for k in result if k.startswith("gpu_") and k.endswith(("_speedup", "_mfu"))]
    cases = result.get("decode", {}).get("cases", {})
    fig, axes = plt.subplots(1, 2 if cases else 1, figsize=(13 if cases else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    goals = result.get("goals", {})
    colors = ["tab:green" if goals.get(k, {}).get("met", True) else "tab:red" for k in keys]
    bars = ax.barh(keys, [result[k] for k in keys], color=colors)
    ax.bar_label(bars, fmt="%.2f", padding=2)
    for i, k in enumerate(keys):
        if k in goals:
            ax.plot([float(goals[k]["goal"].split()[1])] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.invert_yaxis()
    ax.set_xlabel("ratio vs the baseline measured in the same run (black tick: goal; red: goal missed)")
    ax.set_title(f"python -m benchmarks ({result.get('profile')}) on {result['machine_before']['cpus']} CPUs, "
                 f"load {result['machine_before']['load_avg_1m']}", fontsize=9)
    if cases:
        ax = axes[0][1]
        names = list(cases)
        bars = ax.bar(names, [cases[n]["speedup"] for n in names],
                      color=["tab:blue" if n.startswith("short") else "tab:orange" for n in names])
        ax.bar_label(bars, fmt="%.1f", padding=2)
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set_ylabel("sampled frames/s: ours / model card")
        ax.set_title("decode speed-up per case (clip kind / frames sampled)", fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
