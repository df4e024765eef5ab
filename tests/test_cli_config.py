"""``smtp-bridge check-config`` and ``smtp-bridge schema``, run as real processes (docs/cli.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smtp_bridge.config import DEFAULT_CONFIG_PATH

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m smtp_bridge ARGS`` with a scrubbed environment plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AOTSEND_", "SMTP_BRIDGE"))}
    return subprocess.run(
        [sys.executable, "-m", "smtp_bridge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr


def test_check_config_reports_every_mistake_with_file_line_and_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        smtp:
          listen: ["127.0.0.1:2525"]
          tiemout: 60s
        api:
          timeout: ten seconds
        routes:
          - name: otp
            match:
              subject: 're:code (\\d{6}'
            template_id: E_1002
        """,
    )
    result = run("check-config", "--config", str(path))
    assert result.returncode == 1
    assert_no_traceback(result)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    unknown, duration, regex = lines
    assert unknown.startswith(f"{path}:3: smtp.tiemout: unknown key")
    assert "did you mean timeout?" in unknown
    assert duration.startswith(f"{path}:5: api.timeout: expected a duration")
    assert "'ten seconds'" in duration
    assert regex.startswith(f"{path}:9: routes[0].match.subject[0]: invalid regular expression")


def test_check_config_reports_yaml_syntax_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "smtp:\n  listen: [127.0.0.1:2525\nroutes: []\n")
    result = run("check-config", "--config", str(path))
    assert result.returncode == 1
    assert_no_traceback(result)
    assert result.stderr.startswith(f"{path}:")
    assert "YAML syntax error" in result.stderr


def test_check_config_good_file_lists_the_routes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        api:
          app_key: ${AOTSEND_APP_KEY}
        routes:
          - name: password-reset
            match:
              rcpt: ["*@example.com"]
              subject: 're:reset your password'
            template_id: "E_1001"
          - name: block-noise
            match: {mail_from: "cron@*"}
            action: drop
          - template_id: "E_GENERIC"
        """,
    )
    result = run("check-config", "--config", str(path), env={"AOTSEND_APP_KEY": "k"})
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    assert result.stderr == ""
    first, *routes = result.stdout.splitlines()
    assert first.startswith("ok")
    assert str(path) in first
    assert len(routes) == 3
    reset, noise, default = routes
    assert "password-reset" in reset
    assert "rcpt=*@example.com" in reset and "subject=re:reset your password" in reset
    assert "E_1001" in reset
    assert "block-noise" in noise and "mail_from=cron@*" in noise and "drop" in noise
    assert "route-3" in default and "E_GENERIC" in default


def test_check_config_unset_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "api:\n  app_key: ${AOTSEND_APP_KEY}\nroutes: [{template_id: X}]\n")
    result = run("check-config", "--config", str(path))
    assert result.returncode == 1
    assert_no_traceback(result)
    assert result.stderr.strip() == (
        f"{path}:2: api.app_key: environment variable AOTSEND_APP_KEY is not set"
    )


def test_check_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    result = run("check-config", "--config", str(path))
    assert result.returncode == 1
    assert_no_traceback(result)
    assert result.stdout == ""
    assert str(path) in result.stderr
    assert "cannot read" in result.stderr and "No such file" in result.stderr


def test_check_config_on_the_example(tmp_path: Path) -> None:
    result = run("check-config", "--config", str(EXAMPLE), env={"AOTSEND_APP_KEY": "k"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
    names = [line.split(":")[0].strip() for line in result.stdout.splitlines()[1:]]
    assert names == [
        "password-reset",
        "otp",
        "per-app-template",
        "block-noise",
        "no-marketing",
        "default",
    ]


def test_check_config_on_the_example_without_the_key() -> None:
    result = run("check-config", "--config", str(EXAMPLE))
    assert result.returncode == 1
    assert_no_traceback(result)
    assert "api.app_key: environment variable AOTSEND_APP_KEY is not set" in result.stderr


def test_schema_prints_json() -> None:
    result = run("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert set(schema["properties"]) == {
        "smtp",
        "api",
        "delivery",
        "admin",
        "routes",
        "replies",
        "quotas",
    }
    assert schema["additionalProperties"] is False


@pytest.mark.skipif(DEFAULT_CONFIG_PATH.exists(), reason="a real config is installed here")
def test_check_config_defaults_to_the_etc_path() -> None:
    result = run("check-config")
    assert result.returncode == 1
    assert_no_traceback(result)
    assert result.stderr.startswith(f"{DEFAULT_CONFIG_PATH}: cannot read")


def test_check_config_without_a_path_argument_is_a_usage_error() -> None:
    result = run("check-config", "--config")
    assert result.returncode == 2
    assert_no_traceback(result)
    assert "--config" in result.stderr
