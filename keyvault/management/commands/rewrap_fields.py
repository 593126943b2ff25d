"""``manage.py rewrap_fields [app.Model ...]`` — move encrypted field values to the primary KEK versions."""

from django.apps import apps
from django.core.management.base import CommandError

from keyvault.keys import services
from keyvault.keys.fields import encrypted_fields

from ._base import KeyvaultCommand


class Command(KeyvaultCommand):
    help = "Rewrap the DEKs of encrypted model fields after a KEK rotation (all models by default)."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("models", nargs="*", metavar="app_label.Model")
        parser.add_argument("--batch-size", type=int, default=500)

    def handle(self, *args, models, batch_size, **options):
        try:
            selected = [apps.get_model(label) for label in models] if models else apps.get_models()
        except (LookupError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        actor = self.actor(options)
        for model in selected:
            for field in encrypted_fields(model):
                count = services.rewrap_field_values(model, field.name, actor=actor, batch_size=batch_size)
                label = f"{model._meta.label_lower}.{field.name}"
                self.stdout.write(f"{label}: {count} rewrapped")
