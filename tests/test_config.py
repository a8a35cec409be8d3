"""Config layering (file, then environment, then flags) and its validation at start (server/config.py)."""

from __future__ import annotations

import pytest

from server.config import ConfigError, load_config


def test_file_env_and_flags_layer_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-gemma3\nport: 9000\nmax_num_seqs: 4\n")
    env = {"DGSERVE_PORT": "9100", "DGSERVE_API_KEY": "k", "DGSERVE_PARALLEL": '{"block_size": 8}'}
    cfg = load_config(path, {"port": 9200, "dtype": None}, environ=env)
    assert cfg.port == 9200 and cfg.api_key == "k" and cfg.max_num_seqs == 4
    assert cfg.parallel == {"block_size": 8} and cfg.dtype == "float32"
    assert load_config(path, environ=env).port == 9100


def test_bad_config_fails_at_start(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: x\nmax_num_seqs: 0\n")
    with pytest.raises(ConfigError, match="max_num_seqs"):
        load_config(path, environ={})
    path.write_text("nonsense_key: 1\n")
    with pytest.raises(ConfigError, match="nonsense_key"):
        load_config(path, environ={})
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.yaml", environ={})


def test_shipped_configs_are_valid():
    for name in ("default", "tiny"):
        load_config(f"configs/{name}.yaml", environ={})


def test_a_bad_value_names_where_it_came_from(tmp_path):
    """Not pydantic's dump: one line per key, naming the variable, file or flag that set it."""
    path = tmp_path / "c.yaml"
    path.write_text("max_num_seqs: 0\nmax_nums_seqs: 3\n")
    with pytest.raises(ConfigError) as env:
        load_config(None, environ={"DGSERVE_PORT": "99999"})
    assert "environment variable DGSERVE_PORT" in str(env.value) and "99999" in str(env.value)
    assert "pydantic" not in str(env.value) and "validation error" not in str(env.value)
    with pytest.raises(ConfigError) as flag:
        load_config(path, {"port": 70000, "max_num_seqs": 2}, environ={})
    assert "flag --port" in str(flag.value) and "max_num_seqs:" not in str(flag.value)  # the flag's 2 won
    assert f"unknown key 'max_nums_seqs' in file {path}; did you mean 'max_num_seqs'?" in str(flag.value)
    with pytest.raises(ConfigError) as file:
        load_config(path, environ={"DGSERVE_DTYPE": "fp8"})
    text = str(file.value)
    assert f"max_num_seqs: Input should be greater than or equal to 1 (got 0 from file {path})" in text
    assert "dtype:" in text and "environment variable DGSERVE_DTYPE" in text
    with pytest.raises(ConfigError, match="DGSERVE_TEMPERATURE='\\{' is not valid YAML"):
        load_config(None, environ={"DGSERVE_TEMPERATURE": "{"})


def test_a_bad_api_key_value_is_not_echoed():
    with pytest.raises(ConfigError) as bad:
        load_config(None, {"api_key": ["s3cret-key"]}, environ={})
    assert "s3cret" not in str(bad.value) and "flag --api-key" in str(bad.value)


def test_cli_prints_the_variable_and_exits_2(monkeypatch, capsys):
    from server.cli import main

    monkeypatch.setenv("DGSERVE_MAX_NUM_SEQS", "many")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgserve: invalid config:") and "DGSERVE_MAX_NUM_SEQS" in err and "'many'" in err
