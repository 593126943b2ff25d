"""Encrypted model fields: round trips, context binding, refused queries, rewrap after rotation."""

import pytest
from django.db import connection

from keyvault.keys import envelopes, services
from keyvault.exceptions import KeyNotUsable
from keyvault.keys.fields import EncryptedFieldLookupError, rewrap_field
from keyvault.kms import InvalidCiphertext
from keyvault.kms.envelope import read_header
from tests.fieldapp.models import Customer

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def kek(system_actor):
    envelopes.forget()
    return services.create_kek(name="default", actor=system_actor)


def raw(column, pk):
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM fieldapp_customer WHERE id = %s", [pk])
        return bytes(cursor.fetchone()[0])


def test_values_round_trip_and_are_stored_encrypted():
    customer = Customer.objects.create(
        name="Ada", national_id="AB-123-456", photo=b"\x89PNG...", profile={"tier": "gold", "tags": ["a"]}
    )

    loaded = Customer.objects.get(pk=customer.pk)

    assert loaded.national_id == "AB-123-456"
    assert loaded.photo == b"\x89PNG..."
    assert loaded.profile == {"tier": "gold", "tags": ["a"]}
    stored = raw("national_id", customer.pk)
    assert b"AB-123-456" not in stored and stored.startswith(b"KV")
    assert b"gold" not in raw("profile", customer.pk)


def test_null_stays_null():
    customer = Customer.objects.create(name="Bo", national_id="x", photo=None)

    assert Customer.objects.get(pk=customer.pk).photo is None
    assert Customer.objects.filter(photo__isnull=True).count() == 1


def test_value_copied_to_another_column_does_not_decrypt():
    customer = Customer.objects.create(name="Cy", national_id="secret-id", profile={})
    blob = raw("national_id", customer.pk)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE fieldapp_customer SET photo = %s WHERE id = %s", [blob, customer.pk])

    with pytest.raises(InvalidCiphertext):
        Customer.objects.only("photo").get(pk=customer.pk).photo  # noqa: B018


@pytest.mark.parametrize("lookup", ["national_id", "national_id__startswith", "profile__tier", "photo__exact"])
def test_querying_by_an_encrypted_field_is_refused(lookup):
    with pytest.raises(EncryptedFieldLookupError, match="encrypted"):
        Customer.objects.filter(**{lookup: "x"}).count()


def test_missing_kek_is_a_clear_error():
    from tests.fieldapp.models import Supplier

    with pytest.raises(KeyNotUsable, match="suppliers"):
        Supplier.objects.create(national_id="x")


def test_disabled_kek_refuses_reads_and_writes(kek, system_actor, django_capture_on_commit_callbacks):
    customer = Customer.objects.create(name="Di", national_id="x")
    Customer.objects.get(pk=customer.pk)  # warms the KEK lookup and the DEK cache
    with django_capture_on_commit_callbacks(execute=True):
        services.disable_kek(kek, actor=system_actor)

    with pytest.raises(KeyNotUsable):
        Customer.objects.get(pk=customer.pk)
    with pytest.raises(KeyNotUsable):
        Customer.objects.create(name="Ed", national_id="y")


def test_rewrap_after_rotation_keeps_data_ciphertext_and_is_idempotent(kek, system_actor):
    customers = [Customer.objects.create(name=f"c{i}", national_id=f"id-{i}", profile={"i": i}) for i in range(7)]
    before = {c.pk: raw("national_id", c.pk) for c in customers}
    services.rotate_kek_version(kek, actor=system_actor)

    assert rewrap_field(Customer, "national_id", batch_size=3) == 7
    assert rewrap_field(Customer, "national_id", batch_size=3) == 0

    for customer in customers:
        after = raw("national_id", customer.pk)
        assert read_header(after).kek_version == 2
        data_section = 12 + len(customer.national_id) + 16  # nonce, data ciphertext, tag
        assert after[-data_section:] == before[customer.pk][-data_section:]
        assert after[:-data_section] != before[customer.pk][:-data_section]
        assert Customer.objects.get(pk=customer.pk).national_id == customer.national_id
    assert read_header(raw("profile", customers[0].pk)).kek_version == 1  # other fields: their own run


def test_rewrap_fields_command(kek, system_actor):
    from django.core.management import call_command
    from io import StringIO

    Customer.objects.create(name="Fa", national_id="x", photo=b"y", profile={"z": 1})
    services.rotate_kek_version(kek, actor=system_actor)
    out = StringIO()

    call_command("rewrap_fields", "fieldapp.Customer", stdout=out)

    assert "fieldapp.customer.national_id: 1 rewrapped" in out.getvalue()
    assert "fieldapp.customer.profile: 1 rewrapped" in out.getvalue()
    assert read_header(raw("photo", Customer.objects.get().pk)).kek_version == 2
