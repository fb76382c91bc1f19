"""Checkpoint save/load round trips, foreign trunk weights, and every bad-file error."""

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from core.models.backbones import DescriptorModel, build_backbone
from core.models.checkpoint import (
    CheckpointError,
    check_weights,
    load_weights,
    read_sidecar,
    save_checkpoint,
    sidecar_path,
)
from core.models.resolve import load_checkpoint


def _randomise_bn_and_gem(model: torch.nn.Module) -> None:
    """Non-default BN statistics and GeM p, so a lost buffer would change the output."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(model, DescriptorModel):
            model.pool.p.fill_(2.5)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[DescriptorModel, Path]:
    model = build_backbone("tiny_cnn", dim=16, seed=3).eval()
    _randomise_bn_and_gem(model)
    return model, save_checkpoint(model, tmp_path / "tiny.safetensors", meta={"loss": "arcface"})


def test_save_load_round_trip_identical_descriptors(tiny) -> None:
    model, path = tiny
    assert path.is_file() and sidecar_path(path) == Path(f"{path}.json")
    side = read_sidecar(path)
    assert side["config"] == model.config() and side["meta"] == {"loss": "arcface"}
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    loaded = load_checkpoint(path).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.config() == model.config()


def test_load_weights_whole_model_and_trunk_only(tiny) -> None:
    model, path = tiny
    same_arch = build_backbone("tiny_cnn", dim=16, seed=99).eval()
    assert load_weights(same_arch, path) == "model"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(same_arch(x), model(x))
    no_proj = build_backbone("tiny_cnn", seed=99).eval()  # different head: only the trunk fits
    assert load_weights(no_proj, path) == "trunk"
    with torch.no_grad():
        assert torch.equal(no_proj.trunk.forward_features(x), model.trunk.forward_features(x))


def _torchvision_resnet18() -> torch.nn.Module:
    torch.manual_seed(11)
    tv = torchvision.models.resnet18(weights=None).eval()
    _randomise_bn_and_gem(tv)
    return tv


def _tv_features(tv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    body = torch.nn.Sequential(*list(tv.children())[:-2])  # drop avgpool + fc
    return body(x)


@pytest.mark.parametrize(
    "fmt", ["plain.pth", "ddp_wrapped.pt", "training_ckpt.pth", "backbone_prefix.safetensors"]
)
def test_torchvision_resnet18_loads_into_trunk(tmp_path: Path, fmt: str) -> None:
    tv = _torchvision_resnet18()
    sd = tv.state_dict()
    path = tmp_path / fmt
    if fmt.startswith("plain"):
        torch.save(sd, path)
    elif fmt.startswith("ddp"):
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif fmt.startswith("training"):
        torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    else:
        heads = {"projection_head.0.weight": torch.zeros(4, 512)}
        save_file({**{f"backbone.{k}": v.contiguous() for k, v in sd.items()}, **heads}, path)
    model = build_backbone("resnet18", checkpoint=path).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.trunk.forward_features(x), _tv_features(tv, x)
    assert ours.shape == (2, 512, 2, 2)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- bad checkpoints: each raises CheckpointError naming the file ---------------------------

def _into_tiny(path: Path) -> str:
    return load_weights(build_backbone("tiny_cnn"), path)


def _raises(path: Path, match: str, load=_into_tiny) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        load(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    _raises(tmp_path / "absent.safetensors", "no such file")
    _raises(tmp_path / "absent.safetensors", "no such file", load=load_checkpoint)


def test_pickle_with_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"conv1.weight": torch.zeros(1), "args": argparse.Namespace(lr=0.1)}, path)
    _raises(path, r"weights_only.*argparse\.Namespace")


def test_non_tensor_entry_and_unsupported_or_corrupt_files(tmp_path: Path) -> None:
    path = tmp_path / "strings.pt"
    torch.save({"conv1.weight": torch.zeros(1), "note": "hello"}, path)
    _raises(path, "entry 'note' is a str, not a tensor")
    (tmp_path / "weights.npz").write_bytes(b"x")
    _raises(tmp_path / "weights.npz", "unsupported file type '.npz'")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    _raises(tmp_path / "junk.safetensors", "not a valid safetensors file")


def test_wrong_shapes_list_keys_and_both_shapes(tmp_path: Path) -> None:
    sd = dict(build_backbone("tiny_cnn").trunk.state_dict())
    sd["conv1.0.weight"] = torch.zeros(3, 3, 3, 3)
    sd["fc.weight"] = torch.zeros(1000, 96)  # classifier keys are dropped, not an error
    path = tmp_path / "shapes.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    want = tuple(build_backbone("tiny_cnn").trunk.state_dict()["conv1.0.weight"].shape)
    expected = f"1 shape mismatches: conv1.0.weight: file (3, 3, 3, 3) vs model {want}"
    _raises(path, re.escape(expected))


def test_no_matching_keys_and_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.foo": torch.zeros(2)}, path)
    _raises(path, "no key matches the model")
    partial = {k: v.contiguous() for k, v in build_backbone("tiny_cnn").trunk.state_dict().items()
               if not k.startswith("layer4.")}
    save_file(partial, tmp_path / "partial.safetensors")
    _raises(tmp_path / "partial.safetensors", r"model weights missing: layer4\.")


def test_load_checkpoint_needs_a_valid_sidecar(tiny) -> None:
    _, path = tiny
    side = sidecar_path(path)
    side.write_text(json.dumps({"format": "copydet.descriptor/1", "config": {"name": "nope"}}))
    _raises(path, "cannot rebuild the model.*unknown backbone 'nope'", load=load_checkpoint)
    side.write_text("{not json")
    _raises(path, "not valid JSON", load=load_checkpoint)
    side.unlink()
    _raises(path, "missing sidecar", load=load_checkpoint)


def _checked_on_meta(path: Path) -> str:
    with torch.device("meta"):
        return check_weights(build_backbone("tiny_cnn"), path)


def test_check_weights_reads_only_the_header_and_agrees_with_load_weights(tmp_path: Path) -> None:
    model = build_backbone("tiny_cnn")
    trunk = {k: v.contiguous() for k, v in model.trunk.state_dict().items()}
    files = {"whole.safetensors": dict(model.state_dict()), "trunk.pt": {"state_dict": trunk},
             "other.safetensors": {"encoder.foo": torch.zeros(2)},
             "partial.safetensors": {k: v for k, v in trunk.items() if not k.startswith("layer4.")},
             "shapes.pt": {**trunk, "conv1.0.weight": torch.zeros(3, 3, 3, 3)},
             "vit.safetensors": dict(build_backbone("tiny_vit").state_dict())}
    for name, state in files.items():
        path = tmp_path / name
        if path.suffix == ".pt":
            torch.save(state, path)
        else:
            save_file(state, path)
        try:
            want = _into_tiny(path)
        except CheckpointError as e:
            _raises(path, re.escape(str(e)), load=_checked_on_meta)  # the same one-line message
        else:
            assert _checked_on_meta(path) == want, name


def test_save_requires_safetensors_suffix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="saved as .safetensors"):
        save_checkpoint(build_backbone("tiny_cnn"), tmp_path / "model.pth")
