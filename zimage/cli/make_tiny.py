"""`zimage make-tiny FOLDER`: write a random-weight Z-Image folder in the published layout."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("make-tiny", help="write a random-weight model folder (tests, benchmarks)",
                       description="Write a randomly initialised Z-Image folder in the published layout: tiny by "
                                   "default (tests), or --full-size (the real shapes, 33 GB, for benchmarks).")
    p.add_argument("folder", type=Path)
    p.add_argument("--full-size", action="store_true", help="the published shapes (6.15B transformer, Qwen3-4B)")
    p.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster for --full-size)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from zimage.errors import UsageError
    from zimage.weights.tiny import build_model_folder

    if args.folder.exists() and any(args.folder.iterdir()):
        raise UsageError(f"{args.folder} exists and is not empty", param="folder")
    build_model_folder(args.folder, full_size=args.full_size, seed=args.seed, device=args.device)
    print(args.folder)
    return 0
