"""Config `perf`: torch.compile trains the same weights as eager in one graph per network, bad values fail at
start-up naming the key, channels_last keeps checkpoints and exports intact."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from ldm.train.checks import ConfigError
from ldm.train.perf import apply_backend_flags, apply_model_perf, check_perf
from tests.ldm_factory import tiny_ldm
from tests.test_resume import _train, fit_vae

# aot_eager: dynamo capture and AOTAutograd's joint forward/backward graph, without inductor's code generation
# (minutes of C++ compiling on a CPU). Graph breaks and recompiles show up here as they would under inductor.
COMPILE = {"compile": True, "compile_backend": "aot_eager"}


def _ldm():
    torch.manual_seed(0)
    return tiny_ldm(scale_factor=None, prediction_type="v_prediction", warmup_steps=3, ema_decay=0.99)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()  # in-place compile: no `_orig_mod.` prefixes in checkpoints or exports
    for name, tensor in sa.items():
        torch.testing.assert_close(sb[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.usefixtures("one_thread")
def test_compiled_unet_trains_like_eager_in_one_graph(tmp_path):
    eager = _ldm()
    _train(eager, 4, tmp_path / "eager", None)
    compiled = _ldm()
    assert apply_model_perf(compiled, COMPILE) == ["compile unet (aot_eager, default)"]
    counters.clear()
    _train(compiled, 4, tmp_path / "compiled", None)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # four steps, one capture: nothing forces a recompile
    _assert_same_weights(eager, compiled)
    assert not torch.equal(_ldm().unet.out[2].weight, compiled.unet.out[2].weight)  # it trained


@pytest.mark.usefixtures("one_thread")
def test_compiled_autoencoder_trains_like_eager(tmp_path):
    # The GAN joins at step 2: the adaptive weight differentiates through the compiled decoder twice per step.
    _, eager = fit_vae(4, tmp_path / "eager")
    counters.clear()
    _, compiled = fit_vae(4, tmp_path / "compiled", perf=COMPILE)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2  # encoder and decoder
    assert compiled.optimizer_steps == eager.optimizer_steps == [4, 2]
    _assert_same_weights(eager, compiled)


@pytest.mark.parametrize("perf, key", [
    ({"compile_mode": "fast"}, "perf.compile_mode='fast'"),
    ({"compile": True, "compile_backend": "nope"}, "perf.compile_backend='nope'"),
    ({"sdpa_backends": ["flash", "fastest"]}, "perf.sdpa_backends="),
    ({"sdpa_backends": "flash"}, "perf.sdpa_backends="),
    ({"compiel": True}, "unknown key(s) ['compiel']"),
    ({"progress_bar_refresh_steps": 0}, "perf.progress_bar_refresh_steps=0"),
])
def test_bad_perf_values_fail_naming_the_key(perf, key):
    with pytest.raises(ConfigError, match=None) as err:
        check_perf(perf)
    assert key in str(err.value)


def test_good_perf_values_pass_and_cpu_flags_untouched():
    check_perf({"compile": True, "compile_mode": "max-autotune", "sdpa_backends": ["flash", "efficient"],
                "tf32": True, "channels_last": False})
    if torch.cuda.is_available():
        pytest.skip("the CPU-only behaviour")
    before = torch.get_float32_matmul_precision()
    assert apply_backend_flags({"tf32": True, "sdpa_backends": ["math"]}) == []
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.usefixtures("one_thread")
def test_channels_last_trains_and_exports(tmp_path):
    module = _ldm()
    assert apply_model_perf(module, {"channels_last": True}) == ["channels_last"]
    assert module.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    _train(module, 2, tmp_path / "run", None)
    assert module.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    from ldm.checkpoints.bundle import load_bundle, write_bundle

    out = write_bundle(module, tmp_path / "export")  # safetensors refuses non-contiguous tensors
    loaded = load_bundle(out)
    _assert_same_weights(module.ema.model, loaded.unet)  # every value where it was, not channels_last memory order
    module.eval()
    torch.manual_seed(1)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 3, module.ema.model.config["context_dim"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, t, c), module.ema.model(x, t, c), atol=1e-5, rtol=1e-4)


@pytest.mark.usefixtures("one_thread")
def test_compile_with_gradient_checkpointing_is_one_graph_with_eager_gradients():
    import torch.nn.functional as F
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from ldm.diffusion.unet import unet_preset

    torch.manual_seed(0)
    kwargs = dict(in_channels=4, out_channels=4, context_dim=32, model_channels=16, channel_mult=[1, 2],
                  attention_resolutions=[2], num_head_channels=16)
    compiled = unet_preset("tiny", use_checkpoint=True, **kwargs).train()
    with torch.no_grad():
        for p in compiled.parameters():  # no zero-initialised output layer: every gradient is non-trivial
            p.normal_(0, 0.05)
    eager = unet_preset("tiny", use_checkpoint=False, **kwargs).train()
    eager.load_state_dict(compiled.state_dict())
    # aot_eager with the backward graph kept: checkpointing shows there as forward convolutions recomputed.
    recomputed = []

    def keep_backward(gm: torch.fx.GraphModule, example_inputs) -> torch.fx.GraphModule:
        recomputed.append(sum(n.target == torch.ops.aten.convolution.default for n in gm.graph.nodes))
        return make_boxed_func(gm)

    compiled.compile(backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=keep_backward))
    x, t, c = torch.randn(2, 4, 16, 16), torch.randint(0, 1000, (2,)), torch.randn(2, 8, 32)
    counters.clear()
    for model in (compiled, eager):
        F.mse_loss(model(x, t, c), torch.zeros_like(x)).backward()
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    assert len(recomputed) == 1 and recomputed[0] > 0, recomputed  # 0 when use_checkpoint is ignored
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
