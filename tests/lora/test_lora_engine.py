"""LoRAs through the engine against diffusers' ZImagePipeline + load_lora_weights (+ set_adapters), on the tiny model
(fp32, CPU, same seed): merged in every layout, two LoRAs with strengths, runtime slots, mixed-LoRA batches, exact
unmerge, and the errors a bad LoRA gives before any work."""

from __future__ import annotations

import pytest
import torch
from lora_writers import F, random_lora, write_ai_toolkit, write_diffsynth, write_diffusers, write_kohya

from zimage.errors import UsageError
from zimage.request import GenerateRequest

TOL = 1e-4
REQ = dict(prompts=("a red fox in the snow",), width=256, height=256, steps=3)


def gentle(lora: dict, factor: float = 0.25) -> dict:
    """Updates a few percent of the tiny model's weights, as a trained LoRA's are: random factors of 0.2 (the
    writers' default) give updates larger than the weights themselves, whose fp32 rounding then grows over the
    steps past what the comparison is about (merged W + dW vs diffusers' x W + x dW)."""
    return {m: F(f.down * factor, f.up, f.alpha) for m, f in lora.items()}


@pytest.fixture(scope="module")
def files(transformer_shapes, text_encoder_shapes, tmp_path_factory):
    """LoRA A (rank 4, alpha 8, every linear) in four layouts; A without the caption embedder (what runtime slots
    can apply); LoRA B (rank 2, alpha 1, every linear but the caption embedder's)."""
    folder = tmp_path_factory.mktemp("loras")
    a = gentle(random_lora(transformer_shapes, rank=4, alpha=8.0, seed=1))
    runtime = {m: s for m, s in transformer_shapes.items() if not m.startswith("cap_embedder")}
    b = gentle(random_lora(runtime, rank=2, alpha=1.0, seed=2))
    a_rt = {m: f for m, f in a.items() if m in runtime}
    return {
        "diffusers": write_diffusers(folder / "a.safetensors", a),
        "kohya": write_kohya(folder / "a_kohya.safetensors", a),
        "ai-toolkit": write_ai_toolkit(folder / "a_ait.safetensors", a, alphas=True),
        "diffsynth": write_diffsynth(folder / "a_ds.safetensors", a),
        "b": write_diffusers(folder / "b.safetensors", b),
        "a_rt": write_diffusers(folder / "a_rt.safetensors", a_rt),
        "c": write_diffusers(folder / "c.safetensors", gentle(random_lora(runtime, rank=6, alpha=6.0, seed=3))),
        "text": write_diffusers(folder / "te.safetensors", gentle(random_lora(text_encoder_shapes, rank=2, seed=4)),
                                prefix="text_encoder."),
    }


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    from diffusers import ZImagePipeline

    p = ZImagePipeline.from_pretrained(str(tiny_folder), dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def reference(pipe, loras, seed):
    """Latents of diffusers with `loras` [(file, weight)] loaded (each its own adapter) and weighted."""
    pipe.unload_lora_weights()
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
    if loras:
        pipe.set_adapters([f"l{i}" for i in range(len(loras))], adapter_weights=[w for _, w in loras])
    with torch.no_grad():
        out = pipe(prompt=REQ["prompts"][0], width=REQ["width"], height=REQ["height"],
                   num_inference_steps=REQ["steps"], guidance_scale=0.0,
                   generator=[torch.Generator("cpu").manual_seed(seed)], output_type="latent").images
    pipe.unload_lora_weights()
    return out


def latents(engine, req):
    cond, _ = engine.encode([req])
    slots = engine.loras.row_slots([req])
    out, _ = engine.denoise(cond, engine.noise(req.image_seeds(), req), req, lora_slots=slots)
    return out


def load(tiny_folder, **config):
    from zimage.engine.engine import Engine

    return Engine.load(**{"model": str(tiny_folder), "device": "cpu", "dtype": "fp32", "speed": "eager", **config})


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "ai-toolkit", "diffsynth"])
def test_merged_lora_equals_diffusers(tiny_folder, files, pipe, layout):
    engine = load(tiny_folder, loras=(f"{files[layout]}:0.7",))
    got = latents(engine, GenerateRequest(**REQ, seed=5))
    want = reference(pipe, [(files["diffusers"], 0.7)], 5)
    plain = reference(pipe, [], 5)
    assert (want - plain).abs().max() > 0.05  # the LoRA changes the image: the comparison is not vacuous
    assert (got - want).abs().max().item() <= TOL


def test_two_merged_loras_with_strengths_equal_set_adapters(tiny_folder, files, pipe):
    engine = load(tiny_folder, loras=(f"{files['diffusers']}:0.6", f"{files['b']}:-0.4"))
    got = latents(engine, GenerateRequest(**REQ, seed=9))
    want = reference(pipe, [(files["diffusers"], 0.6), (files["b"], -0.4)], 9)
    assert (got - want).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def runtime(tiny_folder):
    return load(tiny_folder, lora_slots=3, lora_rank=8)


def test_runtime_slots_equal_diffusers_and_leave_other_requests_alone(runtime, files, pipe):
    got = latents(runtime, GenerateRequest(**REQ, seed=5, loras=(f"{files['a_rt']}:0.7",)))
    assert (got - reference(pipe, [(files["a_rt"], 0.7)], 5)).abs().max().item() <= TOL
    two = latents(runtime, GenerateRequest(**REQ, seed=6, loras=(f"{files['a_rt']}:0.5", f"{files['b']}:0.8")))
    assert (two - reference(pipe, [(files["a_rt"], 0.5), (files["b"], 0.8)], 6)).abs().max().item() <= TOL
    none = latents(runtime, GenerateRequest(**REQ, seed=5))  # the slots keep their sets; this row uses none
    assert (none - reference(pipe, [], 5)).abs().max().item() <= TOL


def test_a_mixed_lora_batch_gives_each_image_its_solo_result(runtime, files):
    import numpy as np

    reqs = [GenerateRequest(**REQ, seed=11, loras=(f"{files['a_rt']}:0.7",)),
            GenerateRequest(**REQ, seed=12, loras=(f"{files['b']}:1.0",)),
            GenerateRequest(**REQ, seed=13),
            GenerateRequest(**REQ, seed=14, loras=(f"{files['a_rt']}:0.7",))]
    batch = runtime.generate_many(reqs)
    for r, res in zip(reqs, batch):
        alone = runtime.generate(r).images[0].image
        diff = np.abs(np.asarray(res.images[0].image, np.int16) - np.asarray(alone, np.int16)).max()
        assert diff <= 1, (r.seed, diff)
    first, last = (np.asarray(batch[i].images[0].image, np.int16) for i in (0, 3))
    assert np.abs(first - np.asarray(batch[2].images[0].image, np.int16)).max() > 10  # LoRA rows differ


def test_a_set_beyond_the_slots_rank_or_outside_their_layers_is_refused(runtime, files):
    with pytest.raises(UsageError, match="rank 10 .* hold rank 8"):
        runtime.generate(GenerateRequest(**REQ, seed=1, loras=(f"{files['a_rt']}:1", f"{files['c']}:1")))
    with pytest.raises(UsageError, match="changes the text encoder.*merged"):
        runtime.generate(GenerateRequest(**REQ, seed=1, loras=(f"{files['text']}:1",)))


def test_runtime_slots_cover_every_linear_the_caption_embedder_included(runtime, files, pipe):
    got = latents(runtime, GenerateRequest(**REQ, seed=8, loras=(f"{files['diffusers']}:0.7",)))
    assert (got - reference(pipe, [(files["diffusers"], 0.7)], 8)).abs().max().item() <= TOL


def test_a_text_encoder_lora_merges_into_the_text_encoder(tiny_folder, files):
    plain = load(tiny_folder)
    engine = load(tiny_folder, loras=(f"{files['text']}:1.0",))
    req = GenerateRequest(**REQ, seed=3)
    a, b = (e.encode([req])[0].positive[0] for e in (plain, engine))
    assert (a - b).abs().max() > 1e-3  # the captions changed
    module = "layers.0.self_attn.q_proj"
    w0 = plain.text_encoder.get_submodule(module).weight
    w1 = engine.text_encoder.get_submodule(module).weight
    from zimage.weights.lora import read_lora

    delta = read_lora(files["text"]).text_encoder[module].delta()
    torch.testing.assert_close(w1, w0 + delta, rtol=0, atol=1e-6)


def test_changing_the_merged_set_is_exact(tiny_folder, files):
    engine = load(tiny_folder, loras=(f"{files['diffusers']}:0.9",))
    fresh = load(tiny_folder)
    assert engine.set_loras((f"{files['b']}:1.0",))
    other = load(tiny_folder, loras=(f"{files['b']}:1.0",))
    for (k, v), w in zip(engine.transformer.state_dict().items(), other.transformer.state_dict().values()):
        assert torch.equal(v, w), k
    assert engine.set_loras(()) and not engine.set_loras(())
    for (k, v), w in zip(engine.transformer.state_dict().items(), fresh.transformer.state_dict().values()):
        assert torch.equal(v, w), k


def test_per_request_loras_need_runtime_slots(tiny_folder, files):
    engine = load(tiny_folder)
    with pytest.raises(UsageError, match="runtime slots"):
        engine.generate(GenerateRequest(**REQ, seed=1, loras=(str(files["b"]),)))


def test_a_bad_lora_fails_before_the_weights_are_read(tiny_folder, tmp_path, monkeypatch):
    from zimage.weights import load as weights_load
    from zimage.weights.lora import LoraError

    def no_reading(*a, **k):
        raise AssertionError("weights were read before the LoRA was checked")

    monkeypatch.setattr(weights_load, "load_network", no_reading)
    with pytest.raises(UsageError, match="no such file"):
        load(tiny_folder, loras=(str(tmp_path / "missing.safetensors"),))
    from safetensors.torch import save_file

    flux = tmp_path / "flux.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, str(flux))
    with pytest.raises(LoraError, match="Flux") as e:
        load(tiny_folder, loras=(str(flux),))
    assert str(flux) in str(e.value)


def test_names_only_engines_refuse_paths(tiny_folder, files):
    engine = load(tiny_folder, lora_slots=1, lora_rank=4, lora_dir=str(files["b"].parent), lora_names_only=True)
    got = engine.generate(GenerateRequest(**REQ, seed=1, loras=("b:0.5",)))
    assert got.images
    with pytest.raises(UsageError, match="not a path"):
        engine.generate(GenerateRequest(**REQ, seed=1, loras=(str(files["b"]),)))
    with pytest.raises(UsageError, match="no LoRA named 'nope'"):
        engine.generate(GenerateRequest(**REQ, seed=1, loras=("nope",)))


def test_runtime_slots_survive_fused_projections(tiny_folder, files, pipe):
    """Compile mode fuses q/k/v and w1/w3 (zimage.speed.fuse) after the runtime slots are installed: the slots'
    sets stay, and sets written afterwards go into the right parts of the fused layers."""
    from zimage.models.lora import LoraLinear
    from zimage.speed.fuse import fuse_block

    engine = load(tiny_folder, lora_slots=2, lora_rank=8)
    a = GenerateRequest(**REQ, seed=5, loras=(f"{files['a_rt']}:0.7",))
    before = latents(engine, a)  # set a written into a slot before fusion
    for block in engine.transformer.blocks():
        fuse_block(block)
    qkv = engine.transformer.layers[0].attention.to_qkv
    assert isinstance(qkv, LoraLinear) and qkv.parts == 3
    assert (latents(engine, a) - before).abs().max().item() <= 1e-5
    b = GenerateRequest(**REQ, seed=6, loras=(f"{files['a_rt']}:0.5", f"{files['b']}:0.8"))
    got = latents(engine, b)  # a new set: written into the fused layers' parts
    assert (got - reference(pipe, [(files["a_rt"], 0.5), (files["b"], 0.8)], 6)).abs().max().item() <= TOL
    plain = latents(engine, GenerateRequest(**REQ, seed=5))
    assert (plain - reference(pipe, [], 5)).abs().max().item() <= TOL


def test_compile_speed_widens_the_slots_and_their_one_gemm_form_equals_diffusers(tiny_folder, files, pipe,
                                                                                 monkeypatch):
    """Under the compile speed the fused blocks' LoRA layers are widened (zimage.speed.lora_wide). Their compiled
    code path (run here uncompiled, as dynamo traces it) gives diffusers' latents for one set, for two sets that
    share a batch (the mixed path) and for no set."""
    from zimage.models.lora import WideLinear
    from zimage.speed.apply import uncompile

    engine = load(tiny_folder, lora_slots=2, lora_rank=8, speed="compile")
    block = engine.transformer.layers[0]
    assert all(isinstance(m.base, WideLinear) for m in (block.attention.to_qkv, block.feed_forward.w13,
                                                        block.feed_forward.w2))
    uncompile(engine.transformer, engine.vae)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    a = GenerateRequest(**REQ, seed=5, loras=(f"{files['a_rt']}:0.7",))
    assert (latents(engine, a) - reference(pipe, [(files["a_rt"], 0.7)], 5)).abs().max().item() <= TOL
    b = GenerateRequest(**REQ, seed=6, loras=(f"{files['b']}:0.8",))
    cond, _ = engine.encode([a, b])
    noise = engine.noise(a.image_seeds() + b.image_seeds(), a)
    both, _ = engine.denoise(cond, noise, a, lora_slots=engine.loras.row_slots([a, b]))
    assert engine.loras.runtime.rows.mixed
    assert (both[1:] - reference(pipe, [(files["b"], 0.8)], 6)).abs().max().item() <= TOL
    assert (both[:1] - reference(pipe, [(files["a_rt"], 0.7)], 5)).abs().max().item() <= TOL
    plain = latents(engine, GenerateRequest(**REQ, seed=5))
    assert (plain - reference(pipe, [], 5)).abs().max().item() <= TOL
