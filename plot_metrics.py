"""Draw the metrics.jsonl of one or more runs as one PNG (needs matplotlib: pip install matplotlib).

    python plot_metrics.py out/demo                        # writes out/demo/metrics.png
    python plot_metrics.py out/demo out/gpt2-sentiment --metrics loss,rewards/accuracies --out curves.png
"""
import argparse
import os
import sys

from errors import DataError, InputError, exit_code_of
from train.run_dir import read_metrics

DEFAULT_METRICS = "loss,rewards/accuracies,rewards/margins,eval/rewards/accuracies,eval/kl"


def metrics_of(run_dir):
    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        raise DataError(f"{os.path.join(run_dir, 'metrics.jsonl')}: not found; pass run directories (the out_dir of "
                        "fsdp_train.py)")
    return read_metrics(run_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--metrics", default=DEFAULT_METRICS, help=f"comma-separated names (default {DEFAULT_METRICS})")
    parser.add_argument("--out", default=None, help="PNG to write (default: metrics.png in the first run directory)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.runs[0], "metrics.png")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plot_metrics.py needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')")
    names = [m for m in args.metrics.split(",") if m]
    runs = {run: metrics_of(run) for run in args.runs}
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), squeeze=False, sharex=True)
    for ax, name in zip(axes[:, 0], names):
        for run, lines in runs.items():
            points = [(line["step"], line[name]) for line in lines if name in line]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=run)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
