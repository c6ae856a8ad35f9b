"""The LAVIS environment and the real model's files: the transformers pin and the KV cache it
keeps, torch.load's weights_only, the caches and ``prefetch``, missing-weights errors, and the
top-level names the LAVIS wheel installs into site-packages."""
from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engines import lavis_checkpoints, lavis_engine
from engines.lavis_checkpoints import (CAPTION_CHECKPOINT_URL, EVA_VIT_G_URL, HFFile, cache_layout,
                                       hf_files, lavis_checkpoint_paths, missing_files, prefetch,
                                       trusted_checkpoint_loads)
from engines.lavis_engine import LavisEngine
from lavis_testlib import pictures, tiny_cfg
from errors import ModelLoadError
from params import GenerationParams

ROOT = Path(__file__).resolve().parents[2]


# --- transformers 4.25.1 and the KV cache -----------------------------------------------------
def test_transformers_is_pinned_to_the_release_lavis_works_with():
    import transformers
    assert transformers.__version__ == lavis_engine.PINNED_TRANSFORMERS == "4.25.1"
    pins = (ROOT / "requirements-lavis.txt").read_text().split()
    assert "transformers==4.25.1" in pins


def test_decoding_uses_the_kv_cache(lavis_engine):
    """After the first step LAVIS's OPT must get one new token and the cache, not the whole
    sequence again (transformers 4.26 renamed `past`, and LAVIS silently lost its cache)."""
    calls = []

    def record(_module, _args, kwargs):
        calls.append((kwargs["input_ids"].shape[1], kwargs.get("past_key_values") is not None,
                      kwargs.get("query_embeds") is not None))

    hook = lavis_engine.model.opt_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        lavis_engine.caption(pictures(1),
                             GenerationParams(num_beams=1, max_length=6, min_length=6))
    finally:
        hook.remove()
    prompt_tokens = len(lavis_engine.model.opt_tokenizer("a photo of").input_ids)
    assert len(calls) == 6
    assert calls[0] == (prompt_tokens, False, True)  # prompt + the 32 query embeddings
    assert calls[1:] == [(1, True, False)] * 5, calls


# --- torch.load and weights_only ----------------------------------------------------------------
@pytest.fixture
def hub_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    paths = lavis_checkpoint_paths()
    paths[0].parent.mkdir(parents=True)
    return paths


def _save(path: Path, model, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), **extra}, path)
    return path


def test_checkpoint_paths_are_where_lavis_downloads_them(hub_checkpoints, tmp_path):
    from timm.models.hub import get_cache_dir  # what LAVIS's download_cached_file uses
    assert [p.name for p in hub_checkpoints] == ["eva_vit_g.pth", "blip2_caption_opt2.7b.pth"]
    assert all(p.parent == Path(get_cache_dir()) == tmp_path / "torch" / "hub" / "checkpoints"
               for p in hub_checkpoints)


def test_lavis_format_checkpoint_loads_safely_without_fallback(lavis_engine, hub_checkpoints,
                                                               caplog):
    path = _save(hub_checkpoints[1], lavis_engine.model)
    with caplog.at_level(logging.WARNING), trusted_checkpoint_loads(hub_checkpoints):
        lavis_engine.model.load_checkpoint(str(path))  # LAVIS's own torch.load call
    assert "weights_only=False" not in caplog.text


def test_trusted_lavis_checkpoint_falls_back_only_where_trusted(lavis_engine, hub_checkpoints,
                                                               tmp_path, caplog):
    extra = {"config": argparse.Namespace(lr=1e-5)}  # a pickled object weights_only refuses
    trusted = _save(hub_checkpoints[1], lavis_engine.model, **extra)
    elsewhere = _save(tmp_path / "elsewhere" / trusted.name, lavis_engine.model, **extra)
    with pytest.raises(pickle.UnpicklingError):  # the premise: torch's default refuses it
        lavis_engine.model.load_checkpoint(str(trusted))
    original = torch.load
    with caplog.at_level(logging.WARNING), trusted_checkpoint_loads(hub_checkpoints):
        msg = lavis_engine.model.load_checkpoint(str(trusted))
        assert not msg.missing_keys and "weights_only=False" in caplog.text
        with pytest.raises(pickle.UnpicklingError):  # same bytes, not a trusted place
            lavis_engine.model.load_checkpoint(str(elsewhere))
        with pytest.raises(pickle.UnpicklingError):  # an explicit choice is kept
            torch.load(trusted, weights_only=True)
    assert torch.load is original


# --- caches, prefetch, missing weights ----------------------------------------------------------
def test_checkpoint_urls_are_lavis_own():
    from lavis.models.blip2_models.blip2_opt import Blip2OPT
    from lavis.models.eva_vit import create_eva_vit_g
    from omegaconf import OmegaConf
    yaml = OmegaConf.load(Blip2OPT.default_config_path("caption_coco_opt2.7b"))
    assert yaml.model.finetuned == CAPTION_CHECKPOINT_URL and yaml.model.load_finetuned
    assert f'"{EVA_VIT_G_URL}"' in inspect.getsource(create_eva_vit_g)
    assert yaml.model.opt_model == lavis_checkpoints.OPT_REPO


def test_cache_dir_layout_is_what_the_worker_reads_with_its_env(tmp_path):
    layout = cache_layout(tmp_path)
    assert layout.torch_checkpoints == tmp_path / "torch" / "hub" / "checkpoints"
    assert layout.hf_cache == tmp_path / "huggingface" / "hub"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_HOME", "HF_HOME", "TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE",
                        "PYTORCH_TRANSFORMERS_CACHE", "PYTORCH_PRETRAINED_BERT_CACHE")}
    code = ("import engines.lavis_checkpoints as e; l = e.cache_layout(); "
            "print(l.torch_checkpoints); print(l.hf_cache)")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **layout.env}, check=True,
                         cwd=ROOT / "src", capture_output=True, text=True).stdout.split()
    assert out == [str(layout.torch_checkpoints), str(layout.hf_cache)]


def test_hf_files_name_what_lavis_loads():
    plain = hf_files(safetensors_available=False)
    assert {f.repo for f in plain} == {"facebook/opt-2.7b", "bert-base-uncased"}
    required = {(f.repo, f.names) for f in plain if f.required}
    assert ("facebook/opt-2.7b", ("pytorch_model.bin",)) in required
    assert ("bert-base-uncased", ("vocab.txt",)) in required
    assert ("facebook/opt-2.7b", ("merges.txt",)) in required
    safe = hf_files(safetensors_available=True)
    assert HFFile("bert-base-uncased", ("model.safetensors", "pytorch_model.bin")) in safe


def _put_in_hf_cache(hf_cache: Path, repo: str, name: str) -> None:
    """A file in the Hugging Face cache layout (what hf_hub_download leaves behind)."""
    base = hf_cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text("0" * 40)
    (base / "snapshots" / ("0" * 40) / name).parent.mkdir(parents=True, exist_ok=True)
    (base / "snapshots" / ("0" * 40) / name).write_bytes(b"x")


def test_prefetch_fetches_what_is_missing_and_skips_what_is_there(tmp_path):
    layout = cache_layout(tmp_path)
    eva, caption = lavis_checkpoint_paths(layout)
    eva.parent.mkdir(parents=True)
    eva.write_bytes(b"already here")
    _put_in_hf_cache(layout.hf_cache, "bert-base-uncased", "vocab.txt")
    urls, hf = [], []

    def fetch_url(url, target):
        urls.append((url, target))
        target.write_bytes(b"pth")

    def fetch_hf(repo, name, cache):
        hf.append((repo, name))
        if name == "special_tokens_map.json":
            return False  # a repo without an optional file
        _put_in_hf_cache(cache, repo, name)
        return True

    before = missing_files(layout)
    assert str(caption) in before and str(eva) not in before
    assert "bert-base-uncased/vocab.txt" not in before and "facebook/opt-2.7b/config.json" in before
    env = prefetch(tmp_path, fetch_url=fetch_url, fetch_hf=fetch_hf, say=lambda _m: None)
    assert env == layout.env
    assert urls == [(CAPTION_CHECKPOINT_URL, caption)]
    assert ("bert-base-uncased", "vocab.txt") not in hf
    assert ("facebook/opt-2.7b", "pytorch_model.bin") in hf and len(hf) == 10
    assert missing_files(layout) == []
    urls.clear(), hf.clear()
    prefetch(tmp_path, fetch_url=fetch_url, fetch_hf=fetch_hf, say=lambda _m: None)
    assert urls == [] and hf == [("facebook/opt-2.7b", "special_tokens_map.json"),
                                 ("bert-base-uncased", "special_tokens_map.json")]


def test_prefetch_fails_when_a_required_file_does_not_exist(tmp_path):
    with pytest.raises(ModelLoadError, match="facebook/opt-2.7b has none of config.json"):
        prefetch(tmp_path, fetch_url=lambda url, target: target.write_bytes(b"x"),
                 fetch_hf=lambda repo, name, cache: False, say=lambda _m: None)


def test_missing_real_weights_give_one_clear_error(tmp_path, monkeypatch):
    import transformers.utils.hub
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as err:
        LavisEngine.load(tiny_cfg(BLIP_MODEL="Salesforce/blip2-opt-2.7b-coco"))
    text = str(err.value)
    for needed in ("BLIP_ENGINE=lavis", "python builder/fetch_model.py --engine lavis",
                   "BLIP_MODEL=tiny-random", "eva_vit_g.pth", "blip2_caption_opt2.7b.pth",
                   "facebook/opt-2.7b/pytorch_model.bin", "bert-base-uncased/config.json"):
        assert needed in text, needed


@pytest.mark.parametrize("env,needle", [({"BLIP_MODEL": "random-full"}, "BLIP_MODEL='random-full'"),
                                        ({"BLIP_DTYPE": "bfloat16"}, "BLIP_DTYPE=bfloat16")])
def test_unsupported_settings_are_refused_by_name(env, needle):
    with pytest.raises(ModelLoadError, match=needle):
        LavisEngine.load(tiny_cfg(BLIP_DEVICE="cpu", **env))


# --- the wheel's top-level app/docs/projects/tests packages -------------------------------------
FOREIGN = ("app", "docs", "projects", "tests")


def test_the_lavis_wheel_does_install_those_names():
    found = [n for n in FOREIGN if (s := importlib.util.find_spec(n)) and s.origin
             and "site-packages" in s.origin]
    assert found, "premise gone: LAVIS no longer installs app/docs/projects/tests"


def _our_python_files():
    return [p for top in ("src", "tests", "builder") for p in (ROOT / top).rglob("*.py")]


def test_nothing_of_ours_imports_those_names_or_is_named_like_them():
    for path in _our_python_files():
        assert path.stem not in FOREIGN, path
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            assert not {n.split(".")[0] for n in names} & set(FOREIGN), (path, names)


def test_our_modules_resolve_to_our_files_in_this_venv():
    for path in (ROOT / "src").glob("*.py"):
        spec = importlib.util.find_spec(path.stem)
        assert spec and Path(spec.origin) == path, (path.stem, spec and spec.origin)
    for name, path in (("support.images", "tests/support/images.py"),
                       ("lavis_testlib", "tests/lavis/lavis_testlib.py")):
        assert Path(sys.modules[name].__file__) == ROOT / path
    assert Path(__file__).parent == ROOT / "tests" / "lavis"
