from django.apps import AppConfig


class UploadsConfig(AppConfig):
    name = "uploads"
    verbose_name = "Image uploads"

    def ready(self):
        from uploads import checks  # noqa: F401  (registers the deployment check)
