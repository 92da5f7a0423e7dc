"""Django's makemessages, looking only where the portal's words are: without this, it would
also read the virtualenv, node_modules, the collected static files and the tests.

    .venv/bin/python manage.py makemessages -l de                  # templates and Python
    .venv/bin/python manage.py makemessages -l de -d djangojs      # static/js
"""

from django.core.management.commands import makemessages

# Folders with no words for people (or with other projects' words).
NOT_OURS = [
    ".venv", "venv", "node_modules", "staticfiles", "var", "tests", "bench", "imssim", "tools", "docs",
    "deploy", "test-results", ".git",
]


class Command(makemessages.Command):
    def handle(self, *args, **options):
        options["ignore_patterns"] = [*options.get("ignore_patterns", []), *NOT_OURS]
        # File names only: line numbers would change the catalogue with every edit of the code.
        options["add_location"] = options.get("add_location") or "file"
        options.setdefault("no_obsolete", True)
        return super().handle(*args, **options)
