"""An invoice store whose rows are encrypted under data keys Keyvault holds by id."""
