"""Reload planning: which settings a reload applies live, which wait for a restart, and the
whole tree validated before anything changes; systemd's directories as the default paths."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from loraxd.config import Config, ConfigError, load
from loraxd.config.changes import Change, pending_restart, plan_reload
from loraxd.config.tree import default_paths, reloadable

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "loraxd" / "loraxd.toml"


def tree(**sections) -> Config:
    base = Config()
    return Config(**{f.name: dataclasses.replace(getattr(base, f.name), **sections.get(f.name, {}))
                     for f in dataclasses.fields(Config)})


def test_reloadable_settings_apply_and_the_others_wait():
    running = tree(scheduler={"max_batch_total_tokens": 32768})
    loaded = tree(scheduler={"max_input_length": 512, "max_batch_total_tokens": 65536},
                  adapters={"preloaded_adapter_ids": ("a",)}, model={"dtype": "bfloat16"})
    plan = plan_reload(running, loaded)
    assert plan.applied == (Change("scheduler.max_input_length", 1024, 512),
                            Change("adapters.preloaded_adapter_ids", (), ("a",)))
    assert plan.pending == (Change("model.dtype", "float32", "bfloat16"),
                            Change("scheduler.max_batch_total_tokens", 32768, 65536))
    assert plan.config.scheduler.max_input_length == 512
    assert plan.config.scheduler.max_batch_total_tokens == 32768
    assert plan.config.model.dtype == "float32"
    assert pending_restart(plan.config, loaded) == {"model.dtype": "bfloat16",
                                                     "scheduler.max_batch_total_tokens": 65536}


def test_nothing_changed_is_an_empty_plan():
    plan = plan_reload(tree(), tree())
    assert plan.applied == plan.pending == () and plan.config == tree()


def test_the_tree_to_run_with_is_validated_whole():
    for running in (tree(scheduler={"max_batch_total_tokens": 32768}),
                    tree(model={"device": "cpu"})):  # unset: 32768 on a CPU
        with pytest.raises(ConfigError, match=r"max_total_tokens = 40000: must be at most "
                                              r"max_batch_total_tokens, which is 32768.*restart"):
            plan_reload(running, tree(scheduler={"max_total_tokens": 40000,
                                                 "max_batch_total_tokens": 65536}))


def test_what_is_reloadable():
    live = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
            for f in dataclasses.fields(getattr(Config(), s.name)) if reloadable(s.name, f.name)}
    assert {"server.log_level", "server.drain_timeout_s", "scheduler.max_input_length",
            "scheduler.max_concurrent_requests", "adapters.preloaded_adapter_ids",
            "adapters.local_adapter_dirs", "adapters.adapter_fetch_timeout_s",
            "worker.ready_timeout_s"} <= live
    assert not live & {"model.model_id", "model.dtype", "server.port", "server.hostname",
                       "scheduler.max_batch_total_tokens", "scheduler.block_size",
                       "adapters.max_active_adapters", "paths.control_socket"}


def test_the_shipped_file_marks_exactly_the_reloadable_settings():
    text = SHIPPED.read_text()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), section.name)):
            block = re.search(rf"(?ms)((?:^#[^\n]*\n)+)^(?:# )?{f.name} = ", text).group(1)
            assert ("# A reload applies it." in block) == reloadable(section.name, f.name), f.name


def test_a_reload_reads_the_same_flags_and_environment(tmp_path):
    path = tmp_path / "loraxd.toml"
    path.write_text("[scheduler]\nmax_input_length = 100\n")
    argv, environ = ["--config", str(path), "--port", "4000"], {"LORAXD_MAX_BEST_OF": "3"}
    running, _ = load(argv, environ, euid=1000)
    path.write_text("[scheduler]\nmax_input_length = 200\n[server]\nport = 5000\n")
    loaded, _ = load(argv, environ, euid=1000)
    plan = plan_reload(running, loaded)
    assert plan.applied == (Change("scheduler.max_input_length", 100, 200),)
    assert plan.pending == ()  # the flag still wins over the file's port
    assert plan.config.scheduler.max_best_of == 3


def test_systemd_directories_are_the_default_paths():
    environ = {"RUNTIME_DIRECTORY": "/run/loraxd", "CACHE_DIRECTORY": "/var/cache/loraxd",
               "HOME": "/var/lib/loraxd"}
    assert default_paths(environ, 995) == ("/run/loraxd", "/var/cache/loraxd")
    assert default_paths({"RUNTIME_DIRECTORY": "/run/a:/run/b"}, 0)[0] == "/run/a"
    assert default_paths({"RUNTIME_DIRECTORY": "relative"}, 995)[0] == "/tmp/loraxd-995"
    config, _ = load(["--config", "/dev/null"], environ, euid=995)
    assert config.paths.control_socket == "/run/loraxd/control.sock"
