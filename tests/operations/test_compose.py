"""docker-compose.yml, validated and rendered by the `docker-compose` tool (`make test` installs it): it
starts on a CPU-only host (the GPU worker behind a profile), builds one image once, checks each kind of
service its own way, and takes its passwords from an env file, refusing to render without one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


def compose_config(tmp_path: Path, env: str | None) -> subprocess.CompletedProcess:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("the docker-compose tool is missing: `make test` installs it (apt-get install docker-compose)")
    env_file = tmp_path / "compose.env"
    env_file.write_text(env or "")
    # A project directory without a .env, so only the env file given here is read.
    return subprocess.run([tool, "--project-directory", str(tmp_path), "--env-file", str(env_file), "-f", str(COMPOSE),
                           "config"], capture_output=True, text=True, timeout=120)


def test_compose_file_renders_with_secrets_from_the_env_file(tmp_path):
    result = compose_config(tmp_path, "POSTGRES_PASSWORD=pg-9f2c\nREDIS_PASSWORD=rd-41aa\n")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]

    # One image, built once; every pluristeer service runs it and never pulls it.
    built = [name for name, s in services.items() if "build" in s]
    assert built == ["image"], built
    ours = [name for name, s in services.items() if s.get("image") == "pluristeer:latest" and name != "image"]
    assert set(ours) == {"migrate", "model-fetch", "api", "worker-cpu", "worker-gpu"}
    assert all(services[name]["pull_policy"] == "never" for name in ours)

    # A CPU-only host: only the GPU worker reserves a device, and only under the `gpu` profile.
    with_devices = [name for name, s in services.items() if "devices" in str(s.get("deploy", {}))]
    assert with_devices == ["worker-gpu"] and services["worker-gpu"]["profiles"] == ["gpu"]
    assert all("profiles" not in s for name, s in services.items() if name != "worker-gpu")

    # A healthcheck per kind: HTTP for the API, a Celery ping for workers, none for one-shot jobs.
    def check(name: str) -> str:
        return " ".join(services[name]["healthcheck"].get("test", []))

    assert "/healthz" in check("api")
    assert "control.ping" in check("worker-cpu") and check("worker-cpu") == check("worker-gpu")
    assert "pg_isready" in check("postgres") and "redis-cli" in check("redis")
    assert "worker@%h" in services["worker-cpu"]["command"]  # the node name the ping addresses
    assert all(services[name].get("restart") == "no" for name in ("image", "migrate", "model-fetch"))

    # Secrets from the env file, nowhere in the file itself.
    assert "pg-9f2c" in services["api"]["environment"]["DATABASE_URL"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg-9f2c"
    assert "rd-41aa" in " ".join(services["redis"]["command"])
    assert services["worker-cpu"]["environment"]["REDIS_URL"] == "redis://:rd-41aa@redis:6379/0"
    text = COMPOSE.read_text()
    assert "pluristeer:pluristeer@" not in text and "POSTGRES_PASSWORD: pluristeer" not in text


def test_compose_file_refuses_to_render_without_the_passwords(tmp_path):
    result = compose_config(tmp_path, None)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr or "REDIS_PASSWORD" in result.stderr, result.stderr
    assert "make .env first" in result.stderr, result.stderr
