"""Write the synthetic CIFAR-10 image-text pairs (`dmuh.data.synthetic_pairs`) as a paired .npz.

    python bench/cifar_pairs.py --data cifar10-jpeg.zip --features feats.npz --out pairs.npz

The image modality is the feature vectors of `--features` (a features .npz of the same data, in the
same item order: checked by ids) or, without it, the images themselves (32x32 uint8). The text is a
binary bag of words of the generated tags (`Vocabulary.fit`); labels, class names, ids and subsets
come from --data. Every figure on this file is a synthetic-pairs result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dmuh.data import FeatureSource, Vocabulary, open_source
from dmuh.data.synthetic_pairs import tag_texts
from dmuh.errors import DmuhError
from dmuh.utils.io import atomic_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a single-label image source (the CIFAR-10 zip)")
    parser.add_argument("--features", help="a features .npz of --data to use as the image modality")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drop", type=float, default=0.3)
    parser.add_argument("--related", type=float, default=0.4)
    parser.add_argument("--noise", type=int, default=3)
    parser.add_argument("--swap", type=float, default=0.1)
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists() and not args.force:
            raise DmuhError(f"--out {out} exists; pass --force to replace it")
        source = open_source(args.data)
        if (source.labels.sum(axis=1) != 1).any():
            raise DmuhError(f"--data {args.data}: synthetic tags need exactly one label per item")
        texts = tag_texts(
            source.labels.argmax(axis=1),
            source.class_names,
            seed=args.seed,
            drop=args.drop,
            related=args.related,
            noise=args.noise,
            swap=args.swap,
        )
        vocabulary = Vocabulary.fit(texts)
        if args.features:
            features = FeatureSource.load(args.features)
            if features.ids != source.ids:
                raise DmuhError(
                    f"--features {args.features}: its items are not those of --data, in that order (ids differ)"
                )
            image = features.features
        else:
            image = source.decode()
        arrays = dict(
            image=image,
            text=vocabulary.vectorize(texts).astype(np.uint8),
            labels=source.labels,
            class_names=np.array(source.class_names),
            ids=np.array(source.ids),
            vocabulary=np.array(vocabulary.words),
        )
        if source.subsets is not None:
            arrays["subsets"] = source.subsets
        with atomic_path(out) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        tags = arrays["text"].sum(axis=1)
        print(
            f"{out}: {len(texts)} pairs, image {image.shape[1:]} , {len(vocabulary)} words, "
            f"{tags.mean():.1f} tags per item (min {tags.min()}, max {tags.max()})"
        )
        return 0
    except DmuhError as error:
        print(f"cifar_pairs: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
