"""Tests of keyvault/console/."""
