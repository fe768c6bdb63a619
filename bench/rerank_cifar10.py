"""Does uncertainty-aware re-ranking improve retrieval? MAP and P@k with and without it.

    PYTHONPATH=src python bench/rerank_cifar10.py --run runs/cifar10-dmuh-64 --device cuda --out rerank.json

RUN is a trained DMUH run (any protocol; CIFAR-10 for the reported numbers): its saved split's query
images are searched against its database, by plain Hamming ranking and by the re-rankings of
`dmuh.search.rerank_experiment` (momentum uncertainty at several tau; tie-break only; the margin
1 - |h| control). Every tau is printed: choosing the best on the query set is optimistic.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dmuh.errors import DmuhError
from dmuh.io import atomic_write_text
from dmuh.search import rerank_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory of a trained DMUH run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depth", type=int, default=1000, help="candidates re-ranked per query")
    parser.add_argument("--taus", default="0.25,0.5,1,2,4",
                        help="re-ranking temperatures (relative to each query's mean bit uncertainty)")
    parser.add_argument("--ks", default="10,100,1000", help="P@k cut-offs")
    parser.add_argument("--out", help="also write the report as JSON")
    parser.add_argument("--force", action="store_true", help="replace --out")
    args = parser.parse_args()
    if args.out and Path(args.out).exists() and not args.force:
        raise SystemExit(f"--out {args.out} already exists; pass --force to replace it")
    try:
        report = rerank_experiment(args.run, device=args.device, depth=args.depth,
                                   taus=[float(t) for t in args.taus.split(",")],
                                   ks=[int(k) for k in args.ks.split(",")])
    except DmuhError as error:
        raise SystemExit(f"rerank_cifar10: error: {error}")
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    metrics = [key for key in report["results"][0] if key != "ranking"]
    print(f"{report['run']}: {report['method']} {report['bits']} bits, protocol {report['protocol']}, "
          f"{report['query']} queries x {report['database']} database, MAP@{report['map_at']}, "
          f"re-ranking the top {report['depth']}; mean query bit uncertainty {report['mean_bit_uncertainty']:.4f}")
    if "hamming_map_ties_expected" in report:
        print(f"Hamming MAP with expected tie order (dmuh evaluate): {report['hamming_map_ties_expected']:.4f}")
    base = report["results"][0]
    print()
    print("| ranking | " + " | ".join(m.upper() if m == "map" else m.upper().replace("P@", "P@") for m in metrics) + " |")
    print("|---|" + "---:|" * len(metrics))
    for row in report["results"]:
        cells = [f"{row[m]:.4f}" + ("" if row is base else f" ({row[m] - base[m]:+.4f})") for m in metrics]
        print(f"| {row['ranking']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
