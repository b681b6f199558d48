"""The references the LoRA tests compare zimage's reading with: diffusers' + PEFT's, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import torch


def diffusers_deltas(tiny_folder: Path, path: Path) -> dict[str, torch.Tensor]:
    """What diffusers makes of a LoRA file on the tiny transformer: ZImagePipeline.lora_state_dict (its key
    conversion, alpha folding) + load_lora_into_transformer (PEFT layers, metadata scaling), exactly the two steps
    of ZImagePipeline.load_lora_weights, then each PEFT layer's own delta (scaling * B @ A), (out, in) fp32."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from peft.tuners.lora import LoraLayer

    transformer = ZImageTransformer2DModel.from_pretrained(tiny_folder / "transformer", torch_dtype=torch.float32)
    state_dict, metadata = ZImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
    assert all("lora" in k for k in state_dict), "load_lora_weights would refuse this state dict"
    ZImagePipeline.load_lora_into_transformer(state_dict, transformer=transformer, adapter_name="ref",
                                              metadata=metadata)
    return {name: m.get_delta_weight("ref").float() for name, m in transformer.named_modules()
            if isinstance(m, LoraLayer) and "ref" in m.lora_A}


def peft_layer_deltas(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Each PEFT LoRA layer's delta (its own scaling * B @ A) by module name, the PeftModel wrapper prefix removed."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and adapter in m.lora_A:
            out[name.removeprefix("base_model.model.")] = m.get_delta_weight(adapter).float()
    return out


def randomise_lora_parameters(model: torch.nn.Module, seed: int) -> None:
    """PEFT initialises lora_B to zero (a no-op update): give A and B random values so every module matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def assert_same_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    """Same modules, and every delta equal within atol (fp32)."""
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))[:5]
    for name in want:
        assert got[name].shape == want[name].shape, name
        err = (got[name] - want[name]).abs().max().item()
        assert err <= atol, f"{name}: max |difference| {err:.3g} > {atol}"
