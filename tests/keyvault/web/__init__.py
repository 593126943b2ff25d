"""Tests of keyvault/web/."""
