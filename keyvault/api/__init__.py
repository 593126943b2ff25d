"""The application API (``/api/v1/``): clients, their tokens and scopes (:mod:`.services`), the HTTP views (:mod:`.views`)."""
