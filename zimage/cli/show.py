"""`zimage show FILE.png`: print the parameters an image was made with."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("show", help="print the parameters stored in a PNG")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print zimage's JSON record instead of A1111's text")
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import asdict

    from zimage.io.png import read_metadata

    meta = read_metadata(args.file)
    print(json.dumps(asdict(meta), indent=2, ensure_ascii=False) if args.json else meta.a1111_parameters())
    return 0
