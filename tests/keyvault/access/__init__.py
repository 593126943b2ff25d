"""Tests of keyvault/access/."""
