"""LoRAs over HTTP: `loras` in requests (checked when submitted), GET /v1/loras, the serve flags, mixed-LoRA batches
that give each image its solo pixels, and steps left to the model's recipe."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from tests.lora.lora_writers import random_lora, write_diffusers
from tests.server.conftest import GatedEngine

SIZE = 256
STEPS = 2


def body(**kw):
    return {"prompt": "a lighthouse", "size": f"{SIZE}x{SIZE}", "num_inference_steps": STEPS, **kw}


@pytest.fixture(scope="module")
def lora_dir(tiny_folder, tmp_path_factory):
    """a (rank 4), b (rank 2), wide (rank 6: a + wide is over the slots' rank 8), broken (not a LoRA), a README."""
    from zimage.weights.lora import linear_shapes
    from zimage.weights.networks import build_transformer

    shapes = linear_shapes(build_transformer(tiny_folder).module)
    folder = tmp_path_factory.mktemp("server-loras")

    def gentle(lora):  # updates of a few percent, as trained LoRAs make (lora_writers' factors are larger)
        return {m: f._replace(down=f.down * 0.25) for m, f in lora.items()}

    write_diffusers(folder / "a.safetensors", gentle(random_lora(shapes, rank=4, alpha=8.0, seed=1)))
    write_diffusers(folder / "b.safetensors", gentle(random_lora(shapes, rank=2, alpha=1.0, seed=2)))
    write_diffusers(folder / "wide.safetensors", gentle(random_lora(shapes, rank=6, alpha=6.0, seed=3)))
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    (folder / "README.txt").write_text("not a LoRA: not listed")
    return folder


@pytest.fixture(scope="module")
def lora_engine(tiny_folder, lora_dir):
    """The tiny model with 3 runtime slots of rank 8, names only (as `serve --lora-dir` builds it)."""
    from zimage.engine.engine import Engine

    return Engine.load(model=str(tiny_folder), device="cpu", dtype="fp32", speed="eager", lora_dir=str(lora_dir),
                       lora_slots=3, lora_rank=8, lora_names_only=True)


@pytest.fixture
def lora_gated(lora_engine):
    g = GatedEngine(lora_engine)
    yield g
    g.gate.set()


@pytest.fixture
def lc(make_client, lora_gated):
    return make_client(engine_=lora_gated)


def error_of(response, status=400):
    assert response.status_code == status, response.text
    return response.json()["error"]


# ------------------------------------------------------------------ bad inputs: 400 at submit, no job made
@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/images/generations"])
def test_an_unknown_name_is_refused_naming_it_and_what_the_folder_has(lc, lora_gated, route):
    err = error_of(lc.post(route, json=body(loras=[{"name": "nope"}])))
    assert err["code"] == "unknown_lora" and err["param"] == "loras"
    assert "'nope'" in err["message"] and "a, b, broken, wide" in err["message"]
    assert lora_gated.calls == [] and lc.get("/v1/jobs").json()["data"] == []


@pytest.mark.parametrize("name", ["../a", "/etc/passwd", "sub/a", "..\\a", "..", ".hidden", "C:\\loras\\a"])
def test_a_path_is_refused_before_anything_is_read(lc, lora_dir, monkeypatch, name):
    from zimage.engine.loras import LoraLibrary

    def no_reading(*a, **k):
        raise AssertionError("a path reached the LoRA library")

    monkeypatch.setattr(LoraLibrary, "path_of", no_reading)
    monkeypatch.setattr(LoraLibrary, "read", no_reading)
    err = error_of(lc.post("/v1/jobs", json=body(loras=[{"name": name}])))
    assert err["code"] == "invalid_lora_name" and repr(name) in err["message"]
    assert str(lora_dir) not in err["message"]


def test_more_than_eight_loras_are_refused(lc):
    err = error_of(lc.post("/v1/jobs", json=body(loras=[{"name": f"l{i}"} for i in range(9)])))
    assert err["param"] == "loras" and "8" in err["message"]


@pytest.mark.parametrize("scale", [11, -10.5, 1e308])
def test_a_scale_beyond_ten_is_refused(lc, scale):
    err = error_of(lc.post("/v1/jobs", json=body(loras=[{"name": "a", "scale": scale}])))
    assert err["param"] == "loras.0.scale" and "10" in err["message"]


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_a_nan_or_infinite_scale_is_refused(lc, raw):
    text = '{"prompt": "x", "size": "256x256", "loras": [{"name": "a", "scale": %s}]}' % raw
    err = error_of(lc.post("/v1/jobs", content=text, headers={"Content-Type": "application/json"}))
    assert err["param"] == "loras.0.scale"


@pytest.mark.parametrize("entry", [{"name": "a", "scale": "1"}, {"name": "a", "strength": 1}, {"scale": 1},
                                   {"name": ""}, "a:0.5", {"name": "a", "scale": True}])
def test_malformed_entries_are_refused(lc, entry):
    assert error_of(lc.post("/v1/jobs", json=body(loras=[entry])))["param"].startswith("loras")


def test_a_name_given_twice_is_refused(lc):
    err = error_of(lc.post("/v1/jobs", json=body(loras=[{"name": "a"}, {"name": "a", "scale": 0.5}])))
    assert err["param"] == "loras" and "twice" in err["message"]


def test_a_broken_file_or_a_set_over_the_slots_rank_is_refused_at_submit(lc, lora_dir, lora_gated):
    err = error_of(lc.post("/v1/jobs", json=body(loras=[{"name": "broken"}])))
    assert err["code"] == "invalid_lora" and "broken.safetensors" in err["message"]
    assert str(lora_dir) not in err["message"]  # clients see file names, not where the server keeps them
    err = error_of(lc.post("/v1/jobs", json=body(loras=[{"name": "a"}, {"name": "wide"}])))
    assert err["code"] == "invalid_lora" and "rank 10" in err["message"] and "--lora-rank" in err["message"]
    assert lora_gated.calls == []


def test_loras_on_a_server_without_lora_dir_say_how_to_enable(client):
    err = error_of(client.post("/v1/jobs", json=body(loras=[{"name": "a"}])))
    assert err["code"] == "loras_disabled" and "--lora-dir" in err["message"]


def test_no_loras_and_an_empty_list_are_the_same_plain_request(client, wait_status):
    job = client.post("/v1/jobs", json=body(loras=[])).json()
    assert wait_status(client, job["id"])["params"]["loras"] == []


# ------------------------------------------------------------------ runs
def test_loras_are_stored_echoed_and_rerun_after_a_restart(lc, lora_gated, wait_status):
    from zimage.server.worker import request_from_params

    job = lc.post("/v1/jobs", json=body(loras=[{"name": "a", "scale": 0.7}, {"name": "b"}], seed=3)).json()
    assert job["params"]["loras"] == [{"name": "a", "scale": 0.7}, {"name": "b", "scale": 1.0}]
    done = wait_status(lc, job["id"])
    assert done["status"] == "succeeded", done
    assert lora_gated.calls[-1][0].loras == request_from_params(done["params"]).loras  # what a restart re-runs
    assert [(s.name, s.scale) for s in lora_gated.calls[-1][0].loras] == [("a", 0.7), ("b", 1.0)]


def test_a_restart_runs_a_queued_jobs_loras(make_client, lora_engine, tmp_path, wait_status):
    """A job queued when the server stopped runs after the restart with its LoRAs (from the stored params)."""
    first = GatedEngine(lora_engine)
    first.gate.clear()
    c = make_client(engine_=first)
    c.post("/v1/jobs", json=body(seed=1))
    assert first.entered.acquire(timeout=30)
    job = c.post("/v1/jobs", json=body(loras=[{"name": "a", "scale": 0.5}], seed=4)).json()
    first.gate.set()
    c.__exit__(None, None, None)  # a stop: the queued job stays queued in the store (a second exit is a no-op)
    again = GatedEngine(lora_engine)
    c2 = make_client(engine_=again)
    assert wait_status(c2, job["id"])["status"] == "succeeded"
    ran = [r for call in again.calls for r in call if r.seed == 4]
    assert [[(s.name, s.scale) for s in r.loras] for r in ran] == [[("a", 0.5)]]


def test_different_lora_sets_share_one_engine_call_with_solo_pixels(lc, lora_gated, lora_engine, wait_status):
    from zimage.request import GenerateRequest

    lora_gated.gate.clear()
    first = lc.post("/v1/jobs", json=body(seed=1)).json()
    assert lora_gated.entered.acquire(timeout=30)
    sets = [[{"name": "a", "scale": 0.8}], [{"name": "b", "scale": -1.5}], [], [{"name": "a"}, {"name": "b"}]]
    jobs = [lc.post("/v1/jobs", json=body(prompt="a red fox", seed=20 + i, loras=s)).json()
            for i, s in enumerate(sets)]
    lora_gated.gate.set()
    done = [wait_status(lc, j["id"]) for j in [first, *jobs]]
    assert all(d["status"] == "succeeded" for d in done), done
    assert [len(call) for call in lora_gated.calls] == [1, 4]  # the four sets in one engine call
    pixels = []
    for s, d in zip(sets, done[1:]):
        served = np.asarray(Image.open(io.BytesIO(lc.get(d["images"][0]["url"]).content)), dtype=np.int16)
        solo = lora_engine.generate(GenerateRequest(prompts=("a red fox",), width=SIZE, height=SIZE, steps=STEPS,
                                                    seed=d["params"]["seed"],
                                                    loras=tuple((x["name"], x.get("scale", 1.0)) for x in s)))
        diff = np.abs(served - np.asarray(solo.images[0].image, dtype=np.int16))
        assert diff.max() <= 1, (s, diff.max())
        pixels.append(served)
    plain = lora_engine.generate(GenerateRequest(prompts=("a red fox",), width=SIZE, height=SIZE, steps=STEPS,
                                                 seed=done[1]["params"]["seed"]))
    assert np.abs(pixels[0] - np.asarray(plain.images[0].image, np.int16)).max() > 10  # the LoRA did something


def test_a_batch_holds_at_most_lora_slots_different_sets(make_client, lora_engine, wait_status):
    from dataclasses import replace

    gated = GatedEngine(lora_engine)
    # the same engine, said to have 2 slots: the worker must not hand it a third set in one call
    gated.config = replace(lora_engine.config, lora_slots=2)
    c = make_client(engine_=gated)
    gated.gate.clear()
    first = c.post("/v1/jobs", json=body(seed=1)).json()
    assert gated.entered.acquire(timeout=30)
    sets = [[{"name": "a"}], [{"name": "b"}], [], [{"name": "a"}, {"name": "b"}], [{"name": "a"}]]
    jobs = [c.post("/v1/jobs", json=body(seed=30 + i, loras=s)).json() for i, s in enumerate(sets)]
    gated.gate.set()
    assert all(wait_status(c, j["id"])["status"] == "succeeded" for j in [first, *jobs])
    got = [[tuple(s.name for s in r.loras) for r in call] for call in gated.calls[1:]]
    # a, b, none and a again share a call (two sets); a+b, a third set, waits for the next one
    assert got == [[("a",), ("b",), (), ("a",)], [("a", "b")]]


# ------------------------------------------------------------------ GET /v1/loras
def test_the_listing_describes_each_file_and_lists_broken_ones_with_their_error(lc, lora_dir):
    got = lc.get("/v1/loras")
    assert got.status_code == 200, got.text
    listing = got.json()
    assert listing["object"] == "list" and listing["runtime"] is True and listing["merged"] == []
    by_name = {e["name"]: e for e in listing["data"]}
    assert sorted(by_name) == ["a", "b", "broken", "wide"]  # README.txt is not a LoRA
    a = by_name["a"]
    assert a["file"] == "a.safetensors" and a["rank"] == 4 and a["layout"] == "diffusers"
    assert len(a["sha256"]) == 64 and len(a["short_hash"]) == 12 and a["targets"] > 10
    assert a["size_bytes"] == (lora_dir / "a.safetensors").stat().st_size and a["merged"] is False
    assert "error" not in a
    broken = by_name["broken"]
    assert broken["error"] and "sha256" not in broken and str(lora_dir) not in broken["error"]


def test_the_listing_marks_the_merged_set(make_client, tiny_folder, lora_dir):
    from zimage.engine.engine import Engine

    merged = Engine.load(model=str(tiny_folder), device="cpu", dtype="fp32", speed="eager", lora_dir=str(lora_dir),
                         loras=("b:0.5",))  # --lora b:0.5 without slots: merged only
    c = make_client(engine_=merged)
    listing = c.get("/v1/loras").json()
    assert listing["runtime"] is False
    assert [(m["name"], m["scale"]) for m in listing["merged"]] == [("b", 0.5)]
    b = next(e for e in listing["data"] if e["name"] == "b")
    assert b["merged"] is True and b["merged_scale"] == 0.5
    assert error_of(c.post("/v1/jobs", json=body(loras=[{"name": "a"}])))["code"] == "loras_disabled"


def test_the_listing_needs_the_api_key_and_is_empty_without_a_folder(make_client):
    c = make_client(api_key="k" * 40)
    assert c.get("/v1/loras").status_code == 401
    listing = c.get("/v1/loras", headers={"Authorization": "Bearer " + "k" * 40}).json()
    assert listing == {"object": "list", "data": [], "runtime": False, "merged": []}


def test_the_openapi_schema_shows_loras_and_the_route(client):
    schema = client.get("/openapi.json").json()
    assert "/v1/loras" in schema["paths"]
    parts = schema["components"]["schemas"]
    for model in ("ImageJobCreate", "ImageGenerationRequest"):  # the bodies of /v1/jobs and /v1/images/generations
        assert "loras" in parts[model]["properties"]
    assert parts["ImageJobCreate"]["properties"]["loras"]["maxItems"] == 8
    scale = parts["LoraRef"]["properties"]["scale"]
    assert scale["minimum"] == -10 and scale["maximum"] == 10 and scale["default"] == 1.0
    assert "recipe" in parts["ImageJobCreate"]["properties"]["num_inference_steps"]["description"]


# ------------------------------------------------------------------ the recipe's steps
def test_omitted_steps_and_guidance_run_the_models_recipe(make_client, engine, wait_status):
    totals = []

    class Recording(GatedEngine):
        def generate_many(self, requests, on_progress=None, cancels=None):
            def record(prog):
                if prog.phase == "denoise":
                    totals.append(prog.total)
                on_progress(prog)

            return super().generate_many(requests, record, cancels)

    rec = Recording(engine)
    c = make_client(engine_=rec, default_steps=None)
    job = c.post("/v1/jobs", json={"prompt": "a lighthouse", "size": f"{SIZE}x{SIZE}"}).json()
    done = wait_status(c, job["id"])
    assert done["status"] == "succeeded"
    assert engine.recipe.steps == 8
    assert set(totals) == {8} and done["params"]["steps"] == 8 and done["params"]["guidance"] == 0.0
    stored = c.app.state.zimage.store.get(job["id"]).params
    assert stored["steps"] is None and stored["guidance"] is None  # a re-run takes the model's recipe again
    assert rec.calls[0][0].steps == 8


# ------------------------------------------------------------------ zimage serve flags
def serve_args(*argv):
    import argparse

    from zimage.cli import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_serve_flags_set_the_engines_lora_config(lora_dir, tmp_path):
    from zimage.cli.serve import DEFAULT_LORA_SLOTS, settings_from_args

    s = settings_from_args(serve_args("--lora-dir", str(lora_dir), "--lora", "b:0.5", "--data-dir", str(tmp_path)),
                           environ={})
    e = s.engine
    assert (e.lora_dir, e.lora_slots, e.lora_names_only, e.lora_rank) == (str(lora_dir), DEFAULT_LORA_SLOTS, True, 64)
    assert [(x.name, x.scale) for x in e.loras] == [("b", 0.5)]
    e = settings_from_args(serve_args("--lora-dir", str(lora_dir), "--lora-slots", "2", "--lora-rank", "16",
                                      "--data-dir", str(tmp_path)), environ={}).engine
    assert (e.lora_slots, e.lora_rank) == (2, 16)
    assert settings_from_args(serve_args("--data-dir", str(tmp_path)), environ={}).engine.lora_slots == 0
    assert settings_from_args(serve_args("--data-dir", str(tmp_path)), environ={}).default_steps is None


@pytest.mark.parametrize("argv, flag, words", [
    (["--lora-slots", "2"], "lora-slots", "needs --lora-dir"),
    (["--lora-rank", "8"], "lora-rank", "needs --lora-dir"),
    (["--lora-dir", "{missing}"], "lora-dir", "no such folder"),
    (["--lora-dir", "{dir}", "--lora-slots", "0"], "lora-slots", "between 1 and 16"),
    (["--lora-dir", "{dir}", "--lora-slots", "99"], "lora-slots", "between 0 and 16"),
    (["--lora-dir", "{dir}", "--lora-rank", "0"], "lora-rank", "between 1 and 1024"),
])
def test_bad_serve_lora_flags_name_the_flag(lora_dir, tmp_path, argv, flag, words):
    from zimage.cli.serve import settings_from_args
    from zimage.errors import UsageError

    argv = [a.format(dir=lora_dir, missing=tmp_path / "missing") for a in argv]
    with pytest.raises(UsageError, match=words) as e:
        settings_from_args(serve_args(*argv, "--data-dir", str(tmp_path)), environ={})
    assert e.value.param == flag


def test_scale_limits_match_the_engines():
    from zimage.lora_spec import MAX_LORAS, MAX_SCALE
    from zimage.server.schemas import LoraRef

    assert MAX_LORAS == 8 and MAX_SCALE == 10.0
    assert LoraRef(name="a").scale == 1.0 and not math.isnan(LoraRef(name="a", scale=-10).scale)
