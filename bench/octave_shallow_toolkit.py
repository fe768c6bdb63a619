"""The shallow classics of issue #33 against the authors' MATLAB files run in GNU Octave.

    PYTHONPATH=src python bench/octave_shallow_toolkit.py \
        --toolkit /path/to/willard-yuan/hashing-baseline-for-image-retrieval \
        --ksh /path/to/ColumbiaDVMM/Supervised-Hashing-with-Kernels [--bits 16] [--keep DIR]

Needs `octave` on the PATH and checkouts of the two repositories (e.g. `git --git-dir=... worktree`
or an exported tree); nothing of them is copied into dmuh. Not a test: it prints a table.

Data: scikit-learn's digits (1,797 x 64 pixels, 10 classes), the first 1,500 items train and
database, the other 297 queries, mean-centred by the training mean (the toolkit's
construct_data.m centres by the mean of all items; giving both sides the same centred data makes
the comparison exact). KSH needs more labelled items than digits has (KSH_demo.m: 2,000 labelled,
300 anchors, 48 bits), so it runs on seeded, overlapping Gaussian classes (means 0.4 N(0, I),
3,000 training + 500 query items, 32 dimensions, 10 classes) through the authors' unmodified KSH_demo.m script, in a folder whose
demo_patch_data.mat / label_index_2k.mat / sample_300.mat hold those data and the anchors and
labelled items dmuh's fit draws.

Random draws are shared where the MATLAB code draws them: PCA-RR's rotation and SKLSH's (R, B, T)
are dmuh's, handed to compressRR.m / RF_compress.m; density-sensitive hashing's litekmeans draws
its starting centres with randsample, which a randsample.m placed first on Octave's path answers
with dmuh's draw. Each row: the fraction of code bits equal between Octave's codes and dmuh's
(after flipping whole bits where a principal direction's or an eigenvector's sign is arbitrary:
PCAH, SH, KSH; for PCA-RR the signs of eigs' directions are set to dmuh's before the rotation), on the
training and the query items, and the MAP@all of the queries (Hamming ranking, relevance = same
class, ties broken by item order) from each.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.io import loadmat, savemat

from dmuh.methods import create_method
from dmuh.methods.components.shallow_toolkit import neighbour_distance_scale, principal_directions


def mean_average_precision(query_codes, db_codes, query_labels, db_labels) -> float:
    scores = []
    for q in range(len(query_codes)):
        distance = np.sum(query_codes[q] != db_codes, axis=1)
        order = np.argsort(distance, kind="stable")
        relevant = (db_labels[order] == query_labels[q]).astype(float)
        if relevant.sum() == 0:
            continue
        hits = np.cumsum(relevant)
        scores.append(float(np.sum(hits / np.arange(1, len(hits) + 1) * relevant) / relevant.sum()))
    return float(np.mean(scores))


def align_bits(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Flip whole bits of `ours` to agree with `reference` where that makes more bits equal."""
    signs = np.where(np.sum(ours == reference, axis=0) >= ours.shape[0] / 2, 1.0, -1.0)
    return ours * signs


def codes_of(fitted, x: np.ndarray) -> np.ndarray:
    features = torch.from_numpy(x).float()
    z = fitted(features) if isinstance(fitted, torch.nn.Module) else features @ fitted[0].t() + fitted[1]
    return np.where(z.detach().double().numpy() >= 0, 1.0, -1.0)


def octave(script: str, folder: Path) -> None:
    result = subprocess.run(
        ["octave", "--no-gui", "--quiet", "--eval", script], cwd=folder, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"octave failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def toolkit_rows(toolkit: Path, bits: int, work: Path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float64)
    ids = digits.target
    train, query = slice(0, 1500), slice(1500, None)
    x = x - x[train].mean(0)
    x_train, x_query = x[train], x[query]

    rr = create_method("pca-rr", bits=bits, num_train=1500, num_classes=0, seed=0)
    sklsh = create_method("sklsh", bits=bits, num_train=1500, num_classes=0, seed=0)
    r, b, t = (v.numpy() for v in sklsh.draws(x.shape[1]))
    scale = neighbour_distance_scale(torch.from_numpy(x_train), torch.Generator().manual_seed(0 + 1))
    dsh_clusters = int(bits * 1.5 + 0.5)
    dsh_start = torch.randperm(1500, generator=torch.Generator().manual_seed(0))[:dsh_clusters].numpy() + 1
    savemat(
        work / "data.mat",
        {
            "Xtr": x_train,
            "Xq": x_query,
            "nbits": float(bits),
            "Rrr": rr.rotation().numpy(),
            # dmuh's principal directions: the sign of each of eigs' is set to agree with them
            # before the rotation (a sign MATLAB leaves arbitrary; with a rotation it is not a whole bit)
            "Pdm": principal_directions(torch.from_numpy(x_train), bits).numpy(),
            "Rsk": r / scale,
            "Bsk": b[None, :],
            "Tsk": t[None, :],
            "dsh_start": dsh_start.astype(float),
        },
    )
    (work / "shadow").mkdir(exist_ok=True)
    # litekmeans's randsample(n, k), answered with dmuh's draw (1-based)
    (work / "shadow" / "randsample.m").write_text(
        "function y = randsample(n, k)\n  global DSH_START\n  y = DSH_START(1:k);\nend\n"
    )
    # litekmeans.m's option parser (getargs.m, not shipped with the toolkit): name/value pairs over defaults
    (work / "shadow" / "getargs.m").write_text(
        "function [eid, emsg, varargout] = getargs(pnames, dflts, varargin)\n"
        "  eid = ''; emsg = ''; varargout = dflts;\n"
        "  for j = 1:2:numel(varargin)\n"
        "    i = find(strcmpi(varargin{j}, pnames));\n"
        "    varargout{i} = varargin{j + 1};\n"
        "  end\n"
        "end\n"
    )
    (work / "compactbit.m").write_text("function B = compactbit(b)\n  B = b;\nend\n")  # bits as they are
    script = f"""
    addpath('{toolkit}/Method-PCAH'); addpath('{toolkit}/Method-RR'); addpath('{toolkit}/Method-SH');
    addpath('{toolkit}/Method-SKLSH'); addpath('{toolkit}/Method-DSH'); addpath('{toolkit}/utils');
    addpath('{work}'); addpath('{work}/shadow');
    load('{work}/data.mat'); X = [Xtr; Xq];
    p.nbits = nbits; p = trainPCAH(Xtr, p); [~, U] = compressPCAH(X, p); pcah = double(U);
    q.nbits = nbits; q = trainPCAH(Xtr, q); q.pcaW = q.pcaW .* sign(sum(q.pcaW .* Pdm)); q.r = Rrr; [~, U] = compressRR(X, q); pcarr = double(U);
    s.nbits = nbits; s = trainPCAH(Xtr, s); s = trainSH(Xtr, s); [~, U] = compressSH(X, s); sh = double(U > 0);
    f.R = Rsk; f.B = Bsk; f.T = Tsk; f.M = nbits; [~, Z] = RF_compress(X, f); sklsh = double(Z > 0);
    global DSH_START; DSH_START = dsh_start;
    d.nbits = nbits; d = trainDSH(Xtr, d); dsh = double(X * d.U' > repmat(d.intercept', size(X, 1), 1));
    save('-v7', '{work}/codes.mat', 'pcah', 'pcarr', 'sh', 'sklsh', 'dsh');
    """
    octave(script, work)
    theirs = loadmat(work / "codes.mat")
    rows = []
    features = torch.from_numpy(x_train)
    for name, key, aligned in [
        ("pcah", "pcah", True),
        ("pca-rr", "pcarr", False),
        ("sh", "sh", True),
        ("sklsh", "sklsh", False),
        ("densityhash", "dsh", False),
    ]:
        method = create_method(name, bits=bits, num_train=1500, num_classes=0)
        ours = codes_of(method.fit(features, None), x)
        reference = 2 * theirs[key] - 1
        if aligned:
            ours = align_bits(ours, reference)
        rows.append(summary(name, ours, reference, ids[train], ids[query], 1500))
    return rows


def summary(name, ours, reference, train_ids, query_ids, n_train):
    equal_train = float(np.mean(ours[:n_train] == reference[:n_train]))
    equal_query = float(np.mean(ours[n_train:] == reference[n_train:]))
    map_ours = mean_average_precision(ours[n_train:], ours[:n_train], query_ids, train_ids)
    map_theirs = mean_average_precision(reference[n_train:], reference[:n_train], query_ids, train_ids)
    return name, equal_train, equal_query, map_theirs, map_ours


def ksh_row(ksh_repo: Path, work: Path):
    generator = torch.Generator().manual_seed(1)
    n, tn, dim, classes = 3000, 500, 32, 10
    means = torch.randn(classes, dim, generator=generator, dtype=torch.float64) * 0.4
    ids = torch.randint(0, classes, (n + tn,), generator=generator)
    x = (means[ids] + torch.randn(n + tn, dim, generator=generator, dtype=torch.float64)).numpy()
    ids = ids.numpy()
    labels = np.eye(classes)[ids[:n]]
    method = create_method("ksh", bits=48, num_train=n, num_classes=classes)
    draw = torch.Generator().manual_seed(0)  # the fit's own draws: anchors, then the labelled items
    anchors = torch.randperm(n, generator=draw)[:300].numpy()
    labelled = torch.randperm(n, generator=draw)[:2000].numpy()
    folder = work / "ksh"
    folder.mkdir()
    for name in ("KSH_demo.m", "OptProjectionFast.m", "sqdist.m"):
        shutil.copy(ksh_repo / name, folder / name)
    savemat(
        folder / "demo_patch_data.mat",
        {
            "traindata": x[:n],
            "testdata": x[n:],
            "traingnd": ids[:n, None].astype(float),
            "testgnd": ids[n:, None].astype(float),
        },
    )
    savemat(folder / "label_index_2k.mat", {"label_index": (labelled + 1)[None, :].astype(float)})
    savemat(folder / "sample_300.mat", {"sample": (anchors + 1)[None, :].astype(float)})
    octave(
        "KSH_demo; load ksh_48; KTest = sqdist(testdata',anchor'); KTest = exp(-KTest/(2*sigma)); "
        "KTest = KTest-repmat(mvec,tn,1); tY = double(A1'*KTest' > 0); save('-v7', 'out.mat', 'Y', 'tY');",
        folder,
    )
    out = loadmat(folder / "out.mat")
    reference = np.vstack([np.where(out["Y"].T > 0, 1.0, -1.0), np.where(out["tY"].T > 0, 1.0, -1.0)])
    ours = codes_of(method.fit(torch.from_numpy(x[:n]), torch.from_numpy(labels)), x)
    ours = align_bits(ours, reference)  # an eigenvector's sign is arbitrary in eig and eigh alike
    return summary("ksh (48 bits, Gaussian classes)", ours, reference, ids[:n], ids[n:], n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toolkit", type=Path, required=True)
    parser.add_argument("--ksh", type=Path, required=True)
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--keep", type=Path, default=None, help="keep the Octave inputs and outputs here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp()) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = toolkit_rows(args.toolkit.resolve(), args.bits, work) + [ksh_row(args.ksh.resolve(), work)]
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"| method | equal bits, train | equal bits, queries | MAP Octave | MAP dmuh |  ({args.bits} bits unless said)"
    )
    print("|---|---:|---:|---:|---:|")
    for name, train, query, theirs, ours in rows:
        print(f"| {name} | {train:.4f} | {query:.4f} | {theirs:.4f} | {ours:.4f} |")
    assert all(math.isfinite(row[3]) for row in rows)


if __name__ == "__main__":
    main()
