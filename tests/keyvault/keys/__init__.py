"""Tests of keyvault/keys/."""
