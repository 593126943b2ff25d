"""Example applications of Keyvault's application API (see README.md)."""
