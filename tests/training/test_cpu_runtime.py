"""simpletuner's CPU runtime defaults: set before torch loads, never over the user's own choice."""

from __future__ import annotations

import subprocess
import sys

import pytest

from simpletuner.training.cpu_runtime import apply_cpu_runtime_defaults


def test_defaults_fill_in_what_the_user_left_unset():
    env: dict[str, str] = {"PATH": "/bin"}
    assert apply_cpu_runtime_defaults(env) == {"GOMP_SPINCOUNT": "100000"}
    assert env == {"PATH": "/bin", "GOMP_SPINCOUNT": "100000"}


@pytest.mark.parametrize("choice", [{"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}])
def test_the_users_own_waiting_choice_wins(choice: dict[str, str]):
    env = dict(choice)
    assert apply_cpu_runtime_defaults(env) == {}
    assert env == choice


def test_the_cli_sets_the_wait_policy_before_torch_is_imported():
    """The OpenMP runtime reads it when torch loads, so the CLI must set it before any import."""
    probe = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); os.environ.pop('GOMP_SPINCOUNT', None)\n"
             "from simpletuner.cli import main\n"
             "main(['options', '--json'])\n"
             "print('torch loaded by the CLI:', 'torch' in sys.modules, file=sys.stderr)\n"
             "print('spin', os.environ.get('GOMP_SPINCOUNT'), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch loaded by the CLI: False" in result.stderr
    assert "spin 100000" in result.stderr
