"""`manage.py rotate_token_key`: encrypt every stored cloud token anew with the first key.

To rotate: put a new key first in TOKEN_ENCRYPTION_KEY (keep the old ones after it), restart
web and worker, run this command, then remove the old keys. Tokens no key opens are counted and
their accounts named (never the tokens): their owners have to connect again.
"""

from django.core.management.base import BaseCommand

from uploads import crypto
from uploads.models import CloudAccount


class Command(BaseCommand):
    help = "Re-encrypt every stored cloud token with the first key of TOKEN_ENCRYPTION_KEY."

    def handle(self, *args, **options):
        rotated, changed, unreadable = 0, 0, []
        for pk, username, old in CloudAccount.objects.values_list("pk", "user__username", "token_encrypted"):
            new = crypto.rotate(old)
            if new is None:
                unreadable.append(username)
            # Guarded: an account reconnected meanwhile already has a token under the new key.
            elif CloudAccount.objects.filter(pk=pk, token_encrypted=old).update(token_encrypted=new):
                rotated += 1
            else:
                changed += 1
        self.stdout.write(f"Re-encrypted {rotated} token(s) with the first key.")
        if changed:
            self.stdout.write(f"{changed} token(s) changed while this ran (a reconnect) and were left as they are.")
        if unreadable:
            self.stderr.write(self.style.WARNING(
                f"{len(unreadable)} token(s) could not be opened with any key, left as they are; "
                f"these users have to connect their cloud account again: {', '.join(sorted(unreadable))}"
            ))
