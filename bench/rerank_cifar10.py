"""Does uncertainty-aware re-ranking improve retrieval? MAP and P@k with and without it.

    PYTHONPATH=src python bench/rerank_cifar10.py --run runs/cifar10-dmuh-64 --device cuda --out rerank.json

RUN is a trained DMUH run (any protocol; CIFAR-10 for the reported numbers): its saved split's query
images are searched against its database, by plain Hamming ranking and by the re-rankings of
`rerank_experiment` below (momentum uncertainty at several tau; tie-break only; the margin
1 - |h| control). Every tau is printed: choosing the best on the query set is optimistic.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from dmuh.codes.binary import sign
from dmuh.engine.builder import load_run
from dmuh.errors import DmuhError
from dmuh.metrics.ranking import mean_average_precision, ranked_metrics
from dmuh.retrieval.encoder import Encoder
from dmuh.retrieval.rerank import DEFAULT_RERANK_DEPTH, DEFAULT_TAU
from dmuh.utils.io import atomic_write_text


def rerank_experiment(
    run,
    device: str = "cpu",
    depth: int = DEFAULT_RERANK_DEPTH,
    taus: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    ks: Sequence[int] = (10, 100, 1000),
    chunk: int = 100,
) -> Dict[str, Any]:
    """MAP and P@k of a DMUH run's query split against its database split, per ranking:

    - "hamming": Hamming distance, ties by database position (as `dmuh evaluate --ties index`);
    - "weighted tau=T": the top `depth` re-ranked by the weighted Hamming distance of `dmuh.retrieval.rerank.rerank`
      with the query's momentum bit uncertainty u = |h - m| (the rest keeps its Hamming order);
    - "tie-break tau=1": Hamming distance, ties broken by that weighted distance (isolates how
      much comes from ordering within equal distances);
    - "margin tau=T": the same re-ranking with u = 1 - |h| (the query's own distance from the sign
      boundary; no momentum network), a control for whether the momentum uncertainty adds anything.

    MAP is the protocol's (MAP@topk of the split, or MAP@all). The taus are all reported: picking the
    best one on the query set is optimistic.
    """
    exp = load_run(run, device)
    if exp.momentum is None:
        raise DmuhError(f"{run}: re-ranking needs a DMUH run (a momentum network); this run is {exp.config.method!r}")
    for module in (exp.model, exp.method, exp.momentum.network):
        module.eval()
    encoder = Encoder(
        Path(run), exp.config, exp.model, exp.method, exp.momentum.network, exp.pipeline, exp.execution, {}
    )
    split = exp.split
    query_h, query_u = encoder.continuous(exp.images[torch.from_numpy(split.query)], uncertainty=True)
    database_h, _ = encoder.continuous(exp.images[torch.from_numpy(split.database)])
    labels = torch.from_numpy(np.asarray(exp.source.labels)).float()
    query_labels, database_labels = labels[split.query].to(exp.device), labels[split.database].to(exp.device)
    query_b, database_b = sign(query_h).to(exp.device), sign(database_h).to(exp.device)
    bits, n_database = query_b.shape[1], database_b.shape[0]
    depth = min(int(depth), n_database)
    uncertainties = {"weighted": query_u.to(exp.device), "margin": (1.0 - query_h.abs()).to(exp.device)}
    variants = [("hamming", None, None, False)]
    variants += [(f"weighted tau={t:g}", "weighted", t, False) for t in taus]
    variants += [(f"tie-break tau={DEFAULT_TAU:g}", "weighted", DEFAULT_TAU, True)]
    variants += [(f"margin tau={t:g}", "margin", t, False) for t in taus]
    relevant_rows: Dict[str, List] = {name: [] for name, *_ in variants}
    positions = torch.arange(n_database, device=exp.device)
    for start in range(0, query_b.shape[0], chunk):
        rows = slice(start, start + chunk)
        hamming = 0.5 * (bits - query_b[rows] @ database_b.t())  # exact small integers in float32
        relevant = (query_labels[rows] @ database_labels.t()) > 0
        # Stable sort on distance: ties keep database order.
        order = torch.sort(hamming, dim=1, stable=True).indices
        ranked_relevant = torch.gather(relevant, 1, order)
        head = order[:, :depth]
        differ = (query_b[rows, None, :] != database_b[head]).float()  # (chunk, depth, bits)
        head_hamming = torch.gather(hamming, 1, head)
        for name, source, tau, tie_break in variants:
            if source is None:
                relevant_rows[name].append(ranked_relevant.cpu())
                continue
            u = uncertainties[source][rows]
            scale = tau * u.mean(dim=1, keepdim=True)  # as `dmuh.retrieval.rerank.uncertainty_weights`
            weights = torch.exp(-torch.where(scale > 0, u / scale.clamp_min(1e-30), torch.zeros_like(u)))
            weighted = torch.einsum("qrk,qk->qr", differ, weights)
            # Order the head by (weighted, Hamming, position), or (Hamming, weighted, position).
            keys = (head_hamming, weighted) if tie_break else (weighted, head_hamming)
            head_order = torch.sort(positions[head], dim=1).indices  # position, the last key
            for key in reversed(keys):
                head_order = torch.gather(
                    head_order, 1, torch.sort(torch.gather(key, 1, head_order), dim=1, stable=True).indices
                )
            reranked = torch.cat(
                [torch.gather(ranked_relevant[:, :depth], 1, head_order), ranked_relevant[:, depth:]], dim=1
            )
            relevant_rows[name].append(reranked.cpu())
    results = []
    for name, *_ in variants:
        results.append({"ranking": name, **ranked_metrics(torch.cat(relevant_rows[name]), split.topk, ks)})
    report = {
        "run": str(run),
        "method": exp.config.method,
        "bits": bits,
        "protocol": split.protocol,
        "query": int(len(split.query)),
        "database": int(n_database),
        "map_at": split.topk or "all",
        "depth": depth,
        "mean_bit_uncertainty": float(query_u.mean()),
        "results": results,
    }
    # The reference number of `dmuh evaluate`: the expected MAP over random tie orders.
    report["hamming_map_ties_expected"] = float(
        mean_average_precision(
            query_b.cpu(), database_b.cpu(), query_labels.cpu(), database_labels.cpu(), topk=split.topk, ties="expected"
        )
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory of a trained DMUH run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depth", type=int, default=1000, help="candidates re-ranked per query")
    parser.add_argument(
        "--taus",
        default="0.25,0.5,1,2,4",
        help="re-ranking temperatures (relative to each query's mean bit uncertainty)",
    )
    parser.add_argument("--ks", default="10,100,1000", help="P@k cut-offs")
    parser.add_argument("--out", help="also write the report as JSON")
    parser.add_argument("--force", action="store_true", help="replace --out")
    args = parser.parse_args()
    if args.out and Path(args.out).exists() and not args.force:
        raise SystemExit(f"--out {args.out} already exists; pass --force to replace it")
    try:
        report = rerank_experiment(
            args.run,
            device=args.device,
            depth=args.depth,
            taus=[float(t) for t in args.taus.split(",")],
            ks=[int(k) for k in args.ks.split(",")],
        )
    except DmuhError as error:
        raise SystemExit(f"rerank_cifar10: error: {error}") from None
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    metrics = [key for key in report["results"][0] if key != "ranking"]
    print(
        f"{report['run']}: {report['method']} {report['bits']} bits, protocol {report['protocol']}, "
        f"{report['query']} queries x {report['database']} database, MAP@{report['map_at']}, "
        f"re-ranking the top {report['depth']}; mean query bit uncertainty {report['mean_bit_uncertainty']:.4f}"
    )
    if "hamming_map_ties_expected" in report:
        print(f"Hamming MAP with expected tie order (dmuh evaluate): {report['hamming_map_ties_expected']:.4f}")
    base = report["results"][0]
    print()
    print(
        "| ranking | " + " | ".join(m.upper() if m == "map" else m.upper().replace("P@", "P@") for m in metrics) + " |"
    )
    print("|---|" + "---:|" * len(metrics))
    for row in report["results"]:
        cells = [f"{row[m]:.4f}" + ("" if row is base else f" ({row[m] - base[m]:+.4f})") for m in metrics]
        print(f"| {row['ranking']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
