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
