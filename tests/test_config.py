"""The pipeline config: shipped configs validate; bad keys/values are named in the error."""
from pathlib import Path

import pytest

from jobs.config import ConfigError, load_config

CONFIG_DIR = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.models and cfg.output


def test_numbers_read_as_numbers_and_lists_as_the_tuples_they_fill():
    assert load_config(None, ["fuse.threshold=1"]).fuse.threshold == 1.0  # an integer is a number
    assert load_config(None, ["output=2024"]).output == "2024"  # a folder named by a number is a folder
    assert [load_config(None, [f"extract.use_gpu={v}"]).extract.use_gpu for v in ("yes", "no", "auto")] == \
        ["yes", "no", "auto"]  # YAML reads yes / no as booleans
    from pretrain.train_config import load_train_config
    tiny = CONFIG_DIR / "train" / "tiny.yaml"
    assert load_train_config(tiny, ["pretrain.momentum=[0.9, 1]"]).pretrain.momentum == (0.9, 1.0)
    # 1e-3 is a number as people write it (PyYAML's YAML 1.1 read it as a string, which a strict field refuses)
    assert load_train_config(tiny, ["finetune.lr=1e-3"]).finetune.lr == 0.001


def test_a_rate_written_1e_4_in_a_file_is_a_number(tmp_path):
    from pretrain.train_config import load_train_config
    path = tmp_path / "t.yaml"
    path.write_text(f"extends: {CONFIG_DIR / 'train' / 'tiny.yaml'}\nfinetune:\n  lr: 1e-4\n")
    assert load_train_config(path).finetune.lr == 1e-4


def test_smoke_defaults_to_the_bundled_sample():
    cfg = load_config(None)
    assert Path(cfg.data.root).name == "sample"
    assert set(cfg.data.folders()) == {"train", "reference", "query"}
    assert cfg.data.ground_truth_path().endswith("ground_truth.csv")


@pytest.mark.parametrize("override, key", [
    ("search.kk=3", "search.kk: unknown key"),
    ("search.k=-1", "search.k:"),
    ("models.0.scales=[224, big]", "models.0.scales.1:"),
    ("patches.query.rotations=[45]", "patches.query.rotations.0:"),
    ("fuse.rule=median", "fuse.rule:"),
    ("extract.use_gpu=maybe", "extract.use_gpu:"),
    ("models.3.name=x", "--set models.3.name: index 3 is out of range (the list has 1 entries)"),
    ("models.x.name=x", "--set models.x.name: 'x' is not a list index"),
    ("name.first=x", "--set name.first: cannot set 'first' inside a str value"),
    ("reduce.concat=true", "reduce.concat joins two or more members"),  # smoke has one: it would derive nothing
    ("search.k=true", "search.k: Input should be a valid integer"),  # was read as 1: values are not coerced
    ("search.k=2.5", "search.k: Input should be a valid integer"),
    ("models.0.scales=[224, true]", "models.0.scales.1: Input should be a valid integer"),
    ("patches.query.flip=1", "patches.query.flip: Input should be a valid boolean"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"--set 'fuse.k=\[3': the value of fuse.k is not valid YAML"):
        load_config(None, ["fuse.k=[3"])
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "bad.yaml")
    assert str(e.value) == f"{tmp_path / 'bad.yaml'}: not valid YAML at line 2, column 1: expected the node content, " \
        "but found '<stream end>'"  # one line, where PyYAML printed four
    with pytest.raises(ConfigError, match="configs: a folder, not a config file"):
        load_config(CONFIG_DIR)


@pytest.mark.parametrize("path, kind", [
    ("train/tiny.yaml", "a training config (copydet pretrain / finetune CONFIG)"),
    ("train/verifier.yaml", "a verifier training config (copydet train-verifier CONFIG)"),
    ("detector/cpu.yaml", "a detector training config (copydet detector train CONFIG)"),
])
def test_another_commands_config_is_named_as_such(path, kind):
    """Given to a pipeline command, each printed a dozen 'unknown key' lines."""
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG_DIR / path)
    assert str(e.value) == f"{CONFIG_DIR / path}: {kind}, not a pipeline config such as configs/smoke.yaml"


def test_overrides_reach_nested_keys():
    cfg = load_config(None, ["search.normalize.beta=0.5", "models.0.scales=[128, 160]", "output=/tmp/x"])
    assert cfg.search.normalize.beta == 0.5 and cfg.models[0].scales == [128, 160] and cfg.output == "/tmp/x"
    assert [k for _, _, k in cfg.model_keys()] == ["resnet18@128", "resnet18@160"]


def test_a_pool_override_names_its_own_feature_folder():
    cfg = load_config(None, ["models.0.pool=gem_grid2", "models.0.scales=[128]"])
    assert [k for _, _, k in cfg.model_keys()] == ["resnet18-gem_grid2@128"]


def test_an_unresolvable_model_is_named_at_start_with_what_makes_it(tmp_path, capsys, monkeypatch):
    """configs/sscd_ensemble.yaml on a fresh clone (SSCD's download off): no stage runs, one line says what to run."""
    from jobs import pipeline
    from jobs.cli import main

    monkeypatch.setattr(pipeline, "ensure_sscd", lambda names, registry: [])
    from jobs.preflight import how_to_get

    out = tmp_path / "run"
    assert main(["run", "configs/sscd_ensemble.yaml", "--out", str(out), "--set", f"registry={tmp_path / 'reg'}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and "models.0.name: cannot resolve model 'sscd'" in lines[0]
    # every member that does not resolve, each with what makes it (the others are not extracted first)
    assert "to make 'sscd', run `copydet models fetch-sscd`; models.1.name: " in lines[0]
    assert "to make 'sscd_distilled', run `copydet models fetch-sscd`; models.2.name: " in lines[0]
    assert lines[0].endswith("to make 'cpu-resnet18-byol', run `copydet pretrain configs/train/cpu.yaml`")
    assert not (out / "config.yaml").exists() and not (out / "manifest.parquet").exists()
    assert how_to_get("cpu-resnet18-byol") == ("to make 'cpu-resnet18-byol', run "
                                               "`copydet pretrain configs/train/cpu.yaml`")
    assert how_to_get("cpu-resnet18-basic").endswith("run `copydet finetune configs/train/cpu.yaml`")
    assert how_to_get("copy-detector-cpu").endswith("run `copydet detector train configs/detector/cpu.yaml`")


def test_fuse_mean_takes_no_thresholds_and_calibration_factors_are_positive():
    with pytest.raises(ConfigError, match="rule 'mean' takes no thresholds"):
        load_config(None, ["fuse.rule=mean", "fuse.thresholds={a: 0.5}"])
    with pytest.raises(ConfigError, match="calibration factors must be > 0"):
        load_config(None, ["fuse.calibration={a: 0}"])
    assert load_config(None, ["fuse.rule=mean", "fuse.calibration={resnet18@224: 1.2}"]).fuse.calibration == \
        {"resnet18@224": 1.2}


@pytest.mark.parametrize("overrides, error", [
    # both entries make features/resnet18@224: the run stopped after patch, saying a new --out would help
    (["models=[{name: resnet18, dim: 64}, {name: resnet18, dim: 128}]"], "models: resnet18@224 made twice"),
    (["models.0.scales=[224, 224]"], "models: resnet18@224 made twice"),
    # the filtering rules without thresholds failed at fuse, after extraction and search
    (["fuse.rule=confidence"], "rule 'confidence' keeps a pair by per-member thresholds: give fuse.thresholds"),
    # a key that names no member: ignored by max, every pair dropped by completeness (μAP 0, exit 0)
    (["fuse.rule=completeness", "fuse.thresholds={resnet18@22: 0.1}"],
     "fuse.thresholds: resnet18@22 is no member of this config (would be ignored); its members: resnet18@224"),
    (["fuse.calibration={resnet18: 1.1}"], "fuse.calibration: resnet18 is no member"),
    # a NaN threshold counted every prediction a copy in metrics.json and none in copies.csv
    (["fuse.threshold=.nan"], "fuse.threshold.float: Input should be a finite number"),
    (["verify.weight=.inf"], "verify.weight: Input should be a finite number"),
])
def test_settings_a_run_would_fail_on_or_ignore_are_refused_when_read(overrides, error):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert error in str(e.value) and "Value error" not in str(e.value)


def test_a_set_text_key_is_the_text_as_typed_and_numbers_read_as_in_yaml_1_2():
    """`--set output=1.10` made the folder `1.1`, `010` made `8`, `12:30` made `750`; `name=no` was refused."""
    for value in ("1.10", "010", "0x1F", "1e3", "12:30", "no", "2024-01-01", "runs/1.10"):
        cfg = load_config(None, [f"output={value}", f"name={value}", f"models.0.name={value}"])
        assert (cfg.output, cfg.name, cfg.models[0].name) == (value, value, value)
    assert load_config(None, ["registry=null"]).registry is None
    assert load_config(None, ["search.k=010"]).search.k == 10  # YAML 1.1 read octal 8
    with pytest.raises(ConfigError, match="search.k: Input should be a valid integer"):
        load_config(None, ["search.k=12:30"])  # base 60 in YAML 1.1: 750


@pytest.mark.parametrize("override, line", [
    ("serch.k=5", "  serch: unknown key (did you mean search?)"),
    ("search.normalize.neigbours=3", "  search.normalize.neigbours: unknown key (did you mean neighbours?)"),
    ("models.0.scale=[3]", "  models.0.scale: unknown key (did you mean scales?)"),
    ("zzz=1", "  zzz: unknown key"),
])
def test_an_unknown_key_names_the_nearest_known_one(override, line):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).splitlines()[1:] == [line]
    with pytest.raises(ConfigError, match="--set '=5': no KEY before '='"):
        load_config(None, ["=5"])


def test_the_service_threshold_with_an_auto_fuse_threshold():
    """`auto` is estimated per batch run; a served answer uses a number (serve.threshold)."""
    assert load_config(None, ["fuse.threshold=auto", "serve.threshold=0.2"]).copy_threshold() == 0.2
    assert load_config(None, ["fuse.threshold=0.3", "serve.threshold=0.2"]).copy_threshold() == 0.3
    with pytest.raises(ConfigError, match="fuse.threshold"):
        load_config(None, ["fuse.threshold=sometimes"])


def test_a_config_extends_another(tmp_path):
    """Mappings merge key by key, lists and scalars replace; the base path is relative to the file."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("name: a\nsearch: {k: 20, normalize: {enabled: true, beta: 0.5}}\n"
                                             "models: [{name: resnet18, scales: [64, 96]}]\n")
    (tmp_path / "b.yaml").write_text("extends: base/a.yaml\nname: b\nsearch: {normalize: {beta: 2.0}}\n"
                                     "models: [{name: resnet18, scales: [80]}]\n")
    cfg = load_config(tmp_path / "b.yaml", ["search.k=30"])
    assert (cfg.name, cfg.search.k, cfg.search.normalize.enabled, cfg.search.normalize.beta) == ("b", 30, True, 2.0)
    assert [m.scales for m in cfg.models] == [[80]]


def test_extends_errors_name_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: extends a.yaml makes a cycle: a.yaml -> b.yaml -> a.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone.yaml: no such config file \(extended by .*c.yaml\)"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="d.yaml: extends must be the path of a config file"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.parametrize("config, base, overrides", [
    ("balanced", "sscd_verify", ["verify.top_k=5", "verify.max_side=384"]),
    ("sscd_distilled", "sscd", ["models.0.name=sscd_distilled", "models.0.scales=[288]"]),
])
def test_a_shipped_config_is_its_base_with_what_it_sets(config, base, overrides):
    got = load_config(CONFIG_DIR / f"{config}.yaml").model_dump()
    want = load_config(CONFIG_DIR / f"{base}.yaml", [f"name={config}", f"output=runs/{config}", *overrides])
    assert got == want.model_dump()


def test_a_tuned_config_of_an_extending_config_stands_alone(tmp_path, monkeypatch):
    """And names its folders and model registry absolutely: run from another folder (or without
    $COPYDET_REGISTRY), it looked for its models in that folder's ./models."""
    from jobs.tune import write_tuned_config
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COPYDET_REGISTRY", "reg")
    out = write_tuned_config(str(CONFIG_DIR / "balanced.yaml"), ["search.k=12", "data.train=photos"],
                             {"search.normalize.beta": 1.5}, str(tmp_path / "tuned.yaml"), ["tuned here"])
    text = open(out).read()
    assert text.startswith("# tuned here\n") and "extends" not in text
    monkeypatch.chdir(CONFIG_DIR)
    monkeypatch.delenv("COPYDET_REGISTRY")
    cfg = load_config(out)
    assert (cfg.name, cfg.verify.top_k, cfg.patches.query.preset, cfg.search.k, cfg.search.normalize.beta) == \
        ("balanced", 5, "crops", 12, 1.5)
    assert (cfg.registry, cfg.data.train) == (str(tmp_path / "reg"), str(tmp_path / "photos"))


@pytest.mark.parametrize("folder", ["runs/a #1", "yes", "[old] refs", "a: b", "#tmp", "2024", "null", "é/'q\""])
def test_folders_given_as_options_are_taken_as_written(tmp_path, folder):
    """--out and the folder options were passed on as --set text and read as YAML: `runs/a #1`
    lost `#1`, `#tmp` and `null` became the default output, `yes` true, `[old] refs` a list."""
    import argparse

    from jobs.commands.stages import config_with_folders

    args = argparse.Namespace(config=None, set=[], out=str(tmp_path / folder), references=folder, queries=None,
                              train=None, ground_truth=f"{folder}.csv")
    cfg = config_with_folders(args)
    assert (cfg.output, cfg.data.references, cfg.data.ground_truth) == (str(tmp_path / folder), folder, f"{folder}.csv")
    assert cfg.data.root is None


def test_a_root_set_on_the_command_line_gives_the_splits_the_folder_options_do_not(tmp_path):
    """minidisc-hard has queries/ and ground_truth.csv, and takes references and train from
    minidisc-dev: `--set data.root=hard --references dev/references --train dev/train` lost the
    root (a folder option replaced it) and was refused for having no queries folder."""
    import argparse

    from jobs.commands.stages import config_with_folders

    hard, refs = tmp_path / "hard", tmp_path / "dev" / "references"
    args = argparse.Namespace(config=None, set=[f"data.root={hard}"], out=str(tmp_path / "run"),
                              references=str(refs), queries=None, train=None, ground_truth=None)
    cfg = config_with_folders(args)
    assert (cfg.data.root, cfg.data.references) == (str(hard), str(refs))
    args.set = []
    assert config_with_folders(args).data.root is None  # the config's own root is still replaced
