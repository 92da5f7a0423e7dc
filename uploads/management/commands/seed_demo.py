"""`manage.py seed_demo`: the two demo log-ins of `make run`, created when missing.

The passwords are fixed and printed on purpose: they are for a local demo, never for a server.
An existing user is left as it is (its password too), so running this again changes nothing.
"""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

# username -> (password, is_superuser). "staff" is a member of staff who uploads images: an
# ordinary portal user. "admin" can also open /admin/.
DEMO_LOGINS = {
    "staff": ("staff-demo-pw", False),
    "admin": ("admin-demo-pw", True),
}


class Command(BaseCommand):
    help = "Create the demo users admin and staff (for `make run`) if they don't exist."

    def handle(self, *args, **options):
        User = get_user_model()
        for username, (password, is_superuser) in DEMO_LOGINS.items():
            if User.objects.filter(username=username).exists():
                self.stdout.write(f"{username}: exists, left as it is")
                continue
            email = f"{username}@example.com"
            if is_superuser:
                User.objects.create_superuser(username, email, password)
            else:
                User.objects.create_user(username, email, password)
            self.stdout.write(f"{username}: created with password {password}")
