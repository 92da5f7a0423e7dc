"""The deployment files agree with the project: docker-compose.yml, deploy/nginx/, .env.example,
gunicorn.conf.py, the Dockerfile and the Makefile. No Docker engine runs in CI, so the compose file
is read, not run; its proxy's nginx config is checked by Debian's nginx (`nginx -t`)."""

import ast
import importlib
import os
import re
import runpy
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from django.conf import settings

from deploy.nginx import render

ROOT = Path(__file__).resolve().parent.parent
PORTAL_SERVICES = ("web", "ingest", "worker", "beat")
ONE_SHOTS = ("migrate", "static")
COMPOSE_ONLY_MARKER = "# ---- docker-compose.yml only"
ENVIRON_READS = {"os.environ.get", "os.getenv", "os.environ.setdefault"}


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def portal_services() -> dict[str, dict]:
    """The services that run the project's image (web, worker, beat and any one-shot step)."""
    services = compose()["services"]
    build = services["web"]["build"]
    return {name: service for name, service in services.items() if service.get("build") == build}


def _is_environ_read(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and ast.unparse(node.func) in ENVIRON_READS


def settings_variables() -> set[str]:
    """Names of the environment variables portal/settings.py reads, directly or through a helper
    of its own such as env_bool("DEBUG", False)."""
    tree = ast.parse((ROOT / "portal" / "settings.py").read_text())
    helpers = {
        node.name for node in tree.body
        if isinstance(node, ast.FunctionDef) and any(_is_environ_read(n) for n in ast.walk(node))
    }
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            if _is_environ_read(node) or ast.unparse(node.func) in helpers:
                names.add(node.args[0].value)
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            names.add(ast.literal_eval(node.slice))
        elif isinstance(node, ast.Compare) and ast.unparse(node.comparators[0]) == "os.environ":
            names.add(ast.literal_eval(node.left))
    return names


def test_settings_variables_are_found():
    assert {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "DEBUG", "ALLOWED_HOSTS"} <= settings_variables()


def test_compose_has_every_service():
    assert {"proxy", "web", "ingest", "worker", "beat", "migrate", "static", "flower", "redis", "postgres"} \
        <= set(compose()["services"])


def test_web_worker_and_beat_run_one_image_built_here():
    services = portal_services()
    assert set(PORTAL_SERVICES) <= set(services)
    for field in ("build", "image", "environment", "volumes"):
        values = [services[name].get(field) for name in PORTAL_SERVICES]
        assert all(value == values[0] for value in values), f"{field} differs: {values}"
    build = services["web"]["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).is_file()


def test_compose_sets_only_variables_that_settings_read():
    known = settings_variables()
    for name, service in portal_services().items():
        unknown = set(service.get("environment") or {}) - known
        if name == "flower":  # Flower reads its own options from FLOWER_* variables
            unknown = {variable for variable in unknown if not variable.startswith("FLOWER_")}
        assert not unknown, f"{name} sets {unknown}, which portal/settings.py never reads"


def compose_variables() -> set[str]:
    """The variables docker-compose.yml takes from the environment or .env (`${NAME...}`)."""
    text = (ROOT / "docker-compose.yml").read_text().replace("$$", "")
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))


def test_env_example_lists_exactly_the_variables_that_settings_read_then_those_only_compose_reads():
    portal, compose_only = (ROOT / ".env.example").read_text().split(COMPOSE_ONLY_MARKER)
    listed = [set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", part, re.M)) for part in (portal, compose_only)]
    assert listed[0] == settings_variables()
    assert listed[1] == compose_variables() - settings_variables()


def test_staging_volume_is_shared_by_web_and_worker():
    spec = compose()
    volume_of = {}
    for name in ("web", "ingest", "worker"):
        service = spec["services"][name]
        staging = service["environment"]["STAGING_DIR"]
        mounts = (volume.split(":") for volume in service["volumes"])
        sources = [source for source, target, *_ in mounts if target == staging]
        assert sources, f"{name} mounts nothing at STAGING_DIR {staging}"
        volume_of[name] = sources[0]
    assert volume_of["web"] == volume_of["ingest"] == volume_of["worker"]
    assert volume_of["web"] in spec["volumes"], "staging is not a named volume"


def options_and_arguments(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split `-x value`/`--long value`/`--long=value` options from positional arguments."""
    options, arguments, words = {}, [], iter(argv)
    for word in words:
        if word.startswith("-"):
            name, _, value = word.partition("=")
            options[name] = value or next(words)
        else:
            arguments.append(word)
    return options, arguments


def check_gunicorn(argv: list[str]) -> None:
    options, arguments = options_and_arguments(argv)
    config = options.get("-c") or options.get("--config")
    assert config and (ROOT / config).is_file(), f"gunicorn config {config} missing"
    module, attribute = arguments[-1].split(":")
    assert callable(getattr(importlib.import_module(module), attribute))


def check_celery(argv: list[str]) -> None:
    from celery.app.utils import find_app

    options, arguments = options_and_arguments(argv)
    app = find_app(options.get("-A") or options["--app"])
    subcommand = arguments[0]
    assert subcommand in {"worker", "beat", "flower"}
    if subcommand == "flower":  # in the image only (the Dockerfile installs it)
        assert re.search(r"^RUN pip install .*\bflower==", (ROOT / "Dockerfile").read_text(), re.M)
        return
    app.loader.import_default_modules()
    if subcommand == "worker":
        # A task routed to a queue no worker consumes would wait for ever.
        consumed = set((options.get("-Q") or options.get("--queues") or app.conf.task_default_queue).split(","))
        ours = [name for name in app.tasks if not name.startswith("celery.")]
        routed = {app.amqp.router.route({}, name)["queue"].name for name in ours}
        assert routed <= consumed, f"queues {routed - consumed} have no worker"
    else:
        for entry in app.conf.beat_schedule.values():
            assert entry["task"] in app.tasks


def check_manage(argv: list[str]) -> None:
    from django.core.management import get_commands

    assert argv[0] == "manage.py" and (ROOT / "manage.py").is_file()
    assert argv[1] in get_commands()


def command_argv(service: dict) -> list[str]:
    """The service's command; for `sh -c "checks; exec program ..."`, the program's."""
    command = service["command"]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] == ["sh", "-c"]:
        argv = shlex.split(argv[2].rsplit("exec ", 1)[1])
    return argv


@pytest.mark.parametrize("name", [*PORTAL_SERVICES, *ONE_SHOTS, "flower"])
def test_each_command_runs_something_in_the_project(name):
    argv = command_argv(portal_services()[name])
    program, rest = argv[0], argv[1:]
    checks = {"gunicorn": check_gunicorn, "celery": check_celery, "python": check_manage}
    assert program in checks, f"{name}: unexpected program {program}"
    checks[program](rest)


def test_gunicorn_config_uses_only_settings_gunicorn_knows():
    from gunicorn.config import KNOWN_SETTINGS

    names = {name for name in runpy.run_path(str(ROOT / "gunicorn.conf.py")) if not name.startswith("_")}
    names -= {"os"}
    assert names <= {setting.name for setting in KNOWN_SETTINGS}


def test_dockerfile_puts_uppy_and_its_language_packs_where_settings_look_for_them():
    dockerfile = (ROOT / "Dockerfile").read_text()
    workdir = Path(re.findall(r"^WORKDIR\s+(\S+)", dockerfile, re.M)[-1])
    copied = {workdir / target for target in re.findall(r"^COPY --from=\S+ \S+ (\S+)", dockerfile, re.M)}
    vendor = dict(entry for entry in settings.STATICFILES_DIRS if isinstance(entry, tuple))
    assert {"vendor/uppy", "vendor/uppy-locales"} <= set(vendor)
    for path in vendor.values():
        assert workdir / Path(path).relative_to(settings.BASE_DIR) in copied, path


def test_make_test_runs_the_pytest_command():
    makefile = (ROOT / "Makefile").read_text()
    pytest_command = re.search(r"^PYTEST\s*:?=\s*(.+)$", makefile, re.M).group(1).strip()
    pytest_command = pytest_command.replace("$(PY)", ".venv/bin/python")
    assert pytest_command == ".venv/bin/python -m pytest"
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    dry_run = subprocess.run(["make", "-n", "test"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
    assert dry_run.returncode == 0, dry_run.stderr
    assert pytest_command in dry_run.stdout


def test_the_readme_front_door_names_the_commands_ci_and_make_use():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make run" in quick_start and "make test" in quick_start
    assert ".venv/bin/python -m pytest" in quick_start
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M)


def test_the_readme_lists_every_setting_variable():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in settings_variables() if f"`{name}`" not in readme]
    assert missing == []


def test_the_readme_layout_map_names_only_what_exists():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    for line in layout.splitlines():
        first = line.split()[0] if line.strip() else ""
        if (first.endswith("/") or first.endswith(".py")) and not line.startswith("  "):
            assert (ROOT / first).exists(), first
        if line.startswith("  ") and (first.endswith(".py") or first.endswith("/")):
            assert (ROOT / "uploads" / first).exists(), first


# ---------------------------------------------------------------------------------------------
# The operator's set: proxy in front, restarts, limits, health checks, start order


def services() -> dict[str, dict]:
    return compose()["services"]


def interpolate(value: str) -> str:
    """A value as compose makes it with nothing set: `${NAME:-default}` is the default."""
    return re.sub(r"\$\{[A-Z][A-Z0-9_]*(?::?-([^}]*))?[^}]*\}", lambda match: match.group(1) or "", value)


def proxy_environment() -> dict[str, str]:
    return {name: interpolate(str(value)) for name, value in services()["proxy"]["environment"].items()}


def mounts(service: dict) -> dict[str, str]:
    """Where each volume (or file) is mounted: {target: source}."""
    return {target: source for source, target, *_ in (volume.split(":") for volume in service.get("volumes", []))}


def test_the_proxy_renders_the_repositorys_nginx_template_with_a_value_for_every_placeholder():
    proxy = services()["proxy"]
    environment = proxy_environment()
    [(target, source)] = [(t, s) for t, s in mounts(proxy).items() if t.startswith("/etc/nginx/templates/")]
    assert (ROOT / source).resolve() == render.TEMPLATE
    # The image renders templates/X.template into NGINX_ENVSUBST_OUTPUT_DIR/X: the main config.
    assert f"{environment['NGINX_ENVSUBST_OUTPUT_DIR']}/{Path(target).name.removesuffix('.template')}" \
        == "/etc/nginx/nginx.conf"
    missing = render.placeholders() - set(environment)
    assert not missing, f"the proxy leaves {missing} unfilled"


def gunicorn_port(service: dict) -> str:
    options, _ = options_and_arguments(command_argv(service)[1:])
    return (options.get("--bind") or options["-b"]).rsplit(":", 1)[1]


def test_the_proxy_sends_uploads_to_ingest_and_the_rest_to_web_where_they_listen():
    environment = proxy_environment()
    for pool, variable in (("web", "WEB_SERVERS"), ("ingest", "INGEST_SERVERS")):
        [address] = re.findall(r"server ([^;\s]+)", environment[variable])
        host, port = address.rsplit(":", 1)
        assert host == pool and port == gunicorn_port(services()[pool]), environment[variable]
    flower_options, _ = options_and_arguments(command_argv(services()["flower"])[4:])
    assert environment["FLOWER_ADDRESS"] == f"flower:{flower_options['--port']}"
    template = render.TEMPLATE.read_text()
    assert re.search(r"location /tus/ \{[^}]*proxy_pass http://ingest;[^}]*proxy_request_buffering off;", template)
    assert re.search(r"location / \{\s*proxy_pass http://web;", template)


def test_the_proxy_serves_the_static_files_that_the_static_step_collects():
    static_root = Path(re.findall(r"^WORKDIR\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)[-1]) \
        / Path(settings.STATIC_ROOT).relative_to(settings.BASE_DIR)
    collected_into = mounts(services()["static"])[str(static_root)]
    assert mounts(services()["proxy"])[proxy_environment()["STATIC_ROOT"]] == collected_into
    assert collected_into in compose()["volumes"]


def test_only_the_proxy_is_published():
    published = {name for name, service in services().items() if service.get("ports")}
    assert published == {"proxy"}
    ports = [interpolate(port) for port in services()["proxy"]["ports"]]
    environment = proxy_environment()
    assert ports == [f"{environment['HTTP_PORT']}:{environment['HTTP_PORT']}",
                     f"{environment['HTTPS_PORT']}:{environment['HTTPS_PORT']}"]


def test_every_service_restarts_has_resource_limits_and_starts_after_what_it_needs():
    for name, service in services().items():
        assert service.get("restart") == ("no" if name in ONE_SHOTS else "unless-stopped"), name
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert {"cpus", "memory"} <= set(limits), f"{name} has no CPU and memory limits"
        for needed, how in (service.get("depends_on") or {}).items():
            condition = how["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services()[needed], f"{name} waits for {needed}, which has no health check"
            elif condition == "service_completed_successfully":
                assert needed in ONE_SHOTS, f"{name} waits for {needed} to end, which never ends"
    for name in (*PORTAL_SERVICES, "flower"):
        assert set(services()[name]["depends_on"]) == {"postgres", "redis", "migrate"}, name
    assert set(services()["proxy"]["depends_on"]) == {"web", "ingest", "static"}


def test_postgres_and_redis_keep_their_data_on_volumes_and_say_when_they_are_healthy():
    for name, data in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        assert mounts(services()[name])[data] in compose()["volumes"]
        assert services()[name]["healthcheck"]["test"]


def test_workers_can_be_scaled_and_beat_runs_alone():
    for name in ("worker", "beat"):
        assert "container_name" not in services()[name] and "ports" not in services()[name]
    assert "replicas" not in services()["beat"].get("deploy", {})


def test_flower_is_optional_and_refuses_to_start_without_a_password():
    flower = services()["flower"]
    assert flower["profiles"] == ["flower"]
    check = flower["command"][2].replace("$$", "$").split("exec ", 1)[0] + "exit 0"
    refused = subprocess.run(["sh", "-c", check], env={"FLOWER_BASIC_AUTH": ""}, capture_output=True, text=True)
    assert refused.returncode == 1 and "set FLOWER_BASIC_AUTH" in refused.stderr
    allowed = subprocess.run(["sh", "-c", check], env={"FLOWER_BASIC_AUTH": "admin:pw"}, capture_output=True)
    assert allowed.returncode == 0


def test_the_nginx_template_names_what_it_lacks():
    with pytest.raises(KeyError, match="INGEST_SERVERS"):
        render.render({"WEB_SERVERS": "server 127.0.0.1:1;"})


@pytest.mark.nginx
def test_nginx_accepts_the_config_that_compose_renders(tmp_path):
    """`nginx -t` of the proxy's config as compose fills it in; the services' names resolve only
    inside compose's network, so they are loopback here, and the paths are temporary ones."""
    try:
        render.find_nginx()
    except render.NginxMissing as exc:
        pytest.skip(str(exc))
    certificate, key = render.make_certificate(tmp_path)
    environment = proxy_environment()
    for variable in ("WEB_SERVERS", "INGEST_SERVERS", "FLOWER_ADDRESS"):
        environment[variable] = re.sub(r"\b(web|ingest|flower):", "127.0.0.1:", environment[variable])
    environment.update(TLS_CERTIFICATE=str(certificate), TLS_CERTIFICATE_KEY=str(key), STATIC_ROOT=str(tmp_path))
    config = render.write_config(tmp_path / "nginx", {**environment, "NGINX_RUN_DIR": str(tmp_path / "nginx")})
    checked = subprocess.run(render.nginx_argv(config, test=True), capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


def test_workers_wait_for_the_broker_as_long_as_it_takes_through_the_portals_redis_transport():
    """Celery gives up after 100 attempts (about 50 minutes) and the worker ends; kombu's own
    Redis channel ended the worker when Redis went away mid-push (tests/test_faults.py)."""
    from portal.celery import RedisTransport, app

    assert app.conf.broker_connection_max_retries is None
    with app.connection_for_read() as connection:  # made, not connected
        assert isinstance(connection.transport, RedisTransport)
