"""Settings: FEDMQ_* environment, TOML files, precedence and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.protocol import TrainingConfig
from shared.config import AgentSettings, CommonSettings, OrchestratorSettings, load_settings


@pytest.fixture(autouse=True)
def clean_env(no_fedmq_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing of the developer's shell or working directory leaks into these tests."""
    monkeypatch.chdir(tmp_path)


def _toml(tmp_path: Path, text: str, name: str = "fedmq.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = OrchestratorSettings()
    assert (s.federation, s.broker_url, s.mqtt_version, s.rounds) == ("demo", "mqtt://127.0.0.1:1883", "5", 15)
    assert s.training == TrainingConfig() and s.training.local_steps == 100
    assert s.effective_quorum == s.min_sites == 2


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_FEDERATION", "from-env")
    monkeypatch.setenv("FEDMQ_BROKER_URL", "mqtts://broker.example:8883")
    monkeypatch.setenv("FEDMQ_MQTT_VERSION", "3.1.1")
    monkeypatch.setenv("FEDMQ_ROUNDS", "4")
    monkeypatch.setenv("FEDMQ_PASSWORD", "s3cret")
    monkeypatch.setenv("FEDMQ_STRATEGY", '{"name": "fedadam", "eta": 0.1}')
    s = OrchestratorSettings()
    assert (s.federation, s.broker_url, s.mqtt_version, s.rounds) == (
        "from-env", "mqtts://broker.example:8883", "3.1.1", 4)
    assert s.password is not None and s.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
    assert s.strategy == {"name": "fedadam", "eta": 0.1}


def test_env_value_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_ROUNDS", "many")
    with pytest.raises(ValidationError, match="rounds"):
        OrchestratorSettings()


def test_nested_env_merges_with_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _toml(tmp_path, "[training]\nlocal_steps = 7\nlearning_rate = 0.5\nbatch_size = 8\n")
    monkeypatch.setenv("FEDMQ_TRAINING__LEARNING_RATE", "0.02")
    s = load_settings(OrchestratorSettings, path)
    assert s.training.learning_rate == 0.02
    assert s.training.local_steps == 7 and s.training.batch_size == 8


def test_nested_env_overrides_one_field_of_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module docstring's own example: FEDMQ_TRAINING__LEARNING_RATE alone changes only the learning rate."""
    monkeypatch.setenv("FEDMQ_TRAINING__LEARNING_RATE", "0.01")
    s = OrchestratorSettings()
    assert s.training.learning_rate == 0.01
    assert s.training.local_steps == 100 and s.training.batch_size == TrainingConfig().batch_size  # rest kept


def test_nested_env_reaches_compression_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_TRAINING__COMPRESSION__ZSTD_LEVEL", "7")
    assert OrchestratorSettings().training.compression.zstd_level == 7


def test_toml_reaches_compression_settings(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[training.compression]\nzstd_level = 7\nmode = \"sparse\"\ntopk_fraction = 0.1\n")
    s = load_settings(OrchestratorSettings, path)
    assert s.training.compression.zstd_level == 7 and s.training.compression.mode == "sparse"
    assert s.training.local_steps == 100


def test_nested_env_value_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_TRAINING__LEARNING_RATE", "-1")
    with pytest.raises(ValidationError, match=r"training.learning_rate"):
        OrchestratorSettings()


def test_toml_can_choose_an_epoch_budget(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[training]\nlocal_epochs = 2\n")
    s = load_settings(OrchestratorSettings, path)
    assert s.training.local_epochs == 2 and s.training.local_steps is None


def test_env_can_choose_an_epoch_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_TRAINING__LOCAL_EPOCHS", "3")
    s = OrchestratorSettings()
    assert s.training.local_epochs == 3 and s.training.local_steps is None


def test_two_budgets_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_TRAINING__LOCAL_EPOCHS", "3")
    monkeypatch.setenv("FEDMQ_TRAINING__LOCAL_STEPS", "50")
    with pytest.raises(ValidationError, match="set only one of local_steps and local_epochs"):
        OrchestratorSettings()


def test_toml_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'federation = "from-toml"\nrounds = 3\nsample_count = 2\n'
                           'strategy = { name = "fedprox", mu = 0.01 }\n')
    s = load_settings(OrchestratorSettings, path)
    assert (s.federation, s.rounds, s.sample_count) == ("from-toml", 3, 2)
    assert s.strategy == {"name": "fedprox", "mu": 0.01}


def test_toml_via_fedmq_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _toml(tmp_path, 'federation = "via-env-file"\n')
    monkeypatch.setenv("FEDMQ_CONFIG", str(path))
    assert CommonSettings().federation == "via-env-file"
    assert load_settings(CommonSettings).federation == "via-env-file"


def test_explicit_config_file_beats_fedmq_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDMQ_CONFIG", str(_toml(tmp_path, 'federation = "env-file"\n', "a.toml")))
    explicit = _toml(tmp_path, 'federation = "flag-file"\n', "b.toml")
    assert load_settings(CommonSettings, explicit).federation == "flag-file"


def test_config_file_applies_only_to_its_own_load(tmp_path: Path) -> None:
    load_settings(CommonSettings, _toml(tmp_path, 'federation = "once"\n'))
    assert CommonSettings().federation == "demo"


def test_precedence_explicit_env_toml_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _toml(tmp_path, 'federation = "toml"\nrounds = 3\nmin_sites = 3\nbroker_url = "mqtt://toml:1"\n')
    monkeypatch.setenv("FEDMQ_ROUNDS", "5")
    monkeypatch.setenv("FEDMQ_MIN_SITES", "4")
    s = load_settings(OrchestratorSettings, path, rounds=9, broker_url=None)
    assert s.rounds == 9                         # explicit beats env and toml
    assert s.min_sites == 4                      # env beats toml
    assert s.federation == "toml"                # toml beats default
    assert s.broker_url == "mqtt://toml:1"       # an explicit None means "not given"
    assert s.max_attempts == 20                  # default


@pytest.mark.parametrize("bad", ["Demo", "a b", "-x", "x" * 64, "fed/1", "fed+"])
def test_invalid_federation_id(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("FEDMQ_FEDERATION", bad)
    with pytest.raises(ValidationError) as info:
        CommonSettings()
    assert f"federation id {bad!r} is not valid" in str(info.value)
    assert "a-z, 0-9" in str(info.value)


def test_invalid_site_id(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        AgentSettings(site_id="St. Mary's", data_train=tmp_path / "train.csv")
    assert "site id \"St. Mary's\" is not valid: use 1-63 characters of a-z" in str(info.value)
    ok = AgentSettings(site_id="st-marys_2", data_train=tmp_path / "train.csv")
    assert ok.site_id == "st-marys_2"


def test_agent_requires_site_and_data() -> None:
    with pytest.raises(ValidationError) as info:
        AgentSettings()
    text = str(info.value)
    assert "site_id" in text and "data_train" in text


def test_sample_fraction_and_count_exclusive() -> None:
    with pytest.raises(ValidationError, match="at most one of sample_fraction and sample_count"):
        OrchestratorSettings(sample_fraction=0.5, sample_count=2)
    assert OrchestratorSettings(sample_fraction=0.5).sample_fraction == 0.5
    assert OrchestratorSettings(sample_count=2).sample_count == 2


def test_unknown_setting_in_toml_is_refused(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'federaton = "typo"\n')
    with pytest.raises(ValidationError, match="federaton"):
        load_settings(CommonSettings, path)


def test_missing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(FileNotFoundError, match=r"config file .*nope.toml does not exist; fix --config / FEDMQ_CONFIG"):
        load_settings(CommonSettings, missing)
    monkeypatch.setenv("FEDMQ_CONFIG", str(missing))
    with pytest.raises(FileNotFoundError, match="nope.toml does not exist"):
        CommonSettings()
