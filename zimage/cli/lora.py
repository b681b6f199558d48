"""`zimage lora inspect FILE`: what a LoRA file is (layout, networks, ranks, alphas, targets, hashes), read and
normalised as the engine reads it (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("lora", help="inspect LoRA files", description="Work with LoRA files without loading a model.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    inspect = verbs.add_parser("inspect", help="print a LoRA file's layout, ranks, alphas, targets and hashes",
                               description="Read a LoRA (.safetensors file or PEFT folder) as zimage applies it and "
                                           "print what it is: the layout detected, each network's modules, ranks, "
                                           "alphas and the scale they give, the targets by block, the hashes "
                                           "(AUTOMATIC1111's short hash among them) and the trainer's metadata.")
    inspect.add_argument("file", type=Path, help="a .safetensors file or a PEFT folder")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from zimage.weights.lora import describe, read_lora

    info = describe(read_lora(args.file))
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(f"{info['name']}: {info['format']} layout ({info['path']})")
    print(f"  sha256 {info['sha256']}, short hash {info['short_hash']} (as AUTOMATIC1111's 'Lora hashes')")
    for network, n in info["networks"].items():
        alphas = ", ".join(f"{a:g}" for a in n["alphas"]) or "none (scale 1)"
        print(f"  {network}: {n['modules']} modules, rank {', '.join(map(str, n['ranks']))}, alpha {alphas}, "
              f"scale {', '.join(f'{s:g}' for s in n['scales'])}, {n['parameters']:,} parameters")
        for line in n["targets"]:
            print(f"    {line}")
    for key, value in info.get("trainer", {}).items():
        print(f"  {key}: {value}")
    for note in info.get("notes", []):
        print(f"  note: {note}")
    return 0
