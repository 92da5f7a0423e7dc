"""What an error report (Django's error e-mail, the DEBUG page, an error tracker fed by it) may
show: never a password or token. Django hides secret-looking *settings*; this hides POST fields
and local variables with secret-looking names too, in every frame, including uploads/ims.py's,
which knows nothing of Django and so cannot mark its own variables sensitive."""

from django.views.debug import SafeExceptionReporterFilter


class SecretsHidingFilter(SafeExceptionReporterFilter):
    def get_post_parameters(self, request):
        params = super().get_post_parameters(request)
        if request is None or not self.is_active(request):
            return params
        params = params.copy()
        for name in params:
            if self.hidden_settings.search(name):
                params[name] = self.cleansed_substitute
        return params

    def get_traceback_frame_variables(self, request, tb_frame):
        variables = super().get_traceback_frame_variables(request, tb_frame)
        if not self.is_active(request):
            return variables
        return [
            (name, self.cleansed_substitute if self.hidden_settings.search(name) else value)
            for name, value in variables
        ]
