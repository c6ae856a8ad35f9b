"""The RunPod Hub files (.runpod/hub.json, .runpod/tests.json) against the Hub's published
format (RunPod docs, "Hub publishing guide" and "GPU types"), and against this worker: every
environment variable they set is a real setting with a value Config.from_env accepts, the
presets name the model the image bakes in, and every test input passes the request schema."""
import json
import re

import pytest

import config
import schema
from support.dockerfile import CUDA_FLAVORS, default_cuda_flavor, runs_on
from support.worker import REPO

HUB = json.loads((REPO / ".runpod" / "hub.json").read_text())
TESTS = json.loads((REPO / ".runpod" / "tests.json").read_text())
SETTINGS = {s.env: s for s in config.SETTINGS}

CATEGORIES = {"audio", "embedding", "language", "video", "image"}
INPUT_TYPES = {"string", "number", "boolean", "huggingface"}
# GPU pools (Pool ID -> memory in GB) and the GPU IDs of 16 GB and more, from the docs' tables.
POOLS = {"AMPERE_16": 16, "AMPERE_24": 24, "ADA_24": 24, "AMPERE_48": 48, "ADA_48_PRO": 48,
         "AMPERE_80": 80, "ADA_80_PRO": 80, "HOPPER_141": 141}
# The compute capabilities of each pool's GPUs (the docs' pool table: AMPERE_16 is RTX A4000,
# RTX 4000 Ada and RTX 2000 Ada; AMPERE_24 RTX A4500, A5000, 3090; ADA_24 L4, RTX 4090;
# AMPERE_48 A40, RTX A6000; ADA_48_PRO L40S, L40, RTX 6000 Ada; AMPERE_80 A100; ADA_80_PRO the
# H100s; HOPPER_141 H200), and of each GPU ID (NVIDIA's list of CUDA GPUs).
POOL_CAPABILITIES = {"AMPERE_16": {"8.6", "8.9"}, "AMPERE_24": {"8.6"}, "ADA_24": {"8.9"},
                     "AMPERE_48": {"8.6"}, "ADA_48_PRO": {"8.9"}, "AMPERE_80": {"8.0"},
                     "ADA_80_PRO": {"9.0"}, "HOPPER_141": {"9.0"}}
GPUS_16GB_UP = {"NVIDIA RTX A4000": "8.6", "NVIDIA RTX A4500": "8.6", "NVIDIA RTX A5000": "8.6",
                "NVIDIA RTX A6000": "8.6", "NVIDIA RTX 2000 Ada Generation": "8.9",
                "NVIDIA RTX 4000 Ada Generation": "8.9", "NVIDIA GeForce RTX 4080": "8.9",
                "NVIDIA GeForce RTX 4090": "8.9", "NVIDIA GeForce RTX 5090": "12.0",
                "NVIDIA L4": "8.9", "NVIDIA L40": "8.9", "NVIDIA L40S": "8.9", "NVIDIA A40": "8.6",
                "NVIDIA A100 80GB PCIe": "8.0", "NVIDIA A100-SXM4-80GB": "8.0",
                "NVIDIA H100 80GB HBM3": "9.0", "NVIDIA H100 PCIe": "9.0", "NVIDIA H200": "9.0"}
MODEL_GB, CUDA_TORCH_GB = 8, 10  # the fp16 model, and CUDA torch + OS in the image


def env_value(value) -> str:
    """A Hub value as the container sees it (JSON true -> "true")."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def accepted(env: dict) -> config.Config:
    return config.Config.from_env({k: env_value(v) for k, v in env.items()})


def baked_model() -> str:
    """BLIP_MODEL of the transformers image: /models/<BLIP_MODEL_REPO default>."""
    dockerfile = (REPO / "Dockerfile").read_text()
    repo = re.search(r"^ARG BLIP_MODEL_REPO=(\S+)", dockerfile, re.M)[1]
    assert "ENV BLIP_MODEL=/models/${BLIP_MODEL_REPO}" in dockerfile
    return f"/models/{repo}"


def test_hub_metadata():
    assert {"title", "description", "type", "category", "config"} <= set(HUB)
    assert HUB["title"].strip() and len(HUB["description"]) > 40
    assert HUB["type"] == "serverless" and HUB["category"] in CATEGORIES


def test_hub_machine_fits_the_model():
    cfg = HUB["config"]
    assert cfg["runsOn"] == "GPU" and cfg["gpuCount"] == 1
    assert isinstance(cfg["containerDiskInGb"], int)
    assert cfg["containerDiskInGb"] >= MODEL_GB + CUDA_TORCH_GB + 5
    pools = cfg["gpuIds"].split(",")
    assert pools and all(POOLS.get(p, 0) >= 16 for p in pools), pools
    assert all(re.fullmatch(r"1[2-9]\.\d", v) for v in cfg["allowedCudaVersions"])


@pytest.mark.parametrize("entry", HUB["config"]["env"], ids=lambda e: e["key"])
def test_hub_env_inputs_are_real_settings(entry):
    setting = SETTINGS[entry["key"]]
    if "value" in entry:
        accepted({entry["key"]: entry["value"]})
        return
    field = entry["input"]
    assert field["type"] in INPUT_TYPES and field["name"] and field["description"]
    accepted({entry["key"]: field["default"]})
    for option in field.get("options", []):
        assert option["label"] and accepted({entry["key"]: option["value"]})
    if field["type"] == "number":
        assert (field.get("min"), field.get("max")) == (setting.lo, setting.hi)
        assert setting.kind in ("int", "float", "opt_int")
    if setting.kind == "choice":
        assert {o["value"] for o in field["options"]} == set(setting.choices)


@pytest.mark.parametrize("preset", HUB["config"]["presets"], ids=lambda p: p["name"])
def test_hub_presets_are_valid_settings_for_the_baked_model(preset):
    assert preset["name"] and set(preset["defaults"]) <= set(SETTINGS)
    cfg = accepted(preset["defaults"])
    assert cfg.model == baked_model()  # the image runs offline: only the baked model loads
    assert {"BLIP_MODEL", "BLIP_DTYPE", "BLIP_MAX_BATCH_SIZE"} <= set(preset["defaults"])


def test_hub_defaults_of_inputs_match_the_worker_defaults():
    for entry in HUB["config"]["env"]:
        default, setting = entry["input"]["default"], SETTINGS[entry["key"]]
        expected = baked_model() if entry["key"] == "BLIP_MODEL" else setting.default
        assert accepted({entry["key"]: default}) == accepted({entry["key"]: env_value(expected)})


@pytest.mark.parametrize("case", TESTS["tests"], ids=lambda t: t["name"])
def test_hub_test_inputs_are_valid_requests(case):
    assert case["name"] and isinstance(case["timeout"], int) and case["timeout"] >= 60_000
    request = schema.parse_request(case["input"], config.defaults())
    assert all(s.startswith("data:") for s in request.sources)  # self-contained: no network


def test_hub_tests_run_on_a_supported_gpu_with_the_sample_input():
    cfg = TESTS["config"]
    assert cfg["gpuTypeId"] in GPUS_16GB_UP and cfg["gpuCount"] == 1
    assert cfg["allowedCudaVersions"] == HUB["config"]["allowedCudaVersions"]
    accepted({e["key"]: e["value"] for e in cfg.get("env", [])})
    sample = json.loads((REPO / "test_input.json").read_text())["input"]
    assert TESTS["tests"][0]["input"] == sample  # the same check as `make run`


def test_hub_gpus_have_kernels_in_the_default_images_torch():
    """Every GPU the Hub may pick (its pools, the test GPU) is one the default CUDA flavour's
    torch is built for: cu126 stops at Hopper (sm_90), so a Blackwell pool would need cu130."""
    flavor = default_cuda_flavor(REPO)
    assert flavor in CUDA_FLAVORS, flavor
    pools = HUB["config"]["gpuIds"].split(",")
    assert set(pools) <= set(POOL_CAPABILITIES), pools
    unserved = {p: sorted(c for c in POOL_CAPABILITIES[p]
                          if not runs_on(flavor, c)) for p in pools}
    assert not any(unserved.values()), (flavor, unserved)
    assert runs_on(flavor, GPUS_16GB_UP[TESTS["config"]["gpuTypeId"]])
