"""Run-folder settings records: a resumed stage never mixes shards made with other settings."""
import pytest

from jobs.layout import SETTINGS_FILE, SettingsChanged, pin_settings


def test_pin_settings_records_then_checks(tmp_path):
    folder = str(tmp_path / "candidates" / "m@64")
    pin_settings(folder, {"k": 10, "normalize": {"enabled": True}}, "search")
    assert (tmp_path / "candidates" / "m@64" / SETTINGS_FILE).is_file()
    pin_settings(folder, {"normalize": {"enabled": True}, "k": 10}, "search")  # same settings, any order
    with pytest.raises(SettingsChanged, match=r"search shards .*\(normalize: \{'enabled': True\} -> \{'enabled': False\}"):
        pin_settings(folder, {"k": 10, "normalize": {"enabled": False}}, "search")
    with pytest.raises(SettingsChanged, match=r"beta: None -> 0.5.*delete"):
        pin_settings(folder, {"k": 10, "normalize": {"enabled": True}, "beta": 0.5}, "search")
