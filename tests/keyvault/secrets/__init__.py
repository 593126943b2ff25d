"""Tests of the secret sources (keyvault/secrets) and keyvault.config.get_secret."""
