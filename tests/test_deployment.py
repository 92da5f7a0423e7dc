"""The deployment files agree with the project: docker-compose.yml, .env.example, gunicorn.conf.py,
the Dockerfile and the Makefile. No Docker engine runs in CI, so the compose file is read, not run."""

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

ROOT = Path(__file__).resolve().parent.parent
PORTAL_SERVICES = ("web", "worker", "beat")
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
    assert {"web", "worker", "beat", "redis", "postgres"} <= set(compose()["services"])


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
        assert not unknown, f"{name} sets {unknown}, which portal/settings.py never reads"


def test_env_example_lists_exactly_the_variables_that_settings_read():
    listed = set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    assert listed == settings_variables()


def test_staging_volume_is_shared_by_web_and_worker():
    spec = compose()
    volume_of = {}
    for name in ("web", "worker"):
        service = spec["services"][name]
        staging = service["environment"]["STAGING_DIR"]
        mounts = (volume.split(":") for volume in service["volumes"])
        sources = [source for source, target, *_ in mounts if target == staging]
        assert sources, f"{name} mounts nothing at STAGING_DIR {staging}"
        volume_of[name] = sources[0]
    assert volume_of["web"] == volume_of["worker"]
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
    assert subcommand in {"worker", "beat"}
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


@pytest.mark.parametrize("name", [*PORTAL_SERVICES, "migrate"])
def test_each_command_runs_something_in_the_project(name):
    service = portal_services().get(name)
    if service is None and name == "migrate":
        pytest.skip("migrations run as part of another command")
    command = service["command"]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    program, rest = argv[0], argv[1:]
    checks = {"gunicorn": check_gunicorn, "celery": check_celery, "python": check_manage}
    assert program in checks, f"{name}: unexpected program {program}"
    checks[program](rest)


def test_gunicorn_config_uses_only_settings_gunicorn_knows():
    from gunicorn.config import KNOWN_SETTINGS

    names = {name for name in runpy.run_path(str(ROOT / "gunicorn.conf.py")) if not name.startswith("_")}
    names -= {"os"}
    assert names <= {setting.name for setting in KNOWN_SETTINGS}


def test_dockerfile_puts_uppy_where_settings_look_for_it():
    dockerfile = (ROOT / "Dockerfile").read_text()
    workdir = Path(re.findall(r"^WORKDIR\s+(\S+)", dockerfile, re.M)[-1])
    copied = re.search(r"^COPY --from=\S+ \S+ (\S+)", dockerfile, re.M).group(1)
    uppy = dict((prefix, path) for prefix, path in
                (entry for entry in settings.STATICFILES_DIRS if isinstance(entry, tuple)))["vendor/uppy"]
    assert workdir / copied == workdir / Path(uppy).relative_to(settings.BASE_DIR)


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
