"""Write a synthetic scenes dataset, or time the generator.

python -m cloc_data.synthetic data/synthetic --n-train 30000 --n-val 1000 --n-test 1000 --seed 0
python -m cloc_data.synthetic data/synthetic --config my_config.json   # SyntheticSceneConfig fields
python -m cloc_data.synthetic --benchmark 20000                        # generate in memory, print speed
"""

from __future__ import annotations

import argparse
import json
import time

from cloc_data.synthetic.config import SyntheticSceneConfig
from cloc_data.synthetic.export import write_synthetic_dataset
from cloc_data.synthetic.scenes import generate_split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloc_data.synthetic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", nargs="?", help="dataset folder to write")
    parser.add_argument("--config", help="JSON file of SyntheticSceneConfig fields (others keep defaults)")
    parser.add_argument("--seed", type=int, help="overrides the config's seed")
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--n-val", type=int)
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in out_dir")
    parser.add_argument(
        "--benchmark", type=int, metavar="N", help="only generate N training images in memory"
    )
    args = parser.parse_args(argv)

    fields = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            fields = json.load(f)
    if args.seed is not None:
        fields["seed"] = args.seed
    config = SyntheticSceneConfig.from_dict(fields)

    start = time.perf_counter()
    if args.benchmark is not None:
        count = sum(1 for _ in generate_split(config, "train", args.benchmark))
        seconds = time.perf_counter() - start
        print(
            f"generated {count} {config.image_size}x{config.image_size} images in {seconds:.1f} s "
            f"({count / max(seconds, 1e-9):.0f} images/s)"
        )
        return 0
    if not args.out_dir:
        parser.error("out_dir is required unless --benchmark is given")
    info = write_synthetic_dataset(
        config, args.out_dir, args.n_train, args.n_val, args.n_test, overwrite=args.overwrite
    )
    seconds = time.perf_counter() - start
    for split, entry in info["splits"].items():
        print(f"{split}: {json.dumps(entry['counts'])}")
    print(f"wrote {args.out_dir} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
