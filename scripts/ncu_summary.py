"""Sums an Nsight Compute CSV (`ncu --csv --metrics gpu__time_duration.sum`)
by kernel name: where a run's GPU time goes. Used by scripts/gpu-check.sh
(step 5) on a Flux step; prints the kernels by total time, biggest first."""
import csv
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]  # ncu prints its own log lines too
    total = defaultdict(float)
    count = defaultdict(int)
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row.get("Kernel Name", "?")
        short = name.split("(")[0][:70]
        total[short] += float(row["Metric Value"].replace(",", "")) / 1e3  # ns -> us
        count[short] += 1
    grand = sum(total.values())
    print(f"{'kernel':<70} {'calls':>6} {'total us':>10} {'share':>7}")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:30]:
        print(f"{name:<70} {count[name]:>6} {us:>10.1f} {us / grand * 100:>6.1f}%")
    print(f"{'all kernels':<70} {sum(count.values()):>6} {grand:>10.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
