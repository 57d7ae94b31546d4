"""Layers import only downward (DESIGN.md "Package layout"), checked on the source by bench/import_graph.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from .conftest import ROOT

# The files whose layering issue 29 part 1 fixed: each function-level ldm import in them states its reason.
FIXED = ("ldm.autoencoder.model", "ldm.autoencoder.identity", "ldm.diffusion.unet", "ldm.conditioning", "ldm.bundle",
         "ldm.export", "ldm.weights", "ldm.train.cli", "ldm.train.init_from", "ldm.train.checks", "ldm.train.loggers")
TRAINING_AND_ABOVE = ("ldm.diffusion.module", "ldm.autoencoder.module", "ldm.train", "ldm.bundle", "ldm.sampling",
                      "ldm.export", "ldm.evaluate")


@pytest.fixture(scope="module")
def graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "bench" / "import_graph.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = tool  # its dataclasses look their module up there
    spec.loader.exec_module(tool)
    edges, modules, shims = tool.build_graph(ROOT)
    return tool, edges, modules, shims


def test_no_circles_but_the_model_classes_hand_offs(graph):
    tool, edges, modules, _ = graph
    assert tool.strongly_connected(modules, [e for e in edges if not e.function_level]) == []
    rest = [e for e in edges if not (e.function_level and tool.HAND_OFF in e.comment)]
    assert tool.strongly_connected(modules, rest) == []
    hand_offs = {(e.source, e.target) for e in edges if e.function_level and tool.HAND_OFF in e.comment}
    # Only a model class's from_pretrained / save_pretrained may reach up, and only to the format layer.
    assert all(t.startswith("ldm.checkpoints.") for _, t in hand_offs), hand_offs


def test_formats_never_import_training_or_above(graph):
    _, edges, _, shims = graph
    up = [f"{e.source}:{e.line} -> {e.target}" for e in edges
          if e.source.startswith(("ldm.checkpoints.", "ldm.weights")) and e.source not in shims
          and e.target.startswith(TRAINING_AND_ABOVE)]
    assert up == []


def test_function_level_imports_state_their_reason(graph):
    _, edges, _, shims = graph
    files = set(FIXED) | {e.source for e in edges if e.source.startswith("ldm.checkpoints.")} | shims
    silent = [f"{e.source}:{e.line} {e.statement}" for e in edges
              if e.function_level and e.source in files and not e.comment.startswith("reason:")]
    assert silent == []


def test_the_old_bundle_path_loads_no_model_code():
    """sample.py checks its settings through ldm.checkpoints.bundle before the model (and Lightning) loads."""
    code = ("import sys, ldm.checkpoints.bundle as b; b.is_bundle('.'); b.read_hparams; "
            "assert 'pytorch_lightning' not in sys.modules and 'ldm.diffusion.module' not in sys.modules; "
            "from ldm.checkpoints.bundle import load_ldm; import ldm.bundle; assert load_ldm is ldm.bundle.load_ldm")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


def test_sample_loading_goes_down_the_layers(graph, capsys):
    """sample.py ckpt=<export>: no call from a module into a higher layer while the model loads."""
    tool = graph[0]
    trace = tool.trace_sample(ROOT)
    capsys.readouterr()
    assert trace["climbs"] == 0, trace["upward_hops"]
    assert not trace["both_ways"]
    assert "ldm/checkpoints/autoencoder.py" in trace["files"] and "ldm/bundle.py" in trace["files"]
