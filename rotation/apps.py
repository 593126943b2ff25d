from django.apps import AppConfig


class RotationConfig(AppConfig):
    """Rotation schedules, runs and runbooks."""

    name = "rotation"
    verbose_name = "Rotations"
    default_auto_field = "django.db.models.BigAutoField"
