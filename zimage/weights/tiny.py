"""A tiny, randomly initialised Z-Image folder in the published layout, for tests and a first run without weights.

Same architecture and file layout as Tongyi-MAI/Z-Image-Turbo (fp32 transformer in safetensors shards with an
index, bf16 text encoder, a byte-level BPE tokenizer with a chat template, Flux-style VAE, scheduler), at a few
hundred thousand parameters: its images are noise, but every code path (loading, checks, encode, denoise,
decode, metadata) runs exactly as with the real model. The full-size variant (`full_size=True`) has the published
shapes and is what the GPU benchmarks use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from zimage.models.published import FULL_TEXT, FULL_TRANSFORMER, FULL_VAE, VAE_LAYOUT  # noqa: F401 (re-exported)

TINY_VERSION = 1  # bump when the tiny architecture changes, so caches rebuild

# The tiny stand-ins of the published shapes (zimage.models.published): same architecture, a few hundred
# thousand parameters.
TINY_TRANSFORMER = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                        axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512])
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, max_position_embeddings=2048)
TINY_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template, reduced to what the pipeline uses: user turns and the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
_WORDS = (
    "a an the of in on at with and photo portrait painting of cat dog bird fox horse city street forest mountain "
    "river sea sky sunset night snow rain light shadow red blue green yellow black white golden old young woman "
    "man child girl boy face eyes hair smile dress coat hat glass window door house castle tower bridge road car "
    "train boat flower tree grass garden cinematic detailed sharp soft warm cold bright dark style art digital "
    "oil watercolor sketch anime realistic 4k 8k high quality masterpiece lens bokeh studio film grain neon"
).split()


def build_tokenizer(folder: Path, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer (the Qwen2 kind) on a fixed word list and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
    )
    fast.save_pretrained(folder)
    return fast


def build_model_folder(folder: Path, full_size: bool = False, seed: int = 0, device: str = "cpu") -> Path:
    """Write a random-weight Z-Image folder in the published layout to `folder` (created). The same seed gives the
    same weights; torch's global random state is as it was afterwards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _seeded_global_generators(seed, device):
        return _build(folder, full_size, device)


@contextmanager
def _seeded_global_generators(seed: int, device: str):
    """diffusers' and transformers' constructors draw their initial weights from torch's global generators (they
    take no generator), so a local torch.Generator cannot seed them. Instead the global generators that the build
    uses (the CPU one, and the one of `device` if it is an accelerator) are seeded inside the build and restored on
    exit: the caller's random streams go on as before, and the weights are those that torch.manual_seed(seed) gave
    (torch.manual_seed itself would also seed every CUDA device, or queue that for a CUDA not yet started)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(dev.type)  # torch.cuda, torch.mps, ...
    index = dev.index if dev.index is not None else getattr(module, "current_device", lambda: 0)()
    with torch.random.fork_rng(devices=[index], device_type=dev.type):
        torch.default_generator.manual_seed(seed)
        if hasattr(module, "device"):  # several devices (CUDA): seed the one used
            with module.device(index):
                module.manual_seed(seed)
        else:  # one device (MPS)
            module.manual_seed(seed)
        yield


def _build(folder: Path, full_size: bool, device: str) -> Path:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer(folder / "tokenizer")
    text_shape = FULL_TEXT if full_size else dict(TINY_TEXT, vocab_size=len(tokenizer))
    with torch.device(device):
        transformer = ZImageTransformer2DModel(**(FULL_TRANSFORMER if full_size else TINY_TRANSFORMER))
        text_encoder = Qwen3Model(Qwen3Config(**text_shape, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True))
        vae = AutoencoderKL(**VAE_LAYOUT, **(FULL_VAE if full_size else TINY_VAE))
    if not full_size:
        # The constructors zero the pad tokens and some modulation layers; give them values so that tests see
        # every parameter matter (a wrong mapping or a skipped tensor changes the output).
        with torch.no_grad():
            for name, p in transformer.named_parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)
    # fp32 transformer in shards (published: 3 shards of ~8 GB), bf16 text encoder (published: 3 shards).
    transformer.save_pretrained(folder / "transformer", max_shard_size="10GB" if full_size else "600KB")
    text_encoder.to(torch.bfloat16).save_pretrained(folder / "text_encoder", max_shard_size="3GB" if full_size else "40KB")
    vae.save_pretrained(folder / "vae")  # fp32, as constructed
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False).save_pretrained(
        folder / "scheduler"
    )
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "ZImagePipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],  # ours is a small byte-level BPE
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))
    return folder


def ensure_tiny_model() -> Path:
    """The tiny model in zimage's cache, built on first use (a second or so), atomically."""
    from zimage.weights.locate import zimage_cache

    target = zimage_cache() / f"tiny-random-v{TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_model_folder(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its folder is as good as ours
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
