"""`zimage download`: fetch the weights when the user asks (never silently), from Hugging Face or ModelScope."""

from __future__ import annotations


from zimage.weights.layout import DEFAULT_MODEL_ID


def register(sub) -> None:
    p = sub.add_parser("download", help="fetch the model weights (~33 GB) into the Hugging Face or ModelScope cache")
    p.add_argument("--model", default=DEFAULT_MODEL_ID, help="repo id (default: %(default)s)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--source", choices=("huggingface", "modelscope"), default="huggingface")
    p.set_defaults(func=run)


def run(args) -> int:
    from zimage.weights.download import download

    path = download(args.model, args.revision, args.source)
    print(path)
    return 0
