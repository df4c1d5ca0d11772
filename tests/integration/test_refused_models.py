"""A model loraxd cannot run exactly as transformers would stops the daemon at start:
exit 78 (EX_CONFIG, so systemd does not restart it) and one line naming the field."""
from __future__ import annotations

import shutil

import pytest

from tests.integration.daemon import Daemon
from tests.unit.test_model_arch import REFUSED, _edited

pytestmark = pytest.mark.integration

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_daemon_exits_78_naming_the_field(case, default_model_dir, tmp_path):
    family, edit, named = REFUSED[case]
    model_dir = _edited(tmp_path / "model", family, edit)
    for name in TOKENIZER_FILES:  # the supervisor reads the tokenizer before the workers
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, model_dir)
    daemon = Daemon(model_dir, tmp_path)
    try:
        assert daemon.proc.wait(120) == 78, daemon.log()
    finally:
        daemon.stop()
    errors = [line for line in daemon.log().splitlines() if "cannot start" in line]
    assert len(errors) == 1 and named in errors[0], daemon.log()
