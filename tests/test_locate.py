"""Finding the model: explicit path, Hugging Face cache (HF_HUB_CACHE / HF_HOME), ModelScope cache (both layouts),
a miss that lists every place looked, and `zimage download` honouring HF_HUB_OFFLINE."""

from __future__ import annotations

from pathlib import Path

import pytest

from zimage.errors import ModelNotFoundError
from zimage.weights.layout import HOW_TO_GET
from zimage.weights.locate import locate_model

REPO = "Some-Org/Z-Image-Test"
REV = "0123456789abcdef0123456789abcdef01234567"


def make_hf_cache(hub: Path, tiny: Path, repo: str = REPO, rev: str = REV, ref: str | None = REV) -> Path:
    """models--ORG--NAME/snapshots/REV as huggingface_hub lays it out (snapshot files are symlinks)."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / rev
    snap.mkdir(parents=True)
    for child in tiny.iterdir():
        (snap / child.name).symlink_to(child, target_is_directory=child.is_dir())
    if ref is not None:
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(ref + "\n")
    return snap


def link_folder(dst: Path, tiny: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(tiny, target_is_directory=True)
    return dst


def test_explicit_path(tiny_folder):
    loc = locate_model(str(tiny_folder))
    assert loc.path == tiny_folder.resolve()
    assert loc.source == "path" and loc.model_id == tiny_folder.name and loc.revision is None


def test_relative_path(tiny_folder, monkeypatch):
    monkeypatch.chdir(tiny_folder.parent)
    loc = locate_model("./" + tiny_folder.name)
    assert loc.path == tiny_folder.resolve() and loc.source == "path"


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelNotFoundError) as info:
        locate_model(str(missing))
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    assert "zimage download" in str(info.value)


def test_path_that_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        locate_model(str(f))


def test_hf_hub_cache(tmp_path, tiny_folder, monkeypatch):
    hub = tmp_path / "hub-cache"
    snap = make_hf_cache(hub, tiny_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    loc = locate_model(REPO)
    assert loc.path == snap and loc.source == "huggingface" and loc.model_id == REPO
    assert loc.revision == REV


def test_hf_home(tmp_path, tiny_folder, monkeypatch):
    home = tmp_path / "hf-home"
    snap = make_hf_cache(home / "hub", tiny_folder)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    loc = locate_model(REPO)
    assert loc.path == snap and loc.revision == REV


def test_hf_hub_cache_wins_over_hf_home(tmp_path, tiny_folder, monkeypatch):
    make_hf_cache(tmp_path / "home" / "hub", tiny_folder, rev="a" * 40, ref="a" * 40)
    make_hf_cache(tmp_path / "hub", tiny_folder, rev="b" * 40, ref="b" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert locate_model(REPO).revision == "b" * 40


def test_hf_refs_main_preferred_then_any_complete_snapshot(tmp_path, tiny_folder, monkeypatch):
    hub = tmp_path / "hub"
    make_hf_cache(hub, tiny_folder, rev="c" * 40, ref="d" * 40)  # refs/main names a snapshot that is not there
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    loc = locate_model(REPO)
    assert loc.revision == "c" * 40  # falls back to the snapshot that exists


def test_modelscope_current_layout(tmp_path, tiny_folder, monkeypatch):
    ms = tmp_path / "ms"
    target = link_folder(ms / "models" / "Some-Org" / "Z-Image-Test", tiny_folder)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(ms))
    loc = locate_model(REPO)
    assert loc.path == target and loc.source == "modelscope" and loc.model_id == REPO


def test_modelscope_old_layout(tmp_path, tiny_folder, monkeypatch):
    ms = tmp_path / "ms"
    target = link_folder(ms / "Some-Org" / "Z-Image-Test", tiny_folder)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(ms))
    loc = locate_model(REPO)
    assert loc.path == target and loc.source == "modelscope"


def test_modelscope_escaped_dots(tmp_path, tiny_folder, monkeypatch):
    ms = tmp_path / "ms"
    target = link_folder(ms / "models" / "Org" / "Model___v1", tiny_folder)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(ms))
    assert locate_model("Org/Model.v1").path == target


def test_hf_cache_before_modelscope(tmp_path, tiny_folder, monkeypatch):
    make_hf_cache(tmp_path / "hub", tiny_folder)
    link_folder(tmp_path / "ms" / "models" / "Some-Org" / "Z-Image-Test", tiny_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    assert locate_model(REPO).source == "huggingface"


def test_not_found_lists_every_place_and_how_to_get(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    with pytest.raises(ModelNotFoundError) as info:
        locate_model(REPO)
    msg = str(info.value)
    assert repr(REPO) in msg
    assert str(tmp_path / "hub" / "models--Some-Org--Z-Image-Test") in msg
    assert str(tmp_path / "ms" / "models" / "Some-Org" / "Z-Image-Test") in msg
    assert str(tmp_path / "ms" / "Some-Org" / "Z-Image-Test") in msg
    assert HOW_TO_GET in msg
    assert "HF_HUB_CACHE" in msg and "MODELSCOPE_CACHE" in msg


def test_incomplete_snapshot_is_not_used(tmp_path, tiny_folder, monkeypatch):
    """A snapshot without model_index.json (an interrupted download) is not a hit."""
    hub = tmp_path / "hub"
    snap = hub / "models--Some-Org--Z-Image-Test" / "snapshots" / REV
    snap.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(ModelNotFoundError, match="models--Some-Org--Z-Image-Test"):
        locate_model(REPO)


def test_neither_folder_nor_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="neither an existing folder nor a repo id") as info:
        locate_model("justaname")
    assert "'justaname'" in str(info.value)


def test_tiny_random_builds_into_zimage_cache(tmp_path, tiny_folder, monkeypatch):
    """With an empty ZIMAGE_CACHE, tiny-random is built there (not in ~/.cache) and found again without a rebuild.
    (The build itself is stood in for by a copy of the session's tiny folder, to save 3 s.)"""
    import shutil

    import zimage.weights.tiny as tiny

    calls = []

    def build(folder, **kw):
        calls.append(folder)
        shutil.copytree(tiny_folder, folder, dirs_exist_ok=True)
        return folder

    monkeypatch.setattr(tiny, "build_model_folder", build)
    monkeypatch.setenv("ZIMAGE_CACHE", str(tmp_path / "zc"))
    loc = locate_model("tiny-random")
    assert loc.source == "tiny" and loc.model_id == "tiny-random"
    assert loc.path == tmp_path / "zc" / f"tiny-random-v{tiny.TINY_VERSION}"
    assert (loc.path / "model_index.json").is_file()
    assert locate_model("tiny-random").path == loc.path
    assert len(calls) == 1
    assert [p.name for p in (tmp_path / "zc").iterdir()] == [loc.path.name]  # no temp folder left behind


def test_revision_recorded_in_png(tmp_path, tiny_folder, monkeypatch, capsys):
    """A model found in the HF cache records its snapshot commit in the image it makes."""
    from zimage.cli.main import main
    from zimage.io.png import read_metadata

    make_hf_cache(tmp_path / "hub", tiny_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out.png"
    rc = main(["generate", "-p", "a cat", "--model", REPO, "--device", "cpu", "--width", "256", "--height", "256",
               "--steps", "1", "--seed", "1", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    meta = read_metadata(out)
    assert meta.model == REPO and meta.model_revision == REV
    assert f"Model hash: {REV[:10]}" in meta.a1111_parameters()


def test_from_png_uses_the_recorded_repo_and_notes_another_revision(tmp_path, tiny_folder, monkeypatch, capsys):
    """--from-png without --model finds the recorded repo id in the cache; when the cache holds another revision
    than the PNG records, a note says so (the image may differ)."""
    from zimage.cli.main import main

    make_hf_cache(tmp_path / "hub", tiny_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    first = tmp_path / "first.png"
    fast = ["--device", "cpu", "--width", "256", "--height", "256", "--steps", "1", "--seed", "1"]
    assert main(["generate", "-p", "a cat", "--model", REPO, *fast, "-o", str(first)]) == 0
    assert main(["generate", "--from-png", str(first), "--device", "cpu", "-o", str(tmp_path / "same.png")]) == 0
    assert "revision" not in capsys.readouterr().err
    other = "fedcba9876543210fedcba9876543210fedcba98"
    snapshots = tmp_path / "hub" / "models--Some-Org--Z-Image-Test" / "snapshots"
    (snapshots / REV).rename(snapshots / other)
    (snapshots.parent / "refs" / "main").write_text(other)
    assert main(["generate", "--from-png", str(first), "--device", "cpu", "-o", str(tmp_path / "other.png")]) == 0
    assert (f"note: {first} was made with revision {REV[:10]} of {REPO}; the one found is {other[:10]}, so the "
            "image may differ") in capsys.readouterr().err


def test_info_says_where_the_model_is(tmp_path, tiny_folder, monkeypatch, capsys):
    from zimage.cli.main import main

    make_hf_cache(tmp_path / "hub", tiny_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["info", "--model", REPO, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"model: {REPO} (huggingface)" in out and f"revision {REV}" in out


def test_download_honours_hf_hub_offline(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from zimage.cli.main import main

    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: fetched.append((a, k)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    rc = main(["download"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "HF_HUB_OFFLINE" in err and "nothing will be downloaded" in err
    assert fetched == []
    assert not (tmp_path / "hub").exists()


def test_download_calls_snapshot_download_into_the_cache(tmp_path, monkeypatch, capsys):
    """Online, `zimage download` asks huggingface_hub for only the pipeline's files, into the cache we search."""
    import huggingface_hub

    from zimage.cli.main import main

    fetched = []

    def fake(repo_id, revision=None, allow_patterns=None, cache_dir=None):
        fetched.append(dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, cache_dir=cache_dir))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["download", "--revision", "v1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "snap")
    assert fetched == [dict(repo_id="Tongyi-MAI/Z-Image-Turbo", revision="v1",
                            allow_patterns=["model_index.json", "transformer/*", "text_encoder/*", "vae/*",
                                            "tokenizer/*", "scheduler/*"], cache_dir=str(tmp_path / "hub"))]
