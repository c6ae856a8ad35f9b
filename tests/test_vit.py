"""vit.VisionEncoder: transformers' BLIP-2 image encoder as one layer function, eager or compiled."""
import pytest
import torch

import config
import engine as engine_mod
import modeling
import vit


@pytest.fixture(scope="module")
def tiny():
    return modeling.build_tiny(torch.device("cpu"), torch.float32).model


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 364, 364, generator=torch.Generator().manual_seed(seed))


def test_eager_layer_function_gives_transformers_output_bit_for_bit(tiny):
    enc = vit.VisionEncoder(tiny.vision_model)
    x = pixels(3)
    with torch.inference_mode():
        want = tiny.vision_model(x, return_dict=True).last_hidden_state
        got = enc(x)
    assert torch.equal(got, want)
    # and it is sensitive to the image: different images, different embeddings
    assert not torch.allclose(got[0], got[1])


def test_the_fast_decoder_encodes_images_with_it():
    eng = engine_mod.load_engine(config.Config.from_env(
        {"BLIP_MODEL": "tiny-random", "BLIP_WARMUP": "0"}))
    assert isinstance(eng.fast.vision, vit.VisionEncoder) and not eng.fast.vision.compiled


def test_unsupported_vision_models_keep_transformers_forward(tiny):
    assert vit.supports(tiny.vision_model)
    handle = tiny.vision_model.encoder.layers[1].mlp.register_forward_hook(lambda *a: None)
    try:
        assert not vit.supports(tiny.vision_model)  # a hook must still run
    finally:
        handle.remove()
    assert vit.supports(tiny.vision_model)
    tiny.vision_model.config.hidden_act = "quick_gelu"
    try:
        assert not vit.supports(tiny.vision_model)
    finally:
        tiny.vision_model.config.hidden_act = "gelu"
    assert not vit.supports(torch.nn.Linear(2, 2))


def test_compiled_encoder_matches_eager_and_compiles_once_for_all_batch_sizes(tiny):
    """torch.compile with inductor (a C++ compiler is enough on CPU): the compiled layer gives
    eager's output to rounding, and batch sizes above 1 share one compiled graph."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    enc = vit.VisionEncoder(tiny.vision_model, compile=True)
    eager = vit.VisionEncoder(tiny.vision_model)
    with torch.inference_mode():
        first = enc(pixels(2))
        graphs = counters["stats"]["unique_graphs"]
        for n in (3, 5):
            x = pixels(n, seed=n)
            torch.testing.assert_close(enc(x), eager(x), rtol=1e-4, atol=1e-4)
        assert counters["stats"]["unique_graphs"] == graphs  # no recompilation
        torch.testing.assert_close(first, eager(pixels(2)), rtol=1e-4, atol=1e-4)
