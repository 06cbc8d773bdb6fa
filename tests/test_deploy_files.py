"""The files in deploy/ against the service they deploy: every AUTH_* variable they set is
a setting authsvc knows (and its value parses), every probe names a health service the
server reports, the Dockerfile's final stage runs `authsvc serve` unprivileged with no
compiler, and the pieces refer to each other consistently. Plus the container health
check, `python -m service.health_probe`, against a real server.

No image is built here: buildah (Debian) runs on this machine, but the base images come
from a container registry this machine cannot reach (docs/deploy.md says how to build).
"""

from __future__ import annotations

import asyncio
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpc_health.v1 import health_pb2

from service import health_probe
from service.server import (
    ADMIN_SERVICE_NAME,
    AUTH_SERVICE_NAME,
    REVOCATIONS_HEALTH_NAME,
    SHARED_SETTINGS_HEALTH_NAME,
)
from service.settings import Settings, declarations
from tests.live_server import LiveServer, ServerFactory
from tests.replica_processes import free_loopback_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
HEALTH_SERVICES = {
    "",
    AUTH_SERVICE_NAME,
    ADMIN_SERVICE_NAME,
    REVOCATIONS_HEALTH_NAME,
    SHARED_SETTINGS_HEALTH_NAME,
}
KNOWN_VARIABLES = {declaration.variable for _, declaration in declarations()}
COMPILERS = ("build-essential", "gcc", "g++", "clang", "make", "python3-dev", "libc6-dev")


def _manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def _manifest(kind: str) -> dict[str, Any]:
    found = [d for d in _manifests() if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def _container() -> dict[str, Any]:
    containers = _manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split into stages."""
    text = (DEPLOY / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    stages: list[list[str]] = []
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _dockerfile_env(stage: list[str]) -> dict[str, str]:
    values = {}
    for line in stage:
        if line.upper().startswith("ENV "):
            for word in shlex.split(line[4:]):
                name, _, value = word.partition("=")
                values[name] = value
    return values


def _set_variables() -> dict[str, dict[str, str]]:
    """Every AUTH_* variable each deploy file sets, with its value."""
    found: dict[str, dict[str, str]] = {}
    for entry in _container()["env"]:
        if "value" in entry:
            found.setdefault("kubernetes", {})[entry["name"]] = entry["value"]
        else:
            found.setdefault("kubernetes", {})[entry["name"]] = ""
    secret = _manifest("Secret")["stringData"]
    found["kubernetes secret"] = {k: v for k, v in secret.items() if k.startswith("AUTH_")}
    found["authsvc.env"] = _env_file(DEPLOY / "authsvc.env")
    found["secrets.env.example"] = _env_file(DEPLOY / "secrets.env.example")
    found["Dockerfile"] = _dockerfile_env(_dockerfile_stages()[-1])
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        found[f"compose {name}"] = {k: str(v) for k, v in environment.items()}
    return {
        where: {k: v for k, v in values.items() if k.startswith("AUTH_")}
        for where, values in found.items()
    }


def test_every_auth_variable_the_deploy_files_set_is_a_known_setting() -> None:
    variables = _set_variables()
    assert variables["kubernetes"], "the Deployment sets settings"
    unknown = {
        where: sorted(set(values) - KNOWN_VARIABLES)
        for where, values in variables.items()
        if set(values) - KNOWN_VARIABLES
    }
    assert unknown == {}


def test_the_settings_the_deploy_files_set_are_accepted_together(tmp_path: Path) -> None:
    """The values parse, and the combinations pass the start-up checks (e.g. the admin API
    must be guarded on a non-loopback address), with the secrets filled in."""
    tokens = tmp_path / "service-tokens"
    tokens.write_text((DEPLOY / "service-tokens.example").read_text())
    secrets = {
        "AUTH_KEK": "m4Rk9TzP2vQ7xW1cN8bY5hL0gD3fJ6sA9uE2iK7oV4s=",
        "AUTH_DATABASE_URL": "postgresql://authsvc:pw@db.example.test:5432/authsvc",
        "AUTH_SERVICE_TOKENS_FILE": str(tokens),
    }
    variables = _set_variables()
    dockerfile = variables["Dockerfile"]
    for where in ("kubernetes", "authsvc.env"):
        environment = {**dockerfile, **variables[where], **secrets}
        settings = Settings.from_env(environment)
        settings.check()
        assert settings.workers == 1, where
        assert settings.listen.endswith(":50051"), where


def test_probes_name_health_services_the_server_reports() -> None:
    container = _container()
    probes = {
        kind: container[kind]["grpc"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for kind, probe in probes.items():
        assert probe["service"] in HEALTH_SERVICES, kind
        assert probe["port"] == ports["grpc"], kind
    # Readiness follows draining (NOT_SERVING on SIGTERM): the AuthService name or "".
    assert probes["readinessProbe"]["service"] in {"", AUTH_SERVICE_NAME}
    # A replica deaf to revocations or with stale settings is alerted on, not restarted.
    assert probes["livenessProbe"]["service"] not in {
        REVOCATIONS_HEALTH_NAME,
        SHARED_SETTINGS_HEALTH_NAME,
    }


def test_termination_outlasts_the_drain_and_the_grace() -> None:
    pod = _manifest("Deployment")["spec"]["template"]["spec"]
    grace = float(_set_variables()["kubernetes"]["AUTH_SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] > grace
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    stop = compose["x-authsvc"]["stop_grace_period"]
    assert float(stop.removesuffix("s")) > float(
        _env_file(DEPLOY / "authsvc.env")["AUTH_SHUTDOWN_GRACE"]
    )


def test_the_deployment_its_budget_and_its_headless_service_select_the_same_pods() -> None:
    deployment = _manifest("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2
    budget = _manifest("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1
    service = _manifest("Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS record per pod
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"


def test_the_kek_and_the_database_url_come_from_the_secret() -> None:
    secret = _manifest("Secret")
    by_name = {entry["name"]: entry for entry in _container()["env"]}
    for name in ("AUTH_KEK", "AUTH_DATABASE_URL"):
        reference = by_name[name]["valueFrom"]["secretKeyRef"]
        assert reference == {"name": secret["metadata"]["name"], "key": name}
        assert secret["stringData"][name] == ""  # never a real secret in the repository


def test_resource_requests_are_set_and_a_memory_limit_bounds_each_pod() -> None:
    resources = _container()["resources"]
    assert resources["requests"]["cpu"] == "1"  # one worker per pod
    assert resources["requests"]["memory"].endswith("Mi")
    assert int(resources["limits"]["memory"].removesuffix("Mi")) > int(
        resources["requests"]["memory"].removesuffix("Mi")
    )


def test_the_image_runs_authsvc_serve_unprivileged_without_a_compiler() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "multi-stage"
    final = stages[-1]
    final_text = "\n".join(final)
    instructions = {line.split()[0].upper() for line in final}
    assert "COPY" in instructions
    assert any(line.startswith("COPY --from=build ") for line in final)
    (user,) = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert user.split(":")[0] not in {"0", "root"}
    for compiler in COMPILERS:
        assert not re.search(rf"\b{re.escape(compiler)}\b", final_text), compiler
    assert any(re.search(r"\bbuild-essential\b", line) for line in stages[0])
    entrypoint = [line for line in final if line.upper().startswith("ENTRYPOINT ")]
    command = [line for line in final if line.upper().startswith("CMD ")]
    assert entrypoint == ['ENTRYPOINT ["authsvc"]'] and command == ['CMD ["serve"]']
    (healthcheck,) = [line for line in final if line.upper().startswith("HEALTHCHECK ")]
    assert "service.health_probe" in healthcheck
    service = re.search(r'"--service", "([^"]*)"', healthcheck)
    assert service is not None and service.group(1) in HEALTH_SERVICES
    # The image's build context holds what the build copies.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for copied in ("pyproject.toml", "README.md", "service/"):
        assert f"!{copied}" in ignore


def test_compose_runs_postgres_two_replicas_and_nginx_from_the_shipped_files() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    replicas = sorted(name for name, s in services.items() if s.get("command") == ["serve"])
    assert replicas == ["authsvc-1", "authsvc-2"]
    # nginx's upstream names exactly the compose replicas, on the image's port.
    upstream = re.findall(
        r"^\s*server (\S+):(\d+) ", (DEPLOY / "nginx" / "authsvc.conf").read_text(), re.M
    )
    assert sorted(name for name, _ in upstream) == replicas
    assert {port for _, port in upstream} == {"50051"}
    assert "postgres-primary" in services and "postgres-standby" in services
    url = _env_file(DEPLOY / "secrets.env.example")["AUTH_DATABASE_URL"]
    assert "@postgres-primary:5432/" in url
    # Every file the compose file mounts or builds from is in deploy/.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                shipped = DEPLOY / source
                made_by_operator = shipped.name in {"service-tokens"}
                assert shipped.exists() or made_by_operator, source
    assert (DEPLOY / "nginx" / "Dockerfile").exists()
    assert "conf.d/authsvc.conf" in (DEPLOY / "nginx" / "Dockerfile").read_text()


async def test_the_container_health_check_tells_serving_from_not(server: LiveServer) -> None:
    def probe(*args: str) -> int:
        return health_probe.main([*args, "--timeout", "5"])

    assert await asyncio.to_thread(probe, server.address) == 0
    assert await asyncio.to_thread(probe, server.address, "--service", "") == 0
    await server.running.health.set(AUTH_SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await asyncio.to_thread(probe, server.address) == 1
    assert await asyncio.to_thread(probe, server.address, "--service", "no.such.Service") == 1
    unused = f"127.0.0.1:{free_loopback_port()}"
    assert await asyncio.to_thread(health_probe.main, [unused, "--timeout", "0.5"]) == 1


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("0.0.0.0:50051", "127.0.0.1:50051"),
        ("[::]:7000", "[::1]:7000"),
        ("[0:0:0:0:0:0:0:0]:7000", "[::1]:7000"),
        (None, "127.0.0.1:50051"),
        ("[::1]:50051", "[::1]:50051"),
        ("127.0.0.2:50051", "127.0.0.2:50051"),
        ("10.1.2.3:50051", "10.1.2.3:50051"),
        ("[2001:db8::5]:50051", "[2001:db8::5]:50051"),
        ("localhost:7000", "localhost:7000"),
        ("authsvc-1.example:7000", "authsvc-1.example:7000"),
    ],
)
def test_the_health_check_probes_the_listen_address_or_loopback_for_a_wildcard(
    listen: str | None, address: str
) -> None:
    environ = {} if listen is None else {"AUTH_LISTEN": listen}
    assert health_probe.default_address(environ) == address


async def test_the_health_check_reaches_a_server_listening_on_ipv6_loopback_only(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = await server_factory(listen="[::1]:0")
    monkeypatch.setenv("AUTH_LISTEN", f"[::1]:{live.running.port}")
    assert await asyncio.to_thread(health_probe.main, ["--timeout", "5"]) == 0


@pytest.mark.parametrize(
    "listen", ["::1:50051", "not an address", "127.0.0.1:0050051", "127.0.0.1:0"]
)
def test_the_health_check_names_auth_listen_when_it_is_bad(
    listen: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUTH_LISTEN", listen)
    with pytest.raises(SystemExit) as exit_info:
        health_probe.main([])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "AUTH_LISTEN" in error and "address:" not in error


@pytest.mark.parametrize(
    "argv", [["not an address"], ["127.0.0.1:1", "--timeout", "0"], ["[::1]:0"]]
)
def test_the_health_check_refuses_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        health_probe.main(argv)
    assert exit_info.value.code == 2
