"""builder/fetch_model.py on real files: the tiny random BLIP-2 saved by transformers in
several shards plays the Hub repo. The only fake is ``huggingface_hub.snapshot_download``
(there is no network here): ``FakeHub`` serves that directory, honouring ``allow_patterns`` with
huggingface_hub's own filter and answering dry runs with huggingface_hub's ``DryRunFileInfo``.

Caption check (the brief left the choice): the converted model, loaded with float32 compute,
must caption *identically* (greedy and beam search) to the source model loaded by transformers
with ``dtype=float16`` and then upcast -- the same weights rounded to fp16 in the same places,
so any difference would be a conversion bug, on every platform. Against the unrounded fp32
model the next-token logits must stay close (within 1% of their scale; fp16 rounding moves
them by ~0.1% here) and pick the same token; exact caption equality there would depend on
near-ties of a random model, not on the converter.
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.file_download import DryRunFileInfo
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer, Blip2ForConditionalGeneration

import config
import modeling
import preprocess
import testing_models
from engines import TransformersEngine
from errors import ModelLoadError
from params import GenerationParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "builder"))
import fetch_model as fm  # noqa: E402

REPO = "Salesforce/blip2-opt-2.7b-coco"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CPU = torch.device("cpu")
GREEDY = GenerationParams(num_beams=1, max_length=8, min_length=3)
BEAMS = GenerationParams(num_beams=2, max_length=8, min_length=3)


# ----------------------------------------------------------------------------------------------
# the fake Hub and the fixtures
# ----------------------------------------------------------------------------------------------
class FakeHub:
    """Stands in for ``huggingface_hub.snapshot_download`` over a local directory."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[dict] = []

    def __call__(self, repo_id, *, revision=None, local_dir, cache_dir=None, allow_patterns=None,
                 ignore_patterns=None, token=None, dry_run=False, **_):
        local_dir = Path(local_dir)
        self.calls.append(dict(repo_id=repo_id, revision=revision, local_dir=local_dir,
                               cache_dir=Path(cache_dir), allow_patterns=allow_patterns,
                               ignore_patterns=ignore_patterns, token=token, dry_run=dry_run))
        names = list(filter_repo_objects(sorted(p.name for p in self.root.iterdir()),
                                         allow_patterns=allow_patterns,
                                         ignore_patterns=ignore_patterns))
        if dry_run:
            return [DryRunFileInfo(commit_hash=COMMIT, file_size=(self.root / n).stat().st_size,
                                   filename=n, local_path=str(local_dir / n),
                                   is_cached=(local_dir / n).exists(),
                                   will_download=not (local_dir / n).exists()) for n in names]
        local_dir.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copyfile(self.root / n, local_dir / n)
        return str(local_dir)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """The tiny model as transformers saves it, in 6 shards + index, with its tokenizer, and
    files the download must skip (the pickled duplicate and its index, the model card)."""
    root = tmp_path_factory.mktemp("hub")
    tiny = testing_models.build_tiny(CPU, torch.float32)
    tiny.model.save_pretrained(root, max_shard_size="100KB")
    tiny.tokenizer.save_pretrained(root)
    (root / "pytorch_model.bin").write_bytes(b"fp32 pickle duplicate")
    (root / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    (root / "README.md").write_text("model card")
    assert len(list(root.glob("model-*.safetensors"))) > 2 and (root / fm.INDEX).is_file()
    return root


def run_main(hub_root: Path, *argv: str) -> tuple[int, FakeHub]:
    fake = FakeHub(hub_root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub, "snapshot_download", fake)
        mp.setenv("HF_TOKEN", "hf_test_token")
        return fm.main(list(argv)), fake


@pytest.fixture(scope="module")
def fetched(hub, tmp_path_factory):
    """One full run of fetch_model.py into ``out``; returns (out, staging, FakeHub)."""
    out = tmp_path_factory.mktemp("models") / "blip2"
    rc, fake = run_main(hub, "--out", str(out))
    assert rc == 0
    return out, fm.staging_dir_for(out), fake


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {n: f.get_tensor(n) for n in f.keys()}


def all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return {n: t for p in sorted(model_dir.glob("*.safetensors")) for n, t in tensors(p).items()}


def engine_for(model: Blip2ForConditionalGeneration, model_dir: Path) -> TransformersEngine:
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    loaded = modeling._loaded(model.eval(), tok, str(model_dir))  # also checks the invariants
    return TransformersEngine(config.defaults(), CPU, torch.float32, loaded)


def images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray(torch.randint(0, 256, (240 + 40 * i, 320, 3), dtype=torch.uint8,
                                          generator=g).numpy()) for i in range(2)]


# ----------------------------------------------------------------------------------------------
# dtype policy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype,expected", [
    ("query_tokens", torch.float32, torch.float32),
    ("qformer.encoder.layer.0.attention.attention.query.weight", torch.float32, torch.float32),
    ("qformer.layernorm.bias", torch.float16, torch.float32),
    ("language_model.model.decoder.embed_tokens.weight", torch.float32, torch.float16),
    ("language_model.lm_head.weight", torch.bfloat16, torch.float16),
    ("vision_model.embeddings.position_embedding", torch.float32, torch.float16),
    ("language_projection.weight", torch.float64, torch.float16),
    ("vision_model.embeddings.position_ids", torch.int64, torch.int64),
    ("some.mask", torch.bool, torch.bool),
])
def test_dtype_policy_by_tensor_name(name, dtype, expected):
    keep = fm.keep_fp32_pattern(["query_tokens", "qformer"])
    assert fm.target_dtype(name, dtype, keep) == expected


def test_no_kept_modules_means_everything_floating_is_fp16():
    assert fm.keep_fp32_pattern([]) is None
    assert fm.target_dtype("qformer.x", torch.float32, None) == torch.float16


def test_kept_modules_are_read_off_transformers(hub):
    assert fm.keep_fp32_modules(hub) == sorted(
        Blip2ForConditionalGeneration._keep_in_fp32_modules)


def test_stored_dtypes_equal_what_transformers_keeps_when_loading_fp32_in_fp16(hub, fetched):
    out, _, _ = fetched
    reference = Blip2ForConditionalGeneration.from_pretrained(hub, dtype=torch.float16)
    ref = reference.state_dict()
    stored = all_tensors(out)
    assert {n: t.dtype for n, t in stored.items()} == {n: ref[n].dtype for n in stored}
    kinds = {(n.split(".")[0], t.dtype) for n, t in stored.items()}
    assert {("qformer", torch.float32), ("query_tokens", torch.float32),
            ("language_model", torch.float16), ("vision_model", torch.float16)} <= kinds
    assert ("qformer", torch.float16) not in kinds and ("vision_model", torch.float32) not in kinds


def test_every_tensor_is_the_source_tensor_cast_once(hub, fetched):
    out, _, _ = fetched
    source, stored = all_tensors(hub), all_tensors(out)
    assert stored.keys() == source.keys()
    for name, t in stored.items():
        assert t.shape == source[name].shape
        assert torch.equal(t, source[name].to(t.dtype)), name


def test_values_outside_the_fp16_range_are_refused_not_turned_into_inf():
    with pytest.raises(fm.FetchError, match="outside the float16 range"):
        fm.cast_tensor("w", torch.tensor([1.0, 1e6]), torch.float16)
    assert torch.isinf(fm.cast_tensor("w", torch.tensor([float("inf")]), torch.float16)).all()


# ----------------------------------------------------------------------------------------------
# the converted directory
# ----------------------------------------------------------------------------------------------
def test_index_matches_the_shards(hub, fetched):
    out, _, _ = fetched
    index = json.loads((out / fm.INDEX).read_text())
    source_index = json.loads((hub / fm.INDEX).read_text())
    located = {n: p.name for p in out.glob("*.safetensors") for n in tensors(p)}
    assert index["weight_map"] == located == source_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in all_tensors(out).values())
    assert index["metadata"]["total_size"] < 0.6 * source_index["metadata"]["total_size"]
    for shard in set(located.values()):
        with safe_open(str(out / shard), framework="pt") as f:
            assert f.metadata()["format"] == "pt"


def test_config_tokenizer_and_generation_files_are_copied_and_nothing_else(hub, fetched):
    out, _, _ = fetched
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", fm.MANIFEST} <= names
    assert not names & {"pytorch_model.bin", "pytorch_model.bin.index.json", "README.md",
                        fm.PENDING}
    assert not [n for n in names if n.endswith(fm.PARTIAL)]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float16"
    src_cfg = json.loads((hub / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "dtype"} == \
        {k: v for k, v in src_cfg.items() if k != "dtype"}


def test_manifest_records_the_conversion(fetched):
    out, _, _ = fetched
    manifest = json.loads((out / fm.MANIFEST).read_text())
    assert manifest["model"] == REPO and manifest["commit"] == COMMIT
    assert manifest["kept_in_float32"] == ["qformer", "query_tokens"]
    assert manifest["files"] == {p.name: p.stat().st_size for p in out.iterdir()
                                 if p.name != fm.MANIFEST}
    assert set(manifest["tensors"]) == {"float16", "float32"}


def test_loads_with_default_dtype_as_fp16_with_the_qformer_in_fp32(fetched):
    out, _, _ = fetched
    model = Blip2ForConditionalGeneration.from_pretrained(out)  # dtype from config.json
    assert model.language_model.get_input_embeddings().weight.dtype == torch.float16
    assert model.qformer.layernorm.weight.dtype == torch.float32
    assert model.query_tokens.dtype == torch.float32


def test_captions_equal_the_fp16_rounded_source_and_logits_stay_close_to_fp32(hub, fetched):
    out, _, _ = fetched
    converted = engine_for(Blip2ForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32), out)
    rounded = engine_for(Blip2ForConditionalGeneration.from_pretrained(
        hub, dtype=torch.float16).float(), hub)
    fp32 = engine_for(Blip2ForConditionalGeneration.from_pretrained(
        hub, dtype=torch.float32), hub)
    imgs = images()
    for params in (GREEDY, BEAMS):
        got = [r.captions for r in converted.caption(imgs, params)]
        assert got == [r.captions for r in rounded.caption(imgs, params)]
        assert len(set(map(tuple, got))) == len(imgs)  # the image matters: not a dead model

    # The logits that pick the first caption token (after the image tokens and the prompt).
    pixels = preprocess.normalize(torch.stack([converted.preprocess(i) for i in imgs]),
                                  torch.float32)
    ids, mask = converted.build_inputs(["a photo of"] * len(imgs))
    with torch.inference_mode():
        got, want = (e.model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
                     .logits[:, -1] for e in (converted, fp32))
    assert (got - want).abs().max() <= 0.01 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_the_worker_loads_the_converted_directory(fetched):
    out, _, _ = fetched
    loaded = modeling.load_model(str(out), CPU, torch.float32)
    assert loaded.model.qformer.layernorm.weight.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# download, staging, idempotence
# ----------------------------------------------------------------------------------------------
def test_download_lists_then_fetches_that_commit_of_the_repo(fetched):
    out, staging, fake = fetched
    dry, real = fake.calls
    assert dry["dry_run"] and not real["dry_run"]
    assert dry["repo_id"] == real["repo_id"] == REPO
    assert dry["revision"] is None and real["revision"] == COMMIT  # no moving target
    for call in (dry, real):
        assert call["local_dir"] == staging and call["token"] == "hf_test_token"
        assert call["cache_dir"].is_relative_to(staging)  # removed with the staging dir
        assert (call["allow_patterns"], call["ignore_patterns"]) == (
            dry["allow_patterns"], dry["ignore_patterns"])

    def fetched_names(names):  # what huggingface_hub keeps with these patterns
        return set(filter_repo_objects(names, allow_patterns=real["allow_patterns"],
                                       ignore_patterns=real["ignore_patterns"]))
    wanted = {"model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
              "tokenizer.json", "tokenizer_config.json", "merges.txt", "vocab.json",
              "special_tokens_map.json", "preprocessor_config.json", "generation_config.json"}
    skipped = {"pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "README.md",
               ".gitattributes"}
    assert fetched_names(sorted(wanted | skipped)) == wanted


def test_staging_is_deleted_unless_kept(hub, fetched, tmp_path):
    _, staging, _ = fetched
    assert not staging.exists()
    out = tmp_path / "kept"
    rc, _ = run_main(hub, "--out", str(out), "--keep-staging")
    assert rc == 0
    kept = fm.staging_dir_for(out)
    assert sorted(p.name for p in kept.glob("*.safetensors")) == \
        sorted(p.name for p in hub.glob("*.safetensors"))


def test_second_run_reports_already_present_and_touches_nothing(hub, fetched, capsys):
    out, _, _ = fetched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, fake = run_main(hub, "--out", str(out))
    assert rc == 0 and fake.calls == []  # not even a listing: no network needed
    assert "already present" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_damaged_file_makes_the_manifest_incomplete(fetched, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(fetched[0], out)
    assert fm.completed_manifest(out, REPO, None) is not None
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-8])
    assert fm.completed_manifest(out, REPO, None) is None


def test_a_directory_holding_another_model_is_not_overwritten(hub, fetched, capsys):
    out, _, _ = fetched
    rc, fake = run_main(hub, "--model", "someone/other-model", "--out", str(out))
    assert rc == 1 and fake.calls == []
    err = capsys.readouterr().err
    assert f"already holds {REPO}@{COMMIT}" in err and "pass another --out" in err


def test_an_unfinished_fetch_of_another_model_is_not_mixed_in(hub, tmp_path, capsys):
    out = tmp_path / "mixed"
    fm.claim_output(out, "someone/other-model")
    (out / "tokenizer.json").write_text("{}")  # left by the interrupted run
    rc, fake = run_main(hub, "--out", str(out))
    assert rc == 1 and [c["dry_run"] for c in fake.calls] == [True]
    assert "unfinished fetch of someone/other-model" in capsys.readouterr().err
    fm.claim_output(out, "someone/other-model")  # the same model may resume


def test_resume_keeps_finished_shards_and_redoes_partial_and_truncated_ones(hub, fetched,
                                                                              tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(fetched[0], out)
    (out / fm.MANIFEST).unlink()  # the run was interrupted before it finished
    shards = sorted(out.glob("model-*.safetensors"))
    kept, truncated, half_written = shards[0], shards[1], shards[2]
    truncated.write_bytes(truncated.read_bytes()[:100])
    half_written.rename(half_written.with_name(half_written.name + fm.PARTIAL))
    half_written.with_name(half_written.name + fm.PARTIAL).write_bytes(b"\0" * 37)
    kept_stat = kept.stat()

    log: list[str] = []
    keep = json.loads((fetched[0] / fm.MANIFEST).read_text())["kept_in_float32"]
    plans = fm.convert_checkpoint(hub, out, keep, log=log.append)

    assert kept.stat().st_mtime_ns == kept_stat.st_mtime_ns and kept.stat().st_ino == \
        kept_stat.st_ino
    assert any(kept.name in line and "already converted" in line for line in log)
    assert not any(truncated.name in line and "already converted" in line for line in log)
    assert not list(out.glob("*" + fm.PARTIAL))
    fm.verify_output(out, plans)
    assert all(torch.equal(all_tensors(out)[n], t) for n, t in all_tensors(fetched[0]).items())


def plans_of(model_dir: Path, keep_modules: list[str]) -> dict[str, list]:
    keep = fm.keep_fp32_pattern(keep_modules)
    shards = set(json.loads((model_dir / fm.INDEX).read_text())["weight_map"].values())
    return {shard: fm.shard_plan(model_dir / shard, keep)[0] for shard in sorted(shards)}


def test_verification_checks_shapes_dtypes_and_sizes_against_the_plan(hub, fetched):
    out = fetched[0]
    plans = plans_of(hub, ["qformer", "query_tokens"])
    fm.verify_output(out, plans)
    with pytest.raises(fm.FetchError, match="total_size"):  # query_tokens planned as fp16
        fm.verify_output(out, plans_of(hub, ["qformer"]))
    shard, plan = next((s, p) for s, p in plans.items() if any(len(t.shape) == 2 for t in p))
    i = next(i for i, t in enumerate(plan) if len(t.shape) == 2 and t.shape[0] != t.shape[1])
    plan[i] = fm.TensorPlan(plan[i].name, plan[i].shape[::-1], plan[i].src_dtype, plan[i].dtype)
    with pytest.raises(fm.FetchError, match="does not hold the expected tensors"):
        fm.verify_output(out, plans)  # same bytes, transposed shape


# ----------------------------------------------------------------------------------------------
# the BLIP-2 layout from before late 2024: upgraded by the fetch and by --upgrade DIR
# ----------------------------------------------------------------------------------------------
FORK = "someone/blip2-fork"
TOKENS = 260  # the tiny tokenizer without <image>: 4 specials + 256 bytes
ROWS = 264  # like OPT's table (50272 rows for 50265 tokens), rows no token uses
PREPROCESSOR = {"do_normalize": True, "do_resize": True, "image_processor_type":
                "BlipImageProcessor", "processor_class": "Blip2Processor",
                "size": {"height": 364, "width": 364}}
PROCESSOR = {"num_query_tokens": 32, "processor_class": "Blip2Processor"}  # as the Hub has it


def save_current_layout(root: Path, rows: int) -> Path:
    """The tiny model with ``rows`` embedding rows, saved by transformers in shards, with the
    processor files of the updated Hub repos: the layout from late 2024 on."""
    tiny = testing_models.build_tiny(CPU, torch.float32)
    torch.manual_seed(1)  # the new rows' values
    tiny.model.resize_token_embeddings(rows, mean_resizing=False)
    assert tiny.model.config.text_config.vocab_size == rows
    tiny.model.save_pretrained(root, max_shard_size="100KB")
    tiny.tokenizer.save_pretrained(root)
    (root / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (root / "processor_config.json").write_text(json.dumps(PROCESSOR))
    return root


def to_old_layout(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as the Hub repos were before late 2024 (and forks saved then): no
    <image> in the tokenizer files, no image_token_index, only the image processor's config."""
    shutil.copytree(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json",
                 "special_tokens_map.json"):
        path = dst / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        if "added_tokens" in data:
            data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<image>"]
        for key in ("added_tokens_decoder", "extra_special_tokens"):
            if isinstance(data.get(key), dict):
                data[key] = {k: v for k, v in data[key].items()
                             if k != "<image>" and v != "<image>"
                             and not (isinstance(v, dict) and v.get("content") == "<image>")}
        data.pop("<image>", None)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["image_token_index"]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "processor_config.json").unlink()
    for path in dst.iterdir():  # nothing else that transformers 5 wrote names them
        if path.suffix == ".json":
            assert "<image>" not in path.read_text() and "image_token_index" not in \
                path.read_text(), path.name
    return dst


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def dir_bytes(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def hub_new(tmp_path_factory) -> Path:
    return save_current_layout(tmp_path_factory.mktemp("hub-new") / "repo", ROWS)


@pytest.fixture(scope="module")
def hub_old(hub_new, tmp_path_factory) -> Path:
    return to_old_layout(hub_new, tmp_path_factory.mktemp("hub-old") / "repo")


@pytest.fixture(scope="module")
def hub_full(tmp_path_factory) -> Path:
    """Old layout whose tokenizer already uses every embedding row: not upgradeable."""
    new = save_current_layout(tmp_path_factory.mktemp("hub-full") / "new", TOKENS)
    return to_old_layout(new, new.with_name("repo"))


@pytest.fixture(scope="module")
def fetched_new(hub_new, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models-new") / "blip2"
    assert run_main(hub_new, "--model", FORK, "--out", str(out))[0] == 0
    return out


@pytest.fixture(scope="module")
def fetched_old(hub_old, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models-old") / "blip2"
    assert run_main(hub_old, "--model", FORK, "--revision", "v1.0", "--out", str(out))[0] == 0
    return out


def test_fetch_upgrades_the_old_layout_to_the_current_one_and_only_the_old(
        hub_new, fetched_new, fetched_old, fetched):
    upgraded = json.loads((fetched_old / fm.MANIFEST).read_text())["upgraded"]
    assert upgraded["from"] == "pre-2024 BLIP-2 layout"
    assert upgraded["added"] == {"<image>": TOKENS, "image_token_index": TOKENS,
                                 "num_query_tokens": 32}
    assert (upgraded["tokenizer_size_before"], upgraded["embedding_rows"]) == (TOKENS, ROWS)
    assert fm.completed_manifest(fetched_old, FORK, "v1.0") is not None  # sizes are current
    # The upgraded files are those of the current layout (JSON-equal; the weights were equal).
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
                 "preprocessor_config.json"):
        assert json.loads((fetched_old / name).read_text()) == \
            json.loads((fetched_new / name).read_text()), name
    old_tok, new_tok = (AutoTokenizer.from_pretrained(d) for d in (fetched_old, fetched_new))
    assert old_tok.get_vocab() == new_tok.get_vocab() and old_tok.get_vocab()["<image>"] == TOKENS
    added = old_tok.added_tokens_decoder[TOKENS]
    assert (added.content, added.special, added.normalized) == ("<image>", True, False)
    # The current layout is fetched as it was before: nothing upgraded, the files as the Hub's.
    for out in (fetched_new, fetched[0]):
        assert "upgraded" not in json.loads((out / fm.MANIFEST).read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        assert (fetched_new / name).read_bytes() == (hub_new / name).read_bytes()


def test_the_upgraded_fetch_loads_in_the_worker_and_captions_like_the_current_layout(
        fetched_new, fetched_old):
    engines = []
    for out in (fetched_old, fetched_new):
        loaded = modeling.load_model(str(out), CPU, torch.float32)
        assert loaded.image_token_id == TOKENS
        assert loaded.model.get_input_embeddings().num_embeddings == ROWS
        engines.append(TransformersEngine(config.defaults(), CPU, torch.float32, loaded))
    imgs = images()
    for params in (GREEDY, BEAMS):
        old, new = ([r.captions for r in e.caption(imgs, params)] for e in engines)
        assert old == new
        assert len(set(map(tuple, old))) == len(imgs)  # the image matters: not a dead model


def test_a_fetch_that_cannot_be_upgraded_is_refused_before_the_conversion(hub_full, tmp_path,
                                                                          capsys):
    out = tmp_path / "full"
    rc, fake = run_main(hub_full, "--out", str(out))
    assert rc == 1 and [c["dry_run"] for c in fake.calls] == [True, False]
    err = capsys.readouterr().err
    assert err.startswith("error: cannot upgrade ") and "pre-2024 BLIP-2 layout" in err
    assert f"already uses every row of the embedding table ({TOKENS} tokens, {TOKENS} rows" in err
    assert "new, untrained row" in err
    assert not list(out.glob("*.safetensors")) and not (out / fm.MANIFEST).exists()


def old_manifest_dir(fetched_new: Path, tmp_path: Path) -> Path:
    """A directory fetched from an old-layout repo before the tool upgraded layouts: old files,
    and a manifest that lists them at their sizes (no "upgraded")."""
    model_dir = to_old_layout(fetched_new, tmp_path / "fetched-before")
    manifest = json.loads((model_dir / fm.MANIFEST).read_text())
    manifest["files"] = fm.output_files(model_dir)
    manifest["total_bytes"] = sum(manifest["files"].values())
    (model_dir / fm.MANIFEST).write_text(json.dumps(manifest))
    assert fm.completed_manifest(model_dir, FORK, None) is not None
    return model_dir


@pytest.mark.parametrize("how", ["--upgrade", "rerun of the fetch"])
def test_a_directory_fetched_before_is_upgraded_in_place_and_its_manifest_updated(
        how, hub_old, fetched_new, tmp_path, capsys):
    model_dir = old_manifest_dir(fetched_new, tmp_path)
    if how == "--upgrade":
        assert fm.main(["--upgrade", str(model_dir)]) == 0
    else:
        rc, fake = run_main(hub_old, "--model", FORK, "--out", str(model_dir))
        assert rc == 0 and fake.calls == []  # no network
    assert "upgraded" in capsys.readouterr().out
    manifest = json.loads((model_dir / fm.MANIFEST).read_text())
    assert manifest["upgraded"]["added"]["<image>"] == TOKENS
    assert manifest["files"] == fm.output_files(model_dir)  # processor_config.json added
    assert fm.completed_manifest(model_dir, FORK, None) is not None
    assert not (model_dir / "layout_upgrade.json").exists()
    assert dir_bytes(model_dir).keys() == dir_bytes(fetched_new).keys()
    assert modeling.load_model(str(model_dir), CPU, torch.float32).image_token_id == TOKENS


def test_upgrade_dir_of_a_fork_without_manifest_records_it_and_is_idempotent(hub_old, hub_new,
                                                                           tmp_path, capsys):
    fork = tmp_path / "fork"
    shutil.copytree(hub_old, fork)  # saved by an older transformers: fp32, no manifest
    assert fm.main(["--upgrade", str(fork)]) == 0
    assert "upgraded" in capsys.readouterr().out
    for name in ("config.json", "tokenizer.json", "processor_config.json"):
        assert json.loads((fork / name).read_text()) == json.loads((hub_new / name).read_text())
    record = json.loads((fork / "layout_upgrade.json").read_text())["upgraded"]
    assert record["by"] == "builder/fetch_model.py --upgrade"
    assert sorted(record["files"]) == ["config.json", "processor_config.json", "tokenizer.json"]
    assert not (fork / fm.MANIFEST).exists()
    assert modeling.load_model(str(fork), CPU, torch.float32).image_token_id == TOKENS

    before = {p.name: p.stat().st_mtime_ns for p in fork.iterdir()}
    assert fm.main(["--upgrade", str(fork)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in fork.iterdir()} == before


def test_upgrade_adds_the_token_to_every_tokenizer_file_that_lists_added_tokens(hub_old,
                                                                                tmp_path):
    """Forks saved with transformers 4.34-4.46 list added tokens in tokenizer_config.json too,
    older slow tokenizers in added_tokens.json."""
    fork = tmp_path / "fork"
    shutil.copytree(hub_old, fork)
    specials = {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                for t in json.loads((fork / "tokenizer.json").read_text())["added_tokens"]}
    edit_json(fork / "tokenizer_config.json", added_tokens_decoder=specials)
    (fork / "added_tokens.json").write_text("{}")
    assert fm.main(["--upgrade", str(fork)]) == 0
    entry = json.loads((fork / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert entry[str(TOKENS)] == {"content": "<image>", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True}
    assert json.loads((fork / "added_tokens.json").read_text()) == {"<image>": TOKENS}
    record = json.loads((fork / "layout_upgrade.json").read_text())["upgraded"]
    assert {"tokenizer_config.json", "added_tokens.json", "tokenizer.json"} <= set(record["files"])
    assert modeling.load_model(str(fork), CPU, torch.float32).image_token_id == TOKENS


def rename_newline(model_dir: Path) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok["model"]["vocab"]["<nl>"] = tok["model"]["vocab"].pop("\u010a")  # "\n" has no token
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))


@pytest.mark.parametrize("fixture,edit,reason", [
    ("hub_full", None, f"already uses every row of the embedding table ({TOKENS} tokens, "
                       f"{TOKENS} rows: language_model.model.decoder.embed_tokens.weight in "),
    ("hub_new", lambda d: edit_json(d / "config.json", image_token_index=5),
     f"the tokenizer has <image> at id {TOKENS}, but config.json says image_token_index 5"),
    ("hub_old", lambda d: edit_json(d / "config.json", image_token_index=ROWS - 1),
     f"image_token_index {ROWS - 1}, but <image> can only be added at id {TOKENS}"),
    ("hub_old", lambda d: edit_json(d / "config.json", num_query_tokens=16),
     "num_query_tokens 16, not 32"),
    ("hub_old", lambda d: edit_json(d / "config.json", model_type="opt"),
     "not a BLIP-2 captioning checkpoint"),
    ("hub_old", rename_newline, "splits '\\n' into 0 tokens, not one"),
])
def test_upgrade_refuses_what_cannot_be_upgraded_saying_why(fixture, edit, reason, request,
                                                            tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(fixture), model_dir)
    if edit:
        edit(model_dir)
    before = dir_bytes(model_dir)
    assert fm.main(["--upgrade", str(model_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and reason in err, err
    assert dir_bytes(model_dir) == before  # nothing touched


def test_the_worker_names_the_upgrade_for_an_old_layout_directory_and_repo(hub_old):
    with pytest.raises(ModelLoadError) as exc:
        modeling.load_model(str(hub_old), CPU, torch.float32)
    msg = str(exc.value)
    assert "BLIP-2 layout from before late 2024" in msg and "no <image> token" in msg
    assert f"`python builder/fetch_model.py --upgrade {hub_old}`" in msg

    model = Blip2ForConditionalGeneration.from_pretrained(hub_old, dtype=torch.float32)
    with pytest.raises(ModelLoadError) as exc:  # BLIP_MODEL=FORK, from the Hub
        modeling._loaded(model, AutoTokenizer.from_pretrained(hub_old), FORK)
    assert (f"`python builder/fetch_model.py --model {FORK} --out models/blip2-fork` (which "
            "upgrades it) and set BLIP_MODEL=models/blip2-fork") in str(exc.value)


def test_upgrade_takes_a_directory_alone(tmp_path, capsys):
    assert fm.parse_args(["--upgrade", "m"]).upgrade == Path("m")
    with pytest.raises(SystemExit):
        fm.parse_args(["--upgrade", "m", "--out", "x"])
    assert "drop --out" in capsys.readouterr().err
    assert fm.main(["--upgrade", str(tmp_path / "nothing")]) == 1
    assert "no such directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# disk space
# ----------------------------------------------------------------------------------------------
def test_disk_needs_on_one_filesystem_and_on_two():
    s, o = Path("/stage"), Path("/out")
    one = fm.disk_needs(s, o, download_bytes=15 * fm.GB, weight_bytes=16 * fm.GB, same_fs=True)
    assert [(n.directory, n.need) for n in one] == [(o, int(15e9 + 16e9 * 0.55 + 1e9))]
    two = fm.disk_needs(s, o, download_bytes=0, weight_bytes=16 * fm.GB, same_fs=False)
    assert [(n.directory, n.need) for n in two] == [(s, int(1e9)), (o, int(16e9 * 0.55 + 1e9))]


def test_not_enough_disk_refuses_before_downloading_with_the_numbers(hub, tmp_path,
                                                                      monkeypatch, capsys):
    free = 123_000_000
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(
        10**12, 10**12 - free, free))
    out = tmp_path / "nospace" / "blip2"
    rc, fake = run_main(hub, "--out", str(out))
    assert rc == 1
    assert [c["dry_run"] for c in fake.calls] == [True]  # listed, never downloaded
    assert not out.exists() and not fm.staging_dir_for(out).exists()
    err = capsys.readouterr().err  # the numbers: see test_disk_needs_on_one_filesystem_and_on_two
    assert re.search(rf"need 1\.0 GB free in {re.escape(str(out))} \(0\.0 GB download \+ "
                     r"0\.0 GB fp16 output \+ 1\.0 GB margin\), have 0\.1 GB", err), err
    assert "--out" in err  # says what to do


# ----------------------------------------------------------------------------------------------
# arguments, errors, imports
# ----------------------------------------------------------------------------------------------
def test_arguments_and_defaults():
    args = fm.parse_args([])
    assert (args.engine, args.model, args.out, args.revision, args.keep_staging) == (
        "transformers", REPO, Path("models/blip2-opt-2.7b-coco"), None, False)
    assert args.staging == Path("models/blip2-opt-2.7b-coco.fp32-download")
    assert fm.parse_args(["--engine", "lavis", "--cache-dir", "/c"]).cache_dir == Path("/c")
    with pytest.raises(SystemExit):
        fm.parse_args(["--out", "x", "--staging", "x"])
    with pytest.raises(SystemExit):
        fm.parse_args(["--engine", "onnx"])


def test_a_checkpoint_without_safetensors_is_refused_clearly(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(fm.FetchError, match="converts safetensors checkpoints only"):
        fm.source_shards(tmp_path)


def test_module_level_imports_are_stdlib_and_torch_only():
    """The LAVIS image runs this file with transformers 4.25 and maybe no safetensors: the hub,
    transformers, safetensors and engines.lavis_checkpoints are imported only where they are
    used."""
    tree = ast.parse(Path(fm.__file__).read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
           for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.module}
    assert top - {"__future__", "torch"} <= sys.stdlib_module_names, top
