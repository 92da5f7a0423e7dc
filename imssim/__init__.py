"""Local IMS + IAM simulator for tests and local runs (stdlib only). See imssim.server."""
from imssim.server import (DEFAULT_DISK_FORMATS, DEMO_ACCOUNT, DEMO_DOMAIN, DEMO_PASSWORD,
                           DEMO_PROJECT_ID, DEMO_PROJECT_NAME, DEMO_USER, MAX_IMAGE_BYTES,
                           Account, Simulator)

__all__ = ["Account", "Simulator", "DEMO_ACCOUNT", "DEMO_DOMAIN", "DEMO_USER", "DEMO_PASSWORD",
           "DEMO_PROJECT_NAME", "DEMO_PROJECT_ID", "DEFAULT_DISK_FORMATS", "MAX_IMAGE_BYTES"]
