"""What an error report in production (Django's error e-mail, an error tracker fed by it) may
show: never a password or token. Django hides secret-looking *settings*; this hides POST fields
and local variables with secret-looking names too, and secret-looking keys inside dictionaries
(the IAM request body), in every frame, including uploads/ims.py's, which knows nothing of Django
and so cannot mark its own variables sensitive. Like Django's own filter it is off while DEBUG
is on: never turn DEBUG on where real people sign in."""

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
        # cleanse_setting hides a secret-looking name, and secret-looking keys in nested dicts.
        return [(name, self.cleanse_setting(name, value)) for name, value in variables]
