"""Tests of keyvault/ops/."""
