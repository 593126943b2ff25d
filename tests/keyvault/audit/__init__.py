"""Tests of keyvault/audit/."""
