"""Model cards: round trip, listing, name resolution order and building models from cards."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from core.models.backbones import build_backbone
from core.models.checkpoint import CheckpointError, save_checkpoint, sidecar_path
from core.models.layers import gem
from core.models.cards import ModelCard, RegistryError
from core.models.registry import default_registry_dir, list_cards, load_card, register, scan_cards, weights_hash
from core.models.resolve import build_model, card_from_checkpoint, resolve_model
from jobs.cli import main


def _card(name: str, **kw) -> ModelCard:
    fields = dict(
        name=name, kind="backbone", arch="tiny_cnn", weights=None, input_size=64,
        resize="short_side",
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), dim=16,
        build={"name": "tiny_cnn", "pool": "gem", "dim": 16, "img_size": 64, "seed": 0},
        trained_on="recipe_a/set3", loss="arcface", train_time_s=12.5, metrics={"uap": 0.42},
    )
    return ModelCard(**{**fields, **kw})


def test_register_load_round_trip(tmp_path: Path) -> None:
    card = _card("r50.byol-a")
    path = register(card, tmp_path)
    assert path == tmp_path / "r50.byol-a.json"
    assert load_card("r50.byol-a", tmp_path) == card
    assert [p.name for p in tmp_path.iterdir()] == ["r50.byol-a.json"]  # no temp file left
    register(_card("r50.byol-a", loss="triplet"), tmp_path)  # re-register replaces
    assert load_card("r50.byol-a", tmp_path).loss == "triplet"


def test_list_cards_sorted_and_skips_checkpoint_sidecars(tmp_path: Path) -> None:
    assert list_cards(tmp_path / "missing") == []
    for name in ["zeta", "alpha", "mid"]:
        register(_card(name), tmp_path)
    save_checkpoint(build_backbone("tiny_cnn"), tmp_path / "weights.safetensors")
    assert [c.name for c in list_cards(tmp_path)] == ["alpha", "mid", "zeta"]


def test_card_validation() -> None:
    with pytest.raises(ValidationError, match="extra"):
        _card("a", colour="red")
    with pytest.raises(ValidationError, match="backbone card needs dim"):
        _card("a", dim=None)
    with pytest.raises(ValidationError, match="name"):
        _card("../escape")
    det = ModelCard(name="yolo", kind="detector", arch="yolov8n", input_size=640,
                    mean=(0, 0, 0), std=(1, 1, 1))
    assert det.dim is None and det.build == {}


def test_bad_card_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"name": "broken", "kind": "backbone"}')
    with pytest.raises(RegistryError, match=r"broken\.json: invalid model card"):
        load_card("broken", tmp_path)
    (tmp_path / "broken.json").unlink()
    (tmp_path / "renamed.json").write_text(_card("original").model_dump_json())
    with pytest.raises(RegistryError, match="card name 'original' does not match"):
        list_cards(tmp_path)


def test_scan_cards_flags_bad_files_in_one_line_each(tmp_path: Path) -> None:
    for name in ["beta", "alpha"]:
        register(_card(name), tmp_path)
    (tmp_path / "notes.json").write_text('{"foo": 1}')
    (tmp_path / "junk.json").write_bytes(b"\xff not json")
    cards, problems = scan_cards(tmp_path)
    assert [c.name for c in cards] == ["alpha", "beta"]
    assert [str(p) for p in problems] == [
        f"{tmp_path / 'junk.json'}: invalid model card: Invalid JSON: expected value at line 1 column 1",
        f"{tmp_path / 'notes.json'}: invalid model card: name: Field required (and 6 more)"]
    with pytest.raises(RegistryError, match=r"junk\.json: invalid model card"):  # list_cards stays strict
        list_cards(tmp_path)


def test_cli_list_shows_valid_cards_and_warns_per_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    register(_card("good"), tmp_path)
    (tmp_path / "notes.json").write_text('{"foo": 1}')
    assert main(["models", "list", "--registry", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "good" in out and "notes" not in out
    assert err.splitlines() == [f"skipped {tmp_path / 'notes.json'}: invalid model card: name: Field required "
                                "(and 6 more)"]
    assert main(["models", "list", str(tmp_path)]) == 2  # a folder given as PATH: not silently the default registry
    assert f"models list: takes no PATH ({tmp_path}); a registry folder is --registry DIR" in capsys.readouterr().err
    assert main(["models", "list", "--registry", str(tmp_path), "--name", "x", "--only", "sscd"]) == 2  # not ignored
    assert "models list: --name is for import-*; --only is for fetch-sscd" in capsys.readouterr().err
    assert main(["models", "list", "--registry", str(tmp_path), "--resize", "square"]) == 2  # its default, given
    assert "models list: --resize is for import-*" in capsys.readouterr().err
    assert main(["models", "import-onnx", "m.onnx", "--name", "n", "--input-size", "32", "--uint8-nhwc",
                 "--layout", "nchw", "--registry", str(tmp_path)]) == 2
    assert "--uint8-nhwc means --layout nhwc --dtype uint8; it contradicts --layout nchw" in capsys.readouterr().err


def test_weights_inside_the_registry_are_stored_relative(tmp_path: Path) -> None:
    reg, outside = tmp_path / "reg", tmp_path / "elsewhere.safetensors"
    save_checkpoint(build_backbone("tiny_cnn", dim=16, seed=2), reg / "inside.safetensors")
    save_checkpoint(build_backbone("tiny_cnn", dim=16, seed=3), outside)
    register(card_from_checkpoint(reg / "inside.safetensors"), reg)
    register(card_from_checkpoint(outside).model_copy(update={"name": "outside"}), reg)
    stored = {p.stem: json.loads(p.read_text())["weights"] for p in [reg / "inside.json", reg / "outside.json"]}
    assert stored == {"inside": "inside.safetensors", "outside": str(outside.resolve())}
    moved = tmp_path / "copied" / "reg"
    shutil.move(reg, moved)  # a moved registry keeps working; absolute paths (old cards) still resolve
    card = load_card("inside", moved)
    assert card.weights == str((moved / "inside.safetensors").resolve())
    assert weights_hash(card) == card.weights_sha256 and build_model(card).dim == 16
    assert load_card("outside", moved).weights == str(outside.resolve())
    (moved / "inside.safetensors").write_bytes(b"changed")
    with pytest.raises(RegistryError, match="inside.safetensors changed since the card was written"):
        weights_hash(load_card("inside", moved))


def test_unknown_name_lists_registered_names(tmp_path: Path) -> None:
    register(_card("alpha"), tmp_path)
    register(_card("beta"), tmp_path)
    with pytest.raises(RegistryError, match="no model 'gamma' in registry .*: alpha, beta"):
        load_card("gamma", tmp_path)
    with pytest.raises(RegistryError, match=r"cannot resolve model 'gamma'.*alpha, beta.*resnet50"):
        resolve_model("gamma", tmp_path)
    with pytest.raises(RegistryError, match="registered: none"):
        resolve_model("gamma", tmp_path / "empty")


def test_resolve_bare_backbone_gives_random_init_card(tmp_path: Path) -> None:
    card = resolve_model("tiny_cnn", tmp_path, dim=24)
    assert (card.kind, card.arch, card.weights) == ("backbone", "tiny_cnn", None)
    assert (card.dim, card.input_size) == (24, 160)
    assert card.mean == (0.5, 0.5, 0.5)
    model = build_model(card).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # seeded init: every process builds the same random model
        assert torch.equal(model(x), build_backbone("tiny_cnn", dim=24).eval()(x))


def test_resolve_checkpoint_path_uses_sidecar(tmp_path: Path) -> None:
    model = build_backbone("tiny_cnn", dim=16, seed=5).eval()
    meta = {"trained_on": "set1", "loss": "byol", "train_time_s": 3.0, "epochs": 2}
    path = save_checkpoint(model, tmp_path / "ckpts" / "byol tiny.safetensors", meta=meta)
    card = resolve_model(path, tmp_path)
    assert card.name == "byol_tiny" and card.weights == str(path.resolve())
    assert (card.trained_on, card.loss, card.train_time_s, card.dim) == ("set1", "byol", 3.0, 16)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(build_model(card).eval()(x), model(x))
    with pytest.raises(RegistryError, match="has dim 16; dim=8"):
        resolve_model(path, tmp_path, dim=8)
    side = json.loads(Path(f"{path}.json").read_text())
    side["meta"]["resize"] = "sideways"
    Path(f"{path}.json").write_text(json.dumps(side))
    with pytest.raises(RegistryError, match=r"sidecar gives an invalid card: resize: [^\n]*$"):
        card_from_checkpoint(path)  # one line naming the field, not pydantic's dump


def _vit_weights_with_cnn_sidecar(folder: Path) -> Path:
    """``x.safetensors`` holding tiny_vit weights next to a tiny_cnn checkpoint's sidecar."""
    vit = save_checkpoint(build_backbone("tiny_vit"), folder / "vit.safetensors")
    cnn = save_checkpoint(build_backbone("tiny_cnn", dim=16), folder / "cnn.safetensors")
    mixed = folder / "x.safetensors"
    shutil.copy(vit, mixed)
    shutil.copy(sidecar_path(cnn), sidecar_path(mixed))
    return mixed


def test_a_checkpoint_whose_weights_do_not_fit_its_sidecar_is_refused_at_resolve(tmp_path: Path) -> None:
    mixed = _vit_weights_with_cnn_sidecar(tmp_path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(mixed))}: no key matches the model \(file: blocks\.0\.[^\n]*$"):
        resolve_model(mixed, tmp_path)


@pytest.mark.parametrize("registered", [False, True])
def test_run_refuses_weights_that_do_not_fit_before_any_stage_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, registered: bool
) -> None:
    from jobs import pipeline

    def no_stage(*args: object) -> None:
        raise AssertionError("preflight passed: the stages would start")

    monkeypatch.setattr(pipeline, "init_ray", no_stage)
    mixed = _vit_weights_with_cnn_sidecar(tmp_path)
    name = str(mixed)
    if registered:  # a card whose weights file was swapped for another architecture's
        card = card_from_checkpoint(tmp_path / "cnn.safetensors")
        register(card.model_copy(update={"name": "swapped", "weights": str(tmp_path / "vit.safetensors")}), tmp_path)
        name = "swapped"
    out = tmp_path / "run"
    args = ["--out", str(out), "--set", f"registry={tmp_path}", "--set", f"models.0.name={name}"]
    assert main(["run", "configs/smoke.yaml", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    weights = tmp_path / ("vit.safetensors" if registered else "x.safetensors")
    assert len(lines) == 1 and f"models.0.name: {weights}: no key matches the model (file: blocks.0." in lines[0]
    assert not (out / "config.yaml").exists() and not (out / "manifest.parquet").exists()


def test_pool_override_reads_a_trained_model_out_by_regions(tmp_path: Path) -> None:
    model = build_backbone("tiny_cnn", dim=None, seed=3).eval()
    path = save_checkpoint(model, tmp_path / "ssl.safetensors")
    card = resolve_model(path, tmp_path, pool="gem_grid2")
    assert card.build["pool"] == "gem_grid2" and card.dim == 4 * model.dim
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = torch.nn.functional.normalize(gem(model.trunk.forward_features(x), model.pool.p, grid=2), dim=1)
        assert torch.allclose(build_model(card).eval()(x), want, atol=1e-6)
    assert resolve_model(path, tmp_path, pool="gem").dim == model.dim  # its own pooling: unchanged


def test_pool_override_refuses_projected_models_and_non_backbones(tmp_path: Path) -> None:
    path = save_checkpoint(build_backbone("tiny_cnn", dim=16), tmp_path / "proj.safetensors")
    with pytest.raises(RegistryError, match="projects its pooled features to 16 dims.*dim: null"):
        resolve_model(path, tmp_path, pool="gem_grid2")
    register(_card("ext", kind="external", build={}), tmp_path)
    with pytest.raises(RegistryError, match="external: pool applies to backbone models only"):
        resolve_model("ext", tmp_path, pool="gem_grid2")
    assert resolve_model("tiny_cnn", tmp_path, dim=8, pool="gem_grid2").dim == 8  # random init: any pool


def test_registry_name_shadows_backbone_name(tmp_path: Path) -> None:
    register(_card("tiny_cnn", trained_on="registered"), tmp_path)
    assert resolve_model("tiny_cnn", tmp_path).trained_on == "registered"
    assert resolve_model("tiny_cnn", tmp_path / "other").trained_on is None


def test_build_model_rejects_non_backbones() -> None:
    det = ModelCard(name="yolo", kind="detector", arch="yolov8n", input_size=640,
                    mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(RegistryError, match="'yolo' is a detector"):
        build_model(det)


def test_default_registry_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COPYDET_REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_registry_dir() == tmp_path / "models"
    register(_card("here"))
    assert (tmp_path / "models" / "here.json").is_file()
    monkeypatch.setenv("COPYDET_REGISTRY", str(tmp_path / "elsewhere"))
    assert default_registry_dir() == tmp_path / "elsewhere"
    assert list_cards() == []
