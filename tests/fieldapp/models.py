"""Models for the encrypted-field tests (tables made by the test runner; no migrations)."""

from django.db import models

from keyvault.keys.fields import EncryptedBinaryField, EncryptedJSONField, EncryptedTextField


class Customer(models.Model):
    name = models.CharField(max_length=100)
    national_id = EncryptedTextField()
    photo = EncryptedBinaryField(null=True, blank=True)
    profile = EncryptedJSONField(default=dict, blank=True)

    class Meta:
        app_label = "fieldapp"


class Supplier(models.Model):
    national_id = EncryptedTextField(kek="suppliers")

    class Meta:
        app_label = "fieldapp"
